"""Output folders: every command that writes one works in an empty folder with an output path
whose parents do not exist yet (as the docs write them: `-o shards/cremad`), and what cannot be
a folder is one Error line. The same refusals for every command's output parameters, walked
from the click tree, are in test_cli_tree.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from avprep.errors import UserError
from avprep.outputs import check_output_dir, make_output_dir
from cli import avprep, avtrain


def ok(group, *args):
    result = CliRunner().invoke(group, [str(a) for a in args])
    assert result.exit_code == 0, f"{args}: {result.output}"
    return result.output


def refused(group, *args) -> str:
    result = CliRunner().invoke(group, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, f"{args}: exit {result.exit_code}\n{result.output}"
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    return lines[0]


@pytest.mark.slow
def test_every_command_in_an_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(avprep, "synth", "data/synth", "--classes", 2, "--per-class", 3, "--seconds", 1,
       "--size", 32, "--workers", 1)
    ok(avprep, "manifest", "--dataset", "synth", "--root", "data/synth",
       "-o", "manifests/synth/all.jsonl")
    manifest = "manifests/synth/all.jsonl"
    keys = [json.loads(x)["key"] for x in open(manifest) if '"_meta"' not in x]
    assert len(keys) == 6
    ok(avprep, "extract-frames", "--manifest", manifest, "-o", "extracted/frames/synth",
       "--size", 32, "--workers", 1)
    assert all((tmp_path / "extracted/frames/synth" / k / "00000.jpg").is_file() for k in keys)
    ok(avprep, "extract-audio", "--manifest", manifest, "-o", "extracted/audio/synth",
       "--workers", 1)
    assert all((tmp_path / "extracted/audio/synth" / f"{k}.wav").is_file() for k in keys)
    ok(avprep, "build-shards", "--manifest", manifest, "-o", "shards/synth", "--preset", "synth",
       "--shard-size", 4, "--workers", 1, "--no-progress")
    index = json.loads((tmp_path / "shards/synth/index.json").read_text())
    assert sum(split["samples"] for split in index["splits"].values()) == 6
    (tmp_path / "feats").mkdir()
    for i, key in enumerate(keys):
        np.save(tmp_path / "feats" / f"{key}.npy", np.full((3, 2), i, np.float32))
    ok(avprep, "import-features", "--feature", "audio=feats", "--manifest", manifest,
       "-o", "shards/features/synth", "--workers", 1, "--no-progress")
    assert (tmp_path / "shards/features/synth/index.json").is_file()
    ok(avprep, "inspect", "shards/synth", "--show", keys[0], "--png", f"pictures/one/{keys[0]}.png")
    assert (tmp_path / "pictures/one" / f"{keys[0]}.png").stat().st_size > 0
    ok(avtrain, "fit", "--shards", "shards/synth", "--run-dir", "runs/synth/first",
       "--model", "tiny", "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 2,
       "--image-size", 32, "--workers", 0, "--device", "cpu", "--no-progress")
    assert (tmp_path / "runs/synth/first/last.pt").is_file()
    ok(avtrain, "report", "runs/synth/first", "-o", "reports/synth/first")
    assert (tmp_path / "reports/synth/first/report.md").is_file()


@pytest.mark.slow
def test_bench_folder_with_missing_parents(train_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ok(avtrain, "bench", "-o", "benches/synth/first", "--shards", train_shards,
       "--methods", "none", "--seeds", 1, "--no-references", "--model", "tiny",
       "--epochs", 1, "--steps-per-epoch", 1, "--batch-size", 2, "--image-size", 32,
       "--workers", 0, "--device", "cpu", "--no-progress")
    assert (tmp_path / "benches/synth/first/results.md").is_file()


def test_what_cannot_be_a_folder_is_one_line(synth_dir, tmp_path):
    manifest = synth_dir / "manifest.jsonl"
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    line = refused(avprep, "build-shards", "--manifest", manifest, "-o", a_file / "shards")
    assert f"{a_file} is a file" in line
    line = refused(avprep, "extract-audio", "--manifest", manifest, "-o", a_file / "x" / "y")
    assert f"{a_file} is a file" in line
    line = refused(avprep, "manifest", "--dataset", "synth", "--root", synth_dir,
                   "-o", a_file / "m.jsonl")
    assert f"{a_file} exists and is not a folder" in line
    assert a_file.read_text() == "not a folder\n"  # nothing was written over it
    with pytest.raises(UserError, match="exists and is not a folder"):
        make_output_dir(a_file)


def test_check_output_dir_creates_nothing_and_skips_remote(tmp_path):
    check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()
    check_output_dir("s3://bucket/prefix/shards")  # the store's business
    make_output_dir(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir()
    make_output_dir(tmp_path / "new" / "deeper")  # already there: fine
