"""inspect and verify on real shards, including a damaged one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avprep.manifest import read_manifest
from avprep.presets import get_preset
from avprep.shards import build_shards

BIN = Path(sys.executable).parent


def avprep(*args):
    return subprocess.run([str(BIN / "avprep"), *args], capture_output=True, text=True)


@pytest.fixture
def shard_set(synth_dir, tmp_path):
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    build_shards(manifest.records, str(tmp_path / "out"), get_preset("synth"),
                 classes=manifest.classes, dataset="synth", shard_size=6, workers=2)
    return tmp_path / "out", manifest


@pytest.mark.slow
def test_inspect_summary_and_png(shard_set, tmp_path):
    out, manifest = shard_set
    key = manifest.records[0].key
    png = tmp_path / "sample.png"
    result = avprep("inspect", str(out), "--show", key, "--png", str(png))
    assert result.returncode == 0, result.stderr
    assert "dataset synth, 3 classes, preset synth" in result.stdout
    assert "failures: 0" in result.stdout
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    missing = avprep("inspect", str(out), "--show", "no_such_key")
    assert missing.returncode == 2 and "no sample with key 'no_such_key'" in missing.stderr


def test_verify_passes_then_catches_a_truncated_tar(shard_set):
    out, _ = shard_set
    ok = avprep("verify", str(out))
    assert ok.returncode == 0 and "every shard decodes" in ok.stdout
    tar = sorted(out.glob("train-*.tar"))[0]
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    bad = avprep("verify", str(out))
    assert bad.returncode == 2
    assert tar.name in bad.stderr and "problem(s) found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_not_a_shard_set(tmp_path):
    result = avprep("inspect", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: {tmp_path}: no index.json (not a finished shard " \
                                    "set; rerun build-shards)"
