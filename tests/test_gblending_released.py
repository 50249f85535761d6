"""G-Blending against BalanceMM's trainer (differential), its rule by hand, DDP, resume, the CLI.

The authors released only the weighted loss, with hand-given weights (facebookresearch/VMZ
4cc542d, c2/lib/models/loss/loss_creator.py `add_weighted_loss` 119-200, separate audio and
visual heads in c2/lib/models/audio_visual_model.py 483-498). The reference below is written
from GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/GBlending_trainer.py: `fit` 89-106
(an estimate before every epoch e with e % super_epoch == 0, then the epoch with those
weights), `training_step` 292-303 (sum of weight * mean CE over the branches, one backward;
the optimizer steps in `train_loop` 262-269) and `super_epoch_origin` 306-376 (per branch: the
temporary model loaded from the model, its optimizer reset to the state it was built with,
the other modalities' inputs zeroed, super_epoch epochs on the output's CE with the loss.item()
sums of the first and last epoch, a val pass after each of those two, |G| / O^2 normalised).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from released import (
    as_batch,
    assert_fit_refused,
    assert_one_error_line,
    make_batches,
    method_fit_args,
    no_dropout,
    step_trainer,
    text_batches,
    train_steps,
)
from test_balance_ogm import step_records

from avprep.errors import UserError
from avtrain.balance import build_balancer, gblending_ogr, gblending_weights
from avtrain.balance.base import EpochContext

CLASSES, BATCH, STEPS, SE, EPOCHS = 3, 6, 2, 2, 3  # steps per epoch; estimates at epochs 0, 2
TOL = {"rtol": 1e-6, "atol": 1e-6}
BRANCHES = ["audio", "visual", "fused"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_weights_by_hand():
    # w = |G| / O^2: |-1|/1^2 = 1, |-2|/2^2 = 0.5, |0.5|/0.5^2 = 2; sum 3.5
    # normalised: 1/3.5 = 0.285714.., 0.5/3.5 = 0.142857.., 2/3.5 = 0.571428..
    w = gblending_weights([-1.0, -2.0, 0.5], [1.0, 2.0, -0.5])
    torch.testing.assert_close(w, torch.tensor([2 / 7, 1 / 7, 4 / 7], dtype=torch.float64))


def test_ogr_by_hand():
    # branch 0: L^T 10 -> 6, L^V 4 -> 3: G = 3 - 4 = -1; O = (3 - 6) - (4 - 10) = -3 + 6 = 3
    # branch 1: L^T 10 -> 4, L^V 4 -> 2: G = -2;        O = (2 - 4) - (4 - 10) = -2 + 6 = 4
    # w = |G| / O^2 = 1/9, 2/16 = 1/8; sum 17/72: w = (8/17, 9/17)
    g, o = gblending_ogr(torch.tensor([10.0, 10.0]), torch.tensor([4.0, 4.0]),
                         torch.tensor([6.0, 4.0]), torch.tensor([3.0, 2.0]))
    assert g.tolist() == [-1.0, -2.0] and o.tolist() == [3.0, 4.0]
    w = gblending_weights(g, o)
    assert w.tolist() == pytest.approx([8 / 17, 9 / 17], abs=1e-12)


def test_weighted_loss_by_hand():
    torch.manual_seed(0)
    t = step_trainer("gblending", "concat", 3)
    t.balancer.load_state_dict({"weights": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)})
    batch = as_batch(make_batches(1, 4, 1, 3)[0])
    logits = t.model(batch)
    got = t.balancer.loss(logits, batch["label"], epoch=0, step=0)
    y = batch["label"]
    want = (0.2 * F.cross_entropy(logits["audio"], y) + 0.3 * F.cross_entropy(logits["visual"], y)
            + 0.5 * F.cross_entropy(logits["fused"], y))
    torch.testing.assert_close(got, want)
    assert set(t.balancer.step_metrics()) == {f"gblend_w_{b}" for b in BRANCHES}


def test_options_are_checked_in_one_sentence():
    torch.manual_seed(0)
    model = step_trainer("gblending", "concat", 3).model
    with pytest.raises(UserError, match="non-empty 'val' split"):
        build_balancer("gblending", model, {"split_samples": {"train": 10, "val": 0},
                                            "val_split": "val"})
    with pytest.raises(UserError, match="must not be the train split"):
        build_balancer("gblending", model, {"val_split": "train"})
    for bad in (1, 2.5, "x"):
        with pytest.raises(UserError, match="--gblending-super-epoch"):
            build_balancer("gblending", model, {"gblending_super_epoch": bad})
    with pytest.raises(UserError, match="--gblending-offline"):
        build_balancer("gblending", model, {"gblending_offline": True, "epochs": 1})
    assert build_balancer("gblending", model, {"gblending_offline": True,
                                               "epochs": 7}).super_epoch == 7
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        with pytest.raises(UserError, match="--gblending-weights must be 3 numbers"):
            build_balancer("gblending", model, {"gblending_weights": bad})


# --- the reference: BalanceMM's trainer in plain torch ------------------------------------------


def ref_logits(model, batch, padding=()):
    """The model's branches (VMZ's separate heads beside the fusion), `padding` zeroed as
    avclassify_model.py 264-268 does."""
    feats = {}
    for m in model.modalities:
        x = batch[m]
        if m in padding:
            x = torch.zeros_like(x, device=x.device)
        feats[m] = model.encoders[m](x)
    out = {"output": model.fusion(feats)}
    for m in model.modalities:
        out[m] = model.aux_heads[m](feats[m])
    return out


def ref_super_epoch(model, temp_model, optimizer, optimizer_origin, train, val, super_epoch):
    """GBlending_trainer.py `super_epoch_origin`, 306-376; train[e]: the batches of epoch e."""
    criterion = nn.CrossEntropyLoss()
    weights, sums = {}, {}
    modalitys = list(model.modalities) + ["output"]
    for modality in modalitys:
        temp_model.load_state_dict(model.state_dict(), strict=True)
        optimizer.load_state_dict(optimizer_origin)
        padding = [o for o in model.modalities if o != modality and modality != "output"]
        pre_train_loss = now_train_loss = pre_validation_loss = now_validation_loss = 0
        for epoch in range(super_epoch):
            temp_model.train()
            _loss = 0.0
            for batch in train[epoch]:
                optimizer.zero_grad()
                out = ref_logits(temp_model, batch, padding)["output"]
                loss = criterion(out, batch["label"])
                loss.backward()
                optimizer.step()
                _loss += loss.item()
            if epoch == 0 or epoch == super_epoch - 1:
                temp_model.eval()
                with torch.no_grad():
                    _loss_v = 0
                    for batch in val:
                        out = ref_logits(temp_model, batch, padding)["output"]
                        _loss_v += criterion(out, batch["label"]).item()
                    if epoch == 0:
                        pre_train_loss, pre_validation_loss = _loss, _loss_v
                    else:
                        now_train_loss, now_validation_loss = _loss, _loss_v
        g = now_validation_loss - pre_validation_loss
        o = (now_validation_loss - now_train_loss) - (pre_validation_loss - pre_train_loss)
        weights[modality] = abs(g / (o ** 2))
        sums[modality] = (pre_train_loss, pre_validation_loss, now_train_loss,
                          now_validation_loss)
    total = sum(weights.values())
    return {k: v / total for k, v in weights.items()}, sums


def make_sgd(params):  # create_optimizer with our run's settings (step_trainer below)
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)


def ref_fit(model, data, streams, val, epochs=EPOCHS, steps=STEPS, se=SE):
    """GBlending_trainer.py `fit` 89-106 with `train_loop`/`training_step` 218-303."""
    temp_model = copy.deepcopy(model)
    temp_optimizer = make_sgd(temp_model.parameters())
    temp_optimizer_origin = copy.deepcopy(temp_optimizer.state_dict())  # train.py 86-87
    optimizer = make_sgd(model.parameters())
    criterion = nn.CrossEntropyLoss()
    weights, estimates, params, losses = {}, [], [], []
    for epoch in range(epochs):
        if epoch % se == 0:
            model.train()
            stream = streams[epoch]
            train = [stream[e * steps:(e + 1) * steps] for e in range(se)]
            weights, sums = ref_super_epoch(model, temp_model, temp_optimizer,
                                            temp_optimizer_origin, train, val, se)
            estimates.append((weights, sums))
        model.train()
        for batch in data[epoch * steps:(epoch + 1) * steps]:
            out = ref_logits(model, batch)
            loss = 0
            for modality in out:
                loss += weights[modality] * criterion(out[modality], batch["label"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
    return estimates, params, losses


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="concat", bn=True, lr=0.05, **extra):
    return step_trainer("gblending", fusion, CLASSES, bn=bn, optimizer="sgd", lr=lr,
                        gblending_super_epoch=SE, epochs=EPOCHS, **extra)


def epoch_context(t, epoch, stream, val, steps=STEPS, se=SE):
    def batches(n):
        assert n == steps * se  # one stream of super_epoch x steps batches per branch
        return iter(stream)

    return EpochContext(net=t.net, model=t.model, epoch=epoch, batches=batches,
                        steps_per_epoch=steps, eval_batches=lambda split: iter(val),
                        val_split="val")


def our_fit(t, data, streams, val, epochs=EPOCHS, steps=STEPS):
    """The loop's order: start_epoch, then the epoch's steps (Trainer.train_epoch)."""
    params, metrics, losses, estimates = [], [], [], []
    for epoch in range(epochs):
        t.balancer.start_epoch(epoch_context(t, epoch, streams.get(epoch), val))
        if t.balancer.estimated_at == epoch:
            estimates.append((t.balancer.weights.clone(), t.balancer.stats.clone()))
        p, m, loss = train_steps(t, data[epoch * steps:(epoch + 1) * steps], ((epoch, steps),))
        params += p
        metrics += m
        losses += loss
    return estimates, params, metrics, losses


def two(seed, n, steps):
    return [as_batch(b) for b in make_batches(seed, n, steps, CLASSES)]


def three(seed, n, steps):
    return text_batches(seed, n, steps, CLASSES, text_seed=seed + 11)


def dataset(seed=7, n=BATCH, epochs=EPOCHS, steps=STEPS, se=SE, make=two):
    """The epochs' batches, each estimate's stream (super_epoch x steps), the val batches."""
    data = make(seed, n, epochs * steps)
    streams = {e: make(seed + 100 + e, n, steps * se) for e in range(0, epochs, se)}
    val = make(seed + 50, 4, 4)
    return data, streams, val


def _compare(t, data, streams, val, branches=BRANCHES):
    ref = copy.deepcopy(t.model)
    want_est, want_params, want_losses = ref_fit(ref, data, streams, val)
    got_est, got_params, got_metrics, got_losses = our_fit(t, data, streams, val)
    assert len(got_est) == len(want_est) == len(range(0, EPOCHS, SE))
    names = [b if b != "fused" else "output" for b in branches]
    for (w, stats), (want_w, want_sums) in zip(got_est, want_est):
        assert w.tolist() == pytest.approx([want_w[k] for k in names], rel=1e-6, abs=1e-7)
        sums = torch.tensor([want_sums[k] for k in names], dtype=torch.float64).T
        torch.testing.assert_close(stats[:4], sums, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(w, torch.full_like(w, 1 / len(w)), atol=1e-3)  # it acted
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    last_w = got_est[-1][0]
    assert got_metrics[-1] == pytest.approx(
        {f"gblend_w_{b}": float(last_w[i]) for i, b in enumerate(branches)}, rel=1e-6)
    return got_metrics


@pytest.mark.parametrize("fusion", ["concat", "gated"])
def test_fit_equals_the_released_trainer(fusion):
    # estimates before epochs 0 and 2 (super_epoch 2), the epochs' weighted steps between
    torch.manual_seed(0)
    t = trainer(fusion)
    _compare(t, *dataset())


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = trainer("sum", modalities=["audio", "visual", "text"])
    no_dropout(t.model)  # both runs must see the same network
    _compare(t, *dataset(make=three), ["audio", "visual", "text", "fused"])


def test_fixed_weights_are_the_authors_loss():
    # --gblending-weights: no estimate, the given weights scale each branch's CE (VMZ)
    torch.manual_seed(0)
    t = trainer(gblending_weights="0.014,0.630,0.356")
    data, _, val = dataset()
    t.balancer.start_epoch(epoch_context(t, 0, None, val))  # not due: no stream is read
    assert t.balancer.estimated_at == -1
    assert t.balancer.weights.tolist() == [0.014, 0.630, 0.356]
    assert trainer(gblending_weights=[0.014, 0.63, 0.356]).balancer.weights.tolist() == \
        [0.014, 0.630, 0.356]  # a YAML list
    batch = data[0]
    logits = t.model(batch)
    y = batch["label"]
    want = (0.014 * F.cross_entropy(logits["audio"], y) + 0.63 * F.cross_entropy(
        logits["visual"], y) + 0.356 * F.cross_entropy(logits["fused"], y))
    torch.testing.assert_close(t.balancer.loss(logits, y, epoch=0, step=0), want)


def test_state_round_trip():
    torch.manual_seed(0)
    t = trainer()
    data, streams, val = dataset()
    t.balancer.start_epoch(epoch_context(t, 0, streams[0], val))
    state = t.balancer.state_dict()
    other = trainer().balancer
    other.load_state_dict(state)
    assert torch.equal(other.weights, t.balancer.weights)
    assert torch.equal(other.stats, t.balancer.stats) and other.estimated_at == 0
    assert {k: float(v) for k, v in other.step_metrics().items()} == \
        {k: float(v) for k, v in t.balancer.step_metrics().items()}


# w = |G| / O^2 is ill-conditioned: O is a difference of loss sums that differ little, so the
# float32 rounding of a half-batch mean vs the global batch's (1e-7) grows ~100x in w. A larger
# step moves the losses further (O ~ 0.1 of sums ~ 4 instead of 0.01), and the run is cut after
# the first estimate and its epoch (the second estimate compounds the 2 epochs' rounding).


def test_no_finite_weights_stop_the_run(monkeypatch):
    # a still copy (lr 0, no BatchNorm statistics) and one batch repeated: the loss sums repeat,
    # G = O = 0, 0/0 for every branch
    torch.manual_seed(0)
    t = trainer(bn=False)
    monkeypatch.setattr(t.balancer, "_optimizer",
                        lambda model: torch.optim.SGD(model.parameters(), lr=0.0))
    data, _, val = dataset()
    stream = [data[0]] * (STEPS * SE)
    from avprep.errors import UserError

    with pytest.raises(UserError, match="no finite weights"):
        t.balancer.start_epoch(epoch_context(t, 0, stream, val))


# --- the real trainer ---------------------------------------------------------------------------


def test_cli_one_epoch_on_synth_estimates_and_logs_the_weights(method_shards, tmp_path):
    from avtrain.checkpoint import load_checkpoint
    from avtrain.report import balancing_keys, load_run
    from cli import avtrain

    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, method_fit_args("gblending", method_shards, run, 1,
                                                      gblending_super_epoch=2))
    assert out.exit_code == 0, out.output
    steps = step_records(run)
    assert len(steps) == 3
    keys = [f"gblend_w_{b}" for b in BRANCHES]
    for r in steps:
        assert sum(r[k] for k in keys) == pytest.approx(1.0, abs=1e-6)
        assert [r[k] for k in keys] == [steps[0][k] for k in keys]  # constant in the epoch
    assert max(abs(steps[0][k] - 1 / 3) for k in keys) > 1e-4  # estimated, not the initial
    state = load_checkpoint(str(run / "last.pt"))["balancer"]
    assert state["estimated_at"] == 0 and torch.isfinite(state["stats"]).all()
    assert state["weights"].tolist() == pytest.approx([steps[0][k] for k in keys], rel=1e-6)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "gblending"
    assert "gblend_w_audio" in balancing_keys(load_run(str(run)))  # drawn by `avtrain report`


@pytest.mark.parametrize("settings,words", [
    ({"val_split": "nosuch"}, "no 'nosuch' split"),
    ({"val_split": "train"}, "--val-split must not be the train split"),
    ({"gblending_weights": "1,2"}, "--gblending-weights must be 3 numbers"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "gblending", settings, words)


def test_offline_needs_two_epochs(method_shards, tmp_path):
    from cli import avtrain

    out = CliRunner().invoke(avtrain, method_fit_args("gblending", method_shards, tmp_path / "run",
                                                      1, "--gblending-offline"))
    assert_one_error_line(out, "--gblending-offline estimates over --epochs epochs",
                          tmp_path / "run")


@pytest.mark.slow  # ~17 s: two processes of the real loop; `-m "not slow"` leaves it out
def test_torchrun_two_processes_estimate_the_same_weights(method_shards, tmp_path):
    import os
    import subprocess

    from held import HUNG_AFTER_S
    from test_balance_ddp import AVTRAIN, TORCHRUN

    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed")
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", AVTRAIN,
                           *method_fit_args("gblending", method_shards, run, 2,
                                            gblending_super_epoch=2)],
                          capture_output=True, text=True, timeout=HUNG_AFTER_S, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["replicas_in_sync"]  # the weights' digest too
    steps = step_records(run)
    assert len(steps) == 6
    assert sum(steps[0][f"gblend_w_{b}"] for b in BRANCHES) == pytest.approx(1.0, abs=1e-6)
