"""Golden outputs of the released audio front ends, computed once outside avbalance.

Made by this script in its own virtual environment, never avbalance's:
    python 3.11.7, numpy 1.23.5, librosa 0.8.1, resampy 0.4.2, numba 0.57.1, scipy 1.11.4,
    soundfile 0.14.0, torch 2.13.0+cpu, and the fbank code of the torchaudio 0.8.1 wheel.
librosa 0.8.1 and resampy 0.4.2 are the versions OLM's requirements.txt pins
(anonymous-gitlab/OLM); the released CREMA-D loaders (OGM-GE dataset/CramedDataset.py, OLM
datasets/cremad_dataset.py) call librosa.load(wav, sr=22050), np.tile(x, 3)[:66150], clip to
[-1, 1], librosa.stft(n_fft=512, hop_length=353), log(|S| + 1e-7).

Kinetics-Sounds: OGM-GE data/KineticSound/process_audio.py runs torchaudio.load, waveform -
mean, torchaudio.compliance.kaldi.fbank(htk_compat=True, sample_frequency=16000,
use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10), zero-pad
to 1024 frames, (x - -4.503877) / (5.141276 * 2). torchaudio 0.8.1 (OLM pins 0.8.0) has no
wheel for Python 3.11 and a current torchaudio wheel is a CUDA build that does not load on a CPU
torch; so the script runs the 0.8.1 wheel's pure-Python compliance/kaldi.py and
_internal/fft.py unchanged on torch 2.13 (fbank uses nothing else of torchaudio). The WAV is read
with soundfile as float32 = int16 / 32768, which is what torchaudio.load returns for a 16-bit
WAV.

Rerun (about a minute; the outputs must not change):
    python3.11 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install librosa==0.8.1 resampy==0.4.2 "numpy<1.24" numba==0.57.1 \
        "scipy<1.12" "scikit-learn<1.4" soundfile torch
    /tmp/golden-venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.8 \
        --platform manylinux1_x86_64 torchaudio==0.8.1 -d /tmp/ta08
    /tmp/golden-venv/bin/python tests/data/golden/make_golden.py \
        /tmp/ta08/torchaudio-0.8.1-cp38-cp38-manylinux1_x86_64.whl
`--input` also rewrites input_16k.wav (deterministic: numpy's PCG64 seeded 27).
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
WAV = os.path.join(HERE, "input_16k.wav")
SR = 16000
# 1.05 s + 1 sample: over 1 s, so the released np.tile(x, 3) fills 3 s; 16801 * 22050 / 16000
# is not whole, so librosa 0.8.1 pads the resampled clip with one zero
N = 16801


def make_input() -> None:
    import soundfile

    t = np.arange(N) / SR
    rng = np.random.default_rng(27)
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)
         + 0.1 * np.sin(2 * np.pi * 7400 * t) + 0.05 * rng.standard_normal(N))
    x[:400] *= np.linspace(0.0, 1.0, 400)  # a soft start: the reflect pad mirrors real signal
    soundfile.write(WAV, np.round(x * 32767).astype(np.int16), SR, subtype="PCM_16")


def released_cremad() -> dict:
    import librosa
    import resampy

    samples, rate = librosa.load(WAV, sr=22050)
    resamples = np.tile(samples, 3)[:22050 * 3]
    resamples[resamples > 1.0] = 1.0
    resamples[resamples < -1.0] = -1.0
    spectrogram = librosa.stft(resamples, n_fft=512, hop_length=353)
    spectrogram = np.log(np.abs(spectrogram) + 1e-7)
    return {"cremad_spec_f16": spectrogram.astype(np.float16),
            "cremad_spec_edges": np.concatenate([spectrogram[:, :2], spectrogram[:, -2:]], 1),
            "cremad_wave_head": samples[:256], "cremad_wave_tail": samples[-256:],
            "cremad_wave_len": np.int64(samples.size),
            "versions": np.array([f"librosa {librosa.__version__}",
                                  f"resampy {resampy.__version__}", f"numpy {np.__version__}"])}


def kaldi_module(wheel: str):
    """torchaudio 0.8.1's compliance.kaldi, run from the wheel's own files."""
    root = tempfile.mkdtemp()
    with zipfile.ZipFile(wheel) as z:
        for name in ("torchaudio/compliance/kaldi.py", "torchaudio/_internal/fft.py"):
            z.extract(name, root)
    for pkg in ("torchaudio", "torchaudio/compliance", "torchaudio/_internal"):
        open(os.path.join(root, pkg, "__init__.py"), "a").close()
    sys.path.insert(0, root)
    importlib.import_module("torchaudio._internal.fft")
    return importlib.import_module("torchaudio.compliance.kaldi")


def released_ks(wheel: str) -> dict:
    import soundfile
    import torch

    kaldi = kaldi_module(wheel)
    data, sr = soundfile.read(WAV, dtype="float32", always_2d=True)
    waveform = torch.from_numpy(np.ascontiguousarray(data.T))
    waveform = waveform - waveform.mean()
    norm_mean, norm_std = -4.503877, 5.141276
    fbank = kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    n_frames = fbank.shape[0]
    fbank = torch.nn.ZeroPad2d((0, 0, 0, 1024 - n_frames))(fbank)
    fbank = (fbank - norm_mean) / (norm_std * 2)
    out = fbank.numpy()
    assert np.all(out[n_frames:] == out[n_frames])  # padding rows are all alike: keep two
    return {"ks_fbank": out[:n_frames + 2], "ks_frames": np.int64(n_frames),
            "ks_versions": np.array([f"torch {torch.__version__}", "torchaudio 0.8.1 kaldi.py"])}


def main() -> None:
    args = sys.argv[1:]
    if "--input" in args:
        args.remove("--input")
        make_input()
    if len(args) != 1:
        sys.exit(__doc__)
    np.savez_compressed(os.path.join(HERE, "cremad.npz"), **released_cremad())
    np.savez_compressed(os.path.join(HERE, "ks.npz"), **released_ks(args[0]))


if __name__ == "__main__":
    main()
