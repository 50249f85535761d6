"""Manifest records, split files, val carving, and the per-dataset YAML defaults."""

from __future__ import annotations

import json

import pytest

from avprep.datasets import available, dataset_defaults
from avprep.errors import UserError
from avprep.manifest import (
    Record,
    carve_val,
    clip_id,
    hash_fraction,
    read_manifest,
    read_split_files,
    validate,
    write_manifest,
)
from avprep.presets import get_preset


def test_write_read_roundtrip_keeps_classes_and_resolves_relative_paths(tmp_path):
    records = [Record("a_1", "dog", 1, "train", video="clips/a.mp4", extra={"actor": "7"}),
               Record("b-2", "cat", 0, "test", video="/abs/b.mp4", audio="b.wav", start=1.0,
                      end=3.5)]
    path = tmp_path / "m.jsonl"
    assert write_manifest(records, path, classes=["cat", "dog"], dataset="x") == 2
    first = json.loads(path.read_text().splitlines()[0])
    assert first == {"_meta": {"dataset": "x", "classes": ["cat", "dog"]}}
    m = read_manifest(path)
    assert m.classes == ["cat", "dog"] and m.dataset == "x"
    assert m.records[0].video == str(tmp_path / "clips" / "a.mp4")
    assert m.records[0].extra == {"actor": "7"}
    assert (m.records[1].start, m.records[1].end) == (1.0, 3.5)
    assert m.records[1].audio == str(tmp_path / "b.wav")


@pytest.mark.parametrize("record, message", [
    (Record("a.b", "cat", 0, "train", video="x"), "key must use only"),
    (Record("a", "cat", 0, "holdout", video="x"), "split 'holdout'"),
    (Record("a", "cow", 0, "train", video="x"), "label 'cow' is not in the class list"),
    (Record("a", "dog", 0, "train", video="x"), "label_id 0 does not match"),
    (Record("a", "cat", 0, "train"), "neither video nor audio"),
    (Record("a", "cat", 0, "train", video="x", start=3.0, end=2.0), "not after start"),
])
def test_validate_rejects(record, message):
    with pytest.raises(UserError, match=message):
        validate([record], ["cat", "dog"])


def test_validate_duplicate_and_empty():
    r = Record("a", "cat", 0, "train", video="x")
    with pytest.raises(UserError, match="duplicate key"):
        validate([r, r], ["cat"])
    with pytest.raises(UserError, match="empty manifest"):
        validate([], ["cat"])


def test_clip_id():
    assert clip_id("1001_DFA_ANG_XX") == "1001_DFA_ANG_XX"
    assert clip_id("VideoFlash/1001_DFA_ANG_XX.flv") == "1001_DFA_ANG_XX"
    assert clip_id("C:\\data\\clip.MP4") == "clip"
    assert clip_id("yt_id.with.dots") == "yt_id.with.dots"  # not a media extension


def test_split_files_from_names_columns_and_headers(tmp_path):
    (tmp_path / "train.csv").write_text("1001_DFA_ANG_XX,ANG\n1002_DFA_SAD_XX,SAD\n")
    (tmp_path / "my_test.txt").write_text("clip,label\n1003_DFA_HAP_XX.flv,HAP\n")
    (tmp_path / "all.csv").write_text("x1,dog,val\nx2,cat,Validation\nx3,cat,train\n")
    got = read_split_files([tmp_path / "train.csv", tmp_path / "my_test.txt",
                            tmp_path / "all.csv"])
    assert got == {"1001_DFA_ANG_XX": "train", "1002_DFA_SAD_XX": "train",
                   "1003_DFA_HAP_XX": "test", "x1": "val", "x2": "val", "x3": "train"}


def test_split_file_errors(tmp_path):
    (tmp_path / "lists.csv").write_text("a,dog\n")
    with pytest.raises(UserError, match="cannot tell which split row 1"):
        read_split_files([tmp_path / "lists.csv"])
    (tmp_path / "train.csv").write_text("a,dog\n")
    (tmp_path / "test.csv").write_text("a,dog\n")
    with pytest.raises(UserError, match="clip 'a' is already listed in split 'train'"):
        read_split_files([tmp_path / "train.csv", tmp_path / "test.csv"])
    (tmp_path / "val.csv").write_text("\n")
    with pytest.raises(UserError, match="lists no clips"):
        read_split_files([tmp_path / "val.csv"])
    with pytest.raises(UserError, match="does not exist"):
        read_split_files([tmp_path / "nope.csv"])


def test_carve_val_moves_whole_groups_deterministically():
    records = [Record(f"k{i}", "a", 0, "train", video="v", extra={"group": f"g{i // 4}"})
               for i in range(400)] + [Record("t", "a", 0, "test", video="v")]
    moved = carve_val(records, 0.2)
    val_groups = {r.extra["group"] for r in records if r.split == "val"}
    train_groups = {r.extra["group"] for r in records if r.split == "train"}
    assert moved == 4 * len(val_groups) and not val_groups & train_groups
    assert 10 <= len(val_groups) <= 30  # ~20 % of 100 groups
    assert val_groups == {g for g in {f"g{i}" for i in range(100)}
                          if hash_fraction(g, "avbalance-val") < 0.2}
    assert records[-1].split == "test"
    with pytest.raises(UserError, match="val fraction"):
        carve_val(records, 1.5)


def test_every_dataset_has_usable_defaults():
    for name in available():
        d = dataset_defaults(name)
        assert d["name"] == name
        get_preset(d["preset"])  # names a real preset
        assert "ogm_ge_alpha" in d and d["alpha_note"] and d["layout"] and d["splits"]
        if d["classes"] is not None:
            assert len(set(d["classes"])) == len(d["classes"])
    assert dataset_defaults("cremad")["ogm_ge_alpha"] == 0.8
    assert dataset_defaults("vggsound")["ogm_ge_alpha"] == 0.1
    assert len(dataset_defaults("ave")["classes"]) == 28
    # the released ids: OGM-GE / OLM class_dict = {NEU: 0, HAP: 1, SAD: 2, FEA: 3, DIS: 4, ANG: 5}
    assert dataset_defaults("cremad")["classes"] == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert dataset_defaults("mer")["classes"] == ["neutral", "angry", "happy", "sad", "worried",
                                                  "surprise"]
    copy = dataset_defaults("cremad")
    copy["classes"].append("XXX")
    assert "XXX" not in dataset_defaults("cremad")["classes"]  # callers get their own copy
