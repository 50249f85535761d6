"""OPM against the released code (differential), its rule by hand, DDP, resume and the CLI.

The reference is written from github.com/GeWu-Lab/BML_TPAMI2024 (4b3aa4f): code/models/
Classifier.py `Classifier.forward` (lines 93-153: the weight-split logits with the classifier's
detached weights and b/2, scores as a Python sum of softmax entries, `calcu_q` 58-72 with its
Python conditions, `Modality_drop.execute_drop` 24-55: the "drop at all" test
`rand >= 1 - p_exe`, Bernoulli(1 - q) masks, stack, multiply, `custom_autograd` dividing input
and gradient by 1 - theta and returning theta itself as theta's gradient, which reaches both
encoders through the undetached scores, the update_flag filter) and code/main.py `train` (77-176: warm-up,
the label filter, CE mean, backward, step). The uniform numbers are the ones `opm_draws` gives
for (seed, step): the released code takes them from the global RNGs, we from a seeded generator
(documented in opm.py); the comparisons that turn them into decisions are the released ones.
The network is avtrain's tiny model (its `features` and `fusion`): the method is under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from released import (
    as_batch,
    make_batches,
    step_trainer,
)

from avtrain.balance import opm_drop_probabilities
from avtrain.balance.opm import opm_draws

CLASSES, BATCH, SEED = 3, 6, 3
STEPS = ((0, 2), (1, 3), (2, 2))  # (epoch, steps); epoch 0 is the warm-up
START = 1  # first modulated epoch (released: 6, `warm_up = 1 if epoch <= 5`)
Q_BASE, LAM, P_EXE = 0.6, 0.5, 0.7
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference ------------------------------------------------------------------------------


class InverseKeep(torch.autograd.Function):  # Classifier.py lines 9-21, rewritten
    """The released custom_autograd: backward returns theta itself as theta's gradient (line
    21), and theta is differentiable back to both encoders (the scores come from the
    undetached features; q is written in place into a tensor that then requires grad), so the
    step adds theta * d(theta)/d(encoders). `released=False`: no gradient for theta."""

    @staticmethod
    def forward(ctx, x, theta, released):
        ctx.save_for_backward(theta)
        ctx.scale, ctx.released = 1 / (1 - theta.item()), released
        return x * ctx.scale

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad * ctx.scale, (theta if ctx.released else None), None


def calcu_q(p1, p2):  # lines 58-72
    q = torch.tensor([0.0, 0.0])
    r1 = torch.tanh(torch.relu(p1 / p2 - 1))
    r2 = torch.tanh(torch.relu(p2 / p1 - 1))
    q[0] = Q_BASE * (1 + LAM * r1) if r1 > 0 else 0
    q[1] = Q_BASE * (1 + LAM * r2) if r2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def ref_step(model, optimizer, audio, visual, label, epoch, step, released=True):
    softmax, criterion = nn.Softmax(dim=1), nn.CrossEntropyLoss()
    optimizer.zero_grad()
    f = model.features({"audio": audio, "visual": visual})
    out_1, out_2 = f["audio"], f["visual"]
    d = out_1.shape[1]
    w = model.fusion.fc_out.weight.clone().detach()
    b = model.fusion.fc_out.bias.clone().detach()
    t1 = torch.mm(out_1, w[:, :d].t()) + b / 2
    t2 = torch.mm(out_2, w[:, d:].t()) + b / 2
    p1 = sum([softmax(t1)[i][int(label[i])] for i in range(t1.shape[0])])
    p2 = sum([softmax(t2)[i][int(label[i])] for i in range(t2.shape[0])])
    record = {"q": [0.0, 0.0], "exe": 0.0}
    if epoch >= START:  # warm_up == 0
        q = calcu_q(p1, p2)
        record["q"] = q.tolist()
        u_exe, u_mask = opm_draws(SEED, step, label.shape[0], 2, "cpu")
        if u_exe[0] >= 1 - P_EXE:
            record["exe"] = 1.0
            dims = torch.tensor([d, d])
            theta = (dims * q).sum() / dims.sum()
            mask = (u_mask < 1 - q).float().t().unsqueeze(-1)  # Bernoulli(1 - q), [2, B, 1]
            feats = InverseKeep.apply(torch.stack([out_1, out_2]) * mask, theta, released)
            record["theta_grad"] = theta.requires_grad
            flag = mask.squeeze(-1).t().sum(dim=1) > 0
            out_1, out_2, label = feats[0][flag], feats[1][flag], label[flag]
    out = model.fusion({"audio": out_1, "visual": out_2})
    loss = criterion(out, label)
    loss.backward()
    optimizer.step()
    return record


def ref_train(model, data, released=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    records, params, step = [], [], 0
    model.train()
    for epoch, steps in STEPS:
        for _ in range(steps):
            records.append(ref_step(model, optimizer, *data[step], epoch, step, released))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return records, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, **extra):
    return step_trainer("opm", "concat", CLASSES, bn=bn, optimizer="sgd", lr=0.05, seed=SEED,
                        alpha=LAM, opm_q_base=Q_BASE, opm_p_exe=P_EXE, modulation_start=START,
                        **extra)


def our_train(t, data, part=slice(None)):
    params, metrics, step = [], [], 0
    for epoch, steps in STEPS:
        t.model.train()
        for _ in range(steps):
            t.step = step
            t.train_step(as_batch(data[step], part), epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics


def test_drop_probabilities_by_hand():
    # audio 3x as confident: r = tanh(3 - 1) = 0.9640276, q = 0.6 * (1 + 0.5 r) = 0.8892083
    q = opm_drop_probabilities(torch.tensor([3.0, 1.0]), 0.6, 0.5)
    assert q.tolist() == pytest.approx([0.8892083, 0.0], abs=1e-6)
    # visual dominates: r = tanh(4/2 - 1) = 0.7615942, q = 0.5 * (1 + 0.5 r) = 0.6903985
    q = opm_drop_probabilities(torch.tensor([2.0, 4.0]), 0.5, 0.5)
    assert q.tolist() == pytest.approx([0.0, 0.6903985], abs=1e-6)
    assert opm_drop_probabilities(torch.tensor([2.0, 2.0]), 0.5, 0.5).tolist() == [0.0, 0.0]
    # 0.8 * (1 + 1 * tanh(4)) > 1: clipped
    assert opm_drop_probabilities(torch.tensor([5.0, 1.0]), 0.8, 1.0).tolist() == [1.0, 0.0]


def test_draws_depend_on_seed_and_step_only():
    a = opm_draws(1, 5, 8, 2, "cpu")
    b = opm_draws(1, 5, 8, 2, "cpu")
    c = opm_draws(1, 6, 8, 2, "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    assert torch.equal(opm_draws(1, 5, 4, 2, "cpu")[1], a[1][:4])  # rows are a prefix


@pytest.mark.parametrize("theta_grad", ["released", "none"])
def test_steps_equal_the_released_step(theta_grad):
    """Default: the released step, theta * grad(theta) included; `none`: the reference with
    no gradient for theta."""
    torch.manual_seed(0)
    t = trainer(opm_theta_grad=theta_grad)
    ref = copy.deepcopy(t.model)
    ref.fusion._forward_pre_hooks.clear()  # the copy must not feed our balancer
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    want_records, want_params = ref_train(ref, data, released=theta_grad == "released")
    got_params, got_metrics = our_train(t, data)
    for want, got in zip(want_records, got_metrics):
        assert [got["drop_p_audio"], got["drop_p_visual"]] == pytest.approx(want["q"], abs=1e-6)
        assert got["drop_exe"] == want["exe"]
    assert any(m["drop_exe"] and (m["dropped_audio"] or m["dropped_visual"])
               for m in got_metrics)  # features were really dropped
    assert any(r.get("theta_grad") for r in want_records)  # theta did reach the encoders
    assert not any(m["drop_exe"] for m in got_metrics[:2])  # warm-up
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)


def test_theta_gradient_is_what_separates_the_two():
    """One modulated, executing step from the same weights: the released step's encoder
    gradients differ from the no-theta-gradient ones by theta * grad(theta) -- on both
    encoders, nowhere else -- and ours matches each reference at 1e-6."""
    torch.manual_seed(0)
    data = make_batches(7, BATCH, 1, CLASSES)
    audio, visual, label = data[0]
    step = next(s for s in range(200) if opm_draws(SEED, s, BATCH, 2, "cpu")[0][0] >= 1 - P_EXE)
    grads = {}
    for mode in ("released", "none"):
        torch.manual_seed(0)
        t = trainer(opm_theta_grad=mode)
        ref = copy.deepcopy(t.model)
        ref.fusion._forward_pre_hooks.clear()
        ref.train()
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.0)
        ref_step(ref, ref_opt, audio, visual, label, START, step, released=mode == "released")
        t.model.train()
        t.step = step
        for p in t.model.parameters():
            p.grad = None
        t.optimizer.param_groups[0]["lr"] = 0.0
        t.train_step(as_batch(data[0]), START)
        got = {k: p.grad.clone() for k, p in t.model.named_parameters() if p.grad is not None}
        want = {k: p.grad.clone() for k, p in ref.named_parameters() if p.grad is not None}
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
        grads[mode] = want
    diff = {k: (grads["released"][k] - grads["none"][k]).abs().max() for k in grads["none"]}
    for prefix in ("encoders.audio", "encoders.visual"):  # 3-6 % of the largest value here
        largest = max(float(g.abs().max()) for k, g in grads["none"].items()
                      if k.startswith(prefix))
        assert max(float(v) for k, v in diff.items() if k.startswith(prefix)) > 0.02 * largest
    assert all(float(v) == 0 for k, v in diff.items() if not k.startswith("encoders."))


def test_more_than_two_modalities_is_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "sum", 3, ["audio", "visual", "text"])
    with pytest.raises(UserError, match="defined for two modalities"):
        build_balancer("opm", model, {}, modalities=model.modalities)
