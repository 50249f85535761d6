"""build-shards on real media: counts, failures, the format read back by plain webdataset,
determinism, resume after a kill, and refusals."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from held import start_held, wait_until_held
from mediagen import make_frame_counter, make_wav, released_frames, which_frames

from avprep import shards as shards_mod
from avprep.errors import UserError
from avprep.manifest import Record, read_manifest, write_manifest
from avprep.presets import get_preset
from avprep.shards import build_shards

BIN = Path(sys.executable).parent


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def keys_in(out: Path) -> set[str]:
    keys = set()
    for url in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(url), shardshuffle=False):
            keys.add(sample["__key__"])
    return keys


@pytest.fixture(scope="module")
def mixed_manifest(synth_dir, media, tmp_path_factory) -> Path:
    """The synth clips plus one of every broken kind, in the train split."""
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    records = list(manifest.records)
    for name, path in [("bad_truncated", media.truncated), ("bad_empty", media.empty),
                       ("bad_not_media", media.not_media), ("bad_no_audio", media.no_audio)]:
        records.append(Record(key=name, label="class00", label_id=0, split="train",
                              video=str(path)))
    path = tmp_path_factory.mktemp("mixed") / "manifest.jsonl"
    write_manifest(records, path, classes=manifest.classes, dataset="synth")
    return path


def build(manifest_path: Path, out: Path, **kwargs):
    manifest = read_manifest(manifest_path)
    kwargs.setdefault("shard_size", 5)
    kwargs.setdefault("workers", 1)
    return build_shards(manifest.records, str(out), get_preset("synth"), classes=manifest.classes,
                        dataset="synth", **kwargs)


def test_counts_failures_and_index(mixed_manifest, tmp_path):
    summary = build(mixed_manifest, tmp_path / "out", workers=2)
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    manifest = read_manifest(mixed_manifest)
    good = [r for r in manifest.records if not r.key.startswith("bad_")]
    for split in ("train", "val", "test"):
        expected = sum(r.split == split for r in good)
        if expected:
            assert index["splits"][split]["samples"] == expected
            assert sum(s["samples"] for s in index["splits"][split]["shards"]) == expected
    assert index["preset"]["name"] == "synth" and index["classes"] == manifest.classes
    assert index["format"] == "avbalance-shards" and index["failures"] == 4
    failures = [json.loads(line) for line in (tmp_path / "out/failures.jsonl").open()]
    stages = {f["key"]: f["stage"] for f in failures}
    assert stages == {"bad_truncated": "decode", "bad_empty": "open",
                      "bad_not_media": "decode", "bad_no_audio": "no_audio"}
    assert len(failures) == 4  # each exactly once
    assert "4 sample(s) failed" in summary.describe()


def test_progress_counts_every_sample_and_failure_once(mixed_manifest, tmp_path):
    """Per-sample reports from pool workers plus per-shard top-ups add up exactly."""
    n = sum(1 for line in open(mixed_manifest) if '"key"' in line)
    result = run_cli("build-shards", "--manifest", str(mixed_manifest), "-o",
                     str(tmp_path / "out"), "--shard-size", "4", "--workers", "2")
    assert result.returncode == 0, result.stderr
    final = [ln for ln in result.stderr.replace("\r", "\n").splitlines() if "build-shards" in ln]
    assert final and f"{n}/{n}" in final[-1] and "failed=4" in final[-1]
    rerun = run_cli("build-shards", "--manifest", str(mixed_manifest), "-o",
                    str(tmp_path / "out"), "--shard-size", "4", "--workers", "2")
    final = [ln for ln in rerun.stderr.replace("\r", "\n").splitlines() if "build-shards" in ln]
    assert f"{n}/{n}" in final[-1] and "failed=4" in final[-1]  # skipped shards count too


def test_progress_ignores_late_reports():
    from types import SimpleNamespace

    from avprep.executors import _Progress

    job = SimpleNamespace(name="train-000000", records=[1, 2, 3])
    bar = _Progress([job], progress=True)
    bar.sample(job.name, True)
    bar.sample(job.name, False)
    bar.shard(job, {"failures": [{"key": "b"}, {"key": "c"}]})
    bar.sample(job.name, False)  # arrives after the shard's result: already counted
    assert bar.bar.n == 3 and bar.failed == 2


def test_shard_read_back_with_plain_webdataset(synth_dir, tmp_path):
    build(synth_dir / "manifest.jsonl", tmp_path / "out")
    manifest = read_manifest(synth_dir / "manifest.jsonl")
    labels = {r.key: r.label_id for r in manifest.records}
    urls = [str(p) for p in sorted((tmp_path / "out").glob("*.tar"))]
    seen = 0
    for sample in wds.WebDataset(urls, shardshuffle=False).decode("rgb8"):
        key = sample["__key__"]
        spec = sample["spec.npy"]
        assert spec.dtype == np.float16 and spec.shape == (129, 126)
        assert np.isfinite(spec.astype(np.float32)).all()
        assert sample["cls"] == labels[key]
        frames = [sample[k] for k in sorted(sample) if k.startswith("f0")]
        assert len(frames) == 2  # 1 s at 2 fps
        assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
        meta = sample["json"]
        assert meta["key"] == key and meta["n_frames"] == 2 and meta["audio"] == "decoded"
        assert meta["has_audio"] is True and abs(meta["duration"] - 1.0) < 0.1
        seen += 1
    assert seen == len(manifest.records)


def test_missing_audio_silence_keeps_the_clip(media, tmp_path):
    records = [Record(key="quiet", label="a", label_id=0, split="train",
                      video=str(media.no_audio))]
    write_manifest(records, tmp_path / "m.jsonl", classes=["a"], dataset="synth")
    build(tmp_path / "m.jsonl", tmp_path / "out", missing_audio="silence")
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train-000000.tar"),
                                      shardshuffle=False).decode()))
    assert sample["json"]["audio"] == "silence" and sample["json"]["has_audio"] is False
    assert sample["spec.npy"].shape == (129, 126)


def test_segment_duration_is_the_segment(media, tmp_path):
    records = [Record(key="seg", label="a", label_id=0, split="train", video=str(media.mp4),
                      start=0.5, end=1.5)]
    write_manifest(records, tmp_path / "m.jsonl", classes=["a"], dataset="synth")
    build(tmp_path / "m.jsonl", tmp_path / "out")
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train-000000.tar"),
                                      shardshuffle=False).decode()))
    assert abs(sample["json"]["duration"] - 1.0) < 1e-6
    frames = [k for k in sample if k.endswith(".jpg")]
    assert sample["json"]["n_frames"] == len(frames) >= 2


def test_late_video_stream_keeps_its_first_frame(tmp_path):
    # CREMA-D's FLVs start their video at 25 ms: f000 is the first decoded frame, not f001 again
    flv = make_frame_counter(tmp_path / "1001_DFA_ANG_XX.flv", vcodec="flv", acodec="libmp3lame")
    wav = make_wav(tmp_path / "1001_DFA_ANG_XX.wav", seconds=3.5)
    every, kept = released_frames(flv)
    records = [Record(key="1001_DFA_ANG_XX", label="a", label_id=0, split="train",
                      video=str(flv), audio=str(wav))]
    build_shards(records, str(tmp_path / "out"), get_preset("cremad"), classes=["a"],
                 dataset="cremad", workers=1)
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train-000000.tar"),
                                      shardshuffle=False).decode("rgb8")))
    frames = [sample[f"f{i:03d}.jpg"] for i in range(sample["json"]["n_frames"])]
    assert which_frames(frames, every) == kept == [0, 30, 60, 90]


def test_same_input_same_bytes(synth_dir, tmp_path):
    build(synth_dir / "manifest.jsonl", tmp_path / "a", workers=1)
    build(synth_dir / "manifest.jsonl", tmp_path / "b", workers=2)
    a, b = tar_bytes(tmp_path / "a"), tar_bytes(tmp_path / "b")
    assert a and a == b


# Seven samples reported: with 3 per shard, the build is inside its third shard.
HOLD_AT_SEVENTH_SAMPLE = """
from avprep import executors

_report = executors.report_sample
reported = [0]


def report_then_hold(name, ok):
    _report(name, ok)
    reported[0] += 1
    if reported[0] == 7:
        hold()


executors.report_sample = report_then_hold
"""


@pytest.mark.slow
def test_kill_then_rerun_gives_the_same_shards(mixed_manifest, tmp_path):
    reference = tmp_path / "reference"
    build(mixed_manifest, reference, shard_size=3)
    out = tmp_path / "killed"
    args = ["build-shards", "--manifest", str(mixed_manifest), "-o", str(out),
            "--shard-size", "3", "--workers", "1", "--no-progress"]
    proc = start_held(HOLD_AT_SEVENTH_SAMPLE, "avprep", args)
    wait_until_held(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # a crash, mid-shard
    proc.wait()
    assert not (out / "index.json").exists()  # it really was stopped mid-run
    assert len(list(out.glob("*-*.json"))) == 2  # two shards done, the third under way
    for tar in out.glob("*.tar"):  # every final-named tar is complete and readable
        with tarfile.open(tar) as fh:
            names = fh.getnames()
        assert all(n.split(".", 1)[0] for n in names)
    rerun = subprocess.run([str(BIN / "avprep"), *args], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "already done" in rerun.stdout
    assert tar_bytes(out) == tar_bytes(reference)
    assert keys_in(out) == keys_in(reference)
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    failed = [json.loads(line)["key"] for line in (out / "failures.jsonl").open()]
    assert sorted(failed) == ["bad_empty", "bad_no_audio", "bad_not_media", "bad_truncated"]


def test_disk_full_removes_the_temporary_tar_and_rerun_finishes(synth_dir, tmp_path,
                                                                monkeypatch):
    real_add = shards_mod.add_member
    calls = {"n": 0}

    def failing_add(tar, name, data):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_add(tar, name, data)

    monkeypatch.setattr(shards_mod, "add_member", failing_add)
    with pytest.raises(UserError, match="No space left on device.*rerun the same command"):
        build(synth_dir / "manifest.jsonl", tmp_path / "out")
    out = tmp_path / "out"
    assert not [p for p in os.listdir(out) if ".tmp" in p]
    done = {p.stem for p in out.glob("*.json") if p.stem.split("-")[0] in ("train", "val")}
    assert {p.stem for p in out.glob("*.tar")} == done  # no tar without its stats
    monkeypatch.setattr(shards_mod, "add_member", real_add)
    build(synth_dir / "manifest.jsonl", out)
    build(synth_dir / "manifest.jsonl", tmp_path / "clean")
    assert tar_bytes(out) == tar_bytes(tmp_path / "clean")


def test_changed_arguments_are_refused_unless_overwrite(synth_dir, tmp_path):
    build(synth_dir / "manifest.jsonl", tmp_path / "out", shard_size=5)
    with pytest.raises(UserError, match="changed: shard_size"):
        build(synth_dir / "manifest.jsonl", tmp_path / "out", shard_size=7)
    build(synth_dir / "manifest.jsonl", tmp_path / "out", shard_size=7, overwrite=True)
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert index["args"]["shard_size"] == 7
    assert all(s["samples"] <= 7 for s in index["splits"]["train"]["shards"])


def test_non_empty_foreign_folder_is_left_alone(synth_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        build(synth_dir / "manifest.jsonl", tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_long_keys_fit_in_the_tar(media, tmp_path):
    """Folder datasets take keys from file names; USTAR would refuse names over 100 bytes."""
    key = "a_very_long_clip_name_" * 6
    write_manifest([Record(key=key, label="a", label_id=0, split="train", video=str(media.mp4))],
                   tmp_path / "m.jsonl", classes=["a"], dataset="synth")
    build(tmp_path / "m.jsonl", tmp_path / "out")
    sample = next(iter(wds.WebDataset(str(tmp_path / "out/train-000000.tar"),
                                      shardshuffle=False).decode()))
    assert sample["__key__"] == key and sample["cls"] == 0
    assert sample["spec.npy"].shape == (129, 126)


def test_deleted_tar_is_rebuilt_on_rerun(synth_dir, tmp_path):
    build(synth_dir / "manifest.jsonl", tmp_path / "out")
    before = tar_bytes(tmp_path / "out")
    victim = sorted((tmp_path / "out").glob("train-*.tar"))[1]
    victim.unlink()
    summary = build(synth_dir / "manifest.jsonl", tmp_path / "out")
    assert summary.shards_written == 1
    assert tar_bytes(tmp_path / "out") == before


@pytest.mark.slow
def test_max_shard_bytes_cuts_parts_that_index_and_verify_see(synth_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli("build-shards", "--manifest", str(synth_dir / "manifest.jsonl"), "-o",
                     str(out), "--shard-size", "6", "--max-shard-bytes", "100K", "--workers", "1",
                     "--no-progress")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "index.json").read_text())
    shards = index["splits"]["train"]["shards"]
    assert any(s["url"].endswith("-001.tar") for s in shards)  # some shard was cut
    assert max(s["samples"] for s in shards) > 1  # ... into parts of several samples
    for s in shards:
        assert (out / s["url"]).stat().st_size == s["bytes"]
        assert s["bytes"] <= 100 * 1024 + 10240  # the cap + tarfile's end-of-archive padding
    assert sum(s["samples"] for s in shards) == index["splits"]["train"]["samples"]
    whole = tmp_path / "whole"
    build(synth_dir / "manifest.jsonl", whole, shard_size=6)
    assert keys_in(out) == keys_in(whole)
    assert run_cli("verify", str(out)).returncode == 0
    assert "not a size" in one_line_error(run_cli(
        "build-shards", "--manifest", str(synth_dir / "manifest.jsonl"), "-o", str(out),
        "--max-shard-bytes", "lots"))


def run_cli(*args):
    return subprocess.run([str(BIN / "avprep"), *args], capture_output=True, text=True)


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    return lines[0]


def test_cli_bad_input(synth_dir, tmp_path):
    manifest = str(synth_dir / "manifest.jsonl")
    (tmp_path / "a-file").write_text("x\n")  # missing parents are made; a file cannot hold OUT
    line = one_line_error(run_cli("build-shards", "--manifest", manifest,
                                  "-o", str(tmp_path / "a-file" / "such" / "out")))
    assert f"{tmp_path / 'a-file'} is a file" in line
    line = one_line_error(run_cli("build-shards", "--manifest", manifest, "--preset", "nope",
                                  "-o", str(tmp_path / "o1")))
    assert "unknown preset 'nope'" in line
    dup = tmp_path / "dup.jsonl"
    rows = [json.loads(x) for x in open(manifest)][1:3]
    rows[1]["key"] = rows[0]["key"]
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "duplicate key" in one_line_error(run_cli("build-shards", "--manifest", str(dup),
                                                     "--preset", "synth", "-o",
                                                     str(tmp_path / "o2")))
    rows[1]["key"] = "has.dot"
    dup.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "dots" in one_line_error(run_cli("build-shards", "--manifest", str(dup),
                                            "--preset", "synth", "-o", str(tmp_path / "o3")))
    assert "--manifest" in one_line_error(run_cli("build-shards", "-o", str(tmp_path / "o4")))
