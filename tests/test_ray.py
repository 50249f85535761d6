"""The Ray executor runs the same per-shard function: byte-identical shards to local processes."""

from __future__ import annotations

import pytest

from avprep.manifest import read_manifest
from avprep.presets import get_preset
from avprep.shards import build_shards

pytestmark = pytest.mark.slow  # whole pipelines or servers: `make test`, not the quick loop

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
    import ray._private.services as ray_services
    from click.testing import CliRunner

    from cli import avprep

    def no_gcs_server_running():
        return frozenset()
    no_gcs_server_running.cache_clear = lambda: None  # ray.init clears the scan's cache

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # "auto" looks for RAY_TMPDIR/ray/ray_current_cluster, then for *any* gcs_server process on
    # the machine: point the first at an empty folder and make the process scan see none, so a
    # local Ray that another test process runs meanwhile (two suites at once) is never joined
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray_services, "find_gcs_addresses", no_gcs_server_running)
    out = CliRunner().invoke(avprep, ["build-shards", "--manifest",
                                      str(synth_dir / "manifest.jsonl"), "-o",
                                      str(tmp_path / "shards"), "--executor", "ray",
                                      "--ray-address", "auto", "--no-progress"])
    assert out.exit_code == 2, out.output
    errors = [line for line in out.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no Ray cluster at --ray-address auto" in errors[0]
    assert "Traceback" not in out.output


def test_a_cluster_that_dies_while_joining_is_one_line(monkeypatch):
    """A cluster that "auto" finds but that is shutting down (another process's local Ray)
    makes ray.init raise LocalRayletDiedError or RuntimeError: one Error line, not a crash."""
    import ray
    from ray.exceptions import LocalRayletDiedError

    from avprep.errors import UserError
    from avprep.executors import ray_connect

    for exc in (LocalRayletDiedError(), RuntimeError("Failed to connect to GCS\nmore")):
        def refuse(*args, exc=exc, **kwargs):
            raise exc
        monkeypatch.setattr(ray, "init", refuse)
        with pytest.raises(UserError, match="no Ray cluster at --ray-address auto") as info:
            ray_connect("auto")
        assert "\n" not in str(info.value)
