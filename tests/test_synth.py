"""The synthetic dataset: real decodable mp4s, the documented cues, determinism, safe output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from avprep.errors import UserError
from avprep.manifest import read_manifest
from avprep.media import decode_clip
from avprep.synth import SynthConfig, class_colour, write_synth


def test_manifest_and_real_videos(synth_dir):
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    assert manifest.classes == ["class00", "class01", "class02"]
    assert len(manifest.records) == 24
    assert {r.split for r in manifest.records} <= {"train", "val", "test"}
    clip = decode_clip(manifest.records[0].video, fps=2, short_side=0, sample_rate=16000)
    assert clip.n_frames == 2 and clip.frames[0].shape == (32, 32, 3)
    assert clip.audio.size == pytest.approx(16000, abs=600)
    meta = json.loads((synth_dir / "synth.json").read_text())
    assert meta["cues"]["class01"]["audio_f0_hz"] == 250


def test_audio_cue_is_the_documented_harmonic_series(synth_dir):
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    present = [r for r in manifest.records if r.extra["audio_cue"] is not None]
    absent = [r for r in manifest.records if r.extra["audio_cue"] is None]
    assert present and absent  # 80 % of 24 clips carry the cue
    for record in present[:5] + absent[:1]:
        c = record.extra["audio_cue"]
        if c is None:  # noise alone: no harmonic of any class stands out
            wave = decode_clip(record.video, frames=False, sample_rate=16000).audio
            spectrum = np.abs(np.fft.rfft(wave))
            assert spectrum.max() < 8 * np.median(spectrum)
            continue
        wave = decode_clip(record.video, frames=False, sample_rate=16000).audio
        spectrum = np.abs(np.fft.rfft(wave))
        freqs = np.fft.rfftfreq(wave.size, 1 / 16000)
        f0 = 180 + 70 * c
        harmonic = spectrum[np.abs(freqs - f0) < 5].max()
        off = spectrum[np.abs(freqs - (f0 + 35)) < 5].max()  # half-way to the next class
        assert harmonic > 3 * off


def test_visual_cue_colour_is_visible(tmp_path):
    config = SynthConfig(classes=3, per_class=2, seconds=0.5, size=32, visual_snr=20.0)
    write_synth(tmp_path, config, workers=2)
    for record in read_manifest(tmp_path / "manifest.jsonl").records:
        if record.extra["visual_cue"] is None:
            continue
        frames = decode_clip(record.video, fps=None, short_side=0, sample_rate=None).frames
        pixels = np.stack(frames).astype(float).reshape(len(frames), -1, 3)
        background = np.median(pixels, axis=1, keepdims=True)
        deviation = np.linalg.norm(pixels - background, axis=2)
        is_object = deviation > np.quantile(deviation, 0.93, axis=1, keepdims=True)
        shift = ((pixels - background)[is_object]).mean(0)
        cosines = []
        for c in range(3):
            direction = class_colour(c, 3) - background.mean((0, 1))
            cosines.append(shift @ direction / np.linalg.norm(shift) / np.linalg.norm(direction))
        assert int(np.argmax(cosines)) == record.extra["visual_cue"]


@pytest.mark.slow
def test_reliability_controls_how_often_cues_agree(tmp_path):
    config = SynthConfig(classes=4, per_class=30, seconds=0.5, size=16, audio_reliability=1.0,
                         visual_reliability=0.5, seed=3)
    write_synth(tmp_path / "s", config, workers=2)
    records = read_manifest(tmp_path / "s" / "manifest.jsonl").records
    audio_present = np.mean([r.extra["audio_cue"] == r.label_id for r in records])
    visual_present = np.mean([r.extra["visual_cue"] == r.label_id for r in records])
    assert audio_present == 1.0
    assert 0.3 < visual_present < 0.7
    # a cue is either the true class or absent, never a wrong class
    assert all(r.extra["visual_cue"] in (r.label_id, None) for r in records)


def test_same_seed_same_dataset(tmp_path):
    config = SynthConfig(classes=2, per_class=3, seconds=0.5, size=16, seed=7)
    write_synth(tmp_path / "a", config, workers=1)
    write_synth(tmp_path / "b", config, workers=2)
    a = (tmp_path / "a" / "manifest.jsonl").read_text()
    assert a == (tmp_path / "b" / "manifest.jsonl").read_text()
    wa = decode_clip(tmp_path / "a/videos/class01/class01_00002.mp4", frames=False).audio
    wb = decode_clip(tmp_path / "b/videos/class01/class01_00002.mp4", frames=False).audio
    np.testing.assert_allclose(wa, wb, atol=1e-4)


def test_refuses_non_empty_folder_and_keeps_its_files(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="not empty"):
        write_synth(tmp_path, SynthConfig(classes=2, per_class=1, seconds=0.5, size=16))
    with pytest.raises(UserError, match="holds no synth dataset"):
        write_synth(tmp_path, SynthConfig(classes=2, per_class=1, seconds=0.5, size=16),
                    overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("field,value", [("classes", 1), ("size", 15), ("seconds", 0),
                                         ("visual_reliability", 1.5)])
def test_bad_config(tmp_path, field, value):
    with pytest.raises(UserError):
        write_synth(tmp_path / "x", SynthConfig(**{field: value}))
