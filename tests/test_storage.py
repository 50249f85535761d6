"""Shards in object storage (issue #17): build to and train from s3:// (moto's real S3 server on
127.0.0.1) and read from http:// (Python's http.server on 127.0.0.1), both started and stopped
here; kill -9 during an upload; prefix-only member names; one-line errors."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from held import HUNG_AFTER_S, start_held, wait_until_held

pytest.importorskip("s3fs", reason="the s3 extra: pip install 'avbalance[s3]'")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")

from test_features import feature_tree, read_back  # noqa: E402, F401 (a fixture)
from test_features import run as import_tree  # noqa: E402

from avprep.errors import UserError  # noqa: E402
from avprep.manifest import read_manifest  # noqa: E402
from avprep.presets import get_preset  # noqa: E402
from avprep.shards import build_shards  # noqa: E402
from avprep.storage import Store  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "avb-test"
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]  # pipelines, servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; the standard AWS variables point at it."""
    import fsspec

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    fsspec.filesystem("s3").clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.filesystem("s3").clear_instance_cache()


def objects(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    base = f"{BUCKET}/{prefix}/"
    return {p[len(base):]: fs.cat_file(p) for p in fs.find(base)}


def comparable(objs: dict[str, bytes]) -> dict:
    """Object bytes, with the fields that record when and how fast a build ran removed."""
    out = {}
    for name, data in objs.items():
        if name.endswith(".json"):
            value = json.loads(data)
            for field in ("created", "seconds"):
                value.pop(field, None)
            out[name] = value
        else:
            out[name] = data
    return out


def cli(group: str, *args, env=None):
    return subprocess.run([str(BIN / group), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=HUNG_AFTER_S)


def one_error_line(result) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def built(s3, synth_dir, tmp_path_factory):
    """The synth set built straight to s3://BUCKET/a, and a local copy downloaded from it."""
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    build_shards(manifest.records, f"s3://{BUCKET}/a", get_preset("synth"),
                 classes=manifest.classes, dataset="synth", shard_size=4, workers=1)
    local = tmp_path_factory.mktemp("copy")
    for name, data in objects(s3, "a").items():
        (local / name).write_bytes(data)
    return local


def test_build_to_s3_then_train_from_s3_equals_local(built, tmp_path):
    from avtrain.loop import fit

    index = json.loads((built / "index.json").read_text())
    assert index["splits"]["train"]["samples"] > 0
    # each tar, then its stats object, then index.json: every listed tar is there
    assert all((built / s["url"]).stat().st_size == s["bytes"]
               for split in index["splits"].values() for s in split["shards"])
    config = {"model": "tiny", "epochs": 1, "batch_size": 4, "lr": 0.05, "image_size": 32,
              "workers": 1, "progress": False, "steps_per_epoch": 3, "shuffle_buffer": 10,
              "tensorboard": False, "seed": 3}
    local = fit({**config, "shards": str(built), "run_dir": str(tmp_path / "local")})
    remote = fit({**config, "shards": f"s3://{BUCKET}/a", "run_dir": str(tmp_path / "s3"),
                  "cache_dir": str(tmp_path / "cache"), "cache_size": "1G"})
    for split in ("val", "test"):
        for key in ("acc", "acc_audio", "acc_visual", "macro_f1", "loss", "n"):
            if key in local[split]:
                assert remote[split][key] == local[split][key], (split, key)
    cached = [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".part-")]
    assert cached  # tars read to their end were kept while they streamed


def test_exact_epoch_from_s3_equals_local_ranged_and_cached(s3, built, tmp_path):
    """Exact sampling reads samples by byte range: ranged GETs without a cache, the cached
    copy with one; the same batches as from the local copy. A set without recorded spans (an
    older build) is scanned once and the scan kept in the cache."""
    import torch

    from avtrain.data import open_shards, train_loader
    from avtrain.decode import DataOptions
    from avtrain.sampling import sample_table

    for name in os.listdir(built):  # the same set, its stats without spans, under s3://.../old
        data = (built / name).read_bytes()
        if name.startswith("train-") and name.endswith(".json"):
            stats = json.loads(data)
            stats.pop("spans")
            data = json.dumps(stats).encode()
        s3.pipe_file(f"{BUCKET}/old/{name}", data)
    cache = tmp_path / "cache"
    batches = {}
    for name, where, kw in (("local", str(built), {}), ("ranged", f"s3://{BUCKET}/a", {}),
                            ("cached", f"s3://{BUCKET}/a", {"cache_dir": str(cache / "a"),
                                                           "cache_size": 1 << 30}),
                            ("scanned", f"s3://{BUCKET}/old", {"cache_dir": str(cache / "old"),
                                                              "cache_size": 1 << 30}),
                            # a cache smaller than the split: ranged reads, no tar fetched
                            # whole for one sample (each would evict the last)
                            ("small", f"s3://{BUCKET}/a", {"cache_dir": str(cache / "small"),
                                                          "cache_size": 1000})):
        shards = open_shards(where, **kw)
        opts = DataOptions.for_shards(shards, image_size=32)
        batches[name] = list(train_loader(shards, "train", opts, batch_size=4, epoch=1, seed=2,
                                          workers=1))
    local = batches["local"]
    assert len(local) == json.loads((built / "index.json").read_text())[
        "splits"]["train"]["samples"] // 4
    for name in ("ranged", "cached", "scanned", "small"):
        assert len(batches[name]) == len(local)
        for x, y in zip(local, batches[name]):
            assert x["key"] == y["key"] and torch.equal(x["visual"], y["visual"])
            assert torch.equal(x["audio"], y["audio"]) and not y["skipped"]
    tars = len(open_shards(str(built)).urls("train"))
    assert len([p for p in (cache / "a").iterdir() if p.name.endswith(".tar")]) == tars
    assert len(list((cache / "old").glob("*.spans.json"))) == tars  # the scans, kept
    assert not [p for p in (cache / "small").iterdir() if p.name.endswith(".tar")]
    again = sample_table(open_shards(f"s3://{BUCKET}/old", str(cache / "old")), "train")
    assert again.keys == sample_table(open_shards(str(built)), "train").keys


@contextlib.contextmanager
def http_folder(folder):
    """Python's http.server over `folder` on 127.0.0.1 (no Range support, as it ships): its
    base URL, the server stopped and joined on exit."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_eval_over_http_and_cache_bound(built, tmp_path):
    """The https read path (plain http on loopback): eval equals local; a small cache stays
    under its bound."""
    from avtrain.data import eval_loader, open_shards
    from avtrain.decode import DataOptions

    with http_folder(built) as url:
        index = json.loads((built / "index.json").read_text())
        largest = max(s["bytes"] for s in index["splits"]["train"]["shards"])
        bound = largest * 3 // 2  # room for one tar: every new one evicts the last
        keys = {}
        for name, kw in (("local", {}), ("http", {}), ("cached", {"cache_dir": str(tmp_path / "c"),
                                                                  "cache_size": bound})):
            shards = open_shards(url if name != "local" else str(built), **kw)
            shards.require("train")
            opts = DataOptions.for_shards(shards, image_size=32)
            keys[name] = [(k, int(y)) for b in eval_loader(shards, "train", opts, batch_size=4,
                                                              workers=1)
                          for k, y in zip(b["key"], b["label"])]
        assert keys["http"] == keys["local"] == keys["cached"] and keys["local"]
        sizes = [p.stat().st_size for p in (tmp_path / "c").iterdir()]
        assert len(index["splits"]["train"]["shards"]) > 1 and len(sizes) == 1
        assert sum(sizes) <= bound


def test_exact_epoch_over_a_server_that_ignores_byte_ranges(built, capfd):
    """Python's http.server answers a ranged GET with the whole tar (200, no Range support):
    exact epochs still read the right bytes, equal to the local batches, and say once that
    every sample costs a whole tar without --cache-dir."""
    import torch

    from avtrain.data import open_shards, train_loader
    from avtrain.decode import DataOptions

    with http_folder(built) as url:
        batches = {}
        for name, where in (("local", str(built)), ("http", url)):
            shards = open_shards(where)
            opts = DataOptions.for_shards(shards, image_size=32)
            batches[name] = list(train_loader(shards, "train", opts, batch_size=4, epoch=1,
                                              seed=2, workers=0))
    assert len(batches["http"]) == len(batches["local"]) > 0
    for got, want in zip(batches["http"], batches["local"]):
        assert got["key"] == want["key"]
        assert torch.equal(got["audio"], want["audio"])
        assert torch.equal(got["visual"], want["visual"])
    assert capfd.readouterr().err.count("ignores byte ranges") == 1


HOLD_IN_SECOND_UPLOAD = """
from avprep import storage

_put = storage.Store.put_file


def put_then_hold(self, local_path, name):
    if name == "train-000001.tar":
        hold()  # inside the upload of the second shard: its object is not there yet
    return _put(self, local_path, name)


storage.Store.put_file = put_then_hold
"""


def test_kill_during_upload_then_rerun_gives_the_clean_objects(s3, synth_dir):
    args = ["build-shards", "--manifest", str(synth_dir / "manifest.jsonl"), "--shard-size",
            "4", "--workers", "1", "--no-progress", "-o"]
    clean = cli("avprep", *args, f"s3://{BUCKET}/clean")
    assert clean.returncode == 0, clean.stderr
    proc = start_held(HOLD_IN_SECOND_UPLOAD, "avprep", [*args, f"s3://{BUCKET}/killed"])
    wait_until_held(proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = objects(s3, "killed")
    assert "index.json" not in partial and "train-000001.tar" not in partial
    assert "train-000000.json" in partial and "train-000001.json" not in partial
    rerun = cli("avprep", *args, f"s3://{BUCKET}/killed")
    assert rerun.returncode == 0, rerun.stderr
    assert "1 already done" in rerun.stdout
    assert comparable(objects(s3, "killed")) == comparable(objects(s3, "clean"))


def test_inspect_and_verify_on_s3(s3, built):
    inspect = cli("avprep", "inspect", f"s3://{BUCKET}/a")
    assert inspect.returncode == 0, inspect.stderr
    assert "train:" in inspect.stdout and "failures: 0" in inspect.stdout
    verify = cli("avprep", "verify", f"s3://{BUCKET}/a")
    assert verify.returncode == 0, verify.stderr
    assert "every shard decodes" in verify.stdout
    for name, data in objects(s3, "a").items():  # a copy missing one tar
        if name != "test-000000.tar":
            s3.pipe_file(f"{BUCKET}/b/{name}", data)
    broken = cli("avprep", "verify", f"s3://{BUCKET}/b")
    assert broken.returncode == 2 and "test-000000.tar: missing" in broken.stderr


@pytest.mark.parametrize("url", ["../x/train-000000.tar", "s3://other/train-000000.tar",
                                 "/abs/train-000000.tar", "//other/train-000000.tar",
                                 "pipe:cat x.tar", "x.tar?y=../z"])
def test_index_names_resolve_only_under_the_prefix(s3, built, url):
    from avtrain.data import open_shards

    index = json.loads((built / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["url"] = url
    s3.pipe_file(f"{BUCKET}/evil/index.json", json.dumps(index).encode())
    shards = open_shards(f"s3://{BUCKET}/evil")
    with pytest.raises(UserError):
        shards.urls("train")
    with pytest.raises(UserError, match="member name|leaves the folder"):
        Store(f"s3://{BUCKET}/evil").url(url)


def test_one_line_errors(s3, synth_dir, tmp_path):
    for location in ("pipe:cat x", "ftp://host/x", "file:///tmp/x"):
        assert "unsupported location" in one_error_line(cli("avprep", "inspect", location))
    assert "no index.json" in one_error_line(cli("avprep", "inspect", f"s3://{BUCKET}/none"))
    assert "no index.json" in one_error_line(
        cli("avtrain", "fit", "--shards", f"s3://{BUCKET}/none", "--run-dir", str(tmp_path / "r"),
            "--model", "tiny"))
    line = one_error_line(cli("avprep", "build-shards", "--manifest",
                              str(synth_dir / "manifest.jsonl"), "-o", "https://127.0.0.1/x"))
    assert "read-only" in line
    dead = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "AWS_MAX_ATTEMPTS": "1"}
    line = one_error_line(cli("avprep", "verify", f"s3://{BUCKET}/a", env=dead))
    assert f"s3://{BUCKET}/a" in line


def test_folds_on_remote_shards_are_one_line(s3, built, tmp_path):
    line = one_error_line(cli("avtrain", "fit", "--shards", f"s3://{BUCKET}/a", "--run-dir",
                              str(tmp_path / "cv"), "--model", "tiny", "--folds", "3"))
    assert "--folds needs a local shard set" in line
    assert not (tmp_path / "cv").exists()


def test_import_features_to_s3_equals_the_local_import(s3, feature_tree, tmp_path):  # noqa: F811
    """import-features -o s3://: the same objects as the local folder's files (tars, stats,
    failures/missing lists, index), a rerun skips every shard, and the tars read back."""
    local = import_tree(feature_tree, tmp_path / "local")
    remote = import_tree(feature_tree, f"s3://{BUCKET}/feat")
    assert remote.shards_written == local.shards_written > 0
    files = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    uploaded = objects(s3, "feat")
    assert comparable(uploaded) == comparable(files)
    again = import_tree(feature_tree, f"s3://{BUCKET}/feat")
    assert again.shards_skipped == remote.shards_written and again.shards_written == 0
    assert objects(s3, "feat").keys() == uploaded.keys()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name, data in uploaded.items():
        (copy / name).write_bytes(data)
    assert read_back(copy).keys() == read_back(tmp_path / "local").keys()


def test_ray_writes_straight_to_the_bucket(s3, synth_dir, built):
    """--executor ray: each task uploads its own shards (no shared OUT folder); the objects
    equal the local executor's."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra avbalance[ray]")
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # no shared memory, no ports, ...: not the code under test
        pytest.skip(f"a local Ray cluster cannot start here: {exc}")
    try:
        build_shards(manifest.records, f"s3://{BUCKET}/ray", get_preset("synth"),
                     classes=manifest.classes, dataset="synth", shard_size=4, workers=2,
                     executor="ray")
    finally:
        ray.shutdown()
    ray_objects, local_objects = objects(s3, "ray"), objects(s3, "a")
    tars = sorted(n for n in local_objects if n.endswith(".tar"))
    assert tars and sorted(n for n in ray_objects if n.endswith(".tar")) == tars
    assert all(ray_objects[n] == local_objects[n] for n in tars)
    assert "index.json" in ray_objects
