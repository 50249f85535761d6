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

from avprep.errors import UserError
from avtrain.config import TrainConfig
from avtrain.recipes import PRESET_DEFAULTS, check_shards, load_recipe, recipe_names
from avtrain.settings import make_config, resolved_options
from cli import avprep, avtrain

NEEDED = {"ogm_ge-cremad", "ogm_ge-vggsound", "ogm_ge-ks", "olm-cremad", "olm_com-cremad",
          "olm-ave", "olm_com-mer"}
EMOTIONS = ["ANG", "DIS", "FEA", "HAP", "NEU", "SAD"]
RELEASED_CREMAD = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]  # both released CramedDatasets
CREMAD_INPUTS = {"resampler": "kaiser_best", "spectrogram.pad_mode": "reflect"}


def test_every_needed_recipe_ships_and_asks_for_shards_avprep_can_build():
    """Each recipe's data block names a dataset and preset avprep has, preset parameters the
    preset records, and a prepare command that builds them; its protocol is labelled."""
    from avprep.datasets import dataset_defaults
    from avprep.presets import PRESETS

    assert NEEDED <= set(recipe_names())
    for name in recipe_names():
        recipe = load_recipe(name)
        config = make_config(recipe.settings, {"recipe": name})
        assert recipe.protocol in ("legacy", "val", "folds")
        assert recipe.differences, f"{name} must say what still differs from the released code"
        assert recipe.released_reports, f"{name} must say what the released run printed"
        assert (config.val_split == config.test_split) == recipe.legacy, name
        assert bool(config.folds) == (recipe.protocol == "folds"), name
        data = recipe.data
        assert f"--dataset {data['dataset']}" in data["prepare"] or data["dataset"] == "mer", name
        if "preset" in data:  # the prepare command (no --preset) builds the preset asked for
            assert data["preset"] in PRESETS, name
            assert dataset_defaults(data["dataset"]).get("preset") == data["preset"], name


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


# Transcribed from the released OLM code (anonymous-gitlab/OLM @ c4a4244): (value, where).
_OLM_CNN = {  # main_logits.py; main_logits_com.py has the same lines one further down
    "model": ("resnet18", "models/basic_model.py 14-15: ResNet18 audio_net and visual_net"),
    "fusion": ("bilinear", "scripts/run_logits*.sh line 9: --fusion_method='bilinear'"),
    "epochs": (10, "scripts/run_logits*.sh line 11: --epochs=10"),
    "lr": (1e-4, "scripts/run_logits*.sh line 12: --lr=1e-4"),
    "optimizer": ("adam", "main_logits.py line 106: optim.Adam(model.parameters(), ...)"),
    "weight_decay": (2e-4, "main_logits.py line 143: --l2 default 0.0002, used at line 106"),
    "scheduler": ("none", "main_logits.py: no lr_scheduler anywhere"),
    "folds": (5, "main_logits.py line 56: args.num_folder = 5"),
    "frames": (1, "main_logits.py line 123: --fps default 1; cremad_dataset.py line 90"),
    "image_size": (224, "datasets/cremad_dataset.py lines 75, 82: RandomResizedCrop(224), "
                        "Resize((224, 224))"),
    "amp": (False, "engines/engine_logits.py: no autocast"),
    "init": ("torch", "main_logits.py initialize_model (lines 90-108): no weight_init applied"),
    "olm_initial": ("last-batch", "engines/engine_logits.py lines 59-60: initial_loss "
                                  "overwritten by every batch of epoch 0"),
    "olm_reduction": ("sum", "losses/loss.py line 18: CrossEntropyLoss(reduction='sum')"),
}
RELEASED_OLM = {
    "olm-cremad": {**_OLM_CNN, "method": ("olm", "main_logits.py"),
                   "global_batch_size": (96, "scripts/run_logits.sh line 10: --batch_size=96")},
    "olm-ave": {**_OLM_CNN, "method": ("olm", "main_logits.py"),
                "global_batch_size": (96, "scripts/run_logits.sh line 10: --batch_size=96")},
    "olm_com-cremad": {
        **_OLM_CNN, "method": ("olm_com", "main_logits_com.py"),
        "global_batch_size": (64, "scripts/run_logits_com.sh line 10: --batch_size=64"),
        "olm_heldout": ("train", "engines/engine_logits_com.py lines 37, 60: the held-out batch "
                                 "goes through the model in train mode"),
        "epoch_steps": ("shorter", "engines/engine_logits_com.py line 39: for train_data, "
                                   "eval_data in zip(train_dataloader, eval_dataloader)")},
    "olm_com-mer": {
        "method": ("olm_com", "main_trans_logits_com.py"),
        "epoch_steps": ("shorter", "engines/engine_trans_logits_com.py line 32: for "
                                   "train_data, eval_data in zip(train_dataloader, ...)"),
        "model": ("emt", "scripts/run_trans_logits_com.sh line 17: model_type emt, mbt, umt, ca"),
        "global_batch_size": (2, "scripts/run_trans_logits_com.sh line 13: --batch_size=2"),
        "lr": (1e-4, "scripts/run_trans_logits_com.sh line 14: --lr=1e-4"),
        "epochs": (10, "main_trans_logits_com.py line 148: --epochs default 10"),
        "optimizer": ("adam", "main_trans_logits_com.py line 94: optim.Adam(model.parameters())"),
        "weight_decay": (2e-4, "main_trans_logits_com.py line 144: --l2 default 0.0002"),
        "scheduler": ("none", "main_trans_logits_com.py: no lr_scheduler anywhere"),
        "folds": (5, "main_trans_logits_com.py line 23: args.num_folder = 5"),
        "amp": (False, "engines/engine_trans_logits_com.py: no autocast"),
        "olm_initial": ("last-batch", "engines/engine_trans_logits_com.py lines 66-68"),
        "olm_reduction": ("sum", "losses/loss.py line 18: CrossEntropyLoss(reduction='sum')")},
}
# the coefficients' own Adam (lr, weight decay)
RELEASED_OLM_COEFFICIENTS = {
    "olm-cremad": ((1e-3, 0.0), "main_logits.py line 105: optim.Adam([weights], lr=0.001)"),
    "olm-ave": ((1e-3, 0.0), "main_logits.py line 105"),
    "olm_com-cremad": ((1e-3, 0.0), "main_logits_com.py line 106: Adam([weights], lr=0.001)"),
    "olm_com-mer": ((1e-4, 2e-4), "main_trans_logits_com.py line 93: Adam([weights], "
                                  "lr=args.lr, weight_decay=args.l2)"),
}


@pytest.mark.parametrize("name", sorted(RELEASED_OLM))
def test_olm_recipes_follow_the_released_scripts(name):
    """The config an OLM recipe runs (flags aside) has the released scripts' values; the
    coefficient optimizer the method builds from it is the released one."""
    from avtrain.balance.olm import coefficient_optimizer_settings

    config = make_config(load_recipe(name).settings, {"recipe": name})
    options = resolved_options(config.to_dict())  # the method's options (olm_x: "x")
    for key, (want, where) in RELEASED_OLM[name].items():
        got = options[key[4:]] if key.startswith("olm_") else getattr(config, key)
        assert got == want, f"{name}: {key} is {got!r}, released {want!r} ({where})"
    want, where = RELEASED_OLM_COEFFICIENTS[name]
    assert coefficient_optimizer_settings(config.to_dict()) == want, (name, where)


def test_recipes_say_what_the_released_run_printed():
    """OLM printed held-out metrics under train transforms at epochs 0 and 5 only, OLM-com
    training-batch metrics, OGM-GE test accuracy every epoch: `avtrain recipes NAME` says so."""
    runner = CliRunner()
    shown = {n: runner.invoke(avtrain, ["recipes", n]).output for n in recipe_names()}
    for name, text in shown.items():
        assert "what the released run printed, and what fit reports:" in text, name
    for name in ("olm-cremad", "olm-ave"):
        assert "only after epochs 0 and 5" in shown[name] and "train transforms" in shown[name]
        assert "never evaluated" in shown[name]
    for name in ("olm_com-cremad", "olm_com-mer"):
        assert "feeds only the train batches" in shown[name]
        assert "That is training accuracy" in shown[name]
    for name in ("ogm_ge-cremad", "ogm_ge-vggsound", "ogm_ge-ks"):
        assert "test loader after every epoch" in shown[name]


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
    assert "method_options: {initial: last-batch, reduction: sum, heldout: train}" in \
        shown.output
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


def set_preset_params(out, params: dict | None) -> dict:
    """Rewrite index.json's preset parameters: None removes them (an index written by an avprep
    that did not record them yet), a dict sets them as the presets of this version record
    them. Returns the index."""
    path = out / "index.json"
    index = json.loads(path.read_text())
    for dotted in PRESET_DEFAULTS:
        *parents, leaf = dotted.split(".")
        node = index["preset"]
        for part in parents:
            node = node.setdefault(part, {})
        if params is None:
            node.pop(leaf, None)
        elif dotted in params:
            node[leaf] = params[dotted]
    path.write_text(json.dumps(index))
    return index


@pytest.mark.slow
def test_recipe_refuses_shards_built_otherwise_and_labels_the_legacy_run(cremad_lists,
                                                                          tmp_path):
    base, root = cremad_lists
    plain, listed = tmp_path / "plain", tmp_path / "listed"
    build(["--dataset", "cremad", "--root", str(root), "-o", str(plain)])
    lists = ["--split-file", str(base / "train.csv"), "--split-file", str(base / "test.csv")]
    order = base / "released-classes.txt"
    order.write_text("\n".join(RELEASED_CREMAD) + "\n")
    build(["--dataset", "cremad", "--root", str(root), *lists, "--val-fraction", "0",
           "--classes-file", str(order), "-o", str(listed)])
    index = json.loads((listed / "index.json").read_text())
    assert [f["name"] for f in index["args"]["split_files"]] == ["train.csv", "test.csv"]
    assert index["splits"]["train"]["samples"] == 30 and index["splits"]["test"]["samples"] == 6
    assert index["classes"] == RELEASED_CREMAD

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

    set_preset_params(listed, None)  # shards of an avprep before the released resampler/padding
    old = runner.invoke(avtrain, ["fit", "--recipe", "ogm_ge-cremad", "--shards", str(listed),
                                  "--run-dir", str(tmp_path / "r1"), *quick])
    assert old.exit_code == 2
    assert old.output.strip().splitlines() == [
        f"Error: recipe ogm_ge-cremad needs the released inputs; {listed} were built with "
        "resampler 'ffmpeg' (needs 'kaiser_best'), spectrogram.pad_mode 'constant' (needs "
        "'reflect'), by an older avprep or another preset; build them with: avprep build-shards "
        "--dataset cremad --root CREMA-D --split-file train.csv --split-file test.csv "
        "--val-fraction 0 -o shards/cremad-ogmge"]
    assert not (tmp_path / "r1").exists()
    set_preset_params(listed, CREMAD_INPUTS)  # as the cremad preset records them now

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


def _index(**preset_extra) -> dict:
    """A cremad index.json as the OGM-GE/OLM CREMA-D recipes want it, but for preset_extra."""
    return {"dataset": "cremad", "classes": list(RELEASED_CREMAD),
            "preset": {"name": "cremad", "spectrogram": {"recipe": "stft_log", "n_fft": 512,
                                                         "hop": 353, "pad_mode": "reflect"},
                       "resampler": "kaiser_best", **preset_extra},
            "args": {"split_files": [{"name": "train.csv"}, {"name": "test.csv"}]},
            "splits": {"train": {"samples": 30}, "test": {"samples": 6}}}


def test_cremad_recipes_refuse_old_inputs_and_the_old_class_order():
    """A missing parameter reads as the old default; every CREMA-D recipe wants the released
    resampler, reflect padding and class ids NEU 0 ... ANG 5, and says how to rebuild."""
    for name in ("ogm_ge-cremad", "olm-cremad", "olm_com-cremad"):
        recipe = load_recipe(name)
        assert recipe.data["classes"] == RELEASED_CREMAD
        assert recipe.data["preset_params"] == CREMAD_INPUTS
        check_shards(recipe, _index(), "OUT")  # the released inputs pass
        index = _index()
        del index["preset"]["resampler"]
        with pytest.raises(UserError, match=r"resampler 'ffmpeg' \(needs 'kaiser_best'\), by "
                                            r"an older avprep .*; build them with: avprep "
                                            r"build-shards --dataset cremad"):
            check_shards(recipe, index, "OUT")
        index = _index()
        index["preset"]["spectrogram"]["pad_mode"] = "constant"
        with pytest.raises(UserError, match="spectrogram.pad_mode 'constant' .needs 'reflect'."):
            check_shards(recipe, index, "OUT")
        index = _index()
        index["classes"] = list(EMOTIONS)  # avprep's order before the released one
        with pytest.raises(UserError) as refused:
            check_shards(recipe, index, "OUT")
        assert str(refused.value).startswith(
            f"recipe {name} needs the released class ids (NEU 0, HAP 1, SAD 2, FEA 3, DIS 4, "
            "ANG 5); OUT number them (ANG 0, DIS 1, FEA 2, HAP 3, NEU 4, SAD 5); build them with: "
            "avprep build-shards --dataset cremad")


def test_stereo_recipes_want_the_released_mono_mix():
    """Recipes whose released audio went through a 16-bit mono WAV refuse shards mixed in
    float, the default of an index that does not record the mix."""
    for name in ("olm-ave", "ogm_ge-vggsound", "ogm_ge-ks"):
        recipe = load_recipe(name)
        assert recipe.data["preset_params"]["mono_mix"] == "s16", name
        preset = {"name": recipe.data["preset"], "spectrogram": {"pad_mode": "reflect"}}
        for key, value in recipe.data["preset_params"].items():  # all but the mix as needed
            if "." not in key and key != "mono_mix":
                preset[key] = value
        index = {"dataset": recipe.data["dataset"], "preset": preset,
                 "classes": recipe.data.get("classes"),
                 "args": {"split_files": [{"name": f} for f in
                                          recipe.data.get("split_files") or []]}}
        with pytest.raises(UserError, match="mono_mix 'float' .needs 's16'."):
            check_shards(recipe, index, "OUT")
        index["preset"]["mono_mix"] = "s16"
        check_shards(recipe, index, "OUT")
    for name in ("ogm_ge-vggsound", "olm-ave"):  # their presets already reflect
        assert load_recipe(name).data["preset_params"]["spectrogram.pad_mode"] == "reflect"


def test_a_long_class_list_is_refused_at_its_first_difference():
    """AVE's 28 released ids (sorted stat.txt): the line names the first id that differs."""
    recipe = load_recipe("olm-ave")
    classes = recipe.data["classes"]
    assert classes == sorted(classes) and len(classes) == 28
    index = {"dataset": "ave_olm", "classes": [classes[1], classes[0], *classes[2:]],
             "preset": {"name": "ave-olm", "resampler": "kaiser_best", "mono_mix": "s16",
                        "spectrogram": {"pad_mode": "reflect"}}}
    with pytest.raises(UserError, match=r"class ids \(28 classes, Accordion 0\); OUT number "
                                        r"them \(28 classes, Acoustic guitar 0\)"):
        check_shards(recipe, index, "OUT")
    index["classes"] = list(classes)
    check_shards(recipe, index, "OUT")


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

    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        per_process_batch(config, 3)
    assert per_process_batch(TrainConfig(batch_size=8), 2).batch_size == 8
