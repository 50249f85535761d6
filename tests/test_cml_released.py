"""CML against BalanceMM's trainer (differential), its rule by hand, DDP, resume and the CLI.

The reference steps are written from GeWu-Lab/BalanceBenchmark (4c1482f)
balancemm/trainer/CML_trainer.py: `conf_loss` (lines 19-22: max(0, batch sum of conf_x - conf),
the sign unused), `train_loop` (62-67: the modalities shuffled once per epoch) and
`training_step` (170-201: out_p = out_s - z_removed + b/2, max softmax confidences, CE of both,
loss / 2 + lam * hinge; 3 modalities 120-156: / 3, b/3, two removals), with the model's
weight-split logits z_m = f_m W_m^T + b/M (avclassify_model.py 277-300). The `authors` form
follows QingyangZhang/CML (9d2496e) cpm/CPM_Nets.py `rank_loss` 121-123. The epoch's order is
the permutation `cml_order` gives for (seed, epoch); BalanceMM draws it from Python's global
RNG (documented in cml.py). The network is avtrain's tiny model: the method is under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
from released import (
    as_batch,
    assert_fit_refused,
    assert_ranks_equal_one,
    make_batches,
    no_dropout,
    run_gloo,
    step_trainer,
    text_batches,
    train_steps,
)

from avtrain.balance import cml_confidence, cml_order, cml_penalty_terms

CLASSES, BATCH, SEED, LAM = 3, 6, 3, 0.1
STEPS = ((0, 2), (1, 3), (2, 2))  # (epoch, steps); epoch 2 is after the window
END = 1  # last modulated epoch (BalanceMM: 80)
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_confidence_and_penalty_terms_by_hand():
    # softmax [ln 3, 0] = [3/4, 1/4]: confidence 0.75, prediction 0
    conf, pred = cml_confidence(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]))
    assert conf.tolist() == pytest.approx([0.75, 0.5], abs=1e-7) and pred[0] == 0
    sub, more = torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.7])
    y = torch.tensor([0, 1])
    # balancemm: the plain batch sum, 0.3 - 0.2 = 0.1 (hinged later, on the global sum)
    got = cml_penalty_terms(sub, torch.tensor([0, 0]), more, torch.tensor([1, 1]), y, "balancemm")
    assert float(got) == pytest.approx(0.1, abs=1e-7)
    # authors: sample 0 has the subset right (0) and the full set wrong (1): sign 0 -> 0;
    # sample 1: ReLU(-0.2) = 0 -> total 0
    got = cml_penalty_terms(sub, torch.tensor([0, 0]), more, torch.tensor([1, 1]), y, "authors")
    assert float(got) == pytest.approx(0.0, abs=1e-7)
    # authors, subset wrong on sample 0 (pred 1): sign 1, ReLU(0.3) = 0.3; sample 1: 0
    got = cml_penalty_terms(sub, torch.tensor([1, 0]), more, torch.tensor([1, 1]), y, "authors")
    assert float(got) == pytest.approx(0.3, abs=1e-7)
    # the order: a permutation, fixed per (seed, epoch)
    assert sorted(cml_order(1, 4, 3)) == [0, 1, 2] and cml_order(1, 4, 3) == cml_order(1, 4, 3)


def test_loss_by_hand():
    t = step_trainer("cml", "concat", 2, seed=SEED, cml_lam=LAM, modulation_end=END)
    with torch.no_grad():
        t.model.fusion.fc_out.bias.zero_()  # b = 0: the removal adds back b/2 = 0
    ln3 = math.log(3.0)
    logits = {"audio": torch.tensor([[ln3, 0.0]]), "visual": torch.tensor([[-ln3, 0.0]])}
    logits["fused"] = logits["audio"] + logits["visual"]  # [0, 0]: confidence 1/2
    y = torch.tensor([0])
    removed = t.balancer.modalities[cml_order(SEED, 0, 2)[-1]]  # popped from the end
    loss = t.balancer.loss(logits, y, epoch=0, step=0)
    # CE(fused) = ln 2 = 0.693147. Visual removed: out_p = audio = [ln 3, 0], confidence 3/4,
    # CE = -ln(3/4) = 0.287682; hinge max(0, 0.75 - 0.5) = 0.25, times lam 0.1 = 0.025;
    # (0.693147 + 0.287682) / 2 + 0.025 = 0.515415. Audio removed: out_p = [-ln 3, 0],
    # confidence 3/4 (class 1), CE = -ln(1/4) = 1.386294; (0.693147 + 1.386294) / 2 + 0.025
    # = 1.064721
    want = 0.515415 if removed == "visual" else 1.064721
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    assert float(t.balancer.step_metrics()["penalty"]) == pytest.approx(0.25, abs=1e-7)
    # outside the window: CE(fused) alone
    assert float(t.balancer.loss(logits, y, epoch=END + 1, step=0)) == pytest.approx(
        math.log(2.0), abs=1e-6)


# --- the reference ------------------------------------------------------------------------------


def concat_logits(model, feats):  # avclassify_model.py lines 277-300
    w, b = model.fusion.fc_out.weight, model.fusion.fc_out.bias
    out, now = {}, 0
    for m in model.modalities:
        d = feats[m].shape[1]
        out[m] = torch.mm(feats[m], torch.transpose(w[:, now:now + d], 0, 1)) + b / len(feats)
        now += d
    out["output"] = model.fusion.fc_out(torch.cat([feats[m] for m in model.modalities], 1))
    return out


def sum_logits(model, feats):  # our extension: the summands of `sum`, no bias to add back
    out = {m: model.fusion.fc[m](feats[m]) for m in model.modalities}
    out["output"] = sum(out[m] for m in model.modalities)
    return out


def ref_conf_loss(conf, pred, conf_x, pred_x, label, form):
    if form == "balancemm":  # CML_trainer.py lines 19-22
        return max(0, torch.sub(conf_x, conf).sum())
    sign = (~((pred_x == label) & (pred != label))).long()  # CPM_Nets.py lines 121-123
    return torch.nn.ReLU()(torch.sub(conf_x, conf) * sign - 0.00).sum()


def ref_train(model, data, unimodal, form="balancemm", steps=STEPS):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    n = len(model.modalities)
    concat = hasattr(model.fusion, "fc_out")
    losses, params, step = [], [], 0
    model.train()
    for epoch, n_steps in steps:
        random_dict_ = [model.modalities[i] for i in cml_order(SEED, epoch, n)]
        for _ in range(n_steps):
            batch, label = data[step], data[step]["label"]
            uni = unimodal(model, model.features(batch))
            if epoch <= END:
                out_s, loss_c = uni["output"], 0
                random_dict = random_dict_.copy()
                for i in range(n - 1):
                    removed = random_dict.pop()
                    out_p = out_s - uni[removed]
                    if concat:
                        out_p = out_p + model.fusion.fc_out.bias / n
                    conf_s, pred_s = torch.max(softmax(out_s), dim=1)
                    conf_p, pred_p = torch.max(softmax(out_p), dim=1)
                    if i == 0:
                        loss = criterion(out_s, label)
                    loss = loss + criterion(out_p, label)
                    loss_c = loss_c + ref_conf_loss(conf_s, pred_s, conf_p, pred_p, label, form)
                    out_s = out_p
                loss = loss / n + LAM * loss_c
            else:
                loss = criterion(uni["output"], label)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return losses, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="concat", bn=True, form="balancemm", **extra):
    return step_trainer("cml", fusion, CLASSES, bn=bn, optimizer="sgd", lr=0.05, seed=SEED,
                        cml_lam=LAM, cml_form=form, modulation_end=END, **extra)


def our_train(t, data, part=slice(None), steps=STEPS):
    return train_steps(t, data, steps, part)


def _compare(t, data, unimodal, form="balancemm", steps=STEPS):
    ref = copy.deepcopy(t.model)
    want_losses, want_params = ref_train(ref, data, unimodal, form, steps)
    got_params, got_metrics, got_losses = our_train(t, data, steps=steps)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    return got_metrics


@pytest.mark.parametrize("fusion,form", [("concat", "balancemm"), ("sum", "balancemm"),
                                         ("concat", "authors")])
def test_steps_equal_the_released_step(fusion, form):
    torch.manual_seed(0)
    t = trainer(fusion, form=form)
    data = [as_batch(b) for b in make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)]
    metrics = _compare(t, data, concat_logits if fusion == "concat" else sum_logits, form)
    if fusion == "concat":  # (with these weights the sum model's subsets stay below the full set)
        assert any(m["penalty"] > 0 for m in metrics)  # the hinge really acted
    assert not any(m["penalty"] for m in metrics[-2:])  # after the window


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = trainer("concat", modalities=["audio", "visual", "text"])
    no_dropout(t.model)  # both runs see the same network
    data = text_batches(7, BATCH, 5, CLASSES)
    metrics = _compare(t, data, concat_logits, steps=((0, 2), (1, 2), (2, 1)))
    assert sum(m["removed_audio"] + m["removed_visual"] + m["removed_text"]
               for m in metrics[:4]) == 8  # two removals per modulated step


def _ddp_run(rank: int, world: int, form: str = "balancemm") -> dict:
    torch.manual_seed(2)  # weights under which the global hinge is active in several steps
    t = trainer(bn=False, form=form)
    per = BATCH // world
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    params, metrics, _ = our_train(t, data, slice(rank * per, (rank + 1) * per))
    for m in metrics:  # the local confidences are this rank's; the penalty is global
        m.pop("conf_fused", None)
        m.pop("conf_subset", None)
    return {"params": params[-1], "metrics": metrics}


def _ddp_run_authors(rank: int, world: int) -> dict:
    return _ddp_run(rank, world, "authors")


def test_two_gloo_processes_equal_one_with_the_authors_form(tmp_path):
    """The contract suite (test_contract.py) runs the default balancemm form on two ranks."""
    ranks = run_gloo(_ddp_run_authors, tmp_path)
    one = _ddp_run_authors(0, 1)
    assert any(m["penalty"] > 0 for m in one["metrics"])
    assert_ranks_equal_one(ranks, one)


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"cml_lam": "nan"}, "--cml-lam must be a finite number, got nan"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "cml", settings, words)
