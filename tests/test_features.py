"""import-features: per-clip .npy sequences of different lengths and dims -> shards; missing
modalities dropped or masked; bad folders and files named in one clear line."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner

from avprep.errors import UserError
from avprep.features import import_features, parse_feature_args
from avprep.manifest import Record, read_manifest, write_manifest
from cli import avprep

CLASSES = ["neutral", "angry", "happy"]
DIMS = {"audio": 6, "visual": 5, "text": 4}


@pytest.fixture
def feature_tree(tmp_path) -> Path:
    """12 clips; audio/visual/text features with lengths 2..13; one visual file missing,
    one clip's visual stored as a single vector [dim]; MER-like names in extra.clip."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        name = f"sample_{i:08d}"
        extra = {"clip": name, "features": sorted(DIMS)}
        if i % 2 == 0:
            extra["transcript"] = f"sentence number {i}"
        records.append(Record(key=name, label=CLASSES[i % 3], label_id=i % 3,
                              split=["train", "train", "val", "test"][i % 4], extra=extra))
    write_manifest(records, tmp_path / "manifest.jsonl", classes=CLASSES, dataset="mer")
    for m, dim in DIMS.items():
        folder = tmp_path / m
        folder.mkdir()
        for i, r in enumerate(records):
            if m == "visual" and i == 5:
                continue
            shape = (dim,) if (m == "visual" and i == 7) else (2 + i + len(m), dim)
            np.save(folder / f"{r.key}.npy", rng.standard_normal(shape).astype(np.float32))
    return tmp_path


def run(tree: Path, out: Path, modalities=("audio", "visual", "text"), **kw):
    manifest = read_manifest(tree / "manifest.jsonl")
    kw.setdefault("workers", 1)
    kw.setdefault("shard_size", 4)
    return import_features(manifest.records, {m: str(tree / m) for m in modalities}, str(out),
                           classes=manifest.classes, dataset="mer", **kw)


def read_back(out: Path) -> dict[str, dict]:
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(tar), shardshuffle=False):
            samples[s["__key__"]] = s
    return samples


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_import_packs_sequences_with_dims_and_lengths(feature_tree, tmp_path):
    summary = run(feature_tree, tmp_path / "out")
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert {m: f["dim"] for m, f in index["features"].items()} == DIMS
    assert index["modalities"] == ["audio", "visual", "text"]
    assert index["features"]["visual"]["missing"] == 1
    assert index["splits"]["train"]["samples"] + index["splits"]["val"]["samples"] + \
        index["splits"]["test"]["samples"] == 11
    samples = read_back(tmp_path / "out")
    assert len(samples) == 11 and "sample_00000005" not in samples  # dropped: no visual
    for key, s in samples.items():
        i = int(key.split("_")[1])
        meta = json.loads(s["json"])
        assert int(s["cls"]) == i % 3 and meta["masked"] == []
        for m, dim in DIMS.items():
            arr = npy(s[f"{m}.npy"])
            assert arr.shape[1] == dim
            original = np.load(feature_tree / m / f"{key}.npy")
            original = original[None] if original.ndim == 1 else original
            assert arr.dtype == np.float16 and arr.shape == original.shape
            assert meta["lengths"][m] == original.shape[0]
            np.testing.assert_allclose(arr.astype(np.float32), original, rtol=1e-3, atol=1e-3)
        assert ("txt" in s) == (i % 2 == 0)
        if i % 2 == 0:
            assert s["txt"].decode() == f"sentence number {i}"
    missing = [json.loads(x) for x in (tmp_path / "out/missing.jsonl").read_text().splitlines()]
    assert missing == [{"key": "sample_00000005", "split": "train", "missing": ["visual"],
                        "kept": False}]
    assert "1 clip(s) lack a modality: dropped" in summary.describe()
    # the same command again: every shard already done, nothing rewritten
    again = run(feature_tree, tmp_path / "out")
    assert again.shards_written == 0 and again.shards_skipped == summary.shards_written


def test_keep_missing_masks_the_modality(feature_tree, tmp_path):
    run(feature_tree, tmp_path / "out", keep_missing=True, dtype="float32")
    s = read_back(tmp_path / "out")["sample_00000005"]
    meta = json.loads(s["json"])
    assert meta["masked"] == ["visual"] and meta["lengths"]["visual"] == 0
    assert npy(s["visual.npy"]).shape == (0, 5) and npy(s["audio.npy"]).dtype == np.float32
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert index["keep_missing"] is True and index["missing"] == 1
    assert sum(sp["samples"] for sp in index["splits"].values()) == 12


def test_inconsistent_dims_name_the_files(feature_tree, tmp_path):
    np.save(feature_tree / "audio" / "sample_00000003.npy", np.zeros((4, 9), np.float32))
    with pytest.raises(UserError) as err:
        run(feature_tree, tmp_path / "out")
    msg = str(err.value)
    assert "audio feature dims differ" in msg and "dim 9 in sample_00000003.npy" in msg
    assert "dim 6 in sample_00000000.npy" in msg
    assert not (tmp_path / "out").exists()  # nothing written before the check


def test_folder_without_matching_keys(feature_tree, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "clip_a.npy", np.zeros((3, 2), np.float32))
    manifest = read_manifest(feature_tree / "manifest.jsonl")
    with pytest.raises(UserError, match=r"other: no audio feature file matches .*clip_a"):
        import_features(manifest.records, {"audio": str(other)}, str(tmp_path / "out"),
                        classes=CLASSES)
    with pytest.raises(UserError, match="feature folder not found"):
        import_features(manifest.records, {"audio": str(tmp_path / "nope")},
                        str(tmp_path / "out"), classes=CLASSES)


def test_object_arrays_are_refused_without_unpickling(feature_tree, tmp_path):
    np.save(feature_tree / "text" / "sample_00000002.npy", np.array([{"x": 1}], dtype=object),
            allow_pickle=True)
    with pytest.raises(UserError, match=r"sample_00000002.npy: text features must be numbers"):
        run(feature_tree, tmp_path / "out")


def test_broken_files_are_per_sample_failures(feature_tree, tmp_path):
    path = feature_tree / "audio" / "sample_00000004.npy"
    path.write_bytes(path.read_bytes()[:200])  # header intact, data cut short
    bad = np.ones((3, 4), np.float32)
    bad[1, 2] = np.nan
    np.save(feature_tree / "text" / "sample_00000006.npy", bad)
    summary = run(feature_tree, tmp_path / "out")
    failures = [json.loads(x) for x in (tmp_path / "out/failures.jsonl").read_text().splitlines()]
    reasons = {f["key"]: f["error"] for f in failures}
    assert set(reasons) == {"sample_00000004", "sample_00000006"}
    assert "truncated" in reasons["sample_00000004"]
    assert "NaN" in reasons["sample_00000006"]
    samples = read_back(tmp_path / "out")
    assert len(samples) == 9 and not {"sample_00000004", "sample_00000006"} & set(samples)
    assert summary.index["failures"] == 2


def test_changed_arguments_need_overwrite(feature_tree, tmp_path):
    run(feature_tree, tmp_path / "out", modalities=("audio", "visual"))
    with pytest.raises(UserError, match="other arguments"):
        run(feature_tree, tmp_path / "out")
    run(feature_tree, tmp_path / "out", overwrite=True)
    index = json.loads((tmp_path / "out/index.json").read_text())
    assert set(index["features"]) == set(DIMS)


def test_cli(feature_tree, tmp_path):
    runner = CliRunner()
    args = ["import-features", "--manifest", str(feature_tree / "manifest.jsonl"),
            "-o", str(tmp_path / "out"), "--workers", "1", "--no-progress"]
    feats = [x for m in DIMS for x in ("--feature", f"{m}={feature_tree / m}")]
    result = runner.invoke(avprep, args + feats)
    assert result.exit_code == 0, result.output
    assert "visual: dim 5, 11 clip(s), 1 missing" in result.output
    bad = runner.invoke(avprep, args + ["--feature", str(feature_tree / "audio")])
    assert bad.exit_code == 2 and "--feature expects MODALITY=DIR" in bad.output
    assert "Traceback" not in bad.output


def test_parse_feature_args():
    assert parse_feature_args(["audio=a", "text=b/c"]) == {"audio": "a", "text": "b/c"}
    for bad in (["audio=a", "audio=b"], ["au.dio=x"], [], ["=x"]):
        with pytest.raises(UserError):
            parse_feature_args(bad)


def test_a_feature_only_manifest_needs_no_media_paths(feature_tree, tmp_path):
    """Users with features extracted elsewhere (no videos) write key, label, label_id, split and
    nothing else; import-features takes it, build-shards (which decodes) refuses it in a line."""
    records = read_manifest(feature_tree / "manifest.jsonl").records
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"key": r.key, "label": r.label, "label_id": r.label_id,
                                         "split": r.split}) + "\n" for r in records))
    runner = CliRunner()
    result = runner.invoke(avprep, ["import-features", "--manifest", str(plain), "-o",
                                    str(tmp_path / "out"), "--workers", "1", "--no-progress",
                                    "--feature", f"audio={feature_tree / 'audio'}"])
    assert result.exit_code == 0, result.output
    samples = read_back(tmp_path / "out")
    assert sorted(samples) == sorted(r.key for r in records)
    for r in records:
        assert int(samples[r.key]["cls"]) == r.label_id
        np.testing.assert_array_equal(npy(samples[r.key]["audio.npy"]).astype(np.float32),
                                      np.load(feature_tree / "audio" / f"{r.key}.npy")
                                      .astype(np.float16).astype(np.float32))
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["classes"] == CLASSES
    refused = runner.invoke(avprep, ["build-shards", "--manifest", str(plain), "-o",
                                     str(tmp_path / "shards"), "--preset", "synth"])
    assert refused.exit_code == 2
    assert refused.output.strip().splitlines()[-1].endswith("neither video nor audio path")
