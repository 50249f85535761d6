"""OLM / OLM-com against hand-computed values: ratios, losses, gradients, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from held import HUNG_AFTER_S
from test_balance_ogm import build_test_shards, step_records, trainer_config
from torch import nn

from avprep.errors import UserError
from avtrain.balance import build_balancer, get_method, olm_ratios

BRANCHES = ("audio", "visual", "fused")


class Shape(nn.Module):
    """OLM only needs the model's modalities; the logits are made by hand below."""

    modalities = ["audio", "visual"]


def olm(method="olm", **config):
    return build_balancer(method, Shape(), {"olm_lr": 0.0, **config},
                          modalities=["audio", "visual"])


def make_logits(ells: dict[str, float], n=8):
    """Two-class logits [l, 0] for every sample, true class 0: CE = log(1 + exp(-w l)) and
    the logit norm is |l|."""
    return ({b: torch.tensor([[float(ells[b]), 0.0]] * n) for b in BRANCHES},
            torch.zeros(n, dtype=torch.long))


def ce(ell, w=1.0):
    return math.log1p(math.exp(-w * ell))


def run_step(bal, ells, *, epoch, step, n=8, finish=True):
    logits, labels = make_logits(ells, n)
    loss = bal.loss(logits, labels, epoch=epoch, step=step)
    loss.backward()
    bal.before_optimizer_step(logits, labels, epoch=epoch, step=step)
    if finish:
        bal.after_optimizer_step()
    return loss


def same(v):
    return {b: v for b in BRANCHES}


def metric(bal, prefix):
    m = bal.step_metrics()
    return [float(m[f"{prefix}_{b}"]) for b in BRANCHES]


# --- the ratio rules --------------------------------------------------------------------------


def test_olm_ratio_is_the_normalised_loss_ratio():
    r = olm_ratios("olm", torch.tensor([2.0, 1.0, 0.5]), torch.tensor([2.0, 2.0, 2.0]))
    # lambda = [1, 1/2, 1/4], mean 7/12
    torch.testing.assert_close(r, torch.tensor([12 / 7, 6 / 7, 3 / 7]))


def test_olm_com_ratio_weighs_generalisation_against_overfitting():
    r = olm_ratios("olm_com", train_now=torch.tensor([1.0, 1.5, 1.8]),
                   train_init=torch.tensor([2.0, 2.0, 2.0]),
                   val_now=torch.tensor([1.5, 1.9, 2.1]), val_init=torch.tensor([2.0, 2.0, 2.0]))
    # G = [0.5, 0.1, -0.1]; O = [1, .5, .2] - G = [0.5, 0.4, 0.3]; G'/O' = [1, 0.25, 1e-6/0.3]
    x = [1.0, 0.25, 1e-6 / 0.3]
    expect = [math.exp(v) / sum(math.exp(u) for u in x) for v in x]
    torch.testing.assert_close(r, torch.tensor(expect))
    assert expect == pytest.approx([0.543405, 0.256687, 0.199908], abs=1e-6)
    assert float(r.sum()) == pytest.approx(1.0)


def test_olm_com_clamps_non_positive_overfitting():
    # branch 0: val fell as much as train (O = 0 -> 1e-6): G'/O' is huge and takes all of r
    r = olm_ratios("olm_com", torch.tensor([1.8, 1.9, 1.9]), torch.tensor([2.0, 2.0, 2.0]),
                   torch.tensor([1.8, 2.0, 2.0]), torch.tensor([2.0, 2.0, 2.0]))
    torch.testing.assert_close(r, torch.tensor([1.0, 0.0, 0.0]))


def test_ratio_rule_errors():
    t = torch.ones(3)
    with pytest.raises(UserError, match="held-out"):
        olm_ratios("olm_com", t, t)
    with pytest.raises(UserError, match="unknown OLM rule"):
        olm_ratios("olm2", t, t)


# --- the balancer -----------------------------------------------------------------------------


def test_flags_for_the_loop():
    assert get_method("olm").trained_unimodal_heads and get_method("olm_com").trained_unimodal_heads
    assert not get_method("olm").needs_heldout and get_method("olm_com").needs_heldout


def test_loss_is_the_sum_of_weighted_branch_ces():
    bal = olm()
    with torch.no_grad():
        bal.weights.copy_(torch.tensor([2.0, 0.5, 1.0]))
    logits, labels = make_logits({"audio": 1.0, "visual": 2.0, "fused": -1.0})
    loss = bal.loss(logits, labels, epoch=0, step=0)
    per_sample = ce(1.0, 2.0) + ce(2.0, 0.5) + ce(-1.0, 1.0)
    assert float(loss.detach()) == pytest.approx(8 * per_sample, rel=1e-6)  # summed, as released
    bal = olm(olm_reduction="mean")
    with torch.no_grad():
        bal.weights.copy_(torch.tensor([2.0, 0.5, 1.0]))
    loss = bal.loss(logits, labels, epoch=0, step=0)
    assert float(loss.detach()) == pytest.approx(per_sample, rel=1e-6)


@pytest.mark.parametrize("method,uniform", [("olm", 1.0), ("olm_com", 1 / 3)])
def test_first_epoch_uses_uniform_ratios(method, uniform):
    bal = olm(method)
    for s, ells in enumerate([{"audio": 3.0, "visual": 0.5, "fused": 2.0},
                              {"audio": 4.0, "visual": 0.2, "fused": 1.0}]):
        if method == "olm_com" and s:
            bal.heldout(*make_logits({"audio": 1.0, "visual": 0.3, "fused": 2.0}))
        run_step(bal, ells, epoch=0, step=s)
        assert metric(bal, "r") == pytest.approx([uniform] * 3)


@pytest.mark.parametrize("initial", ["mean", "last-batch"])
def test_initial_losses_from_the_first_epoch_then_the_olm_rule(initial):
    bal = olm(olm_initial=initial)
    epoch0 = [{"audio": 1.0, "visual": 0.5, "fused": 2.0},
              {"audio": 2.0, "visual": 0.5, "fused": 1.0},
              {"audio": 3.0, "visual": 1.5, "fused": 0.0}]
    for s, ells in enumerate(epoch0):
        run_step(bal, ells, epoch=0, step=s)
    bal.end_epoch(0)
    if initial == "mean":
        init = [sum(ce(e[b]) for e in epoch0) / 3 for b in BRANCHES]
    else:
        init = [ce(epoch0[-1][b]) for b in BRANCHES]
    assert bal.init_train.tolist() == pytest.approx(init, rel=1e-6)
    now = {"audio": 4.0, "visual": 1.0, "fused": 2.5}
    run_step(bal, now, epoch=1, step=3)
    lam = [ce(now[b]) / i for b, i in zip(BRANCHES, init)]
    assert metric(bal, "r") == pytest.approx([v / (sum(lam) / 3) for v in lam], rel=1e-5)
    assert metric(bal, "loss") == pytest.approx([ce(now[b]) for b in BRANCHES], rel=1e-5)
    bal.end_epoch(1)  # later epochs never move the initial losses
    assert bal.init_train.tolist() == pytest.approx(init, rel=1e-6)


def test_weights_move_as_the_rule_says():
    lr, n = 0.01, 8
    bal = olm()  # w stays 1 through epoch 0 (lr 0), then a fresh Adam so its step is exact
    for s in range(2):
        run_step(bal, same(1.0), epoch=0, step=s, n=n)
    bal.end_epoch(0)
    bal.optimizer.state.clear()
    bal.optimizer.param_groups[0]["lr"] = lr
    w0 = bal.weights.detach().clone()
    assert w0.tolist() == [1.0, 1.0, 1.0]
    # audio's loss fell most (dominant), visual's least: r_audio < 1 < r_visual
    ells = {"audio": 3.0, "visual": 0.5, "fused": 2.0}
    run_step(bal, ells, epoch=1, step=2, n=n, finish=False)
    w = w0.tolist()
    lam = [ce(ells[b], wk) / ce(1.0, wk0) for b, wk, wk0 in zip(BRANCHES, w, w)]
    r = [v / (sum(lam) / 3) for v in lam]
    assert r[0] < 1 < r[1]
    # hand gradient: CE part B * d/dw log(1 + e^{-w l}) (the released CE sums over the batch)
    # plus the L1 part B * sign(n - t) * |l|
    norms = [wk * abs(ells[b]) for wk, b in zip(w, BRANCHES)]
    mean = sum(norms) / 3
    grad = [-n * ells[b] / (1 + math.exp(wk * ells[b]))
            + n * math.copysign(1.0, nk - mean * rk) * abs(ells[b])
            for b, wk, nk, rk in zip(BRANCHES, w, norms, r)]
    assert bal.weights.grad.tolist() == pytest.approx(grad, rel=1e-5)
    bal.after_optimizer_step()
    moved = (bal.weights.detach() - w0).tolist()
    # Adam's first step on this optimizer moves each weight by lr against its gradient sign
    assert moved[0] == pytest.approx(-lr, rel=1e-4)  # the dominant branch is turned down
    assert moved[1] == pytest.approx(lr, rel=1e-4)  # the weak branch is turned up
    assert metric(bal, "w") == [1.0, 1.0, 1.0]  # the weights this step's loss used


def test_olm_com_uses_the_heldout_losses():
    bal = olm("olm_com")
    run_step(bal, same(1.0), epoch=0, step=0)
    bal.heldout(*make_logits(same(0.8)))
    run_step(bal, same(1.0), epoch=0, step=1)
    bal.heldout(*make_logits(same(0.8)))
    bal.end_epoch(0)
    assert bal.init_val.tolist() == pytest.approx([ce(0.8)] * 3, rel=1e-6)
    assert bal.init_train.tolist() == pytest.approx([ce(1.0)] * 3, rel=1e-6)
    val = {"audio": 1.0, "visual": 1.5, "fused": 1.2}
    train = {"audio": 3.0, "visual": 1.6, "fused": 2.0}
    bal.heldout(*make_logits(val))
    run_step(bal, train, epoch=1, step=2)
    g = [ce(0.8) - ce(val[b]) for b in BRANCHES]
    o = [ce(1.0) - ce(train[b]) - gk for b, gk in zip(BRANCHES, g)]
    x = [max(gk, 1e-6) / max(ok, 1e-6) for gk, ok in zip(g, o)]
    expect = [math.exp(v - max(x)) / sum(math.exp(u - max(x)) for u in x) for v in x]
    assert metric(bal, "r") == pytest.approx(expect, rel=1e-5)
    assert metric(bal, "val_loss") == pytest.approx([ce(val[b]) for b in BRANCHES], rel=1e-6)
    # audio over-fits most (train fell far more than val): the smallest target
    assert min(range(3), key=lambda i: expect[i]) == 0


def test_checkpointed_state_resumes_intact(tmp_path):
    def epoch0(bal):
        for s, v in enumerate((1.0, 2.0)):
            bal.heldout(*make_logits(same(v / 2)))
            run_step(bal, {"audio": v, "visual": v / 4, "fused": v / 2}, epoch=0, step=s)
        bal.end_epoch(0)
        run_step(bal, {"audio": 3.0, "visual": 0.7, "fused": 1.1}, epoch=1, step=2)

    bal = olm("olm_com", olm_lr=0.05)
    epoch0(bal)
    path = tmp_path / "last.pt"
    torch.save({"balancer": bal.state_dict()}, path)
    state = torch.load(path, weights_only=True)["balancer"]
    fresh = olm("olm_com", olm_lr=0.05)
    fresh.load_state_dict(state)
    for name in ("weights", "init_train", "init_val", "sum_train", "sum_val", "val_now"):
        assert torch.equal(getattr(fresh, name), getattr(bal, name)), name
    assert fresh.have_initial and (fresh.n_train, fresh.n_val) == (bal.n_train, bal.n_val)
    assert not torch.equal(bal.weights, torch.ones(3))  # it learned something
    for b in (bal, fresh):  # the same next step on both: Adam's moments came back too
        run_step(b, {"audio": 2.5, "visual": 0.9, "fused": 1.3}, epoch=1, step=3)
    assert torch.equal(fresh.weights, bal.weights)
    assert fresh.step_metrics().keys() == bal.step_metrics().keys()


def test_state_of_another_method_is_refused_and_empty_state_ignored():
    bal = olm("olm")
    bal.load_state_dict({})  # e.g. resuming a baseline run's checkpoint
    assert torch.equal(bal.weights.detach(), torch.ones(3))
    with pytest.raises(UserError, match="olm_com"):
        bal.load_state_dict(olm("olm_com").state_dict())


@pytest.mark.parametrize("method,config,match", [
    ("olm_com", {"val_split": "test"}, "never the test split"),
    ("olm_com", {"val_split": "heldout", "test_split": "heldout"}, "never the test split"),
    ("olm_com", {"val_samples": 0}, "empty"),
    ("olm", {"olm_initial": "first"}, "olm-initial"),
    ("olm", {"olm_lr": -1}, "olm-lr"),
])
def test_bad_options_are_one_clear_user_error(method, config, match):
    with pytest.raises(UserError, match=match):
        olm(method, **config)


def test_step_reads_nothing_back_to_the_host():
    from test_balance_ogm import NoHostSync

    bal = olm("olm_com", olm_lr=0.01)
    logits, labels = make_logits(same(1.0))
    with NoHostSync():
        bal.heldout(logits, labels)
        bal.loss(logits, labels, epoch=0, step=0).backward()
        bal.before_optimizer_step(logits, labels, epoch=0, step=0)
    bal.after_optimizer_step()
    assert bal.step_metrics()["w_audio"].dim() == 0


# --- through the real trainer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    return build_test_shards(synth_dir, tmp_path_factory.mktemp("olm-shards"))


def test_trainer_runs_olm_com_and_resumes_with_its_state(shards, tmp_path):
    from avtrain.checkpoint import load_checkpoint
    from avtrain.loop import fit

    run = tmp_path / "run"
    config = trainer_config(shards, run, "olm_com", olm_lr=0.01)
    fit(config)
    records = step_records(run)
    for i, r in enumerate(records):  # val losses from the first held-out batch on
        names = ("w", "r", "loss", "val_loss") if i else ("w", "r", "loss")
        assert {f"{p}_{b}" for p in names for b in BRANCHES} <= set(r)
    first = [r for r in records if r["epoch"] == 0]
    assert all(r[f"r_{b}"] == pytest.approx(1 / 3) for r in first for b in BRANCHES)
    saved = load_checkpoint(str(run / "last.pt"))["balancer"]
    assert saved["method"] == "olm_com" and saved["have_initial"]
    later = [r for r in records if r["epoch"] == 1]
    assert later
    for r in later:  # from epoch 1 on the rule runs on the first epoch's mean losses
        def vec(prefix, r=r):
            return torch.tensor([r[f"{prefix}_{b}"] for b in BRANCHES])
        expect = olm_ratios("olm_com", vec("loss"), saved["init_train"], vec("val_loss"),
                            saved["init_val"])
        assert vec("r").tolist() == pytest.approx(expect.tolist(), rel=1e-4)
    first_losses = torch.tensor([[r[f"loss_{b}"] for b in BRANCHES] for r in first])
    if len(first) == 3:  # every step of epoch 0 was logged: the initial loss is their mean
        torch.testing.assert_close(saved["init_train"], first_losses.mean(0))
    assert not torch.equal(saved["weights"], torch.ones(3))
    fit({**config, "epochs": 3}, resume=str(run))
    resumed = load_checkpoint(str(run / "last.pt"))["balancer"]
    for key in ("init_train", "init_val"):
        assert torch.equal(resumed[key], saved[key]), key
    step = next(r for r in step_records(run) if r["epoch"] == 2)
    # the first resumed step used the checkpoint's weights (w is logged before its update)
    assert [step[f"w_{b}"] for b in BRANCHES] == pytest.approx(saved["weights"].tolist())


@pytest.mark.slow
def test_olm_com_without_a_val_split_is_a_user_error(synth_dir, shards, tmp_path):
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards
    from avtrain.loop import fit

    manifest = read_manifest(synth_dir / "manifest.jsonl")
    out = tmp_path / "no-val"
    build_shards(manifest.records, str(out), get_preset("synth"), classes=manifest.classes,
                 dataset="synth", splits=["train", "test"], workers=1)
    with pytest.raises(UserError, match="val"):
        fit(trainer_config(out, tmp_path / "run", "olm_com"))
    # the same from the command line: one line, exit 2, no run folder
    import subprocess
    import sys
    from pathlib import Path

    avtrain = Path(sys.executable).with_name("avtrain")
    proc = subprocess.run([str(avtrain), "fit", "--shards", str(out), "--run-dir",
                           str(tmp_path / "cli-run"), "--method", "olm_com", "--model", "tiny",
                           "--epochs", "1", "--batch-size", "4", "--workers", "0", "--no-progress"],
                          capture_output=True, text=True, timeout=HUNG_AFTER_S)
    said = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2 and len(said.splitlines()) == 1, said
    assert said.startswith("Error:") and "val" in said and "Traceback" not in said
    assert not (tmp_path / "cli-run").exists()
    with pytest.raises(UserError, match="never the test split"):
        fit(trainer_config(shards, tmp_path / "run2", "olm_com", val_split="test"))
