"""AGM against the released code (differential), its rule by hand, DDP, resume and the CLI.

The references are written from github.com/lihong2303/AGM (5a65542), the authors' code:
model/CREMAD_net.py `GradMod` (lines 25-72: the training forward, then the padded forwards in
eval mode *with* grad, `Modality_Audio/Visual`, the identity `Modality_out` modules whose full
backward hooks multiply the gradient by `scale_a` / `scale_v`) and run/CREMAD_main.py `train`
(13-268: CE of m_a + m_v, the Python loop of scores with its 1e-8 guard, `math.exp`
coefficients with the cap 10, the iteration-weighted running scores, `update_scale` inside the
1-based epoch window, backward, the clipping of lines 233-243, SGD step); for three modalities
model/URFunny_net.py `GradMod` (39-120: 7 padded forwards, the Shapley formulas of lines 6-31)
and run/URFunny_main.py `train` (98-145: the 3/2 rule, cap 7; 204-207: clipping at 5). The
network is avtrain's tiny model: the method is under test.
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
    make_batches,
    step_trainer,
)

from avtrain.balance import agm_coefficients, agm_contributions
from avtrain.balance.agm import agm_scores

CLASSES, BATCH = 3, 6
STEPS = ((0, 2), (1, 2), (2, 2))  # (epoch, steps), our epochs (from 0)
START, END = 0, 1  # our window: epoch 2 is after it
ALPHA, CLIP = 6.0, 0.23
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the references -----------------------------------------------------------------------------


class ModalityOut(nn.Module):  # CREMAD_net.py lines 19-23
    def forward(self, x):
        return x


class RefGradMod(nn.Module):
    """GradMod (CREMAD_net.py 25-72 / URFunny_net.py 39-120) around a copy of our model; its
    `net(..., pad_x=True)` replaces x's input by zeros."""

    def __init__(self, net, modalities):
        super().__init__()
        self.net, self.mods = net, modalities
        self.outs = nn.ModuleDict({m: ModalityOut() for m in modalities})
        self.scale = {m: 1.0 for m in modalities}
        for m in modalities:
            self.outs[m].register_full_backward_hook(self._hook(m))

    def _hook(self, m):
        def hook(module, ginp, gout):
            gnew = ginp[0].clone()
            return (gnew * self.scale[m],)
        return hook

    def update_scale(self, coeffs):
        self.scale = dict(coeffs)

    def run(self, batch, pad=()):
        b = {k: (torch.zeros_like(v) if k in pad else v) for k, v in batch.items()}
        return self.net(b)["fused"]

    def forward(self, batch):
        if len(self.mods) == 2:
            total = self.run(batch)
            self.net.eval()
            pv = self.run(batch, ("visual",))
            pa = self.run(batch, ("audio",))
            self.run(batch, ("audio", "visual"))  # zero_padding_out, unused
            self.net.train()
            m_a = self.outs["audio"](0.5 * (total - pa + pv))
            m_v = self.outs["visual"](0.5 * (total - pv + pa))
            return {"audio": 0.5 * (total - pa + pv), "visual": 0.5 * (total - pv + pa)}, m_a + m_v
        t = self.run(batch)
        self.net.eval()
        pa = self.run(batch, ("audio",))
        pv = self.run(batch, ("visual",))
        pt = self.run(batch, ("text",))
        pva = self.run(batch, ("visual", "audio"))
        pvt = self.run(batch, ("visual", "text"))
        pat = self.run(batch, ("audio", "text"))
        self.run(batch, ("audio", "visual", "text"))  # zero_padding_out
        self.net.train()
        m_t = self.outs["text"]((t - pt + pva) / 3 + (pv - pat + pa - pvt) / 6)
        m_a = self.outs["audio"]((t - pa + pvt) / 3 + (pv - pat + pt - pva) / 6)
        m_v = self.outs["visual"]((t - pv + pat) / 3 + (pa - pvt + pt - pva) / 6)
        return {"audio": m_a, "visual": m_v, "text": m_t}, m_a + m_v + m_t


def ref_scores_two(out, label):  # CREMAD_main.py 130-143
    softmax = nn.Softmax(dim=1)
    score = 0.0
    for k in range(out.size(0)):
        if torch.isinf(torch.log(softmax(out)[k][label[k]])) or softmax(out)[k][label[k]] < 1e-8:
            score += -torch.log(torch.tensor(1e-8, dtype=out.dtype, device=out.device))
        else:
            score += -torch.log(softmax(out)[k][label[k]])
    return score / out.size(0)


def ref_scores_three(out, label):  # URFunny_main.py 111-115
    softmax = nn.Softmax(dim=1)
    score = 0.0
    for k in range(out.size(0)):
        score += -torch.log(softmax(out)[k][label[k]]) / out.size(0)
    return score


def ref_train(model, data, mods, *, after="hold", cap=10.0, steps=STEPS, seeds=None):
    """The released train loop over `steps`; epochs counted from 1 as released."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    train_score = {m: 0.0 for m in mods}
    total_batch = steps[0][1]
    n = len(mods)
    records, params, step_global = [], [], 0
    model.train()
    for epoch0, count in steps:
        epoch = epoch0 + 1
        for step in range(count):
            batch = data[step_global]
            if seeds is not None:
                torch.manual_seed(seeds[step_global])
            iteration = (epoch - 1) * total_batch + step + 1
            outs, out = model(batch)
            label = batch["label"]
            loss = criterion(out, label)
            optimizer.zero_grad()
            score_fn = ref_scores_two if n == 2 else ref_scores_three
            score = {m: score_fn(outs[m], label).item() for m in mods}
            if n == 2:
                ratio = {"audio": math.exp(score["visual"] - score["audio"]),
                         "visual": math.exp(score["audio"] - score["visual"])}
                optimal = {"audio": math.exp(train_score["visual"] - train_score["audio"]),
                           "visual": math.exp(train_score["audio"] - train_score["visual"])}
            else:
                mean = sum(score.values()) / 3
                ratio = {m: math.exp((mean - score[m]) * 3 / 2) for m in mods}
                opt_mean = sum(train_score.values()) / 3
                optimal = {m: math.exp((opt_mean - train_score[m]) * 3 / 2) for m in mods}
            coeff = {m: math.exp(ALPHA * min(optimal[m] - ratio[m], cap)) for m in mods}
            for m in mods:
                train_score[m] = (train_score[m] * (iteration - 1) / iteration
                                  + score[m] / iteration)
            if START + 1 <= epoch <= END + 1:
                model.update_scale(coeff)
            elif after == "reset" and epoch > END + 1:
                model.update_scale({m: 1.0 for m in mods})
            loss.backward()
            w = model.net.fusion.fc_out.weight.grad
            clipped = bool(torch.max(w) > CLIP or torch.min(w) < -CLIP)
            if clipped:
                nn.utils.clip_grad_norm_(model.parameters(), max_norm=CLIP)
            optimizer.step()
            records.append({"coeff": dict(coeff), "scale": dict(model.scale), "score": score,
                            "running": dict(train_score), "clipped": clipped,
                            "loss": loss.item()})
            params.append({k: p.detach().clone() for k, p in model.net.named_parameters()})
            step_global += 1
    return records, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, after="hold", modalities=("audio", "visual"), **extra):
    settings = {"optimizer": "sgd", "lr": 0.05, "alpha": ALPHA, "modulation_start": START,
                "modulation_end": END, "agm_clip": CLIP, "agm_after_window": after,
                "modalities": list(modalities), **extra}
    return step_trainer("agm", "concat", CLASSES, bn=bn, **settings)


def our_train(t, data, part=slice(None), steps=STEPS, seeds=None):
    params, metrics, step = [], [], 0
    for epoch, count in steps:
        t.model.train()
        for _ in range(count):
            t.step = step
            if seeds is not None:
                torch.manual_seed(seeds[step])
            batch = {k: v[part] for k, v in data[step].items()}
            t.train_step(batch, epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics


def av_data(seed=7):
    return [as_batch(b) for b in make_batches(seed, BATCH, sum(n for _, n in STEPS), CLASSES)]


# --- the rule by hand ---------------------------------------------------------------------------


def test_contributions_by_hand():
    one = torch.ones(1, 1)
    two = {frozenset({"audio"}): 1 * one, frozenset({"visual"}): 2 * one,
           frozenset({"audio", "visual"}): 5 * one}
    got = agm_contributions(two, ["audio", "visual"])
    # released Modality_Audio: (T - PA + PV) / 2 = (5 - 2 + 1) / 2; visual (5 - 1 + 2) / 2
    assert float(got["audio"]) == pytest.approx(2.0)
    assert float(got["visual"]) == pytest.approx(3.0)
    values = {"a": 1, "v": 2, "t": 4, "av": 8, "at": 16, "vt": 32, "avt": 64}
    names = {"a": "audio", "v": "visual", "t": "text"}
    three = {frozenset(names[c] for c in k): v * one for k, v in values.items()}
    got = agm_contributions(three, ["audio", "visual", "text"])
    # URFunny_net.py: audio (T - PA + PVT)/3 + (PV - PAT + PT - PVA)/6 = 33/3 + 18/6
    assert float(got["audio"]) == pytest.approx(14.0)
    assert float(got["visual"]) == pytest.approx(50 / 3 + 35 / 6)
    assert float(got["text"]) == pytest.approx(20 + 45 / 6)
    assert sum(float(v) for v in got.values()) == pytest.approx(64.0)  # efficiency, f(0) = 0


def test_coefficients_by_hand():
    d = torch.float64
    # s = [1, 2], t = 0: audio ratio e^(2-1) = e, optimal 1 -> exp(1 - e) = 0.1793741;
    # visual ratio e^-1 -> exp(1 - e^-1) = 1.8815964
    k = agm_coefficients(torch.tensor([1.0, 2.0], dtype=d), torch.zeros(2, dtype=d), 1.0)
    assert k.tolist() == pytest.approx([0.1793741, 1.8815964], abs=1e-7)
    # t = [5, 0], s equal: visual optimal e^5 - 1 = 147.4 -> capped at 10: exp(0.5 * 10)
    k = agm_coefficients(torch.zeros(2, dtype=d), torch.tensor([5.0, 0.0], dtype=d), 0.5)
    assert k.tolist() == pytest.approx([math.exp(0.5 * (math.exp(-5) - 1)), math.exp(5)])
    k = agm_coefficients(torch.zeros(2, dtype=d), torch.tensor([5.0, 0.0], dtype=d), 0.5,
                         cap=math.inf)
    assert float(k[1]) == pytest.approx(math.exp(0.5 * (math.exp(5) - 1)))
    # three modalities: the 3/2 rule; equal scores and running scores -> all 1
    k = agm_coefficients(torch.ones(3, dtype=d), torch.ones(3, dtype=d), 2.0)
    assert k.tolist() == pytest.approx([1.0, 1.0, 1.0])
    s, t = torch.tensor([1.0, 2.0, 3.0], dtype=d), torch.tensor([2.0, 2.0, 2.0], dtype=d)
    want = [math.exp(2.0 * (1 - math.exp(1.5 * (2 - x)))) for x in (1.0, 2.0, 3.0)]
    assert agm_coefficients(s, t, 2.0).tolist() == pytest.approx(want)


def test_scores_floor_a_vanishing_probability():
    logits = torch.tensor([[0.0, 0.0], [0.0, -40.0]])  # p(y=1) of sample 2 is ~4e-18
    labels = torch.tensor([0, 1])
    got = agm_scores({"audio": logits}, labels, ["audio"])
    assert float(got[0]) == pytest.approx((math.log(2) + -math.log(1e-8)) / 2, rel=1e-6)
    assert float(got[0]) == pytest.approx(float(ref_scores_two(logits, labels)), rel=1e-6)
    # the released UR-Funny scores have no floor: --agm-floor 0 gives -log p itself
    bare = agm_scores({"audio": logits}, labels, ["audio"], floor=0.0)
    assert float(bare[0]) == pytest.approx(float(ref_scores_three(logits, labels)), rel=1e-6)
    assert float(bare[0]) == pytest.approx((math.log(2) + 40) / 2, rel=1e-5)  # -log p = 40


# --- the step against the released one ----------------------------------------------------------


@pytest.mark.parametrize("after", ["hold", "reset"])
def test_steps_equal_the_released_step(after):
    torch.manual_seed(0)
    t = trainer(after=after)
    ref = RefGradMod(copy.deepcopy(t.model), ["audio", "visual"])
    data = av_data()
    want_records, want_params = ref_train(ref, data, ["audio", "visual"], after=after)
    got_params, got_metrics = our_train(t, data)
    for want, got in zip(want_records, got_metrics):
        for m in ("audio", "visual"):
            assert got[f"agm_score_{m}"] == pytest.approx(want["score"][m], rel=1e-6)
            assert got[f"agm_coeff_{m}"] == pytest.approx(want["coeff"][m], rel=1e-5)
            assert got[f"agm_scale_{m}"] == pytest.approx(want["scale"][m], rel=1e-5)
            assert got[f"agm_running_{m}"] == pytest.approx(want["running"][m], rel=1e-6)
        assert got["agm_clipped"] == float(want["clipped"])
    clipped = [r["clipped"] for r in want_records]
    assert any(clipped) and not all(clipped)  # both branches of the released clipping
    coeffs = [r["coeff"]["audio"] for r in want_records]
    assert max(abs(c - 1) for c in coeffs) > 0.03  # the coefficients really modulate
    if after == "hold":  # after the window the last in-window scale stays
        assert want_records[-1]["scale"] == want_records[3]["scale"] != {"audio": 1, "visual": 1}
    else:
        assert want_records[-1]["scale"] == {"audio": 1.0, "visual": 1.0}
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)


def test_three_modalities_equal_the_released_urfunny_step():
    torch.manual_seed(0)
    mods = ["audio", "visual", "text"]
    t = trainer(modalities=mods, agm_cap=7.0, agm_floor=0.0)  # URFunny_main.py: cap 7, no floor
    ref = RefGradMod(copy.deepcopy(t.model), mods)
    g = torch.Generator().manual_seed(3)
    data = av_data()
    for b in data:
        b["text"] = torch.randint(1, 200, (BATCH, 12), generator=g)
        b["text"][:2, 8:] = 0  # padding
    seeds = [100 + i for i in range(len(data))]  # the text encoder's dropout, the same masks
    want_records, want_params = ref_train(ref, data, mods, cap=7.0, seeds=seeds)
    got_params, got_metrics = our_train(t, data, seeds=seeds)
    for want, got in zip(want_records, got_metrics):
        for m in mods:
            assert got[f"agm_coeff_{m}"] == pytest.approx(want["coeff"][m], rel=1e-5)
            assert got[f"agm_scale_{m}"] == pytest.approx(want["scale"][m], rel=1e-5)
    assert max(abs(r["coeff"]["text"] - 1) for r in want_records) > 0.01
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)


# --- DDP ----------------------------------------------------------------------------------------


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"agm_clip": "inf"}, "--agm-clip must be 0 (off) or a finite number"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "agm", settings, words)
