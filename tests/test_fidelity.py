"""Data-side fidelity to the released OGM-GE / OLM code (issue #14): Kaldi fbank for
Kinetics-Sounds, VGGSound tiling/clipping and test-time crop, the released eval resize and
per-frame train crop, and AVE as OLM runs it. References are computed independently:
kaldi-native-fbank, librosa, or small cases worked out by hand from the released code."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import librosa
import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from avprep import audio
from avprep.errors import UserError
from avprep.presets import get_preset
from avtrain.decode import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataOptions,
    decode_sample,
    pick_frames,
    transform_frames,
)
from avtrain.settings import make_config

SR = 16000


@pytest.fixture(scope="module")
def sine_noise():
    """1.3 s: two tones and a little noise, float32 in [-1, 1] like torchaudio.load gives."""
    t = np.arange(int(SR * 1.3)) / SR
    rng = np.random.default_rng(0)
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3150 * t)
    return (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# --- (11) Kinetics-Sounds: Kaldi fbank ---------------------------------------------------------


@pytest.mark.parametrize("bins", [64, 80])  # Kaldi refuses empty mel bins: 128 at 16 kHz has some
def test_kaldi_fbank_matches_kaldi_native_fbank(sine_noise, bins):
    knf = pytest.importorskip("kaldi_native_fbank")
    o = knf.FbankOptions()
    o.frame_opts.dither = 0.0
    o.frame_opts.window_type = "hanning"
    o.frame_opts.samp_freq = SR
    o.frame_opts.snip_edges = True
    o.mel_opts.num_bins = bins
    o.mel_opts.low_freq = 20.0
    o.mel_opts.high_freq = 0.0
    o.use_energy = False
    o.htk_compat = True
    fb = knf.OnlineFbank(o)
    fb.accept_waveform(SR, sine_noise.tolist())
    fb.input_finished()
    ref = np.array([fb.get_frame(i) for i in range(fb.num_frames_ready)]).T
    ours = audio.kaldi_fbank(sine_noise, SR, num_mel_bins=bins, window_type="hanning")
    assert ours.shape == ref.shape == (bins, 1 + (sine_noise.size - 400) // 160)
    np.testing.assert_allclose(ours, ref, atol=1e-3)  # knf computes in float32
    assert np.abs(ours - ref).mean() < 1e-4


def test_kaldi_mel_banks_by_hand():
    banks = audio.kaldi_mel_banks(3, 512, 16000.0, 20.0, 0.0)
    assert banks.shape == (3, 257) and not banks[:, -1].any()
    mel = lambda f: 1127.0 * np.log(1 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    centre1 = lo + 2 * (hi - lo) / 4  # bin 1's centre in mel
    k = int(np.argmax(banks[1]))
    f = 31.25 * np.arange(256)
    assert abs(mel(f[k]) - centre1) <= max(abs(mel(f[k + 1]) - mel(f[k])),
                                            abs(mel(f[k]) - mel(f[k - 1])))
    assert banks[0, 0] == 0.0  # 0 Hz lies below low_freq 20 Hz


def test_ks_preset_equals_the_released_golden():
    """process_audio.py run by torchaudio's own Kaldi fbank (tests/data/golden/make_golden.py,
    torchaudio 0.8.1's kaldi.py): waveform - mean, fbank(128 bins, hanning, no dither, no
    energy), zero-pad to 1024 frames, (x + 4.503877) / (5.141276 * 2). Our decode of the WAV
    and our fbank agree to 7e-5 (torch computes in float32)."""
    from avprep.media import decode_clip

    golden = np.load(Path(__file__).parent / "data" / "golden" / "ks.npz")
    n = int(golden["ks_frames"])
    preset = get_preset("ks")
    clip = decode_clip(None, audio=Path(__file__).parent / "data" / "golden" / "input_16k.wav",
                       frames=False, sample_rate=preset.sample_rate, mono_mix=preset.mono_mix)
    spec = preset.spectrogram_of(clip.audio)
    assert spec.shape == (128, 1024)
    fed = spec.T  # the model gets [1024, 128], as released
    np.testing.assert_allclose(fed[:n], golden["ks_fbank"][:n], atol=2e-4)
    assert np.abs(fed[:n] - golden["ks_fbank"][:n]).mean() < 1e-5
    np.testing.assert_allclose(fed[n:], np.broadcast_to(golden["ks_fbank"][n], (1024 - n, 128)),
                               atol=1e-6)  # the zero-padded frames, normalised
    long = np.tile(clip.audio, 12)  # 12.6 s: 1258 frames, cut to the first 1024
    np.testing.assert_allclose(preset.spectrogram_of(long)[:, :n], spec[:, :n], atol=1e-4)
    assert preset.audio_layout == "time_freq" and preset.frame_pick == "segment-start"


def test_ks_spectrogram_goes_to_the_model_time_by_freq():
    opts = DataOptions(modalities=("audio",), audio_layout="time_freq")
    spec = np.arange(128 * 1024, dtype=np.float32).reshape(128, 1024)
    out = decode_sample({"__key__": "k", "cls": b"3", "spec.npy": _npy(spec)}, opts, None)
    assert out["audio"].shape == (1, 1024, 128)
    np.testing.assert_array_equal(out["audio"][0].numpy(), spec.T)


def test_segment_start_frames_are_the_released_ks_frames():
    # dataset/dataset.py: seg = int(n / 3); files frame_0000{seg*i + 1}.jpg (1-based)
    for n in (3, 10, 11, 30):
        seg = n // 3
        released = [seg * i + 1 for i in range(3)]
        assert pick_frames(n, 3, None, "segment-start") == [t - 1 for t in released]
        rng = np.random.default_rng(0)
        assert pick_frames(n, 3, rng, "segment-start") == [t - 1 for t in released]


# --- (10) VGGSound: tile + clip, random test-time crop -----------------------------------------


def _released_vggsound_wave(sample: np.ndarray, rate: int = SR) -> np.ndarray:
    """VGGSoundDataset.__getitem__ before the crop: double the clip until it lasts 10 s."""
    while len(sample) / rate < 10.0:
        sample = np.tile(sample, 2)
    return sample


@pytest.mark.parametrize("seconds", [0.7, 3.0, 4.9, 7.0])
def test_vggsound_tiles_like_the_released_loader(seconds):
    preset = get_preset("vggsound")
    wave = np.linspace(-1.5, 1.5, int(seconds * SR), dtype=np.float32)
    ours = preset.prepare_waveform(wave)
    released = _released_vggsound_wave(wave)
    # every 5 s window the released loader can take (start <= 5 s) lies in the first 10 s
    np.testing.assert_array_equal(ours, np.clip(released[:10 * SR], -1.0, 1.0))
    assert ours.max() == 1.0 and ours.min() == -1.0


def test_stft_reflect_padding_matches_librosa(sine_noise):
    ours = audio.stft_log(sine_noise, n_fft=256, hop=128, pad_mode="reflect")
    theirs = np.log(np.abs(librosa.stft(sine_noise, n_fft=256, hop_length=128,
                                        pad_mode="reflect")) + 1e-7)
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_vggsound_window_equals_the_released_crop_inside():
    """A stored-column window starting at column c is the released STFT of the 5 s crop that
    starts at sample 128·c, except its first and last column (the crop's own padding)."""
    preset = get_preset("vggsound")
    rng = np.random.default_rng(3)
    wave = preset.prepare_waveform(rng.uniform(-1, 1, 10 * SR).astype(np.float32))
    full = preset.spectrogram_of(wave)
    c = 137
    crop = wave[128 * c:128 * c + 5 * SR]
    released = np.log(np.abs(librosa.stft(crop, n_fft=256, hop_length=128)) + 1e-7)
    assert released.shape == (129, 626)
    np.testing.assert_allclose(full[:, c + 1:c + 625], released[:, 1:-1], atol=2e-3)


def _spec_sample(key: str) -> dict:
    spec = np.tile(np.arange(1251, dtype=np.float32), (4, 1))
    return {"__key__": key, "cls": b"0", "spec.npy": _npy(spec)}


def test_eval_crop_centre_and_seeded_random():
    centre = DataOptions(modalities=("audio",), crop_columns=626)
    out = decode_sample(_spec_sample("a"), centre, None)["audio"]
    assert out.shape == (1, 4, 626) and out[0, 0, 0] == (1251 - 626) // 2
    rand = DataOptions(modalities=("audio",), crop_columns=626, eval_crop="random", eval_seed=5)
    starts = {k: int(decode_sample(_spec_sample(k), rand, None)["audio"][0, 0, 0])
              for k in (f"clip{i}" for i in range(40))}
    again = {k: int(decode_sample(_spec_sample(k), rand, None)["audio"][0, 0, 0]) for k in starts}
    assert starts == again  # the same windows in every eval of a run
    assert len(set(starts.values())) > 20 and all(0 <= s <= 625 for s in starts.values())
    other = DataOptions(modalities=("audio",), crop_columns=626, eval_crop="random", eval_seed=6)
    assert starts != {k: int(decode_sample(_spec_sample(k), other, None)["audio"][0, 0, 0])
                      for k in starts}


# --- (7) eval resize and per-frame train crop --------------------------------------------------


def _normalised(img: torch.Tensor) -> torch.Tensor:
    x = img.float().div(255.0)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def test_eval_resize_square_ignores_the_aspect():
    img = torch.zeros(3, 20, 40, dtype=torch.uint8)
    img[:, :, :10] = 255  # the left quarter white: a centre crop would cut it away
    square = transform_frames([img], 16, None, "square")[0]
    np.testing.assert_allclose(square.numpy(),
                               _normalised(TF.resize(img, [16, 16], antialias=True)).numpy(),
                               atol=1e-6)
    assert square[0, 8, 0] > 2.0  # white survives at the left edge
    cropped = transform_frames([img], 16, None, "crop")[0]
    assert cropped[0, 8, 0] < 0  # the default centre crop starts inside the black part


def test_train_crop_per_frame_gives_each_frame_its_own_crop():
    img = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 64, 64).remainder(251)
    img = img.to(torch.uint8)
    rng = np.random.default_rng(0)
    draws = np.stack([rng.random(41) for _ in range(3)])
    per_frame = transform_frames([img] * 3, 16, draws)
    assert not torch.equal(per_frame[0], per_frame[1])
    shared = transform_frames([img] * 3, 16, draws[0])
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], per_frame[0])


@pytest.mark.slow
def test_new_fit_settings_and_their_errors():
    c = make_config({"eval_crop": "random", "eval_resize": "square", "train_crop": "frame"})
    assert (c.eval_crop, c.eval_resize, c.train_crop) == ("random", "square", "frame")
    d = make_config({})
    assert (d.eval_crop, d.eval_resize, d.train_crop) == ("centre", "crop", "clip")
    with pytest.raises(UserError, match="--eval-crop must be one of centre, random"):
        make_config({"eval_crop": "middle"})
    avtrain = Path(sys.executable).parent / "avtrain"
    if avtrain.exists():
        r = subprocess.run([str(avtrain), "fit", "--print-config", "--eval-resize", "stretch"],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error:") and "--eval-resize" in lines[0]


# --- (12) AVE as OLM runs it ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ave_olm_root(tmp_path_factory):
    from mediagen import make_video

    d = tmp_path_factory.mktemp("ave_olm")
    clip = make_video(d / "src.mp4", seconds=4.0, size=(96, 72), fps=10, tone=523.0,
                      audio_rate=44100)
    root = d / "AVE_Dataset"
    for vid in ("vidA", "vidB", "vidC"):
        (root / "AVE").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(clip, root / "AVE" / f"{vid}.mp4")
    head = "Category&VideoID&Quality&StartTime&EndTime\n"
    (root / "trainSet.txt").write_text(head + "Church bell&vidA&good&0&4\n"
                                       "Bark&vidA&good&5&10\n"  # same video: the last line wins
                                       "Banjo&vidB&good&1&9\n")
    (root / "valSet.txt").write_text(head + "Goat&vidC&good&0&10\n")
    (root / "testSet.txt").write_text(head + "Cat&vidC&good&0&10\n")  # again: kept in val
    return root


def test_ave_olm_one_record_per_video(ave_olm_root):
    from avprep.datasets import scan_dataset

    scan = scan_dataset("ave_olm", ave_olm_root)
    recs = {r.key: r for r in scan.records}
    assert set(recs) == {"vidA", "vidB", "vidC"}
    assert recs["vidA"].label == "Bark" and recs["vidA"].extra["events"] == 2
    assert recs["vidA"].start is None and recs["vidA"].end is None
    assert (recs["vidA"].split, recs["vidB"].split, recs["vidC"].split) == ("train", "train",
                                                                              "val")
    assert any("last line" in n for n in scan.notes) and any("another split" in n
                                                              for n in scan.notes)


def test_ave_olm_build_shards_end_to_end(ave_olm_root, tmp_path):
    from avprep.media import decode_clip
    from avprep.shards import build_shards, load_source

    loaded, preset = load_source(dataset="ave_olm", root=str(ave_olm_root))
    assert preset.name == "ave-olm"
    build_shards(loaded.records, str(tmp_path / "out"), preset, classes=loaded.classes,
                 dataset=loaded.dataset, workers=1, splits=["train"])
    members = {}
    for tar in (tmp_path / "out").glob("train-*.tar"):
        with tarfile.open(tar) as t:
            members.update({m.name: t.extractfile(m).read() for m in t.getmembers()})
    spec = np.load(io.BytesIO(members["vidA.spec.npy"]), allow_pickle=False)
    assert spec.shape == (257, 188)
    assert sum(1 for n in members if n.startswith("vidA.f")) == 4  # 1 fps over the 4 s video
    # OLM: ffmpeg -acodec pcm_s16le -ar 16000 -ac 1 WAV, librosa 0.8.1 load(sr=22050) (resampy
    # kaiser_best, padded to ceil(n * ratio)), tile 3 -> first 3 s, clip, STFT 512/353 reflect
    import resampy

    wav = decode_clip(str(ave_olm_root / "AVE" / "vidA.mp4"), sample_rate=16000,
                      frames=False, mono_mix="s16").audio
    y = resampy.resample(wav, 16000, 22050, filter="kaiser_best")
    y = np.pad(y, (0, int(np.ceil(wav.size * 22050 / 16000)) - y.size))
    y = np.clip(np.tile(y, 3)[:22050 * 3], -1.0, 1.0)
    ref = np.log(np.abs(librosa.stft(y, n_fft=512, hop_length=353, pad_mode="reflect")) + 1e-7)
    loud = ref > -5  # float16 storage: compare where the tone is, to its precision
    np.testing.assert_allclose(spec[loud], ref[loud], atol=2e-2)
    np.testing.assert_allclose(spec, ref, atol=0.1)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
