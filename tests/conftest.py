"""Shared fixtures: real encoded media made with ffmpeg at test time."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from mediagen import make_cremad_flv, make_video, make_wav, truncate  # noqa: E402


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> SimpleNamespace:
    """One of every kind of file the decoders must handle, good and broken."""
    d = tmp_path_factory.mktemp("media")
    m = SimpleNamespace(dir=d)
    m.mp4 = make_video(d / "clip.mp4", seconds=2.0, size=(160, 120), fps=25, tone=440)
    m.flv = make_cremad_flv(d / "1001_DFA_ANG_XX.flv", seconds=2.5)
    m.wav = make_wav(d / "1001_DFA_ANG_XX.wav", seconds=2.5, tone=660, rate=16000)
    m.no_audio = make_video(d / "no_audio.mp4", seconds=2.0, audio=False)
    m.odd = make_video(d / "odd.mp4", seconds=1.5, size=(317, 203), pix_fmt="yuv444p")
    m.unicode = make_video(d / "clip ünïcødé with spaces.mp4", seconds=1.0)
    m.six_channel = make_video(d / "surround.mp4", seconds=1.0, channels=6, audio_rate=48000)
    m.truncated = truncate(m.mp4, d / "truncated.mp4", 0.4)
    m.empty = d / "empty.mp4"
    m.empty.write_bytes(b"")
    m.not_media = d / "notes.mp4"
    m.not_media.write_text("this is not a video\n")
    m.broken = [m.truncated, m.empty, m.not_media]
    return m


@pytest.fixture
def one_torch_thread():
    """Tiny models on a shared 2-core machine run far faster on one thread than on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (real mp4s + manifest.jsonl), shared by tests that need one."""
    from avprep.synth import SynthConfig, write_synth

    out = tmp_path_factory.mktemp("synth")
    write_synth(out, SynthConfig(classes=3, per_class=8, seconds=1.0, size=32), workers=2)
    return out


@pytest.fixture(scope="session")
def method_shards(synth_dir, tmp_path_factory) -> Path:
    """The synth clips as one shard set, shared by every per-method CLI test (built once, not
    once per method file)."""
    from test_balance_ogm import build_test_shards

    return build_test_shards(synth_dir, tmp_path_factory.mktemp("method-shards"))


@pytest.fixture(scope="session")
def train_shards(tmp_path_factory) -> Path:
    """Shards built by avprep.shards from synth media (3 classes x 30 clips, several shards per
    split), for the trainer tests: big enough that a linear probe can beat chance."""
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards
    from avprep.synth import SynthConfig, write_synth

    media = tmp_path_factory.mktemp("train_synth")
    write_synth(media, SynthConfig(classes=3, per_class=30, seconds=1.0, size=32,
                                   val_fraction=0.2, test_fraction=0.2), workers=2)
    manifest = read_manifest(media / "manifest.jsonl")
    out = tmp_path_factory.mktemp("train_shards")
    build_shards(manifest.records, str(out), get_preset("synth"), classes=manifest.classes,
                 dataset="synth", shard_size=8, workers=2)
    return out
