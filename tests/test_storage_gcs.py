"""Shards in Google Cloud Storage: build to, inspect, verify, read and train from gs:// against
a real GCS JSON-API server (the gcp-storage-emulator package, in memory, on a free 127.0.0.1
port), started and stopped here. gcsfs reaches it through STORAGE_EMULATOR_HOST, the variable
Google's own clients read."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import pytest
from held import HUNG_AFTER_S

pytest.importorskip("gcsfs", reason="the gcs extra: pip install 'avbalance[gcs]'")
pytest.importorskip("gcp_storage_emulator", reason="gcp-storage-emulator is in the dev extra")

import torch  # noqa: E402

from avprep.manifest import read_manifest  # noqa: E402
from avprep.presets import get_preset  # noqa: E402
from avprep.shards import build_shards  # noqa: E402
from avprep.storage import Store  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "avb-gcs-test"
READY_TRIES = 600  # x 0.05 s between tries: a bound on start-up, not an expected duration
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # pipelines, servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def comparable(objs: dict[str, bytes]) -> dict:
    """Object bytes, with the fields that record when and how fast a build ran removed."""
    out = {}
    for name, data in objs.items():
        value = json.loads(data) if name.endswith(".json") else data
        if isinstance(value, dict):
            value.pop("created", None)
            value.pop("seconds", None)
        out[name] = value
    return out


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


class Emulator:
    """One emulator process; its log (one line per request it answered) is read by tests."""

    def __init__(self, folder: Path):
        self.log_path = folder / "emulator.log"
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            self.log = open(self.log_path, "w")
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
                 "--port", str(self.port), "--in-memory", "--default-bucket", BUCKET],
                cwd=folder, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                start_new_session=True)
            if self._wait_ready():
                return
            self.stop()
        raise RuntimeError(f"the GCS emulator did not start:\n{self.log_path.read_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_ready(self) -> bool:
        """Poll the health endpoint until it answers, the process ends, or the tries run out."""
        for _ in range(READY_TRIES):
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/", timeout=5) as resp:
                    if resp.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def mark(self) -> int:
        return self.log_path.stat().st_size

    def requests(self, since: int = 0) -> list[str]:
        """The request lines logged after byte `since` (each logged once it was answered)."""
        with open(self.log_path, "rb") as fh:
            fh.seek(since)
            text = fh.read().decode("utf-8", "replace")
        return [line for line in text.splitlines() if line.startswith('"')
                or "code 400" in line]

    def tar_downloads(self, prefix: str, since: int = 0) -> list[str]:
        pattern = re.compile(rf'"GET /download/storage/v1/b/{BUCKET}/o/([^?\s]+)')
        names = [unquote(m.group(1)) for line in self.requests(since)
                 if (m := pattern.search(line))]
        return [n[len(prefix) + 1:] for n in names
                if n.startswith(f"{prefix}/") and n.endswith(".tar")]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator on a free loopback port; STORAGE_EMULATOR_HOST points gcsfs (here and in
    the CLI subprocesses) at it."""
    from gcsfs.core import GCSFileSystem

    server = Emulator(tmp_path_factory.mktemp("gcs"))
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    GCSFileSystem.clear_instance_cache()
    yield server
    server.stop()
    GCSFileSystem.clear_instance_cache()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


def objects(prefix: str) -> dict[str, bytes]:
    store = Store(f"gs://{BUCKET}/{prefix}")
    return {name: store.read_bytes(name) for name in store.names()}


@pytest.fixture(scope="module")
def built(gcs, synth_dir, tmp_path_factory):
    """The synth set built straight to gs://BUCKET/a, and the same build in a local folder."""
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    local = tmp_path_factory.mktemp("local")
    for out in (f"gs://{BUCKET}/a", str(local)):
        build_shards(manifest.records, out, get_preset("synth"), classes=manifest.classes,
                     dataset="synth", shard_size=4, workers=1)
    return local


def test_build_to_gs_writes_the_local_build(built):
    uploaded = objects("a")
    files = {p.name: p.read_bytes() for p in built.iterdir()}
    assert comparable(uploaded) == comparable(files)
    index = json.loads(uploaded["index.json"])
    assert sum(len(s["shards"]) for s in index["splits"].values()) > 3


def test_emulator_store_uses_the_json_api_only(gcs, built):
    """Under STORAGE_EMULATOR_HOST a read is JSON-API requests and nothing else: gcsfs's
    default class would first try gRPC (TLS) on the emulator's port, once per call, and wait
    out a 60 s retry each time."""
    from gcsfs.core import GCSFileSystem

    store = Store(f"gs://{BUCKET}/a")
    assert type(store.fs) is GCSFileSystem
    since = gcs.mark()
    with store.open_read("train-000000.tar") as fh:
        assert fh.read() == (built / "train-000000.tar").read_bytes()
    lines = gcs.requests(since)
    assert lines and all(line.startswith('"GET /') for line in lines), lines


def test_inspect_and_verify_on_gs(gcs, built):
    inspect = subprocess.run([str(BIN / "avprep"), "inspect", f"gs://{BUCKET}/a"],
                             capture_output=True, text=True, timeout=HUNG_AFTER_S)
    assert inspect.returncode == 0, inspect.stderr
    assert "train:" in inspect.stdout and "failures: 0" in inspect.stdout
    none = subprocess.run([str(BIN / "avprep"), "inspect", f"gs://{BUCKET}/none"],
                          capture_output=True, text=True, timeout=HUNG_AFTER_S)
    assert "no index.json" in one_error_line(none)
    store = Store(f"gs://{BUCKET}/b")  # a copy missing one tar
    for name, data in objects("a").items():
        if name != "val-000000.tar":
            store.write_bytes(name, data)
    for prefix, ok in (("a", True), ("b", False)):
        verify = subprocess.run([str(BIN / "avprep"), "verify", f"gs://{BUCKET}/{prefix}"],
                                capture_output=True, text=True, timeout=HUNG_AFTER_S)
        if ok:
            assert verify.returncode == 0, verify.stderr
            assert "every shard decodes" in verify.stdout
        else:  # each problem on its own line, then one Error line
            assert verify.returncode == 2 and "Traceback" not in verify.stderr
            assert verify.stderr.splitlines() == [
                "val-000000.tar: missing", f"Error: gs://{BUCKET}/b: 1 problem(s) found"]


def test_eval_loader_reads_every_sample_as_the_local_build(built):
    from avtrain.data import eval_loader, open_shards
    from avtrain.decode import DataOptions

    batches = {}
    for name, where in (("local", str(built)), ("gs", f"gs://{BUCKET}/a")):
        shards = open_shards(where)
        opts = DataOptions.for_shards(shards, image_size=32)
        batches[name] = {split: list(eval_loader(shards, split, opts, batch_size=4, workers=1))
                         for split in ("train", "val", "test")}
    index = json.loads((built / "index.json").read_text())
    for split, local in batches["local"].items():
        remote = batches["gs"][split]
        assert sum(len(b["key"]) for b in local) == index["splits"][split]["samples"] > 0
        assert len(remote) == len(local)
        for a, b in zip(local, remote):
            assert list(a["key"]) == list(b["key"])
            for field, value in a.items():
                if isinstance(value, torch.Tensor):
                    assert torch.equal(value, b[field]), (split, field)


def test_fit_from_gs_equals_local_and_epoch_two_reads_the_cache(gcs, built, tmp_path):
    """One epoch from gs:// (train, val, test) gives the local run's metrics; resumed for a
    second epoch with the same --cache-dir, no tar that the first epoch cached is fetched
    from the server again (val and test are read whole, so they are among them)."""
    from avtrain.loop import fit

    config = {"model": "tiny", "epochs": 1, "batch_size": 4, "lr": 0.05, "image_size": 32,
              "workers": 1, "progress": False, "steps_per_epoch": 3, "shuffle_buffer": 10,
              "tensorboard": False, "seed": 3}
    cache = tmp_path / "cache"
    remote_config = {**config, "shards": f"gs://{BUCKET}/a", "run_dir": str(tmp_path / "gs"),
                     "cache_dir": str(cache), "cache_size": "1G"}
    local = fit({**config, "shards": str(built), "run_dir": str(tmp_path / "local")})
    first = gcs.mark()
    remote = fit(remote_config)
    for split in ("val", "test"):
        for key in ("acc", "acc_audio", "acc_visual", "macro_f1", "loss", "n"):
            if key in local[split]:
                assert remote[split][key] == local[split][key], (split, key)
    fetched_first = set(gcs.tar_downloads("a", first))
    cached = {p.name.split("-", 1)[1] for p in cache.iterdir()
              if not p.name.startswith(".part-")}
    index = json.loads((built / "index.json").read_text())
    whole = {s["url"] for split in ("val", "test") for s in index["splits"][split]["shards"]}
    assert whole <= cached <= fetched_first
    second = gcs.mark()
    fit({**remote_config, "epochs": 2}, resume=str(tmp_path / "gs"))
    epochs = [json.loads(line) for line in (tmp_path / "gs" / "metrics.jsonl").read_text()
              .splitlines() if json.loads(line)["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert not cached & set(gcs.tar_downloads("a", second))
