"""The audio the released loaders make, sample for sample (issue #27 items 2, 3, 5, 9).

- CREMA-D: librosa 0.8.1's load(wav, sr=22050) resamples with resampy's kaiser_best and pads
  to ceil(n * ratio) with zeros; its stft(center=True) pads by reflection.
- Stereo sources: the released scripts write a 16-bit mono WAV with `ffmpeg -ac 1`, whose
  downmix has the gain of an integer output ((L + R) / 2), not the float one ((L + R) / sqrt 2).
- Golden values: tests/data/golden/make_golden.py ran the released code (librosa 0.8.1, resampy
  0.4.2, torchaudio 0.8.1's Kaldi fbank) in a separate environment on input_16k.wav.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
from mediagen import ffmpeg, make_cremad_flv, make_rich_wav, make_stereo_video

from avprep.errors import UserError
from avprep.manifest import Record
from avprep.media import decode_clip
from avprep.presets import PRESETS, Preset, get_preset
from avprep.shards import convert_sample

GOLDEN = Path(__file__).parent / "data" / "golden"
S16_PRESETS = ["cremad", "vggsound", "ks", "ave", "ave-olm"]


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    d = tmp_path_factory.mktemp("rich")
    return {"wav": make_rich_wav(d / "1001_DFA_ANG_XX.wav", seconds=1.3),
            "flv": make_cremad_flv(d / "1001_DFA_ANG_XX.flv", seconds=1.3),
            "stereo": make_stereo_video(d / "stereo.mp4", seconds=2.0)}


def _ours(preset: Preset, path, **kw) -> np.ndarray:
    """The waveform build-shards computes the spectrogram on (before the length fit)."""
    rate = preset.decode_rate or preset.sample_rate
    video, audio = (None, path) if str(path).endswith(".wav") else (path, None)
    clip = decode_clip(video, audio=audio, frames=False, sample_rate=rate,
                       mono_mix=preset.mono_mix, **kw)
    return preset.resample_decoded(clip.audio)


def _librosa_081_load(path, sr: int = 22050) -> np.ndarray:
    """librosa 0.8.1 load(path, sr) of a mono 16-bit WAV: soundfile float32, then resample():
    resampy kaiser_best, fix_length to ceil(n * sr / native) with zeros."""
    import resampy

    y, native = soundfile.read(path, dtype="float32")
    out = resampy.resample(y, native, sr, filter="kaiser_best")
    n = int(math.ceil(y.size * sr / native))
    return np.pad(out, (0, max(0, n - out.size)))[:n]


def _released_cremad(y: np.ndarray) -> np.ndarray:
    """CramedDataset.__getitem__ after the load: tile 3, first 3 s, clip, STFT (reflect), log."""
    y = np.clip(np.tile(y, 3)[:22050 * 3], -1.0, 1.0)
    return np.log(np.abs(librosa.stft(y, n_fft=512, hop_length=353, pad_mode="reflect")) + 1e-7)


def _spec_member(members: dict) -> np.ndarray:
    return np.load(io.BytesIO(members["spec.npy"]), allow_pickle=False).astype(np.float32)


# --- item 2: CREMA-D resampling -------------------------------------------------------------


def test_cremad_resamples_with_resampy_kaiser_best(rich):
    preset = get_preset("cremad")
    assert (preset.decode_rate, preset.resampler) == (16000, "kaiser_best")
    ours = _ours(preset, rich["wav"])
    ref = _librosa_081_load(rich["wav"])
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)  # the same filter, in float32


def test_resampled_length_is_librosa_081s(tmp_path):
    """librosa 0.8.1 pads resampy's floor(n * ratio) samples to ceil(n * ratio) with a zero."""
    wav = tmp_path / "odd.wav"
    soundfile.write(wav, (np.sin(np.arange(16001) * 0.3) * 9000).astype(np.int16), 16000,
                    subtype="PCM_16")
    ours = _ours(get_preset("cremad"), wav)
    assert ours.size == math.ceil(16001 * 22050 / 16000) == 22052 and ours[-1] == 0.0
    np.testing.assert_allclose(ours, _librosa_081_load(wav), atol=1e-6)


# --- item 5: CREMA-D STFT edges ---------------------------------------------------------------


def test_cremad_stft_edges_are_reflect_padded(rich):
    preset = get_preset("cremad")
    assert preset.spectrogram["pad_mode"] == "reflect"
    y = _librosa_081_load(rich["wav"])
    ours = preset.spectrogram_of(y)
    ref = _released_cremad(y)
    assert ours.shape == ref.shape == (257, 188)
    edges = [0, 1, -2, -1]
    np.testing.assert_allclose(ours[:, edges], ref[:, edges], atol=2e-3)
    np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_cremad_shard_sample_is_the_released_loaders(rich):
    """A CREMA-D record (FLV video + 16 kHz WAV) through build-shards' own conversion."""
    record = Record(key="1001_DFA_ANG_XX", label="ANG", label_id=0, split="train",
                    video=str(rich["flv"]), audio=str(rich["wav"]))
    spec = _spec_member(convert_sample(record, get_preset("cremad")))
    ref = _released_cremad(_librosa_081_load(rich["wav"]))
    # stored as float16: 2^-8 relative, 0.008 at |x| < 16
    np.testing.assert_allclose(spec, ref, atol=0.02)
    assert np.abs(spec - ref).mean() < 3e-3


# --- item 3: the 16-bit mono WAV's downmix ----------------------------------------------------


def _ffmpeg_mono_wav(src, out, rate: int) -> np.ndarray:
    """What the released scripts run: ffmpeg -i SRC -acodec pcm_s16le -ar RATE -ac 1 OUT."""
    ffmpeg("-i", str(src), "-acodec", "pcm_s16le", "-ar", str(rate), "-ac", "1", str(out))
    data, got = soundfile.read(out, dtype="float32")
    assert got == rate
    return data


@pytest.mark.parametrize("name", S16_PRESETS)
def test_stereo_decodes_as_the_16bit_mono_wav(rich, tmp_path, name):
    preset = get_preset(name)
    assert preset.mono_mix == "s16"
    rate = preset.decode_rate or preset.sample_rate
    wav = _ffmpeg_mono_wav(rich["stereo"], tmp_path / "mono.wav", rate)
    ours = decode_clip(rich["stereo"], frames=False, sample_rate=rate,
                       mono_mix=preset.mono_mix).audio
    np.testing.assert_array_equal(ours, wav)  # bit for bit: the same ffmpeg conversion
    floats = decode_clip(rich["stereo"], frames=False, sample_rate=rate, mono_mix="float").audio
    gain = float(np.dot(floats, wav) / np.dot(wav, wav))
    assert abs(gain - math.sqrt(2)) < 1e-3  # the float mix: 3 dB louder


def test_extract_audio_writes_the_released_wav(rich, tmp_path):
    from avprep.frames import extract_audio

    record = Record(key="st", label="x", label_id=0, split="train", video=str(rich["stereo"]))
    extract_audio([record], tmp_path / "wavs", sample_rate=16000, workers=1)
    ours, rate = soundfile.read(tmp_path / "wavs" / "st.wav", dtype="int16")
    ffmpeg("-i", str(rich["stereo"]), "-acodec", "pcm_s16le", "-ar", "16000", "-ac", "1",
           str(tmp_path / "released.wav"))
    released, _ = soundfile.read(tmp_path / "released.wav", dtype="int16")
    assert rate == 16000
    np.testing.assert_array_equal(ours, released)


@pytest.mark.parametrize("name", ["ave-olm", "vggsound"])
def test_stereo_spectrogram_has_no_offset(rich, tmp_path, name):
    """build-shards' spectrogram of a stereo clip equals the one of the released WAV."""
    preset = get_preset(name)
    rate = preset.decode_rate or preset.sample_rate
    wav = _ffmpeg_mono_wav(rich["stereo"], tmp_path / "mono.wav", rate)
    record = Record(key="st", label="x", label_id=0, split="train", video=str(rich["stereo"]))
    spec = _spec_member(convert_sample(record, preset))
    ref = preset.spectrogram_of(preset.resample_decoded(wav))
    loud = ref > -5
    offset = float(np.mean(spec[loud] - ref[loud]))
    assert abs(offset) < 5e-3, offset  # the float mix: ln sqrt 2 = 0.347
    np.testing.assert_allclose(spec[loud], ref[loud], atol=0.02)


# --- item 9: golden values of the released code -----------------------------------------------


def test_cremad_preset_equals_the_released_golden():
    golden = np.load(GOLDEN / "cremad.npz")
    preset = get_preset("cremad")
    wave = _ours(preset, GOLDEN / "input_16k.wav")
    assert wave.size == int(golden["cremad_wave_len"])
    np.testing.assert_allclose(wave[:256], golden["cremad_wave_head"], atol=1e-6)
    np.testing.assert_allclose(wave[-256:], golden["cremad_wave_tail"], atol=1e-6)
    spec = preset.spectrogram_of(wave)
    # measured: edge columns within 1e-6 (librosa's complex64 STFT vs our float64 one); the full
    # golden is stored as float16, whose rounding (<= 0.0039 below |16|) is all that remains
    edges = golden["cremad_spec_edges"]
    np.testing.assert_allclose(spec[:, [0, 1, -2, -1]], edges, atol=1e-5)
    full = golden["cremad_spec_f16"].astype(np.float32)
    np.testing.assert_allclose(spec, full, atol=4e-3)
    assert np.abs(spec - full).mean() < 1e-3


# --- old shard sets -----------------------------------------------------------------------------


def test_old_index_presets_read_back_as_built():
    """index.json written before these fields: ffmpeg resampling, float mix, zero padding;
    ave-olm then resampled with soxr HQ."""
    old = get_preset("cremad").to_dict()
    for key in ("resampler", "mono_mix", "decode_rate"):
        old.pop(key)
    old["spectrogram"] = {"recipe": "stft_log", "n_fft": 512, "hop": 353}
    back = Preset.from_dict(old)
    assert (back.resampler, back.mono_mix, back.decode_rate) == ("ffmpeg", "float", None)
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 22050 * 3).astype(np.float32)
    np.testing.assert_array_equal(back.resample_decoded(wave), wave)
    zero_pad = np.log(np.abs(librosa.stft(wave, n_fft=512, hop_length=353,
                                          pad_mode="constant")) + 1e-7)
    np.testing.assert_allclose(back.spectrogram_of(wave), zero_pad, atol=2e-3)

    old_ave = get_preset("ave-olm").to_dict()
    old_ave.pop("resampler")
    old_ave.pop("mono_mix")
    back = Preset.from_dict(old_ave)
    assert back.resampler == "soxr_hq" and back.mono_mix == "float"
    x = wave[:16000]
    np.testing.assert_allclose(back.resample_decoded(x),
                               librosa.resample(x, orig_sr=16000, target_sr=22050,
                                                res_type="soxr_hq"), atol=1e-6)


def test_every_preset_names_its_resampler_and_mix():
    for preset in PRESETS.values():
        assert preset.resampler in ("ffmpeg", "kaiser_best", "soxr_hq")
        assert preset.mono_mix in ("float", "s16")
        assert (preset.resampler == "ffmpeg") == (preset.decode_rate in (None,
                                                                          preset.sample_rate))


@pytest.mark.parametrize("changes,words", [
    ({"resampler": "sinc"}, "resampler"),
    ({"mono_mix": "int8"}, "mono_mix"),
    ({"resampler": "kaiser_best", "decode_rate": None}, "decode_rate"),
    ({"resampler": "ffmpeg", "decode_rate": 16000}, "decode_rate"),
])
def test_inconsistent_audio_settings_are_refused(changes, words):
    with pytest.raises(UserError, match=words):
        get_preset("cremad").replace(**changes)


def test_index_json_records_the_audio_front_end(tmp_path, rich):
    from avprep.shards import build_shards

    record = Record(key="1001_DFA_ANG_XX", label="ANG", label_id=0, split="train",
                    video=str(rich["flv"]), audio=str(rich["wav"]))
    out = tmp_path / "out"
    build_shards([record], str(out), get_preset("cremad"), classes=["ANG"], workers=1)
    index = json.loads((out / "index.json").read_text())
    p = index["preset"]
    assert (p["resampler"], p["mono_mix"], p["decode_rate"], p["spectrogram"]["pad_mode"]) == \
        ("kaiser_best", "s16", 16000, "reflect")
    with tarfile.open(next(out.glob("train-*.tar"))) as tar:
        names = tar.getnames()
    assert "1001_DFA_ANG_XX.spec.npy" in names


def test_builds_the_new_fields_do_not_change_still_resume():
    """The build fingerprint leaves out fields at the values older builds had."""
    for name in ("synth", "mer"):
        args = get_preset(name).build_args()
        assert "resampler" not in args and "mono_mix" not in args
        assert Preset.from_dict(args) == get_preset(name)
    args = get_preset("cremad").build_args()
    assert (args["resampler"], args["mono_mix"]) == ("kaiser_best", "s16")
