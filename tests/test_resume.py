"""Ctrl-C and --resume: interrupt a 3-epoch run after its first epoch with SIGINT, resume it,
and end exactly where an uninterrupted run with the same seed ends (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from avtrain.checkpoint import load_checkpoint
from avtrain.loop import fit
from cli import avtrain

AVTRAIN = os.path.join(os.path.dirname(sys.executable), "avtrain")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


SETTINGS = {"model": "tiny", "fusion": "gated", "epochs": 3, "batch_size": 8, "lr": 0.05,
            "optimizer": "sgd", "scheduler": "step", "lr_step": 1, "lr_gamma": 0.5,
            "image_size": 32, "workers": 0, "steps_per_epoch": 6, "shuffle_buffer": 20,
            "log_every": 2, "seed": 3}


def epochs_of(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return recs, [r for r in recs if r["kind"] == "epoch"]


def wait_for_epoch(run, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return
        path = run / "metrics.jsonl"
        if path.exists() and '"kind": "epoch"' in path.read_text():
            return
        time.sleep(0.02)


def test_interrupt_then_resume_equals_uninterrupted(train_shards, tmp_path):
    full = fit({**SETTINGS, "shards": str(train_shards), "run_dir": str(tmp_path / "full"),
                "progress": False})

    run = tmp_path / "interrupted"
    args = [AVTRAIN, "fit", "--shards", str(train_shards), "--run-dir", str(run), "--no-progress"]
    for key, value in SETTINGS.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    wait_for_epoch(run, proc)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]  # interrupted, not finished
    assert "Interrupted." in err and "Traceback" not in err
    ckpt = load_checkpoint(str(run / "last.pt"))  # usable after Ctrl-C
    assert ckpt["epoch"] in (0, 1)
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
