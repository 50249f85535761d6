"""MBSD against BalanceMM's trainer (differential), its rule by hand, DDP, resume and the CLI.

No code of the method's authors was found; the reference is written from GeWu-Lab/
BalanceBenchmark (4c1482f) balancemm/trainer/MBSD_trainer.py `training_step` (lines 95-231):
CE of the output and of each unimodal result, the per-sample loop over the batch with Python's
max/min of the true-class probabilities assigned into fresh tensors (gradients kept), kl_div of
the strong probability as input against the weak one, the RS term on logits (two modalities) or
probabilities (three), both weighted by w and divided by the batch, one backward; outside the
window CE(output) alone. The unimodal results are concat's weight split with bias / M
(balancemm/models/avclassify_model.py lines 277-300); `sum` gives its summands.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import (
    as_batch,
    make_batches,
    no_dropout,
    step_trainer,
    text_batches,
    train_steps,
)

from avtrain.balance import mbsd_loss, mbsd_pair_terms

CLASSES, BATCH = 3, 6
STEPS = ((0, 3), (1, 1))  # (epoch, steps); epoch 1 is after the window
END = 0  # last modulated epoch (BalanceMM: 80)
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_pair_terms_by_hand():
    # two samples, two classes, labels [0, 1].
    # sample 0: z_a = [ln 3, 0] -> p_a = 3/4 (argmax 0 = label: right); z_v = [0, 0] -> 1/2.
    #   strong 3/4, weak 1/2, w = 1/4; KL = 1/2 * (ln(1/2) - 3/4) = -0.7215736;
    #   RS on logits = ((ln 3)^2 + 0) / 2 = 0.6034744
    # sample 1: z_a = [0, 0] (argmax 0, wrong), z_v = [ln 4, 0] (argmax 0, wrong) -> w = 0
    z_a = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    z_v = torch.tensor([[0.0, 0.0], [math.log(4.0), 0.0]])
    y = torch.tensor([0, 1])
    kl, rs, w = mbsd_pair_terms(z_a, z_v, y, "logits")
    assert w.tolist() == pytest.approx([0.25, 0.0], abs=1e-7)
    # loss_KL = (1/4 * -0.7215736 + 0) / 2 = -0.0901967; loss_RS = 1/4 * 0.6034744 / 2
    assert float(kl) == pytest.approx(0.25 * 0.5 * (math.log(0.5) - 0.75) / 2, abs=1e-7)
    assert float(kl) == pytest.approx(-0.0901967, abs=1e-6)
    assert float(rs) == pytest.approx(0.25 * math.log(3.0) ** 2 / 2 / 2, abs=1e-7)
    # RS on probabilities: sample 0 (3/4 - 1/2)^2 + (1/4 - 1/2)^2 = 1/8, / C = 1/16; * w / B
    _, rs_p, _ = mbsd_pair_terms(z_a, z_v, y, "probs")
    assert float(rs_p) == pytest.approx(0.25 * (1 / 16) / 2, abs=1e-7)
    # the total for two modalities: CE(fused) + CE(a) + CE(v) + RS + KL
    fused = torch.zeros(2, 2)  # CE = ln 2
    total, info = mbsd_loss({"fused": fused, "audio": z_a, "visual": z_v}, y, ["audio", "visual"],
                            "auto")
    ce = math.log(2) + F.cross_entropy(z_a, y).item() + F.cross_entropy(z_v, y).item()
    assert float(total) == pytest.approx(ce + float(rs) + float(kl), abs=1e-6)
    assert float(info["weighted"]) == 0.5 and float(info["weight"]) == pytest.approx(0.125)


def test_gradient_reaches_the_weight_as_released():
    # one sample, p_a = 3/4 > p_v = 1/2 and right: total = w * KL with w = p_a - p_v,
    # KL = p_v * (ln p_v - p_a); d/dp_a = KL - w * p_v = -0.7215736 - 0.125 = -0.8465736
    p = torch.tensor([0.75, 0.5], requires_grad=True)
    w = torch.tensor([0.0])
    w[0] = max(p[0], p[1]) - min(p[0], p[1])  # BalanceMM's assignment keeps the graph
    kl = F.kl_div(max(p[0], p[1]).view(1), min(p[0], p[1]).view(1), reduction="none")
    (w * kl).sum().backward()
    assert p.grad[0].item() == pytest.approx(0.5 * (math.log(0.5) - 0.75) - 0.25 * 0.5, abs=1e-6)
    # ours, through the logits: the same gradient as the released loop
    z_a = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    z_v = torch.tensor([[0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    kl_ours, _, _ = mbsd_pair_terms(z_a, z_v, y, "logits")
    kl_ours.backward()
    pa = F.softmax(z_a.detach(), 1)[0, 0]
    want = p.grad[0] * pa * (1 - pa)  # dp_a/dz_a0 = p_a (1 - p_a)
    assert z_a.grad[0, 0].item() == pytest.approx(want.item(), abs=1e-6)


def test_ties_take_the_first_modality():
    # equal probabilities: w = 0, strong = weak = p_a, KL = p (ln p - p)
    z = torch.tensor([[1.0, 0.0]])
    kl, rs, w = mbsd_pair_terms(z, z.clone(), torch.tensor([0]), "logits")
    assert w.tolist() == [0.0] and float(kl) == 0.0 and float(rs) == 0.0


# --- the reference ------------------------------------------------------------------------------


def concat_logits(model, feats):  # avclassify_model.py lines 284-293
    w, b = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    out, now = {}, 0
    for m in model.modalities:
        d = feats[m].shape[1]
        out[m] = torch.mm(feats[m], torch.transpose(w[:, now:now + d], 0, 1)) + b / len(feats)
        now += d
    return out


def sum_logits(model, feats):  # our extension: the summands of `sum`
    return {m: model.fusion.fc[m](feats[m]) for m in model.modalities}


def ref_loss(out, z, label, key):  # MBSD_trainer.py training_step, lines 119-228
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    n = len(out)
    prediction = {m: softmax(z[m]) for m in key}
    y_pred = {m: prediction[m].argmax(dim=-1) for m in key}
    total = criterion(out, label) + sum(criterion(z[m], label) for m in key)
    kls, rss = [], []
    for a, b in itertools.combinations(key, 2):  # key[0]-key[1] (and 0-2, 1-2 for three)
        w, ps, pw = torch.zeros(n), torch.zeros(n), torch.zeros(n)
        for i in range(n):
            pa, pb = prediction[a][i][label[i]], prediction[b][i][label[i]]
            if y_pred[a][i] == label[i] or y_pred[b][i] == label[i]:
                w[i] = max(pa, pb) - min(pa, pb)
            ps[i] = max(pa, pb)
            pw[i] = min(pa, pb)
        kl = F.kl_div(ps, pw, reduction="none")
        if len(key) == 2:
            rs = 1 / z[key[0]].shape[1] * torch.sum((z[a] - z[b]) ** 2, dim=1)
        else:
            rs = 1 / z[key[0]].shape[1] * torch.sum((prediction[a] - prediction[b]) ** 2, dim=1)
        kls.append(torch.mm(w.reshape(1, -1), kl.reshape(-1, 1)) / n)
        rss.append(torch.mm(w.reshape(1, -1), rs.reshape(-1, 1)) / n)
    return total + (sum(rss) / len(rss)).squeeze() + (sum(kls) / len(kls)).squeeze()


def ref_train(model, data, unimodal, steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses, params, step = [], [], 0
    model.train()
    for epoch, n_steps in steps:
        for _ in range(n_steps):
            batch = data[step]
            feats = model.features(batch)
            z = unimodal(model, feats)
            out = model.fusion(feats)
            label = batch["label"]
            if 0 <= epoch <= END:
                loss = ref_loss(out, z, label, list(model.modalities))
            else:
                loss = criterion(out, label)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return losses, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="concat", bn=True, **extra):
    return step_trainer("mbsd", fusion, CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        modulation_end=END, **extra)


def our_train(t, data, part=slice(None), steps=STEPS):
    return train_steps(t, data, steps, part)


def _compare(t, data, unimodal, steps=STEPS):
    ref = copy.deepcopy(t.model)
    want_losses, want_params = ref_train(ref, data, unimodal, steps)
    got_params, got_metrics, got_losses = our_train(t, data, steps=steps)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    return got_metrics


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_steps_equal_the_released_step(fusion):
    torch.manual_seed(0)
    t = trainer(fusion)
    data = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    metrics = _compare(t, data, concat_logits if fusion == "concat" else sum_logits)
    assert any(m["mbsd_weighted"] > 0 and m["mbsd_kl"] != 0 for m in metrics[:3])  # acted
    assert metrics[-1] == {"mbsd_kl": 0.0, "mbsd_rs": 0.0, "mbsd_weight": 0.0,
                           "mbsd_weighted": 0.0}  # after the window


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = step_trainer("mbsd", "sum", CLASSES, optimizer="sgd", lr=0.05, modulation_end=END,
                     modalities=["audio", "visual", "text"])
    no_dropout(t.model)  # both runs see the same network
    data = text_batches(7, BATCH, 3, CLASSES)
    metrics = _compare(t, data, sum_logits, ((0, 2), (1, 1)))
    assert metrics[0]["mbsd_weighted"] > 0


# --- the real trainer ---------------------------------------------------------------------------


def test_bad_rs_choice_is_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "concat", 3, ["audio", "visual"])
    with pytest.raises(UserError, match="--mbsd-rs-on must be one of"):
        build_balancer("mbsd", model, {"mbsd_rs_on": "features"}, modalities=model.modalities)


def test_rs_choice_reaches_the_rule():
    # --mbsd-rs-on probs with two modalities: the RS term of the released three-modality branch
    t = trainer(mbsd_rs_on="probs")
    assert t.balancer.rs_on == "probs"
    torch.manual_seed(0)
    z_a, z_v, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    logits = {"fused": z_a + z_v, "audio": z_a, "visual": z_v}
    _, auto = mbsd_loss(logits, y, ["audio", "visual"], "auto")
    _, probs = mbsd_loss(logits, y, ["audio", "visual"], "probs")
    _, rs_p, _ = mbsd_pair_terms(z_a, z_v, y, "probs")
    assert float(probs["rs"]) == pytest.approx(float(rs_p)) and auto["rs"] != probs["rs"]
