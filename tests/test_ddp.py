"""DDP under torchrun: 2 CPU processes with gloo. Both ranks end with identical weights, the
metrics agree with a 1-process run of the same global batch, and the distributed evaluation
gives exactly the single-process numbers (every sample once, gathered on rank 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from held import HUNG_AFTER_S

from avtrain.evaluate import evaluate_checkpoint, probe_checkpoint
from avtrain.loop import fit

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
AVTRAIN = os.path.join(os.path.dirname(sys.executable), "avtrain")

pytestmark = [pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed"),
              pytest.mark.slow]


def torchrun(args, timeout=HUNG_AFTER_S):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", AVTRAIN, *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def common(shards, **kw):
    args = {"shards": str(shards), "model": "tiny", "fusion": "concat", "epochs": 2,
            "lr": 0.05, "image_size": 32, "workers": 0, "progress": False, "device": "cpu",
            "steps_per_epoch": 4, "shuffle_buffer": 20, "log_every": 2, **kw}
    return args


def test_two_gloo_processes_match_one(train_shards, tmp_path):
    ddp_run = tmp_path / "ddp"
    flags = []
    for key, value in common(train_shards, batch_size=4, run_dir=str(ddp_run)).items():
        if isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}" if value else
                         f"--no-{key.replace('_', '-')}")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    torchrun(["fit", *flags])
    ddp = json.loads((ddp_run / "summary.json").read_text())
    assert ddp["world_size"] == 2
    assert len(ddp["replica_digests"]) == 2 and ddp["replicas_in_sync"]

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fit(common(train_shards, batch_size=8, run_dir=str(tmp_path / "one")))
    finally:
        torch.set_num_threads(before)
    assert single["world_size"] == 1 and ddp["steps"] == single["steps"] == 8
    for split in ("val", "test"):
        assert ddp[split]["n"] == single[split]["n"] and ddp[split]["duplicates"] == 0
    # same global batch and steps but other samples per step: close, not identical
    recs = [json.loads(x) for x in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    ddp_loss = [r["train_loss"] for r in recs if r["kind"] == "epoch"]
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    one_loss = [r["train_loss"] for r in one if r["kind"] == "epoch"]
    assert len(ddp_loss) == len(one_loss) == 2
    for a, b in zip(ddp_loss, one_loss):
        assert abs(a - b) < 0.35, (ddp_loss, one_loss)
    assert abs(ddp["val"]["acc"] - single["val"]["acc"]) <= 0.35

    # the DDP run's test metrics (evaluated on 2 ranks, gathered) == evaluating its best.pt
    # in one process, to the last digit: every sample counted once
    local = evaluate_checkpoint(str(ddp_run / "best.pt"), str(train_shards), split="test",
                                batch_size=7, workers=0, device="cpu")
    for key in ("n", "acc", "acc_audio", "acc_visual", "macro_f1", "confusion"):
        assert ddp["test"][key] == local[key], key
    assert ddp["test"]["loss"] == pytest.approx(local["loss"], rel=1e-5)

    # the linear probe under 2 ranks (features gathered on rank 0, fitted there, broadcast)
    # gives the one-process probe of the same checkpoint
    out = torchrun(["eval", "--ckpt", str(ddp_run / "best.pt"), "--shards", str(train_shards),
                    "--linear-probe", "--json", "--workers", "0", "--device", "cpu"])
    ddp_probe = json.loads(out)
    torch.set_num_threads(1)
    try:
        local_probe = probe_checkpoint(str(ddp_run / "best.pt"), str(train_shards), workers=0,
                                       device="cpu")
    finally:
        torch.set_num_threads(before)
    assert ddp_probe["train_samples"] == local_probe["train_samples"] > 0
    for view in ("audio", "visual", "fused"):
        for key in ("val_acc", "test_acc", "l2"):
            assert ddp_probe[view][key] == pytest.approx(local_probe[view][key]), (view, key)
