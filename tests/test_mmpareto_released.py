"""MMPareto against the authors' released step (differential), its rule by hand, DDP, resume, CLI.

The reference is written from GeWu-Lab/MMPareto_ICML2024 (a339db3): code/MMPareto.py
`train_epoch` (lines 57-213: CE of the fused and of each unimodal head, one `backward(
retain_graph=True)` per loss with the encoder gradients copied (and concatenated) and
`optimizer.zero_grad()` after each, the cosine per encoder, weights 0.5/0.5 or
`MinNormSolver.find_min_norm_element` on the lists of per-tensor gradients plus the concatenated
one, the summed backward, then per encoder tensor `three_norm`, `new_grad = 2 k0 g_mm + 2 k1 g_m`,
`diff = three_norm / |new_grad|`, grad = diff * new_grad * gamma if diff > 1 else new_grad *
gamma, gamma = 1.5, one SGD step) and code/min_norm_solvers.py (`_min_norm_2d` with
`_min_norm_element_from2`, the two-vector case of `find_min_norm_element`). The released name
tests ("audio"/"visual" in the name, not "head") select the whole audio_net / visual_net; on
avtrain's model that is `encoders[m]`. The network is avtrain's tiny model: the method is under
test.
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
    run_gloo,
    step_trainer,
    text_batches,
)

from avtrain.balance import min_norm_weight, mmpareto_gradient, mmpareto_weights

CLASSES, BATCH, STEPS, GAMMA = 3, 6, 5, 1.5
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_min_norm_weight_by_hand():
    t = torch.tensor
    # x1 = [1, 0], x2 = [-1, 1]: x1.x1 = 1, x1.x2 = -1, x2.x2 = 2 -> c = (2 + 1) / (1 + 2 + 2) = 0.6
    assert float(min_norm_weight(t(1.0), t(-1.0), t(2.0))) == pytest.approx(0.6, abs=1e-7)
    # x1.x2 >= x1.x1 -> 0.999 (released clamp); x1.x2 >= x2.x2 -> 0.001
    assert float(min_norm_weight(t(1.0), t(1.0), t(4.0))) == pytest.approx(0.999, abs=1e-7)
    assert float(min_norm_weight(t(4.0), t(1.0), t(1.0))) == pytest.approx(0.001, abs=1e-7)
    # a zero second vector: x1.x2 = 0 >= x2.x2 = 0 -> 0.001
    assert float(min_norm_weight(t(3.0), t(0.0), t(0.0))) == pytest.approx(0.001, abs=1e-7)


def test_weights_and_gradient_by_hand():
    # aligned: g_mm = ([1, 0], [0]), g_u = ([1, 1], [1]): cos = 1 / (1 * sqrt 3) > 0 -> 1/2, 1/2;
    # new = g_mm + g_u = ([2, 1], [1]), the summed gradient itself: ratio 1 -> 1.5 * new
    grads, info = mmpareto_gradient([torch.tensor([1.0, 0.0]), torch.tensor([0.0])],
                                    [torch.tensor([1.0, 1.0]), torch.tensor([1.0])], gamma=1.5)
    assert float(info["cos"]) == pytest.approx(1 / math.sqrt(3), abs=1e-7)
    assert not bool(info["conflict"]) and float(info["w_mm"]) == float(info["w_uni"]) == 0.5
    assert grads[0].tolist() == pytest.approx([3.0, 1.5], abs=1e-6)
    assert grads[1].tolist() == pytest.approx([1.5], abs=1e-6)
    # conflicting: g_mm = ([1, 0], [1]), g_u = ([-1, 1], [-1]): g_mm.g_mm = 2, g_mm.g_u = -2,
    # g_u.g_u = 3, cos = -2 / sqrt(6) <= 0 -> min-norm c = (3 + 2) / (2 + 3 + 4) = 5/9, 4/9;
    # new = 10/9 g_mm + 8/9 g_u = ([2/9, 8/9], [2/9]); summed = ([0, 1], [0]).
    # tensor 1: |summed| = 1, |new| = sqrt(68) / 9 -> ratio 9 / sqrt(68) > 1:
    #   1.5 * 9 / sqrt(68) * [2/9, 8/9] = [3, 12] / sqrt(68) = [0.363803, 1.455214];
    # tensor 2: |summed| = 0 -> ratio 0, not > 1: 1.5 * 2/9 = 1/3 (never rescaled down)
    grads, info = mmpareto_gradient([torch.tensor([1.0, 0.0]), torch.tensor([1.0])],
                                    [torch.tensor([-1.0, 1.0]), torch.tensor([-1.0])], gamma=1.5)
    assert float(info["cos"]) == pytest.approx(-2 / math.sqrt(6), abs=1e-7)
    assert bool(info["conflict"])
    assert float(info["w_mm"]) == pytest.approx(5 / 9, abs=1e-7)
    assert float(info["w_uni"]) == pytest.approx(4 / 9, abs=1e-7)
    assert grads[0].tolist() == pytest.approx([0.363803, 1.455214], abs=1e-6)
    assert grads[1].tolist() == pytest.approx([1 / 3], abs=1e-6)
    # a zero unimodal gradient: cos 0 -> min-norm branch, c = 0.001: new = 0.002 g_mm, ratio
    # |g_mm| / |0.002 g_mm| = 500 -> 1.5 * 500 * 0.002 g_mm = 1.5 g_mm
    grads, info = mmpareto_gradient([torch.tensor([2.0, -1.0])], [torch.zeros(2)], gamma=2.0)
    assert bool(info["conflict"]) and float(info["w_mm"]) == pytest.approx(0.001, abs=1e-7)
    assert grads[0].tolist() == pytest.approx([4.0, -2.0], abs=1e-5)  # gamma 2: 2 g_mm
    cos, conflict, w_mm, w_uni = mmpareto_weights(torch.tensor([1.0, 0.0]),
                                                  torch.tensor([0.0, 1.0]))
    assert float(cos) == 0.0 and bool(conflict)  # orthogonal counts as a conflict (cos > 0 only)
    assert float(w_mm) == pytest.approx(0.5) and float(w_uni) == pytest.approx(0.5)  # 1/(1+1)


def test_balancemm_step_is_three_times_the_summed_gradient_on_the_encoders():
    """BalanceMM's MMPareto_trainer.py (4c1482f) as written, for one encoder tensor: every loss
    is backpropagated into the same .grad before both are recorded (lines 349-365), so both
    are the summed gradient G; cos(G, G) = 1 > 0 -> weights 1/2 (377-379); after zero_grad the
    summed loss's backward gives G again (383-384); new = 2 w0 G + 2 w1 G = 2G, |G| / |2G| < 1
    so no rescale, times alpha 1.5 (trainer_config.yaml line 78): 3G. A parameter without the
    modality in its name (the fusion) keeps G. The docs state these numbers."""
    g = torch.tensor([0.3, -1.2, 0.5])
    recorded_output = recorded_modality = g.clone()  # both read from the accumulated .grad
    cos = F.cosine_similarity(recorded_output, recorded_modality, dim=0)
    w0, w1 = (0.5, 0.5) if cos > 0 else (0.0, 0.0)
    three_norm = torch.norm(g)  # the summed loss's backward
    new = 2 * w0 * recorded_output + 2 * w1 * recorded_modality
    diff = three_norm / torch.norm(new)
    encoder = diff * new * 1.5 if diff > 1 else new * 1.5
    torch.testing.assert_close(encoder, 3 * g)
    from avtrain.balance import mmpareto

    assert "3G" in mmpareto.__doc__ and "1.5 x the summed" not in mmpareto.__doc__


# --- the reference ------------------------------------------------------------------------------


def ref_min_norm(vecs):
    """min_norm_solvers.py: `_min_norm_2d` (dot products summed over the list, float on the CPU)
    and `_min_norm_element_from2`; `find_min_norm_element` returns [c, 1 - c] for two vectors."""
    dps = {}
    for i, j in ((0, 1), (0, 0), (1, 1)):
        dps[(i, j)] = 0.0
        for k in range(len(vecs[i])):
            dps[(i, j)] += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
    v1v1, v1v2, v2v2 = dps[(0, 0)], dps[(0, 1)], dps[(1, 1)]
    if v1v2 >= v1v1:
        gamma = 0.999
    elif v1v2 >= v2v2:
        gamma = 0.001
    else:
        gamma = float(-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)))
    return [gamma, 1 - gamma]


def ref_step(model, batch, optimizer, gamma=GAMMA):
    """One step of the released `train_epoch` (MMPareto.py lines 93-209), for M modalities."""
    criterion = nn.CrossEntropyLoss()
    mods = model.modalities
    record = {m: list(model.encoders[m].named_parameters()) for m in mods}
    optimizer.zero_grad()
    out = model(batch)
    label = batch["label"]
    loss_mm = criterion(out["fused"], label)
    loss_uni = {m: criterion(out[m], label) for m in mods}
    grads = {m: {} for m in mods}
    for loss_type, loss in [("both", loss_mm), *loss_uni.items()]:
        loss.backward(retain_graph=True)
        for m in mods:
            if loss_type in ("both", m):
                g = {name: p.grad.data.clone() for name, p in record[m]}
                g["concat"] = torch.cat([g[name].flatten() for name, _ in record[m]])
                grads[m]["both" if loss_type == "both" else "uni"] = g
        optimizer.zero_grad()
    rec = {}
    k = {}
    for m in mods:
        cos = F.cosine_similarity(grads[m]["both"]["concat"], grads[m]["uni"]["concat"], dim=0)
        if cos > 0:
            k[m] = [0.5, 0.5]
        else:
            k[m] = ref_min_norm([list(grads[m][t].values()) for t in ("both", "uni")])
        rec[m] = (float(cos), not bool(cos > 0), k[m][0], k[m][1])
    loss = loss_mm + sum(loss_uni.values())
    loss.backward()
    for m in mods:
        for name, param in record[m]:
            three_norm = torch.norm(param.grad.data.clone())
            new_grad = 2 * k[m][0] * grads[m]["both"][name] + 2 * k[m][1] * grads[m]["uni"][name]
            diff = three_norm / torch.norm(new_grad)
            param.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    optimizer.step()
    return float(loss.detach()), rec


def ref_train(model, data, steps=STEPS, gamma=GAMMA):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model.train()
    records, params = [], []
    for step in range(steps):
        records.append(ref_step(model, data[step], optimizer, gamma))
        params.append({k: p.detach().clone() for k, p in model.named_parameters()})
    return records, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, **settings):
    return step_trainer("mmpareto", "concat", CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        **settings)


def conflicting(t):
    """Visual's unimodal head set to minus the fused head's visual slice, so the two visual
    gradients point apart and the min-norm branch really runs; with it some encoder tensors
    have r > 1 (rescaled up) and some r < 1 (left as they are) in those steps."""
    with torch.no_grad():
        w, start = t.model.fusion.fc_out.weight, t.model.encoders["audio"].out_dim
        width = t.model.encoders["visual"].out_dim
        t.model.aux_heads["visual"].weight.copy_(-w[:, start:start + width])
    return t


def our_train(t, data, part=slice(None), steps=STEPS):
    params, metrics, losses = [], [], []
    t.model.train()
    for step in range(steps):
        t.step = step
        batch = data[step] if isinstance(data[step], dict) else as_batch(data[step], part)
        loss, _ = t.train_step(batch, 0)
        metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
        losses.append(float(loss.detach()))
        params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
    return params, metrics, losses


def _compare(t, data, steps=STEPS, gamma=GAMMA):
    ref = copy.deepcopy(t.model)
    want_records, want_params = ref_train(ref, data, steps, gamma)
    got_params, got_metrics, got_losses = our_train(t, data, steps=steps)
    for (loss, rec), got, got_loss in zip(want_records, got_metrics, got_losses):
        assert got_loss == pytest.approx(loss, rel=1e-6, abs=1e-6)
        for m, (cos, conflict, w_mm, w_uni) in rec.items():
            assert got[f"cos_{m}"] == pytest.approx(cos, abs=1e-6)
            assert bool(got[f"minnorm_{m}"]) == conflict
            assert got[f"wmm_{m}"] == pytest.approx(w_mm, abs=1e-6)
            assert got[f"wuni_{m}"] == pytest.approx(w_uni, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    return got_metrics


@pytest.mark.parametrize("gamma", [None, 0.7])
def test_steps_equal_the_released_step(gamma):
    torch.manual_seed(0)
    t = conflicting(trainer(mmpareto_gamma=gamma))
    assert t.model.trained_unimodal_heads and set(t.model.aux_heads) == {"audio", "visual"}
    data = [as_batch(b) for b in make_batches(7, BATCH, STEPS, CLASSES)]
    metrics = _compare(t, data, gamma=GAMMA if gamma is None else gamma)
    fired = [m["minnorm_visual"] for m in metrics] + [m["minnorm_audio"] for m in metrics]
    assert 0 < sum(fired) < len(fired)  # both branches ran
    assert any(0.5 != m["wmm_visual"] for m in metrics)


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = conflicting(trainer(modalities=["audio", "visual", "text"]))
    assert t.model.modalities == ["audio", "visual", "text"]
    no_dropout(t.model)  # both runs see the same network
    data = text_batches(7, BATCH, 3, CLASSES)
    metrics = _compare(t, data, steps=3)
    assert {f"{k}_text" for k in ("cos", "minnorm", "wmm", "wuni", "uniloss")} <= set(metrics[0])


def _ddp_bn_run(rank: int, world: int) -> dict:
    torch.manual_seed(0)
    t = conflicting(trainer(bn=True))
    per = BATCH // world
    data = make_batches(7 + rank, BATCH, 3, CLASSES)  # different data per rank
    params, metrics, _ = our_train(t, data, slice(0, per), steps=3)
    buffers = {k: b.clone() for k, b in t.model.named_buffers()}
    return {"params": params[-1], "metrics": metrics, "buffers": buffers}


@pytest.mark.slow
def test_ranks_stay_identical_with_batchnorm(tmp_path):
    # per-rank BatchNorm statistics differ, so no equality with one process; but rank 0's
    # buffers are broadcast before each forward (as DDP's) and the gradients are averaged, so
    # the ranks' parameters stay equal and only the last forward's running statistics differ
    ranks = run_gloo(_ddp_bn_run, tmp_path)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    for name, value in ranks[0]["params"].items():
        assert torch.equal(value, ranks[1]["params"][name]), name
    assert any(not torch.equal(b, ranks[1]["buffers"][k])
               for k, b in ranks[0]["buffers"].items() if b.is_floating_point())


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"mmpareto_gamma": "nan"}, "--mmpareto-gamma must be a finite number, got nan"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "mmpareto", settings, words)


def test_models_without_unimodal_heads_are_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "concat", 3, ["audio", "visual"])
    with pytest.raises(UserError, match="trained unimodal heads"):
        build_balancer("mmpareto", model, {}, modalities=model.modalities)
    with pytest.raises(UserError, match="not a sequence model"):
        build_balancer("mmpareto", nn.Linear(2, 2), {}, modalities=["audio", "visual"])
    model = build_model("tiny", "concat", 3, ["audio", "visual"], True, mmtm=True)
    with pytest.raises(UserError, match="not MMTM blocks"):
        build_balancer("mmpareto", model, {}, modalities=model.modalities)
