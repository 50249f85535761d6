"""The Ray executor runs the same per-shard function: byte-identical shards to local processes."""

from __future__ import annotations

import pytest

from avprep.manifest import read_manifest
from avprep.presets import get_preset
from avprep.shards import build_shards

ray = pytest.importorskip("ray", reason="Ray is the optional extra avbalance[ray]")


def test_ray_and_local_executors_write_identical_shards(synth_dir, tmp_path):
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    common = dict(classes=manifest.classes, dataset="synth", shard_size=4, workers=2)
    build_shards(manifest.records, str(tmp_path / "local"), get_preset("synth"), **common)
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no shared memory, no ports, ...: not the code under test
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")
    try:
        summary = build_shards(manifest.records, str(tmp_path / "ray"), get_preset("synth"),
                               executor="ray", **common)
    finally:
        ray.shutdown()
    assert summary.shards_written == len(list((tmp_path / "ray").glob("*.tar")))
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").glob("*.tar")}
    remote = {p.name: p.read_bytes() for p in (tmp_path / "ray").glob("*.tar")}
    assert local and local == remote


def test_no_cluster_at_the_address_is_one_line(synth_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from cli import avprep

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "auto" looks for RAY_TMPDIR/ray/ray_current_cluster: point it at an empty folder, so a
    # local Ray started meanwhile by another test process on this machine is not found
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    out = CliRunner().invoke(avprep, ["build-shards", "--manifest",
                                      str(synth_dir / "manifest.jsonl"), "-o",
                                      str(tmp_path / "shards"), "--executor", "ray",
                                      "--ray-address", "auto", "--no-progress"])
    assert out.exit_code == 2, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no Ray cluster at --ray-address auto" in errors[0]
    assert "Traceback" not in out.output
