"""ReconBoost against the released code (differential), its rules by hand, DDP, resume, the CLI.

The reference is written from github.com/huacong/ReconBoost (14ab57a): train.py (the stage loop,
lines 259-452: `schedule_model` picking audio at even stages; the learner phase 295-357 with a
fresh `optim.SGD(model.parameters(), ...)`, `out_join = net_ensemble.forward(data,
mask_model=...)`, the c0 expansion at stage 0, the one-hot target, the boosting loss with
`.mean(-1)`, the GA term on detached softmaxes with its own pre-model forward, `loss.mean()`;
`net_ensemble.add`; the rectification phase 369-402 with a fresh SGD over
`net_ensemble.parameters()` and CE of `forward_grad`) and models/dynamic_net.py (`DynamicNet`:
models list, add = pop + append, parameters without the learners' `fc` plus the shared head
plus boost_rate, no-grad forward times boost_rate, forward_grad). The learners are copies of
avtrain's tiny encoders with the shared head as their `fc` (train.py line 288): the method, not
the encoder, is under test.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    step_trainer,
)

from avtrain.balance import boosting_loss, reconboost_stage

CLASSES, BATCH, STEPS_PER_EPOCH = 3, 6, 2
T1, T2, STAGES = 2, 1, 3  # learner-phase and rectification epochs per stage; stages run
EPOCHS = STAGES * (T1 + T2)
LR, MOMENTUM, WD = 0.01, 0.9, 5e-4
W1, W2, ALPHA = 5.0, 1.0, 0.5
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference ------------------------------------------------------------------------------


class Learner(nn.Module):
    """The released AudioNet / VisualNet: an encoder, then `fc` (the shared head)."""

    def __init__(self, encoder, fc):
        super().__init__()
        self.net, self.fc = encoder, fc

    def forward(self, x):
        return self.fc(self.net(x))


class DynamicNet:  # models/dynamic_net.py, common_space=True
    def __init__(self, c0, head, boost_rate):
        self.models, self.models_name, self.c0 = [], [], c0
        self.head, self.boost_rate = head, boost_rate

    def add(self, model, name):
        if name in self.models_name:
            i = self.models_name.index(name)
            self.models.pop(i)
            self.models_name.pop(i)
        self.models.append(model)
        self.models_name.append(name)

    def parameters(self):
        params = [p for m in self.models for n, p in m.named_parameters() if "fc" not in n]
        return params + list(self.head.parameters()) + [self.boost_rate]

    def forward(self, inputs, mask_model=None):
        if not self.models:
            return self.c0
        prediction = None
        with torch.no_grad():
            for m, name in zip(self.models, self.models_name):
                if name == mask_model:
                    continue
                pred = m(inputs[name])
                prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction

    def forward_grad(self, inputs):
        prediction = None
        for m, name in zip(self.models, self.models_name):
            pred = m(inputs[name])
            prediction = pred if prediction is None else prediction + pred
        return self.boost_rate * prediction


def snapshot(learners, head, boost_rate):
    out = {f"{m}.{k}": v.detach().clone() for m, lr in learners.items()
           for k, v in lr.net.state_dict().items()}
    out.update({f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()})
    out["boost_rate"] = boost_rate.detach().clone()
    return out


def ref_train(learners, head, boost_rate, data):
    """train.py's stage loop over `data` (STEPS_PER_EPOCH batches an epoch)."""
    mse = nn.MSELoss()
    ce = nn.CrossEntropyLoss()
    net = DynamicNet(random.Random(0).random(), head, boost_rate)
    names = ["audio", "visual"]
    states, losses, k = [], [], 0
    for stage in range(STAGES):
        name = "audio" if stage % 2 == 0 else "visual"  # schedule.py, fixed_mode
        model = learners[name]
        pre_name = names[1 - names.index(name)]
        pre_model = learners[pre_name]
        for m in learners.values():
            m.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM,
                                    weight_decay=WD)
        for _ in range(T1):
            for _ in range(STEPS_PER_EPOCH):
                audio, visual, lbl = data[k]
                inputs = {"audio": audio, "visual": visual}
                out_join = net.forward(inputs, mask_model=name)
                if stage == 0:
                    out_join = torch.as_tensor(out_join, dtype=torch.float32).view(-1, 1) \
                        .expand(BATCH, 1)
                out_obj = model(inputs[name])
                target = torch.zeros(BATCH, CLASSES).scatter_(1, lbl.view(-1, 1), 1)
                boost = -W1 * (target * out_obj.log_softmax(1)).mean(-1) \
                    + W2 * (target * out_join.detach().softmax(1) * out_obj.log_softmax(1)) \
                    .mean(-1)
                model.zero_grad()
                if stage == 0:
                    loss = boost
                else:
                    pre_out = pre_model(inputs[pre_name])
                    ga = mse(out_obj.detach().softmax(1), pre_out.detach().softmax(1))
                    loss = boost + ALPHA * ga
                loss.mean().backward()
                optimizer.step()
                states.append(snapshot(learners, head, boost_rate))
                losses.append(float(loss.mean().detach()))
                k += 1
        net.add(model, name)
        optimizer = torch.optim.SGD(net.parameters(), LR, momentum=MOMENTUM, weight_decay=WD)
        for _ in range(T2):
            for _ in range(STEPS_PER_EPOCH):
                audio, visual, lbl = data[k]
                out = net.forward_grad({"audio": audio, "visual": visual})
                loss = ce(out, lbl)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                states.append(snapshot(learners, head, boost_rate))
                losses.append(float(loss.detach()))
                k += 1
    return states, losses


# --- ours ---------------------------------------------------------------------------------------


def trainer(fusion="boost", bn=True, **extra):
    settings = dict(optimizer="sgd", lr=LR, momentum=MOMENTUM, weight_decay=WD,
                    reconboost_stage_epochs=T1, reconboost_correct_epochs=T2)
    return step_trainer("reconboost", fusion, CLASSES, bn=bn, **{**settings, **extra})


def ours_snapshot(model):
    out = {f"{m}.{k}": v.detach().clone() for m in ("audio", "visual")
           for k, v in model.encoders[m].state_dict().items()}
    out.update({f"head.{k}": v.detach().clone()
                for k, v in model.fusion.head.state_dict().items()})
    out["boost_rate"] = model.fusion.boost_rate.detach().clone()
    return out


def our_train(t, data, part=slice(None), epochs=EPOCHS):
    states, losses, metrics, k = [], [], [], 0
    for epoch in range(epochs):
        t.model.train()
        for _ in range(STEPS_PER_EPOCH):
            t.step = k
            loss, _ = t.train_step(as_batch(data[k], part), epoch)
            metrics.append({n: float(v) for n, v in t.balancer.step_metrics().items()})
            losses.append(float(loss))
            states.append(ours_snapshot(t.model) if t.config.fusion == "boost"
                          else {n: p.detach().clone() for n, p in t.model.named_parameters()})
            k += 1
    return states, losses, metrics


def data_for(n=BATCH):
    return make_batches(11, n, EPOCHS * STEPS_PER_EPOCH, CLASSES)


def test_boosting_loss_by_hand():
    logits, labels = torch.zeros(1, 2), torch.tensor([0])
    join = torch.tensor([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    # -(w1 - w2 q_y) log p_y / C = (5 - 0.75) ln 2 / 2
    assert float(boosting_loss(logits, join, labels, 5.0, 1.0)) == pytest.approx(
        4.25 * math.log(2) / 2, rel=1e-6)
    # an empty ensemble (the released c0): q = 1
    assert float(boosting_loss(logits, None, labels, 5.0, 1.0)) == pytest.approx(
        4 * math.log(2) / 2, rel=1e-6)


def test_schedule_by_hand():
    two = ["audio", "visual"]
    s = [reconboost_stage(e, two, 2, 1) for e in range(9)]
    assert [(x.stage, x.phase, x.learner) for x in s] == [
        (0, 1, "audio"), (0, 1, "audio"), (0, 2, "audio"), (1, 1, "visual"), (1, 1, "visual"),
        (1, 2, "visual"), (2, 1, "audio"), (2, 1, "audio"), (2, 2, "audio")]
    assert [x.others for x in s[::3]] == [(), ("audio",), ("visual",)]
    assert [x.ensemble for x in s[::3]] == [("audio",), ("audio", "visual"),
                                             ("visual", "audio")]  # add = pop + append
    assert [x.previous for x in s[::3]] == [None, "audio", "visual"]
    three = ["audio", "visual", "text"]
    t = [reconboost_stage(e, three, 1, 1) for e in range(0, 10, 2)]
    assert [x.learner for x in t] == ["audio", "visual", "text", "audio", "visual"]
    assert [x.others for x in t] == [(), ("audio",), ("audio", "visual"), ("visual", "text"),
                                     ("text", "audio")]
    assert [x.previous for x in t] == [None, "audio", "visual", "text", "audio"]
    assert t[3].ensemble == ("visual", "text", "audio")


def test_steps_equal_the_released_steps():
    torch.manual_seed(0)
    t = trainer()
    learners = {m: Learner(copy.deepcopy(t.model.encoders[m]), None) for m in ("audio", "visual")}
    head = copy.deepcopy(t.model.fusion.head)
    for lr in learners.values():
        lr.fc = head  # train.py line 288: model.fc = net_ensemble.head
    boost_rate = nn.Parameter(t.model.fusion.boost_rate.detach().clone())
    data = data_for()
    want, want_losses = ref_train(learners, head, boost_rate, data)
    got, got_losses, metrics = our_train(t, data)
    assert len(got) == len(want) == EPOCHS * STEPS_PER_EPOCH
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        for name in w:  # parameters and BatchNorm statistics after every step
            torch.testing.assert_close(g[name], w[name], **TOL, msg=f"step {i}: {name}")
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    # the schedule as logged: stage 0 trains audio only, stage 1 visual, then the ensemble
    assert [m["trained_visual"] for m in metrics[:6]] == [0, 0, 0, 0, 0, 0]
    assert [m["trained_audio"] for m in metrics[6:12]] == [0, 0, 0, 0, 1, 1]
    assert all("ga_loss" in m for m in metrics[6:10]) and "ga_loss" not in metrics[0]
    assert metrics[-1]["boost_rate"] != 1.0  # beta is learned in the rectification phase
    assert t.model.fusion.members.tolist() == [1.0, 1.0]


def test_stage_zero_leaves_the_visual_learner_out():
    torch.manual_seed(0)
    t = trainer()
    before = {k: v.clone() for k, v in t.model.encoders["visual"].state_dict().items()}
    our_train(t, data_for(), epochs=T1 + T2)
    for k, v in t.model.encoders["visual"].state_dict().items():
        assert torch.equal(v, before[k]), k  # neither stepped nor forwarded (BN stats)
    assert t.model.fusion.members.tolist() == [1.0, 0.0]  # eval predicts with audio alone
    batch = as_batch(data_for()[0])
    t.model.eval()
    with torch.no_grad():
        out = t.model(batch)
    torch.testing.assert_close(out["fused"], t.model.fusion.boost_rate * out["audio"])


def test_concat_learner_phase_steps_only_the_learner():
    torch.manual_seed(0)
    t = trainer("concat")
    d = t.model.encoders["audio"].out_dim
    w0 = t.model.fusion.fc_out.weight.detach().clone()
    vis0 = [p.detach().clone() for p in t.model.encoders["visual"].parameters()]
    data = data_for()
    for k in range(STEPS_PER_EPOCH * T1):  # stage 0, learner phase (audio)
        t.step = k
        t.train_step(as_batch(data[k]), 0)
    w = t.model.fusion.fc_out.weight.detach()
    assert torch.equal(w[:, d:], w0[:, d:])  # the visual columns: as they were
    assert not torch.equal(w[:, :d], w0[:, :d])
    assert all(torch.equal(p, q) for p, q in zip(t.model.encoders["visual"].parameters(), vis0))


@pytest.mark.parametrize("reset", [True, False])
def test_optimizer_state_is_fresh_at_every_phase(reset):
    """SGD's first step from a fresh state: buffer = grad + wd * w (the released new optim.SGD
    per phase); --no-reconboost-reset-optimizer keeps the momentum of the phase before."""
    torch.manual_seed(0)
    t = trainer("sum", reconboost_reset_optimizer=reset)
    data = data_for()
    t.step = 0
    t.train_step(as_batch(data[0]), 0)  # learner phase (audio)
    w = t.model.fusion.fc["audio"].weight
    old, before = t.optimizer.state[w]["momentum_buffer"].clone(), w.detach().clone()
    t.step = 1
    t.train_step(as_batch(data[1]), T1)  # the rectification phase starts
    fresh = w.grad + WD * before
    want = fresh if reset else MOMENTUM * old + fresh
    torch.testing.assert_close(t.optimizer.state[w]["momentum_buffer"], want, **TOL)


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"reconboost_weight1": "inf"}, "--reconboost-weight1 must be a finite number"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "reconboost", settings, words)


def test_a_window_is_ignored_with_one_warning(method_shards, tmp_path, capsys):
    """ReconBoost's stages run for the whole training: a shared window option given to it is
    not read, which the settings say in one Warning line (the rule of avtrain.options)."""
    from avtrain.balance import build_balancer
    from avtrain.models import build_model
    from avtrain.settings import make_config

    config = make_config({"shards": str(method_shards), "run_dir": str(tmp_path / "run"),
                          "method": "reconboost", "fusion": "boost", "modulation_end": 3})
    assert capsys.readouterr().err.splitlines() == [
        "Warning: --method reconboost does not read --modulation-end (ignored)"]
    model = build_model("tiny", "boost", 3, ["audio", "visual"])
    rb = build_balancer("reconboost", model, config.to_dict(), modalities=model.modalities)
    assert (rb.stage_epochs, rb.correct_epochs) == (4, 4)  # released 4 + 4, whatever the window


def test_three_modalities_cycle_the_learners():
    from avtrain.balance import build_balancer
    from avtrain.balance.base import StepContext
    from avtrain.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", "boost", 3, ["audio", "visual", "text"])
    rb = build_balancer("reconboost", model, {"reconboost_stage_epochs": 1,
                                              "reconboost_correct_epochs": 1},
                        modalities=model.modalities)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    batch = {"audio": torch.randn(4, 1, 16, 16, generator=g),
             "visual": torch.randn(4, 2, 3, 16, 16, generator=g),
             "text": torch.randint(1, 200, (4, 12), generator=g), "label": torch.arange(4) % 3}
    learners = []
    for epoch in range(6):
        ctx = StepContext(net=model, model=model, batch=batch, labels=batch["label"],
                          optimizer=opt, epoch=epoch, step=epoch)
        rb.train_step(ctx)
        m = rb.step_metrics()
        learners.append([n for n in ("audio", "visual", "text") if float(m[f"trained_{n}"])])
    assert learners == [["audio"], ["audio"], ["visual"], ["audio", "visual"], ["text"],
                        ["audio", "visual", "text"]]
    assert F.softmax(model(batch)["fused"], 1).shape == (4, 3)
