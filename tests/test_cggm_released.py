"""CGGM against its released step (differential) and its rule by hand.

The reference is written from zrguo/CGGM (21e428c) src/msatrain.py `train_model` (lines
39-133; the two-modality form of src/foodtrain.py 57-135): `acc1` and `l_gm` kept across steps,
the network's loss CE + lamda * l_gm of the previous step, one backward; the classifiers on the
detached encoder outputs, their CE summed, backward after `cls_optimizer.zero_grad()`; `cal_cos`
(src/eval_metrics.py 165-173) of each classifier's `out_layer.weight` with the fused output
weight (the parameters, cloned, with their graph); the batch accuracies (sklearn's
`accuracy_score`, as `train_eval_iemo`), the coefficients, the new l_gm, the encoder gradients
times coeff * rou, the classifiers' step, `clip_grad_norm_` at 0.8, the network's step. Our
fusion's weight for modality m stands for the released single fused output layer (concat's
slice, sum's summand), as the module says.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import as_batch, make_batches, step_trainer
from sklearn.metrics import accuracy_score

from avprep.errors import UserError
from avtrain.balance import cggm_coefficients, cggm_lgm

CLASSES, BATCH, STEPS = 3, 6, 6
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_coefficients_by_hand():
    # improvements d = [0.5, 0.25]: D = 0.75 + 1e-8; coeff = [0.25, 0.5] / D = [1/3, 2/3]
    coeff = cggm_coefficients(torch.tensor([0.5, 0.5], dtype=torch.float64),
                              torch.tensor([0.0, 0.25], dtype=torch.float64))
    assert coeff.tolist() == pytest.approx([1 / 3, 2 / 3], rel=1e-7)
    # nothing changed: D = 1e-8, coeff = 1 each
    same = torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert cggm_coefficients(same, same).tolist() == [1.0, 1.0]
    # opposite changes: D = 1e-8, coeff = (1e-8 -+ 0.25) / 1e-8 = 1 -+ 2.5e7
    coeff = cggm_coefficients(torch.tensor([0.5, 0.25], dtype=torch.float64),
                              torch.tensor([0.25, 0.5], dtype=torch.float64))
    assert coeff.tolist() == pytest.approx([1 - 2.5e7, 1 + 2.5e7], rel=1e-9)
    # three modalities d = [0.1, 0.2, 0.3]: D = 0.6, coeff = [5/6, 4/6, 3/6]
    coeff = cggm_coefficients(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64),
                              torch.zeros(3, dtype=torch.float64))
    assert coeff.tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6], rel=1e-7)


def test_lgm_by_hand():
    # coeff [1/3, 2/3], cosines [0.5, -0.25]: (1 - (1/6 - 1/6)) / 2 = 0.5
    coeff = torch.tensor([1 / 3, 2 / 3], dtype=torch.float64)
    assert cggm_lgm(coeff, [torch.tensor(0.5), torch.tensor(-0.25)]).item() == \
        pytest.approx(0.5, abs=1e-7)
    # a negative coefficient counts by its size: |-1| + 2 = 3; 3 - (-1 * 1 + 2 * 0.5) = 3; / 2
    coeff = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    assert cggm_lgm(coeff, [torch.tensor(1.0), torch.tensor(0.5)]).item() == pytest.approx(1.5)


# --- the reference ------------------------------------------------------------------------------


def fused_part(model, m):
    fusion = model.fusion
    if isinstance(getattr(fusion, "fc", None), nn.ModuleDict):
        return fusion.fc[m].weight
    d = model.encoders["audio"].out_dim
    return fusion.fc_out.weight[:, :d] if m == "audio" else fusion.fc_out.weight[:, d:]


def classify(head, x):
    """models/msamodel.py `Classifier.forward` after its transformer (lines 91-93): proj1
    twice, relu, out_layer; or the linear head (out_layer alone)."""
    if hasattr(head, "proj1"):
        x = head.proj1(x)
        x = F.relu(head.proj1(x))
    return head.out_layer(x)


def ref_train(model, classifier, data, *, rou=1.3, lamda=0.2, cls_lr=5e-4, clip=0.8):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    cls_optimizer = torch.optim.Adam(classifier.parameters(), lr=cls_lr)
    criterion = nn.CrossEntropyLoss()
    mods = list(model.modalities)
    num_mod = len(mods)
    acc1, l_gm = [0] * num_mod, None
    losses, params, cls_params, coeffs = [], [], [], []
    model.train()
    for batch in data:
        eval_attr = batch["label"]
        model.zero_grad()
        out = {m: model.encoders[m](batch[m]) for m in mods}
        hs = [out[m].clone().detach() for m in mods]
        preds = model.fusion(out)
        raw_loss = criterion(preds, eval_attr)
        if l_gm is not None:
            raw_loss += lamda * l_gm
        raw_loss.backward()
        cls_optimizer.zero_grad()
        cls_res = [classify(classifier[m], hs[i]) for i, m in enumerate(mods)]
        cls_loss = criterion(cls_res[0], eval_attr)
        for i in range(1, num_mod):
            cls_loss += criterion(cls_res[i], eval_attr)
        cls_loss.backward()
        cls_grad = [classifier[m].out_layer.weight for m in mods]
        llist = [F.cosine_similarity(cls_grad[i].clone().view(-1),
                                     fused_part(model, m).clone().view(-1), dim=0)
                 for i, m in enumerate(mods)]
        acc2 = [accuracy_score(eval_attr.numpy(), np.argmax(r.detach().numpy(), axis=1))
                for r in cls_res]
        diff = [acc2[i] - acc1[i] for i in range(num_mod)]
        diff_sum = sum(diff) + 1e-8
        coeff = [(diff_sum - d) / diff_sum for d in diff]
        acc1 = acc2
        l_gm = np.sum(np.abs(coeff)) - sum(coeff[i] * llist[i] for i in range(num_mod))
        l_gm /= num_mod
        for i, m in enumerate(mods):
            for name, p in model.named_parameters():
                if name.startswith(f"encoders.{m}."):
                    p.grad *= coeff[i] * rou
        cls_optimizer.step()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(float(raw_loss.detach()))
        params.append({k: p.detach().clone() for k, p in model.named_parameters()})
        cls_params.append({k: p.detach().clone() for k, p in classifier.named_parameters()})
        coeffs.append(coeff)
    return losses, params, cls_params, coeffs


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="concat", **settings):
    return step_trainer("cggm", fusion, CLASSES, optimizer="sgd", lr=0.05, **settings)


def compare(fusion="concat", ref_settings=None, seed=0, **settings):
    torch.manual_seed(seed)
    t = trainer(fusion, **settings)
    data = [as_batch(b) for b in make_batches(7, BATCH, STEPS, CLASSES)]
    ref_model, ref_cls = copy.deepcopy(t.model), copy.deepcopy(t.balancer.classifiers)
    want = ref_train(ref_model, ref_cls, data, **(ref_settings or {}))
    losses, metrics = [], []
    t.model.train()
    for step, batch in enumerate(data):
        t.step = step
        loss, _ = t.train_step(batch, 0)
        losses.append(float(loss.detach()))
        metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
        for name, p in t.model.named_parameters():
            torch.testing.assert_close(p.detach(), want[1][step][name], **TOL,
                                       msg=f"step {step} {name}")
        for name, p in t.balancer.classifiers.named_parameters():
            torch.testing.assert_close(p.detach(), want[2][step][name], **TOL,
                                       msg=f"step {step} classifier {name}")
        assert [metrics[-1][f"cggm_coeff_{m}"] for m in t.model.modalities] == \
            pytest.approx(want[3][step], rel=1e-5)
    assert losses == pytest.approx(want[0], rel=1e-6, abs=1e-6)
    return metrics


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_steps_equal_the_released_step(fusion):
    metrics = compare(fusion)
    assert all(m["cggm_lgm"] != 0 for m in metrics)
    assert any(abs(m["cggm_coeff_audio"] - 1) > 1e-3 for m in metrics)  # it modulated


def test_options_reach_the_step():
    compare("concat", {"rou": 0.7, "lamda": 1.0, "cls_lr": 1e-2, "clip": 5.0},
            cggm_rho=0.7, cggm_lam=1.0, cggm_lr=1e-2, cggm_clip=5.0)


def test_linear_classifiers_and_no_clip():
    torch.manual_seed(0)
    t = trainer(cggm_classifier="linear", cggm_clip=0.0)
    assert [type(h).__name__ for h in t.balancer.classifiers.values()] == ["LinearHead"] * 2
    compare("concat", {"clip": float("inf")}, cggm_classifier="linear", cggm_clip=0.0)


def test_state_round_trips_and_resumes_the_same_step():
    torch.manual_seed(0)
    t = trainer()
    data = [as_batch(b) for b in make_batches(7, BATCH, 3, CLASSES)]
    t.model.train()
    for step in range(2):
        t.step = step
        t.train_step(data[step], 0)
    state = copy.deepcopy(t.balancer.state_dict())
    model_state = copy.deepcopy(t.model.state_dict())
    opt_state = copy.deepcopy(t.optimizer.state_dict())
    t.train_step(data[2], 0)
    want = {k: v.detach().clone() for k, v in t.model.named_parameters()}
    torch.manual_seed(1)
    fresh = trainer()
    fresh.model.load_state_dict(model_state)
    fresh.optimizer.load_state_dict(opt_state)
    fresh.balancer.load_state_dict(state)
    fresh.model.train()
    fresh.train_step(data[2], 0)
    for name, p in fresh.model.named_parameters():
        torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=0, msg=name)


def test_film_is_refused():
    with pytest.raises(UserError, match="--method cggm compares each classifier"):
        trainer("film")
