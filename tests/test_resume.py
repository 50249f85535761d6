"""Ctrl-C and --resume: interrupt a 3-epoch run after its first epoch with SIGINT, resume it,
and end exactly where an uninterrupted run with the same seed ends (CPU)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from click.testing import CliRunner
from held import HUNG_AFTER_S, start_held, wait_until_held

from avtrain.checkpoint import load_checkpoint
from avtrain.loop import fit
from cli import avtrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SETTINGS = {"model": "tiny", "fusion": "gated", "epochs": 3, "batch_size": 8, "lr": 0.05,
            "optimizer": "sgd", "scheduler": "step", "lr_step": 1, "lr_gamma": 0.5,
            "image_size": 32, "workers": 0, "steps_per_epoch": 6, "shuffle_buffer": 20,
            "log_every": 2, "seed": 3}


def epochs_of(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return recs, [r for r in recs if r["kind"] == "epoch"]


# Hold the run inside epoch 1, right after step 8 was logged (epoch 1 runs steps 7-12).
HOLD_MID_EPOCH_1 = """
from avtrain import loop

_log_step = loop.Trainer._log_step


def log_then_hold(self, *args, **kwargs):
    _log_step(self, *args, **kwargs)
    if self.step == 8:
        hold()


loop.Trainer._log_step = log_then_hold
"""


@pytest.mark.slow
def test_interrupt_then_resume_equals_uninterrupted(train_shards, tmp_path):
    full = fit({**SETTINGS, "shards": str(train_shards), "run_dir": str(tmp_path / "full"),
                "progress": False})

    run = tmp_path / "interrupted"
    args = ["fit", "--shards", str(train_shards), "--run-dir", str(run), "--no-progress"]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = start_held(HOLD_MID_EPOCH_1, "avtrain", args)
    wait_until_held(proc)  # provably mid-epoch 1, after step 8
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=HUNG_AFTER_S)
    assert proc.returncode == 130, err[-2000:]  # interrupted, not finished
    assert "Interrupted." in err and "Traceback" not in err
    ckpt = load_checkpoint(str(run / "last.pt"))  # usable after Ctrl-C
    assert ckpt["epoch"] == 0 and ckpt["step"] == 6
    recs, _ = epochs_of(run)
    assert {k: recs[-1][k] for k in ("kind", "epoch", "step")} == \
        {"kind": "interrupted", "epoch": 1, "step": 8}
    assert not (run / "summary.json").exists()

    out = CliRunner().invoke(avtrain, ["fit", "--resume", str(run)])
    assert out.exit_code == 0, out.output
    resumed = json.loads((run / "summary.json").read_text())

    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))
    b = load_checkpoint(str(run / "last.pt"))
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 18
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-6, atol=1e-7)
    assert resumed["best_epoch"] == full["best_epoch"]
    for split in ("val", "test"):
        for key in ("acc", "acc_audio", "acc_visual", "macro_f1", "confusion"):
            assert resumed[split][key] == full[split][key]
    # the log reads as if the run had never stopped: each epoch and step exactly once
    recs, epochs = epochs_of(run)
    _, full_epochs = epochs_of(tmp_path / "full")
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    steps = [r["step"] for r in recs if r["kind"] == "step"]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    for e, f in zip(epochs, full_epochs):
        assert e["train_loss"] == pytest.approx(f["train_loss"], rel=1e-5)
        assert e["val"]["acc"] == f["val"]["acc"] and e["lr"] == f["lr"]
