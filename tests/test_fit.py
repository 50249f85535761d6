"""fit / eval end to end on real shards: every fusion, run-directory contents, checkpoint
evaluation, config merging, the linear probe, and one-line refusals of bad input."""

from __future__ import annotations

import json
import shutil
from fractions import Fraction

import pytest
import torch
import yaml
from click.testing import CliRunner

from avtrain.checkpoint import load_checkpoint
from avtrain.evaluate import evaluate_checkpoint
from avtrain.loop import fit
from cli import avtrain

FUSIONS = ["sum", "concat", "film", "gated", "bilinear", "attention"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(shards, run, **kw):
    return {"shards": str(shards), "run_dir": str(run), "model": "tiny", "epochs": 1,
            "batch_size": 8, "lr": 0.05, "image_size": 32, "workers": 0, "log_every": 1,
            "progress": False, "steps_per_epoch": 3, "shuffle_buffer": 20, **kw}


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fusion", FUSIONS)
def test_one_epoch_with_each_fusion(train_shards, tmp_path, fusion):
    run = tmp_path / "run"
    summary = fit(tiny(train_shards, run, fusion=fusion))
    index = json.loads((train_shards / "index.json").read_text())
    assert summary["best_epoch"] == 0 and summary["steps"] == 3
    test = summary["test"]
    assert test["n"] == index["splits"]["test"]["samples"] and test["duplicates"] == 0
    for key in ("acc", "acc_audio", "acc_visual", "macro_f1"):
        assert 0.0 <= test[key] <= 1.0
    assert len(test["confusion"]) == 3 and sum(map(sum, test["confusion"])) == test["n"]
    recs = records(run)
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["lr"] == 0.05 for r in steps)
    (epoch,) = [r for r in recs if r["kind"] == "epoch"]
    assert epoch["val"]["n"] == index["splits"]["val"]["samples"]
    assert epoch["train_loss"] > 0 and epoch["epoch_time"] > 0
    assert {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "tb"} <= {
        p.name for p in run.iterdir()}
    assert any((run / "tb").iterdir())
    assert json.loads((run / "summary.json").read_text())["test"]["acc"] == test["acc"]
    ckpt = load_checkpoint(str(run / "last.pt"))
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    assert {"optimizer", "scheduler", "balancer", "rng", "config", "epoch", "step"} <= set(ckpt)
    assert ckpt["spec"]["fusion"] == fusion and ckpt["classes"] == index["classes"]


def test_eval_of_a_checkpoint_matches_the_run(train_shards, tmp_path):
    run = tmp_path / "run"
    summary = fit(tiny(train_shards, run, fusion="concat", epochs=2))
    result = CliRunner().invoke(avtrain, ["eval", "--ckpt", str(run / "best.pt"), "--shards",
                                          str(train_shards), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output)
    assert metrics["epoch"] == summary["best_epoch"]
    for key in ("n", "acc", "acc_audio", "acc_visual", "macro_f1", "confusion"):
        assert metrics[key] == summary["test"][key]
    table = CliRunner().invoke(avtrain, ["eval", "--ckpt", str(run), "--split", "val",
                                         "--workers", "0"])
    assert table.exit_code == 0 and "acc_visual" in table.output and "val" in table.output
    same = evaluate_checkpoint(str(run / "best.pt"), str(train_shards), split="val", workers=0)
    assert same["acc"] == summary["val"]["acc"]


def test_unimodal_run(train_shards, tmp_path):
    summary = fit(tiny(train_shards, tmp_path / "run", modalities=["visual"]))
    assert summary["modalities"] == ["visual"]
    assert summary["test"]["acc_visual"] == summary["test"]["acc"]
    assert "acc_audio" not in summary["test"]


def test_config_file_flags_and_print_config(train_shards, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({"shards": str(train_shards), "model": "tiny", "lr": 0.2,
                                   "batch-size": 4, "fusion": "sum", "modalities": "audio,visual"}))
    runner = CliRunner()
    out = runner.invoke(avtrain, ["fit", "--config", str(cfg), "--lr", "0.01", "--epochs", "3",
                                  "--print-config"])
    assert out.exit_code == 0, out.output
    merged = yaml.safe_load(out.output)
    assert merged["lr"] == 0.01 and merged["epochs"] == 3  # flags win
    assert merged["batch_size"] == 4 and merged["fusion"] == "sum"  # file beats defaults
    assert merged["modalities"] == ["audio", "visual"] and merged["optimizer"] == "sgd"
    run = tmp_path / "run"
    out = runner.invoke(avtrain, ["fit", "--config", str(cfg), "--run-dir", str(run), "--epochs",
                                  "1", "--steps-per-epoch", "2", "--image-size", "32",
                                  "--workers", "0", "--no-progress", "--alpha", "1.5"])
    assert out.exit_code == 0, out.output
    assert "best epoch 0" in out.output and "acc_visual" in out.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["lr"] == 0.2 and saved["alpha"] == 1.5 and saved["steps_per_epoch"] == 2
    # the saved config repeats the run
    again = runner.invoke(avtrain, ["fit", "--config", str(run / "config.yaml"),
                                    "--print-config"])
    assert yaml.safe_load(again.stdout) == saved
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 2\n")
    out = runner.invoke(avtrain, ["fit", "--config", str(bad), "--print-config"])
    assert out.exit_code == 2 and "unknown setting 'learning_rate'" in out.output


@pytest.mark.slow
def test_linear_probe_beats_chance(train_shards, tmp_path):
    summary = fit(tiny(train_shards, tmp_path / "run", epochs=2, steps_per_epoch=6,
                       linear_probe=True))
    probe = summary["linear_probe"]
    assert probe["chance"] == pytest.approx(1 / 3)
    assert probe["train_samples"] == json.loads((train_shards / "index.json").read_text()
                                                )["splits"]["train"]["samples"]
    assert set(probe) >= {"audio", "visual", "fused"}
    # the synth audio cue is easy: the frozen audio encoder's features separate the classes
    assert probe["audio"]["test_acc"] >= 0.6
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["linear_probe"] == probe
    out = CliRunner().invoke(avtrain, ["eval", "--ckpt", str(tmp_path / "run" / "best.pt"),
                                       "--linear-probe", "--workers", "0"])
    assert out.exit_code == 0, out.output
    assert "linear probe" in out.output and "visual" in out.output


def one_line_error(args, words):
    out = CliRunner().invoke(avtrain, args)
    assert out.exit_code == 2, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), out.output
    assert words in lines[0], lines[0]
    assert "Traceback" not in out.output


def test_bad_input_is_one_line(train_shards, tmp_path):
    base = ["fit", "--run-dir", str(tmp_path / "r"), "--model", "tiny", "--image-size", "32",
            "--workers", "0", "--no-progress", "--epochs", "1", "--batch-size", "8"]
    one_line_error(base + ["--shards", str(tmp_path)], "no index.json")
    one_line_error(["fit"], "Missing option '--shards'")
    one_line_error(["fit", "--shards", str(train_shards)], "Missing option '--run-dir'")
    one_line_error(base + ["--shards", str(train_shards), "--batch-size", "1000"],
                   "larger than the 'train' split")
    one_line_error(base + ["--shards", str(train_shards), "--method", "magic"],
                   "unknown balancing method 'magic'")
    one_line_error(base + ["--shards", str(train_shards), "--fusion", "product"],
                   "unknown fusion 'product'")
    one_line_error(base + ["--shards", str(train_shards), "--optimizer", "lion"],
                   "--optimizer must be one of")
    empty = tmp_path / "empty_val"
    shutil.copytree(train_shards, empty)
    index = json.loads((empty / "index.json").read_text())
    index["splits"]["val"] = {"samples": 0, "shards": [], "class_counts": [0, 0, 0]}
    (empty / "index.json").write_text(json.dumps(index))
    one_line_error(base + ["--shards", str(empty)], "'val' split is empty")
    one_line_error(["eval", "--ckpt", str(tmp_path / "nope.pt"), "--shards", str(train_shards)],
                   "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line_error(["eval", "--ckpt", str(tmp_path / "junk.pt"), "--shards", str(train_shards)],
                   "not an avbalance checkpoint (torch cannot read it")
    # a pickled object needs code to rebuild: refused in one complete sentence, never run
    torch.save({"format": Fraction(1, 3)}, tmp_path / "pkl.pt")
    one_line_error(["eval", "--ckpt", str(tmp_path / "pkl.pt"), "--shards", str(train_shards)],
                   "holds pickled Python objects (fractions.Fraction) that only code could "
                   "rebuild); nothing in it was executed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_without_a_gpu_is_refused(train_shards, tmp_path):
    base = ["fit", "--shards", str(train_shards), "--run-dir", str(tmp_path / "r"), "--model",
            "tiny", "--workers", "0"]
    one_line_error(base + ["--device", "cuda"], "--device cuda needs a CUDA GPU")
    one_line_error(base + ["--decode-device", "cuda"], "--decode-device cuda needs a CUDA GPU")


def test_checkpoint_of_another_model_or_class_list_is_refused(train_shards, tmp_path):
    run = tmp_path / "run"
    fit(tiny(train_shards, run, steps_per_epoch=1))
    other = tmp_path / "four_classes"
    shutil.copytree(train_shards, other)
    index = json.loads((other / "index.json").read_text())
    index["classes"] = index["classes"] + ["extra"]
    index["num_classes"] = 4
    (other / "index.json").write_text(json.dumps(index))
    one_line_error(["eval", "--ckpt", str(run / "best.pt"), "--shards", str(other)],
                   "trained for 3 classes; these shards have 4")
    one_line_error(["fit", "--resume", str(run), "--fusion", "gated", "--no-progress",
                    "--epochs", "2"], "fusion='concat' checkpoint")
    one_line_error(["fit", "--resume", str(tmp_path / "no_run")], "nothing to resume")


def test_a_run_directory_holding_a_run_is_never_overwritten_silently(train_shards, tmp_path):
    run = tmp_path / "run"
    first = fit(tiny(train_shards, run, steps_per_epoch=1))
    best_before = (run / "best.pt").read_bytes()
    args = ["fit", "--shards", str(train_shards), "--run-dir", str(run), "--model", "tiny",
            "--image-size", "32", "--workers", "0", "--no-progress", "--epochs", "1",
            "--batch-size", "8", "--steps-per-epoch", "1", "--seed", "1"]
    one_line_error(args, "already holds a run")
    assert (run / "best.pt").read_bytes() == best_before  # nothing of the old run was touched
    assert json.loads((run / "summary.json").read_text())["best_epoch"] == first["best_epoch"]
    out = CliRunner().invoke(avtrain, args + ["--overwrite"])
    assert out.exit_code == 0, out.output
    kinds = [r["kind"] for r in records(run)]
    assert kinds.count("start") == 1 and kinds.count("epoch") == 1  # only the new run's log
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 1


def test_probe_train_subset_is_seeded_and_bounded():
    import numpy as np

    from avtrain.probe import subsample

    x = {"audio": np.arange(100, dtype=np.float32).reshape(50, 2)}
    y = np.arange(50)
    xs, ys = subsample(x, y, 20, seed=3)
    again_x, again_y = subsample(x, y, 20, seed=3)
    assert len(ys) == 20 and len(set(ys.tolist())) == 20 and list(ys) == sorted(ys)
    assert np.array_equal(ys, again_y) and np.array_equal(xs["audio"], again_x["audio"])
    assert np.array_equal(xs["audio"][:, 0], ys * 2)  # features stay with their labels
    assert not np.array_equal(ys, subsample(x, y, 20, seed=4)[1])
    assert subsample(x, y, None, seed=3)[1] is y and subsample(x, y, 50, seed=3)[1] is y
