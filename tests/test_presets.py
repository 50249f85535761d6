"""Spectrogram recipes against librosa computed directly, and the preset shapes of the design."""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from avprep import audio
from avprep.errors import UserError
from avprep.presets import PRESETS, Preset, get_preset


@pytest.fixture
def noise():
    return np.random.default_rng(0).standard_normal(22050).astype(np.float32) * 0.3


def test_stft_log_matches_librosa(noise):
    ours = audio.stft_log(noise, n_fft=512, hop=353)
    theirs = np.log(np.abs(librosa.stft(noise, n_fft=512, hop_length=353, window="hann",
                                        center=True, pad_mode="constant")) + 1e-7)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=2e-3)


def test_log_mel_matches_librosa(noise):
    sr = 16000
    ours = audio.log_mel(noise, sr=sr, n_mels=64, win_ms=25, hop_ms=10)
    power = librosa.feature.melspectrogram(
        y=noise, sr=sr, n_fft=512, hop_length=160, win_length=400, window="hann", center=False,
        power=2.0, n_mels=64, fmin=20.0, htk=True)
    np.testing.assert_allclose(ours, np.log(power + 1e-6), atol=2e-3)


@pytest.mark.parametrize("seconds", [1.0, 2.4, 3.0, 5.5])
def test_cremad_shape_for_any_length(seconds):
    preset = get_preset("cremad")
    wave = np.random.default_rng(1).uniform(-1.5, 1.5, int(seconds * preset.sample_rate))
    spec = preset.spectrogram_of(wave)
    assert spec.shape == (257, 188) and spec.dtype == np.float32


def test_cremad_tiles_short_clips_and_clips_amplitude():
    preset = get_preset("cremad")
    wave = np.linspace(-2, 2, 22050, dtype=np.float32)  # 1 s, out of [-1, 1]
    prepared = preset.prepare_waveform(wave)
    assert prepared.size == 3 * 22050
    np.testing.assert_array_equal(prepared[22050:44100], np.clip(wave, -1, 1))
    assert prepared.max() == 1.0 and prepared.min() == -1.0


@pytest.mark.parametrize("name,shape", [("vggsound", (129, 1251)), ("ks", (128, 1024)),
                                        ("ave", (257, 188)), ("mer", (128, 800)),
                                        ("synth", (129, 126))])
def test_preset_shapes(name, shape):
    preset = get_preset(name)
    wave = np.random.default_rng(2).standard_normal(int(4.2 * preset.sample_rate)) * 0.1
    assert preset.spectrogram_of(wave).shape == shape


def test_vggsound_tiles_short_clips_as_released():
    preset = get_preset("vggsound")  # VGGSoundDataset.py tiles, never pads with silence
    wave = np.linspace(-2, 2, 16000, dtype=np.float32)
    prepared = preset.prepare_waveform(wave)
    assert prepared.size == 160000
    np.testing.assert_array_equal(prepared[144000:], np.clip(wave, -1, 1))


def test_fit_length_modes():
    wave = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(audio.fit_length(wave, 10, "tile"),
                                  [0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    np.testing.assert_array_equal(audio.fit_length(wave, 6, "pad"), [0, 1, 2, 3, 0, 0])
    np.testing.assert_array_equal(audio.fit_length(wave, 2, "tile"), [0, 1])


def test_presets_round_trip_as_data():
    for preset in PRESETS.values():
        again = Preset.from_dict(preset.to_dict())
        assert again == preset


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        get_preset("nope")
