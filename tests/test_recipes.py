"""Recipes: a paper's protocol under one name. Every shipped recipe is a valid config; flags
override it; shards built without the protocol's split lists (or with a carved val) are refused
in one line saying how to build them; a legacy (test-selected) run says so everywhere."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from click.testing import CliRunner
from mediagen import make_video, make_wav

from avtrain.config import TrainConfig, make_config
from avtrain.recipes import load_recipe, recipe_names
from cli import avprep, avtrain

NEEDED = {"ogm_ge-cremad", "ogm_ge-vggsound", "ogm_ge-ks", "olm-cremad", "olm_com-cremad",
          "olm-ave", "olm_com-mer"}
EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]


def test_every_needed_recipe_ships_and_is_a_valid_config():
    assert NEEDED <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        config = make_config(recipe.settings, {"recipe": name})
        for key, value in recipe.settings.items():
            assert getattr(config, key) == value, (name, key)
        assert recipe.protocol in ("legacy", "val", "folds")
        assert recipe.differences, f"{name} must say what still differs from the released code"
        assert (config.val_split == config.test_split) == recipe.legacy, name
        if recipe.protocol == "folds":
            assert config.folds


def test_ogm_ge_recipes_follow_the_released_main_py():
    """main.py's argparse defaults and its optimizer/scheduler lines (GeWu-Lab/OGM-GE_CVPR2022)."""
    for name in ("ogm_ge-cremad", "ogm_ge-vggsound", "ogm_ge-ks"):
        s = load_recipe(name).settings
        assert (s["optimizer"], s["lr"], s["momentum"], s["weight_decay"]) == \
            ("sgd", 1e-3, 0.9, 1e-4)
        assert (s["scheduler"], s["lr_step"], s["lr_gamma"], s["epochs"]) == ("step", 70, 0.1, 100)
        assert (s["global_batch_size"], s["amp"], s["init"], s["fusion"]) == \
            (64, False, "ogm_ge", "concat")
        assert (s["modulation_start"], s["modulation_end"]) == (0, 50)
    assert load_recipe("ogm_ge-cremad").settings["alpha"] == 0.8
    assert load_recipe("ogm_ge-vggsound").settings["alpha"] == 0.1


def test_print_config_lists_recipes_and_flags_override():
    runner = CliRunner()
    out = runner.invoke(avtrain, ["fit", "--recipe", "ogm_ge-cremad", "--epochs", "3",
                                  "--print-config"])
    assert out.exit_code == 0, out.output
    config = yaml.safe_load(out.output)
    assert config["recipe"] == "ogm_ge-cremad" and config["epochs"] == 3
    assert config["alpha"] == 0.8 and config["val_split"] == "test"
    listing = runner.invoke(avtrain, ["recipes"])
    assert listing.exit_code == 0
    lines = listing.output.strip().splitlines()
    assert [line.split()[0] for line in lines] == recipe_names()
    shown = runner.invoke(avtrain, ["recipes", "olm_com-cremad"])
    assert "still differs from the released code" in shown.output
    assert "olm_heldout: train" in shown.output
    bad = runner.invoke(avtrain, ["fit", "--recipe", "ogm-cremad", "--print-config"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "Error: unknown recipe 'ogm-cremad'; choose one of: " + ", ".join(recipe_names())]


@pytest.fixture(scope="module")
def cremad_lists(tmp_path_factory):
    """A small CREMA-D tree (real flv + wav) and OGM-GE-style train.csv / test.csv lists."""
    base = tmp_path_factory.mktemp("cremad")
    flv = make_video(base / "c.flv", seconds=1.0, size=(96, 72), fps=30, vcodec="flv",
                     acodec="libmp3lame")
    wav = make_wav(base / "c.wav", seconds=1.0, rate=16000)
    root = base / "CREMA-D"
    rows = {"train": [], "test": []}
    for actor in range(1001, 1007):
        for emo in EMOTIONS:
            stem = f"{actor}_DFA_{emo}_XX"
            for folder, src, ext in (("VideoFlash", flv, "flv"), ("AudioWAV", wav, "wav")):
                (root / folder).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, root / folder / f"{stem}.{ext}")
            rows["test" if actor == 1006 else "train"].append(f"{stem},{emo}\n")
    for split, lines in rows.items():
        (base / f"{split}.csv").write_text("".join(lines))
    return base, root


def build(args) -> None:
    result = CliRunner().invoke(avprep, ["build-shards", "--no-progress", "--workers", "2",
                                         "--shard-size", "12", *args])
    assert result.exit_code == 0, result.output


def test_recipe_refuses_shards_built_otherwise_and_labels_the_legacy_run(cremad_lists,
                                                                          tmp_path):
    base, root = cremad_lists
    plain, listed = tmp_path / "plain", tmp_path / "listed"
    build(["--dataset", "cremad", "--root", str(root), "-o", str(plain)])
    lists = ["--split-file", str(base / "train.csv"), "--split-file", str(base / "test.csv")]
    build(["--dataset", "cremad", "--root", str(root), *lists, "--val-fraction", "0", "-o",
           str(listed)])
    index = json.loads((listed / "index.json").read_text())
    assert [f["name"] for f in index["args"]["split_files"]] == ["train.csv", "test.csv"]
    assert index["splits"]["train"]["samples"] == 30 and index["splits"]["test"]["samples"] == 6

    quick = ["--model", "tiny", "--epochs", "1", "--global-batch-size", "6", "--image-size",
             "32", "--workers", "0", "--steps-per-epoch", "2", "--no-progress",
             "--no-linear-probe"]
    runner = CliRunner()
    refused = runner.invoke(avtrain, ["fit", "--recipe", "ogm_ge-cremad", "--shards", str(plain),
                                      "--run-dir", str(tmp_path / "r0"), *quick])
    assert refused.exit_code == 2
    line = refused.output.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(
        "Error: recipe ogm_ge-cremad needs shards built with the split lists train.csv and "
        "test.csv (from the OGM-GE repository")
    assert "avprep build-shards --dataset cremad" in line[0]
    assert not (tmp_path / "r0").exists()  # nothing trained on a half-configured protocol

    run = tmp_path / "legacy"
    result = runner.invoke(avtrain, ["fit", "--recipe", "ogm_ge-cremad", "--shards", str(listed),
                                     "--run-dir", str(run), *quick])
    assert result.exit_code == 0, result.output
    assert "LEGACY: best epoch chosen on the test split" in result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["protocol"] == "legacy" and summary["recipe"] == "ogm_ge-cremad"
    assert summary["val"] == summary["test"]  # the legacy protocol's val *is* test
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "ogm_ge-cremad" and saved["batch_size"] == 6
    assert saved["init"] == "ogm_ge" and saved["eval_resize"] == "square"
    report = runner.invoke(avtrain, ["report", str(run), "-o", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| LEGACY: test-selected |" in text and "their test accuracy is optimistic" in text


def test_a_carved_val_is_refused_for_a_recipe_that_trains_on_the_whole_list(cremad_lists,
                                                                           tmp_path):
    base, root = cremad_lists
    out = tmp_path / "carved"
    build(["--dataset", "cremad", "--root", str(root), "--split-file", str(base / "train.csv"),
           "--split-file", str(base / "test.csv"), "--val-fraction", "0.2", "-o", str(out)])
    result = CliRunner().invoke(avtrain, ["fit", "--recipe", "ogm_ge-cremad", "--shards",
                                          str(out), "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert "build with --val-fraction 0" in result.output.strip().splitlines()[-1]


def test_global_batch_size_splits_over_processes():
    from avtrain.loop import per_process_batch

    config = TrainConfig(global_batch_size=64)
    assert per_process_batch(config, 1).batch_size == 64
    assert per_process_batch(config, 4).batch_size == 16
    from avprep.errors import UserError

    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        per_process_batch(config, 3)
    assert per_process_batch(TrainConfig(batch_size=8), 2).batch_size == 8
