"""AMCo against BalanceMM's trainer (differential), its rules by hand, DDP, resume and the CLI.

The authors' code is not public; the reference is written from GeWu-Lab/BalanceBenchmark
(4c1482f): balancemm/trainer/AMCo_trainer.py `train_loop` (lines 32-120: per-epoch reset of the
dependence flags and of l_t, the mask `np.pad(np.ones(C - N), (0, N))` shuffled, l_t += epoch/10)
and `training_step` (122-159: window, forward with the mask, CE of the output, backward with
retain_graph, one backward per unimodal CE, the shares of the concatenated softmax against
sigma), and balancemm/models/avclassify_model.py `BaseClassifierAMCoModel` (326-384: the
weight-split logits with bias / M, the mask on dependent modalities, their sum, linear_star).
The mask's order is the permutation `amco_order` gives for (seed, step): BalanceMM shuffles with
the global numpy RNG, we with a seeded generator (documented in amco.py); the mask is built
from it the released way. The network is avtrain's tiny model (its `features`, the fusion's
weights and the output layer): the method is under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    no_dropout,
    step_trainer,
    text_batches,
    train_steps,
)

from avtrain.balance import amco_masked_count, amco_share_sums
from avtrain.balance.amco import amco_mask, amco_order

CLASSES, BATCH, SEED = 3, 6, 3
STEPS = ((0, 2), (1, 4), (2, 2))  # (epoch, steps); epoch 2 is after the window
END = 1  # last modulated epoch (BalanceMM: 80)
SIGMA, EPS = 0.5, 0.3
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rules by hand --------------------------------------------------------------------------


def test_ramp_by_hand():
    # l = 0: sin(0) = 0, nothing masked
    assert amco_masked_count(0.0, 0.3, 6) == (0.0, 0)
    # l = 0.15 of eps 0.3: sin(pi/4) = 0.7071068, int(6 * 0.7071068) = int(4.24) = 4
    pt, n = amco_masked_count(0.15, 0.3, 6)
    assert pt == pytest.approx(0.7071068, abs=1e-7) and n == 4
    # l = 0.2: sin(pi/3) = 0.8660254, int(3 * 0.866) = 2 of 3 classes; int(10 * 0.866) = 8
    assert amco_masked_count(0.2, 0.3, 3)[1] == 2
    assert amco_masked_count(0.2, 0.3, 10) == (pytest.approx(0.8660254, abs=1e-7), 8)
    # l at or past eps: sin(pi/2) = 1, every class masked
    assert amco_masked_count(0.3, 0.3, 7) == (1.0, 7)
    assert amco_masked_count(5.0, 0.3, 7) == (1.0, 7)
    # l = 0.1: sin(pi/6) = 0.5 (exactly, in float64): half of 6 classes; int() truncates 2.5
    assert amco_masked_count(0.1, 0.3, 6) == (0.5, 3)
    assert amco_masked_count(0.1, 0.3, 5) == (0.5, 2)


def test_mask_is_the_released_list_reordered():
    # [1, 1, 0, 0] (C = 4, N = 2) read in the order [3, 0, 2, 1] -> [0, 1, 0, 1]
    assert amco_mask(torch.tensor([3, 0, 2, 1]), 2).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert amco_mask(torch.tensor([3, 0, 2, 1]), 0).tolist() == [1.0] * 4
    assert amco_mask(torch.tensor([3, 0, 2, 1]), 4).tolist() == [0.0] * 4
    order = amco_order(1, 5, 8, "cpu")
    assert sorted(order.tolist()) == list(range(8))
    assert torch.equal(order, amco_order(1, 5, 8, "cpu"))
    assert not torch.equal(order, amco_order(1, 6, 8, "cpu"))


def test_shares_by_hand():
    # one sample, two classes: exp of [ln 3, 0 | 0, 0] = [3, 1 | 1, 1], total 6:
    # audio's share 4/6, visual's 2/6
    a = torch.tensor([[math.log(3.0), 0.0]])
    v = torch.zeros(1, 2)
    assert amco_share_sums([a, v]).tolist() == pytest.approx([4 / 6, 2 / 6], abs=1e-7)
    # a fully masked modality (zeros) still holds exp(0) per class: three modalities,
    # [0, 0 | ln 2, ln 2 | ln 5, 0] -> [1, 1 | 2, 2 | 5, 1], total 12; two samples summed
    t = torch.tensor([[math.log(5.0), 0.0]])
    shares = amco_share_sums([torch.zeros(1, 2), torch.full((1, 2), math.log(2.0)), t])
    assert shares.tolist() == pytest.approx([2 / 12, 4 / 12, 6 / 12], abs=1e-7)
    two = amco_share_sums([torch.zeros(2, 2), torch.full((2, 2), math.log(2.0)), t.repeat(2, 1)])
    assert two.tolist() == pytest.approx([4 / 12, 8 / 12, 12 / 12], abs=1e-6)


# --- the reference ------------------------------------------------------------------------------


def concat_logits(model, feats):  # avclassify_model.py lines 368-375
    w, b = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    out, now = {}, 0
    for m in model.modalities:
        d = feats[m].shape[1]
        out[m] = torch.mm(feats[m], torch.transpose(w[:, now:now + d], 0, 1)) + b / len(feats)
        now += d
    return out


def sum_logits(model, feats):  # our extension: the summands of `sum`
    return {m: model.fusion.fc[m](feats[m]) for m in model.modalities}


def ref_train(model, data, unimodal, steps=STEPS, sigma=SIGMA):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    records, params, step = [], [], 0
    model.train()
    for epoch, n_steps in steps:
        dependent = {m: False for m in model.modalities}  # train_loop lines 61-64
        l_t = 0
        for _ in range(n_steps):
            batch = data[step]
            pt = np.sin(np.pi / 2 * (min(EPS, l_t) / EPS))  # lines 73-83
            n = int(pt * CLASSES)
            mask_t = np.pad(np.ones(CLASSES - n), (0, n))
            mask_t = torch.from_numpy(mask_t[amco_order(SEED, step, CLASSES, "cpu").numpy()])
            mask_t = mask_t.float().unsqueeze(0)
            l_t += epoch / 10
            active = epoch <= END
            record = {"dependent": dict(dependent) if active else {m: False for m in dependent},
                      "ratio": n / CLASSES if active else 0.0}
            feats = model.features(batch)  # BaseClassifierAMCoModel.forward
            z = unimodal(model, feats)
            output = torch.zeros_like(z[model.modalities[0]])
            for m in model.modalities:
                if active and dependent[m]:
                    z[m] = torch.mul(z[m], mask_t)
                output = output + z[m]
            output = model.output_layer(output)  # linear_star
            label = batch["label"]
            loss = criterion(output, label)
            if active:  # training_step lines 141-155
                loss.backward(retain_graph=True)
                for m in model.modalities:
                    criterion(z[m], label).backward()
                sft = softmax(torch.cat([z[m] for m in model.modalities], 1))
                for i, m in enumerate(model.modalities):
                    share = torch.sum(sft[:, i * CLASSES:(i + 1) * CLASSES]) / len(label)
                    dependent[m] = bool(share > sigma)
            else:
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            record["loss"] = float(loss.detach())
            records.append(record)
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return records, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="concat", bn=True):
    return step_trainer("amco", fusion, CLASSES, bn=bn, optimizer="sgd", lr=0.05, seed=SEED,
                        amco_sigma=SIGMA, amco_eps=EPS, modulation_end=END)


def our_train(t, data, part=slice(None), steps=STEPS):
    return train_steps(t, data, steps, part)


def _compare(t, data, unimodal, steps=STEPS, sigma=SIGMA):
    ref = copy.deepcopy(t.model)
    ref.fusion._forward_hooks.clear()  # the copy must not feed our balancer
    want_records, want_params = ref_train(ref, data, unimodal, steps, sigma)
    got_params, got_metrics, got_losses = our_train(t, data, steps=steps)
    for want, got, loss in zip(want_records, got_metrics, got_losses):
        assert {m: bool(got[f"dependent_{m}"]) for m in want["dependent"]} == want["dependent"]
        assert got["mask_ratio"] == pytest.approx(want["ratio"], abs=1e-7)
        assert loss == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    return got_metrics


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_steps_equal_the_released_step(fusion):
    torch.manual_seed(0)
    t = trainer(fusion)
    assert t.model.output_layer is not None
    data = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    metrics = _compare(t, data, concat_logits if fusion == "concat" else sum_logits)
    masked = [m for m in metrics if m["mask_ratio"] > 0
              and (m["dependent_audio"] or m["dependent_visual"])]
    assert masked  # a dependent modality's logits were really masked
    assert not any(m["mask_ratio"] for m in metrics[:2])  # epoch 0: l stays 0
    assert not any(m["mask_ratio"] or m["dependent_audio"] or m["dependent_visual"]
                   for m in metrics[-2:])  # after the window


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = step_trainer("amco", "sum", CLASSES, optimizer="sgd", lr=0.05, seed=SEED,
                     amco_sigma=0.4, amco_eps=EPS, modulation_end=END,
                     modalities=["audio", "visual", "text"])
    assert t.model.modalities == ["audio", "visual", "text"]
    no_dropout(t.model)  # both runs see the same network
    data = text_batches(7, BATCH, 6, CLASSES)
    metrics = _compare(t, data, sum_logits, ((0, 1), (1, 4), (2, 1)), sigma=0.4)
    assert any(m["mask_ratio"] > 0 and m["dependent_audio"] + m["dependent_visual"]
               + m["dependent_text"] > 0 for m in metrics)
    assert set(metrics[0]) == {"mask_ratio", "share_audio", "share_visual", "share_text",
                               "dependent_audio", "dependent_visual", "dependent_text"}
    assert sum(m["share_audio"] + m["share_visual"] + m["share_text"] for m in metrics) == \
        pytest.approx(len(metrics), abs=1e-5)


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"amco_eps": "inf"}, "--amco-eps must be a finite number"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "amco", settings, words)


def test_models_without_summed_unimodal_logits_are_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "film", 3, ["audio", "visual"], output_layer=True)
    with pytest.raises(UserError, match="use --fusion concat"):
        build_balancer("amco", model, {}, modalities=model.modalities)
    model = build_model("tiny", "concat", 3, ["audio", "visual"])
    with pytest.raises(UserError, match="output layer"):
        build_balancer("amco", model, {}, modalities=model.modalities)
