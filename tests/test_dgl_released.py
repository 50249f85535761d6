"""DGL against its released step (differential) and its rule by hand.

Reference written from shicaiwei123/ICCV2025-GDL @ b72a55f, main_dgl.py `train_epoch` (lines
90-154): one forward (ConcatFusion_DGL / SumFusion_DGL, models/fusion_modules.py 16-59: fused
logits from detached features, unimodal logits of the same classifier on the live features,
concat with the whole bias); `(loss_a + loss_v) * alpha` backward with retain_graph; every
parameter of the fusion module set to `grad = None`; `loss_f` backward; the clip; one SGD step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from released import as_batch, make_batches, step_trainer, train_steps

from avtrain.balance import dgl_logits, dgl_loss

CLASSES, BATCH = 3, 6
STEPS = ((0, 2), (1, 1))
ALPHA, CLIP, LR = 4.0, 0.5, 0.05  # a clip that bites
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_gradients_are_disentangled_by_hand():
    # concat, 1-d features, 2 classes: W = [[1, 0], [0, 1]] (columns a | v), b = [0, 0];
    # f_a = 1, f_v = 0, label 0. fused = [1, 0]; z_a = [1, 0] (+ b), z_v = [0, 0].
    from avtrain.models.fusions import ConcatFusion

    fusion = ConcatFusion(["audio", "visual"], {"audio": 1, "visual": 1}, 2)
    with torch.no_grad():
        fusion.fc_out.weight.copy_(torch.eye(2))
        fusion.fc_out.bias.zero_()
    fa = torch.tensor([[1.0]], requires_grad=True)
    fv = torch.tensor([[0.0]], requires_grad=True)
    fused, z = dgl_logits(fusion, {"audio": fa, "visual": fv}, ["audio", "visual"])
    y = torch.tensor([0])
    loss, ce = dgl_loss(fused, z, y, 2.0)
    # CE([1, 0], 0) = ln(1 + e^-1); CE([0, 0], 0) = ln 2
    ce10 = math.log(1 + math.exp(-1))
    assert float(ce["fused"]) == pytest.approx(ce10) and float(ce["audio"]) == pytest.approx(ce10)
    assert float(ce["visual"]) == pytest.approx(math.log(2))
    assert float(loss.detach()) == pytest.approx(ce10 + 2 * (ce10 + math.log(2)))
    loss.backward()
    # the encoders: alpha * d CE(z_m) / d f_m only. p_a = softmax([1, 0]) = [s, 1 - s]:
    # dCE/dz_a = [s - 1, 1 - s]; d z_a / d f_a = W[:, 0] = [1, 0] -> 2 (s - 1)
    s = 1 / (1 + math.exp(-1))
    assert fa.grad.item() == pytest.approx(2 * (s - 1), abs=1e-7)
    # visual: dCE/dz_v = [-1/2, 1/2], d z_v / d f_v = W[:, 1] = [0, 1] -> 2 * 1/2 = 1
    assert fv.grad.item() == pytest.approx(1.0, abs=1e-7)
    # the classifier: the fused CE alone: dL/dW = (p - onehot) f^T = [[s - 1, 0], [1 - s, 0]]
    want = torch.tensor([[s - 1, 0.0], [1 - s, 0.0]])
    torch.testing.assert_close(fusion.fc_out.weight.grad, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(fusion.fc_out.bias.grad, torch.tensor([s - 1, 1 - s]))


# --- the reference ------------------------------------------------------------------------------


def ref_train(model, data, fusion):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    losses, params, step = [], [], 0
    model.train()
    for _epoch, n_steps in STEPS:  # DGL has no window: every epoch alike
        for _ in range(n_steps):
            batch, label = data[step], data[step]["label"]
            optimizer.zero_grad()
            a = model.encoders["audio"](batch["audio"])
            v = model.encoders["visual"](batch["visual"])
            if fusion == "concat":  # ConcatFusion_DGL
                fc = model.fusion.fc_out
                out = fc(torch.cat((a, v), dim=1).detach())
                out_a = fc(torch.cat((a, torch.zeros_like(v)), dim=1))
                out_v = fc(torch.cat((torch.zeros_like(a), v), dim=1))
            else:  # SumFusion_DGL
                fa, fv = model.fusion.fc["audio"], model.fusion.fc["visual"]
                out_a, out_v = fa(a), fv(v)
                out = fa(a.detach()) + fv(v.detach())
            loss_v, loss_a, loss_f = (criterion(o, label) for o in (out_v, out_a, out))
            loss_unimodal = (loss_a + loss_v) * ALPHA
            loss_unimodal.backward(retain_graph=True)
            for name, parms in model.named_parameters():
                if "fusion" in name.split(".")[0]:  # DataParallel's [1]: no `module.` here
                    parms.grad = None
            loss_f.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP, norm_type=2)
            optimizer.step()
            losses.append(float((loss_f + loss_unimodal).detach()))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return losses, params


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_steps_equal_the_released_step(fusion):
    torch.manual_seed(0)
    t = step_trainer("dgl", fusion, CLASSES, optimizer="sgd", lr=LR, clip_grad=CLIP)
    assert t.balancer.opt.alpha == ALPHA
    batches = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    want_losses, want_params = ref_train(copy.deepcopy(t.model), batches, fusion)
    got_params, metrics, got_losses = train_steps(t, batches, STEPS)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert set(metrics[0]) == {"dgl_ce_fused", "dgl_ce_audio", "dgl_ce_visual", "dgl_grad_audio",
                               "dgl_grad_visual"}
    assert all(m["dgl_grad_audio"] > 0 and m["dgl_grad_visual"] > 0 for m in metrics)
