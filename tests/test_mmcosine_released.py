"""MMCosine against the authors' step (differential), its rule by hand, DDP, resume and the CLI.

The reference is written from GeWu-Lab/MMCosine_ICASSP23 (00ba0a9) main_CD.py: `train_epoch`
lines 103-146 (zero_grad; the model's forward; out_m = mm(normalize(f_m, dim=1),
normalize(fc_out.weight[:, cols_m].T, dim=0)) * scaling; out = sum; loss = CE(out) with lam 0;
CE(out_m) and the true-class mean of out_m logged; backward; SGD over all parameters, the unused
bias included) and `valid` lines 181-198 (fused prediction from the model's own concat output,
per-modality predictions from the scaled cosines). Three modalities: the weight split by widths
as BalanceMM's MMCosine_trainer.py lines 118-121.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    no_dropout,
    step_trainer,
    text_batches,
    train_steps,
)

from avtrain.balance import mmcosine_signal
from avtrain.models.fusions import CosineFusion, build_fusion

CLASSES, BATCH = 3, 6
STEPS = ((0, 2), (1, 2))  # (epoch, steps); the authors' MMCosine has no window
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_cosine_fusion_hand_computed():
    f = build_fusion("cosine", ["audio", "visual"], {"audio": 2, "visual": 2}, 2)
    assert isinstance(f, CosineFusion)
    with torch.no_grad():
        # W = [[3, 4 | 1, 0], [0, 1 | 0, 2]]; bias 5 must be ignored
        f.fc_out.weight.copy_(torch.tensor([[3.0, 4.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]]))
        f.fc_out.bias.fill_(5.0)
    feats = {"audio": torch.tensor([[6.0, 8.0]]), "visual": torch.tensor([[0.0, -3.0]])}
    parts = f.modality_logits(feats)
    # audio: f/|f| = (0.6, 0.8); rows (3,4)/5 = (0.6,0.8) -> 1.0; (0,1) -> 0.8; times 10
    assert torch.allclose(parts["audio"], torch.tensor([[10.0, 8.0]]))
    # visual: f/|f| = (0, -1); rows (1,0) -> 0; (0,2)/2 = (0,1) -> -1; times 10
    assert torch.allclose(parts["visual"], torch.tensor([[0.0, -10.0]]))
    assert torch.allclose(f(feats), torch.tensor([[10.0, -2.0]]))
    # scaling 15: every logit times 1.5
    f.set_scaling(15.0)
    assert torch.allclose(f(feats), torch.tensor([[15.0, -3.0]]))
    # the authors' eval: the plain concat layer, [6, 8, 0, -3] . rows + 5:
    # row 0: 18 + 32 + 0 + 0 + 5 = 55; row 1: 0 + 8 + 0 - 6 + 5 = 7
    f.set_eval_rule("concat")
    f.eval()
    assert torch.allclose(f(feats), torch.tensor([[55.0, 7.0]]))
    assert torch.allclose(f.modality_logits(feats)["audio"], torch.tensor([[15.0, 12.0]]))
    f.train()
    assert torch.allclose(f(feats), torch.tensor([[15.0, -3.0]]))


def test_three_modalities_of_different_widths_split_by_width():
    f = build_fusion("cosine", ["audio", "visual", "text"], {"audio": 1, "visual": 2, "text": 1}, 2)
    with torch.no_grad():  # columns: audio | visual visual | text
        f.fc_out.weight.copy_(torch.tensor([[2.0, 3.0, 4.0, -5.0], [1.0, -4.0, 3.0, 1.0]]))
    feats = {"audio": torch.tensor([[7.0]]), "visual": torch.tensor([[3.0, 4.0]]),
             "text": torch.tensor([[2.0]])}
    parts = f.modality_logits(feats)
    # audio: 1 . (1, 1) -> 10, 10; visual: (0.6, 0.8) . (0.6, 0.8) = 1, . (-0.8, 0.6) = 0;
    # text: 1 . (-1, 1) -> -10, 10; fused: 10 + 10 - 10 = 10, 10 + 0 + 10 = 20
    assert torch.allclose(parts["audio"], torch.tensor([[10.0, 10.0]]))
    assert torch.allclose(parts["visual"], torch.tensor([[10.0, 0.0]]), atol=1e-6)
    assert torch.allclose(parts["text"], torch.tensor([[-10.0, 10.0]]))
    assert torch.allclose(f(feats), torch.tensor([[10.0, 20.0]]))


def test_signal_hand_computed():
    # audio logits [[10, 8], [0, -10]], labels [0, 1]: true-class logits 10 and -10 -> mean 0;
    # CE: sample 0 log(1 + e^-2) = 0.126928, sample 1 log(1 + e^10) = 10.0000454 -> mean
    z_a = torch.tensor([[10.0, 8.0], [0.0, -10.0]])
    z_v = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # CE ln 2, true-class logit 1
    out = mmcosine_signal({"audio": z_a, "visual": z_v}, torch.tensor([0, 1]), ["audio", "visual"])
    assert float(out["mmcosine_logit_audio"]) == pytest.approx(0.0, abs=1e-6)
    ce = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(10.0))) / 2
    assert float(out["mmcosine_loss_audio"]) == pytest.approx(ce, abs=1e-5)
    assert float(out["mmcosine_logit_visual"]) == 1.0
    assert float(out["mmcosine_loss_visual"]) == pytest.approx(math.log(2), abs=1e-6)


def test_eval_rule_and_scaling_survive_a_checkpoint():
    from avtrain.models import build_model, model_from_spec

    model = build_model("tiny", "cosine", 3)
    model.fusion.set_scaling(15.0)
    model.fusion.set_eval_rule("concat")
    fresh = model_from_spec(model.spec)
    assert fresh.fusion.rule == "cosine" and float(fresh.fusion.scaling) == 10.0
    fresh.load_state_dict(model.state_dict())
    assert fresh.fusion.rule == "concat" and float(fresh.fusion.scaling) == 15.0
    assert not fresh.fusion.fc_out.bias.requires_grad


# --- the reference ------------------------------------------------------------------------------


def ref_cosine(model, feats, scaling):  # main_CD.py lines 114-118 (columns by width for N)
    w, now, out = model.fusion.fc_out.weight, 0, {}
    for m in model.modalities:
        d = feats[m].shape[1]
        out[m] = torch.mm(F.normalize(feats[m], dim=1),
                          F.normalize(torch.transpose(w[:, now:now + d], 0, 1), dim=0)) * scaling
        now += d
    return out


def ref_train(model, data, scaling, steps=STEPS):
    model.fusion.fc_out.bias.requires_grad_(True)  # released: a parameter no loss reaches
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses, params, logs, step = [], [], [], 0
    model.train()
    for _, n_steps in steps:
        for _ in range(n_steps):
            batch = data[step]
            optimizer.zero_grad()
            feats = model.features(batch)
            label = batch["label"]
            parts = ref_cosine(model, feats, scaling)
            out = sum(parts[m] for m in model.modalities)
            log = {}
            for m in model.modalities:  # lines 128-135 and 142-143
                onehot = F.one_hot(label, num_classes=parts[m].size(1))
                log[f"mmcosine_logit_{m}"] = float(torch.mean(torch.sum(parts[m] * onehot, 1)).detach())
                log[f"mmcosine_loss_{m}"] = float(criterion(parts[m], label).detach())
            loss = criterion(out, label)
            loss.backward()
            optimizer.step()
            assert model.fusion.fc_out.bias.grad is None
            losses.append(float(loss.detach()))
            logs.append(log)
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return losses, params, logs


def ref_valid(model, batch, scaling):  # main_CD.py lines 181-198
    model.eval()
    with torch.no_grad():
        feats = model.features(batch)
        out = model.fusion.fc_out(torch.cat([feats[m] for m in model.modalities], dim=1))
        return out, ref_cosine(model, feats, scaling)


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, **extra):
    return step_trainer("mmcosine", extra.pop("fusion", "concat"), CLASSES, bn=bn,
                        optimizer="sgd", lr=0.05, **extra)


def _compare(t, data, scaling, steps=STEPS):
    ref = copy.deepcopy(t.model)
    want_losses, want_params, want_logs = ref_train(ref, data, scaling, steps)
    got_params, got_metrics, got_losses = train_steps(t, data, steps)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    for got, want in zip(got_metrics, want_logs):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    return ref


@pytest.mark.parametrize("scaling,fusion", [(None, "concat"), (15.0, "cosine")])
def test_steps_equal_the_released_step(scaling, fusion):
    torch.manual_seed(0)
    extra = {} if scaling is None else {"mmcosine_scaling": scaling}
    t = trainer(fusion=fusion, **extra)
    assert isinstance(t.model.fusion, CosineFusion)
    bias = t.model.fusion.fc_out.bias.detach().clone()
    data = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    s = 10.0 if scaling is None else scaling
    ref = _compare(t, data, s)
    assert torch.equal(t.model.fusion.fc_out.bias, bias)  # never trained, as released
    # evaluation: the authors' fused prediction is the plain concat output
    want_fused, want_parts = ref_valid(ref, data[0], s)
    t.model.eval()
    with torch.no_grad():
        got = t.model(data[0])
    torch.testing.assert_close(got["fused"], want_fused, **TOL)
    for m in t.model.modalities:
        torch.testing.assert_close(got[m], want_parts[m], **TOL)


def test_cosine_eval_is_the_training_sum():
    torch.manual_seed(0)
    t = trainer(mmcosine_eval_fused="cosine")
    batch = as_batch(make_batches(3, BATCH, 1, CLASSES)[0])
    t.model.eval()
    with torch.no_grad():
        out = t.model(batch)
    torch.testing.assert_close(out["fused"], out["audio"] + out["visual"])


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = step_trainer("mmcosine", "concat", CLASSES, optimizer="sgd", lr=0.05,
                     modalities=["audio", "visual", "text"])
    no_dropout(t.model)
    _compare(t, text_batches(7, BATCH, 3, CLASSES), 10.0, ((0, 2), (1, 1)))


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"mmcosine_scaling": "inf"}, "--mmcosine-scaling must be a finite number, got inf"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "mmcosine", settings, words)
