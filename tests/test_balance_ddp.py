"""DDP: two gloo processes apply identical coefficients and noise, keep identical weights, and
match one process that sees both halves of every batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from held import HUNG_AFTER_S
from released import run_gloo
from test_balance_ogm import ToyAV, build_test_shards, step_records
from torch.nn.parallel import DistributedDataParallel

from avtrain.balance import build_balancer

pytestmark = pytest.mark.slow  # whole pipelines or servers: `make test`, not the quick loop

METHODS = ("none", "ogm", "ogm_ge", "olm", "olm_com")
GLOBAL_BATCH = 8
STEPS = ((0, 3), (1, 3))  # (epoch, steps): epoch 0 sets OLM's initial losses


def global_batches(seed: int):
    """The same global batches in every process; rank r trains on its half."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sum(n for _, n in STEPS)):
        batch = {"audio": torch.randn(GLOBAL_BATCH, 1, 8, 8, generator=g),
                 "visual": torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g)}
        # audio carries the label, so it dominates: OGM has something to do
        labels = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
        batch["audio"][:, 0, 0, :3] += 3 * torch.nn.functional.one_hot(labels, 3)
        out.append((batch, labels))
    return out


def shard(item, rank: int, world: int):
    batch, labels = item
    per = GLOBAL_BATCH // world
    part = slice(rank * per, (rank + 1) * per)
    return {m: x[part] for m, x in batch.items()}, labels[part]


def train(method: str, rank: int = 0, world: int = 1) -> dict:
    torch.manual_seed(0)
    model = ToyAV(classes=3, bn=False)  # no BatchNorm: per-rank statistics would differ
    config = {"alpha": 0.8, "modulation_start": 0, "modulation_end": 5, "seed": 3,
              "olm_lr": 0.05}
    balancer = build_balancer(method, model, config, modalities=model.modalities)
    net = DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    data, val = global_batches(1), global_batches(2)
    metrics, step = [], 0
    for epoch, steps in STEPS:
        for _ in range(steps):
            batch, labels = shard(data[step], rank, world)
            logits = net(batch)
            if balancer.needs_heldout:
                vbatch, vlabels = shard(val[step], rank, world)
                with torch.no_grad():
                    balancer.heldout(model(vbatch), vlabels)
            loss = balancer.loss(logits, labels, epoch=epoch, step=step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            balancer.before_optimizer_step(logits, labels, epoch=epoch, step=step)
            optimizer.step()
            balancer.after_optimizer_step()
            metrics.append({k: float(v) for k, v in balancer.step_metrics().items()})
            step += 1
        balancer.end_epoch(epoch)
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "metrics": metrics, "balancer": balancer.state_dict()}


def _train_all(rank: int, world: int) -> dict:
    return {m: train(m, rank, world) for m in METHODS}


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_gloo(_train_all, tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("method", METHODS)
def test_ranks_stay_identical_and_match_one_process(ddp_results, method):
    r0, r1 = ddp_results[0][method], ddp_results[1][method]
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name]), name
    assert r0["metrics"] == r1["metrics"]  # identical scores, coefficients, w and r
    ref = train(method)
    for name, value in ref["params"].items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-4, atol=1e-5)
    for got, want in zip(r0["metrics"], ref["metrics"]):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    torch.manual_seed(0)
    start = ToyAV(classes=3, bn=False).state_dict()
    assert any(not torch.equal(start[n], r0["params"][n]) for n in start)  # it trained


def test_methods_really_acted(ddp_results):
    r0 = ddp_results[0]
    coeffs = [m["coeff_audio"] for m in r0["ogm"]["metrics"]]
    assert min(coeffs) < 1.0  # audio dominated and was slowed on both ranks alike
    # GE noise: same coefficients as OGM at step 0, yet different weights afterwards
    assert r0["ogm_ge"]["metrics"][0]["coeff_audio"] == r0["ogm"]["metrics"][0]["coeff_audio"]
    w = r0["ogm_ge"]["params"]["encoders.visual.0.weight"]
    assert not torch.allclose(w, r0["ogm"]["params"]["encoders.visual.0.weight"])
    for method in ("olm", "olm_com"):
        weights = r0[method]["balancer"]["weights"]
        assert torch.equal(weights, ddp_results[1][method]["balancer"]["weights"])
        assert not torch.equal(weights, torch.ones(3))
        assert torch.equal(r0[method]["balancer"]["init_train"],
                           ddp_results[1][method]["balancer"]["init_train"])


# --- the real trainer under torchrun ----------------------------------------------------------

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
AVTRAIN = os.path.join(os.path.dirname(sys.executable), "avtrain")


@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    return build_test_shards(synth_dir, tmp_path_factory.mktemp("ddp-shards"))


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("method,logged", [("ogm_ge", "coeff_audio"), ("olm_com", "w_fused")])
def test_torchrun_replicas_stay_in_sync(shards, tmp_path, method, logged):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", AVTRAIN, "fit",
         "--shards", str(shards), "--run-dir", str(run), "--method", method, "--model", "tiny",
         "--epochs", "2", "--batch-size", "4", "--steps-per-epoch", "3", "--lr", "0.05",
         "--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress",
         "--log-every", "1", "--alpha", "0.8",
         *(["--olm-lr", "0.05"] if method.startswith("olm") else [])],
        capture_output=True, text=True, timeout=HUNG_AFTER_S, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"]
    steps = step_records(run)
    assert len(steps) == 6 and all(logged in r for r in steps)
