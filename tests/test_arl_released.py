"""ARL against its released step (differential) and its rule by hand.

Reference written from shicaiwei123/ICCV2025-ARL @ 358af4f, main_arl_variance.py `train_epoch`
(lines 97-174): one forward giving (out, out_a, out_v), CE batch means; `epoch > args.start`:
loss = CE(out) + gamma (CE(out_a) + CE(out_v)), else CE(out) + CE(out_a) + CE(out_v); one
backward through `GradScale` (models/backbone.py 71-86, 325-347: the encoder output's gradient
g becomes g + g * w, from epoch start + 1, w the args' weight: 0.5 in the released file), the
clip, one SGD step. Unimodal logits: models/fusion_modules.py ConcatFusion_AUXI 41-52 (the fused
layer on the features with the other modality zeroed: full bias), SumFusion_AUXI 16-26. The
analysis weights: lines 116-153, in the released scalar arithmetic (numpy / Python floats).
The released GradScale multiplies by a tuple and fails (see avtrain/balance/arl.py); the
reference's GradScale multiplies by the weight, as that line means.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import as_batch, make_batches, step_trainer, train_steps

from avtrain.balance import arl_analysis_weights, arl_unimodal_logits
from avtrain.balance.arl import arl_statistics

CLASSES, BATCH = 3, 6
START = 1  # released: epoch > 5; here the rule starts at epoch 1 so both phases are stepped
STEPS = ((0, 2), (1, 2))
GAMMA, CLIP, LR = 4.0, 0.5, 0.05  # a clip that bites, to hold the scale-then-clip order
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_analysis_weights_by_hand():
    # magnitudes c = [3, 1] -> shares [0.75, 0.25]; entropies [0.2, 0.8] -> shares [0.2, 0.8],
    # clamped below at 0.3 -> [0.3, 0.8]; inverses [10/3, 5/4] -> shares [8/11, 3/11].
    # logits T * [c_v * i_a, c_a * i_v] = 2 * [0.25 * 8/11, 0.75 * 3/11] = [4/11, 4.5/11]
    w = arl_analysis_weights(torch.tensor([3.0, 1.0]), torch.tensor([0.2, 0.8]), 2.0)
    a = 1 / (1 + math.exp(0.5 / 11))  # softmax([4/11, 4.5/11])[0]
    assert w.tolist() == pytest.approx([a, 1 - a], abs=1e-7)
    assert w[0] < 0.5  # audio, the larger logits, gets the smaller weight here


def test_statistics_and_full_bias_by_hand():
    # z = [[ln 3, 0], [0, 0]]: magnitude = mean over the batch of sum |z| = ln 3 / 2;
    # entropy: sample 0 p = [3/4, 1/4] -> -(3/4 ln 3/4 + 1/4 ln 1/4); sample 1 -> ln 2
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    mag, ent = arl_statistics(z).tolist()
    assert mag == pytest.approx(math.log(3.0) / 2, abs=1e-7)
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert ent == pytest.approx((h0 + math.log(2.0)) / 2, abs=1e-6)

    # concat: our split carries b / 2; ARL's unimodal logits carry b (fc_out on [f_a; 0])
    from avtrain.models import build_model

    model = build_model("tiny", "concat", 3, ["audio", "visual"])
    with torch.no_grad():
        model.fusion.fc_out.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    f = {"audio": torch.randn(2, 64), "visual": torch.randn(2, 64)}
    ours = arl_unimodal_logits(model, model.fusion.modality_logits(f), ["audio", "visual"])
    zero = torch.zeros_like(f["visual"])
    want = model.fusion.fc_out(torch.cat([f["audio"], zero], 1))
    torch.testing.assert_close(ours["audio"], want, rtol=1e-6, atol=1e-6)


# --- the reference ------------------------------------------------------------------------------


class GradScale(torch.autograd.Function):
    """backbone.py GradScale as meant: g + g * w on the way back, identity forward. `holder`
    is read at backward time, so w can come from this forward's logits as released."""

    @staticmethod
    def forward(ctx, x, holder):
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output + grad_output * ctx.holder[0], None


def released_analysis(out_a, out_v, T):
    """main_arl_variance.py 116-153, in its scalar arithmetic -> [audio, visual] weights."""
    calculate_a = torch.mean(torch.abs(out_a), 0).sum().detach().numpy()
    calculate_b = torch.mean(torch.abs(out_v), 0).sum().detach().numpy()
    p_a, p_v = torch.softmax(out_a, dim=1), torch.softmax(out_v, dim=1)
    H_a = torch.sum(-p_a * torch.log(p_a + 1e-16), dim=1).mean().detach().numpy().item()
    H_v = torch.sum(-p_v * torch.log(p_v + 1e-16), dim=1).mean().detach().numpy().item()
    H_a_n, H_v_n = H_a / (H_a + H_v), H_v / (H_a + H_v)
    H_a = torch.clamp(torch.tensor(H_a_n), 0.3).numpy()
    H_v = torch.clamp(torch.tensor(H_v_n), 0.3).numpy()
    a_weight, v_weight = 1 / H_a, 1 / H_v
    calculate_a, calculate_b = (calculate_a / (calculate_a + calculate_b),
                                calculate_b / (calculate_a + calculate_b))
    a_weight, v_weight = a_weight / (a_weight + v_weight), v_weight / (a_weight + v_weight)
    weight = F.softmax(torch.tensor(np.array([calculate_b * a_weight * T,
                                              calculate_a * v_weight * T])), dim=0)
    return [float(weight[0]), float(weight[1])]


def ref_train(model, data, fusion, analysis=False, T=8.0):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses, params, scales, step = [], [], [], 0
    model.train()
    for epoch, n_steps in STEPS:
        for _ in range(n_steps):
            batch, label = data[step], data[step]["label"]
            on = epoch >= START  # epoch > args.start with start = START - 1
            optimizer.zero_grad()
            a = model.encoders["audio"](batch["audio"])
            v = model.encoders["visual"](batch["visual"])
            wa, wv = [0.5], [0.5]  # main_arl_variance.py 163-164
            if on:
                a, v = GradScale.apply(a, wa), GradScale.apply(v, wv)
            if fusion == "concat":
                fc = model.fusion.fc_out
                out = fc(torch.cat([a, v], 1))
                out_a = fc(torch.cat([a, torch.zeros_like(v)], 1))
                out_v = fc(torch.cat([torch.zeros_like(a), v], 1))
            else:
                out_a, out_v = model.fusion.fc["audio"](a), model.fusion.fc["visual"](v)
                out = out_a + out_v
            if on and analysis:  # this forward's logits, before the backward
                wa[0], wv[0] = released_analysis(out_a, out_v, T)
            loss_f, loss_a, loss_v = (criterion(o, label) for o in (out, out_a, out_v))
            loss = loss_f + (loss_a + loss_v) * (GAMMA if on else 1)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP, norm_type=2)
            optimizer.step()
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            scales.append([1 + wa[0], 1 + wv[0]] if on else [1.0, 1.0])
            step += 1
    return losses, params, scales


def trainer(fusion, **extra):
    return step_trainer("arl", fusion, CLASSES, optimizer="sgd", lr=LR, clip_grad=CLIP,
                        modulation_start=START, **extra)


def data():
    return [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_steps_equal_the_released_step(fusion):
    torch.manual_seed(0)
    t = trainer(fusion)
    assert t.balancer.opt.gamma == GAMMA  # cramed_arl.sh's --gamma 4.0 is the default
    batches = data()
    want_losses, want_params, want_scales = ref_train(copy.deepcopy(t.model), batches, fusion)
    got_params, metrics, got_losses = train_steps(t, batches, STEPS)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert [[m["arl_scale_audio"], m["arl_scale_visual"]] for m in metrics] == want_scales
    assert want_scales[0] == [1.0, 1.0] and want_scales[-1] == [1.5, 1.5]


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_analysis_weights_equal_the_released_arithmetic(fusion):
    torch.manual_seed(0)
    t = trainer(fusion, arl_weights="analysis", arl_temperature=3.0)
    batches = data()
    want_losses, want_params, want_scales = ref_train(copy.deepcopy(t.model), batches, fusion,
                                                      analysis=True, T=3.0)
    got_params, metrics, got_losses = train_steps(t, batches, STEPS)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    for m, want in zip(metrics[2:], want_scales[2:]):
        assert [m["arl_scale_audio"], m["arl_scale_visual"]] == pytest.approx(want, abs=1e-6)
        assert m["arl_scale_audio"] != m["arl_scale_visual"]  # asymmetric
        assert m["arl_analysis_audio"] + m["arl_analysis_visual"] == pytest.approx(1.0)


def test_analysis_needs_two_modalities():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "sum", 3, ["audio", "visual", "text"])
    with pytest.raises(UserError, match="--arl-weights analysis is defined for two modalities"):
        build_balancer("arl", model, {"arl_weights": "analysis"}, modalities=model.modalities)
