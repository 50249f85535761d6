"""MLA against the released code (differential), its rules by hand, DDP, resume and the CLI.

The reference is written from github.com/Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation (ab6c184): main.py `train_epoch` under `--gs_flag` (lines 419-476: one encoder forward,
then per modality `fusion_module.fc_out`, CrossEntropyLoss (mean), backward, `before_update`,
`optimizer.step()`, `optimizer.zero_grad()` -- torch 1.8.1's, which writes zeros -- and at the end
`del p.grad` for every parameter), `valid` (622-651) with `calculate_entropy` /
`calculate_gating_weights` (65-87), and utils/utils.py `GSPlugin.before_update` (24-41), whose
parameter-name test selects the release: HEAD `n == "module.weight"` (never true for the head's
nn.Linear: no projection), the first release 4735bbc `n == "module.weight" or n == "weight"`
(grad <- grad P^T), BalanceMM's MLA_trainer.py 20-53 `n == "weight"` with `w.grad.add_`. The
network is avtrain's tiny model (its `features` and the shared head `fusion.fc_out`): the method
is under test.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner
from released import (
    as_batch,
    make_batches,
    method_fit_args,
    run_gloo,
    step_trainer,
)
from test_balance_ogm import step_records

from avtrain.balance import owm_update, project_gradient
from avtrain.balance.base import EpochContext
from avtrain.balance.mla import owm_alpha
from avtrain.models import build_model
from avtrain.models.fusions import gate_weights

CLASSES, BATCH, PER_EPOCH = 3, 6, 3
EPOCHS = 2
TOL = {"rtol": 1e-6, "atol": 1e-6}
HEAD_NAMES = {"none": {"module.weight"}, "owm": {"module.weight", "weight"},
              "owm-add": {"weight"}}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the reference ------------------------------------------------------------------------------


class GSPlugin:  # utils/utils.py lines 12-41, rewritten; `names` and `add` pick the release
    def __init__(self, dim, names, add):
        self.Pl = torch.eye(dim)
        self.exp_count = 0
        self.names, self.add = names, add

    def before_update(self, model, before_batch_input, batch_index, len_dataloader,
                      train_exp_counter):
        lamda = batch_index / len_dataloader + 1
        alpha = 1.0 * 0.1 ** lamda
        if train_exp_counter != 0:
            for n, w in model.named_parameters():
                if n in self.names:
                    r = torch.mean(before_batch_input, 0, True)
                    k = torch.mm(self.Pl, torch.t(r))
                    self.Pl = torch.sub(self.Pl, torch.mm(k, torch.t(k)) / (alpha + torch.mm(k, r)))
                    pnorm2 = torch.norm(self.Pl.data, p="fro")
                    self.Pl.data = self.Pl.data / pnorm2
                    if self.add:
                        w.grad.add_(torch.mm(w.grad.data, torch.t(self.Pl.data)))
                    else:
                        w.grad.data = torch.mm(w.grad.data, torch.t(self.Pl.data))


def ref_train(model, data, modalities, projection, stale, optimizer_name):
    head = model.fusion.fc_out
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    gs = GSPlugin(head.in_features, HEAD_NAMES[projection], projection == "owm-add")
    criterion = nn.CrossEntropyLoss()
    losses, params, step = [], [], 0
    model.train()
    for _epoch in range(EPOCHS):
        for batch_step in range(PER_EPOCH):
            batch = data[step]
            label = batch["label"]
            optimizer.zero_grad(set_to_none=False)
            feats = model.features(batch)  # a, v(, t) = model(spec, image)
            record = {}
            for m in modalities:
                out = head(feats[m])
                loss = criterion(out, label)
                loss.backward()
                gs.before_update(head, feats[m], batch_step, PER_EPOCH, gs.exp_count)
                optimizer.step()
                optimizer.zero_grad(set_to_none=stale == "none")  # torch 1.8.1: zeros
                gs.exp_count += 1
                record[m] = float(loss.detach())
            for _n, p in model.named_parameters():
                if p.grad is not None:
                    del p.grad
            losses.append(record)
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return losses, params, gs.Pl


# --- ours ---------------------------------------------------------------------------------------


def trainer(modalities=("audio", "visual"), bn=True, optimizer="sgd", **mla):
    lr = 0.05 if optimizer == "sgd" else 1e-3
    return step_trainer("mla", "concat", CLASSES, bn=bn, optimizer=optimizer, lr=lr,
                        steps_per_epoch=PER_EPOCH, modalities=list(modalities), **mla)


def our_train(t, data, part=slice(None)):
    params, metrics, step = [], [], 0
    for epoch in range(EPOCHS):
        t.balancer.start_epoch(EpochContext(net=t.net, model=t.model, epoch=epoch,
                                            batches=lambda n: iter(())))
        t.model.train()
        for _ in range(PER_EPOCH):
            t.step = step
            batch = {k: v[part] for k, v in data[step].items()}
            t.train_step(batch, epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics


def av_data(n=BATCH):
    return [as_batch(item) for item in make_batches(7, n, EPOCHS * PER_EPOCH, CLASSES)]


def avt_data():
    g = torch.Generator().manual_seed(11)
    out = []
    for item in av_data():
        out.append({**item, "text": torch.randint(1, 257, (BATCH, 9), generator=g)})
    return out


# --- the rules by hand --------------------------------------------------------------------------


def test_owm_update_and_projection_by_hand():
    # P = I, r = [1, 2], a = 0.5: k = r^T, k k^T = k r = [[1, 2], [2, 4]], divided element-wise
    # by a + k r: [[1/1.5, 2/2.5], [2/2.5, 4/4.5]]; I minus that = [[1/3, -0.8], [-0.8, 1/9]],
    # Frobenius norm 1.1846761 (the textbook scalar a + r k = 5.5 would give another P)
    P = owm_update(torch.eye(2), torch.tensor([[1.0, 2.0]]), 0.5)
    assert P.flatten().tolist() == pytest.approx(
        [0.2813709, -0.6752902, -0.6752902, 0.0937903], abs=1e-6)
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    assert project_gradient(g, P, "owm").flatten().tolist() == pytest.approx(
        [-1.0692095, -0.4877096, 1.5194030, -2.1196610], abs=1e-6)
    assert project_gradient(g, P, "owm-add").flatten().tolist() == pytest.approx(
        [-0.0692095, 1.5122904, 4.5194030, -3.1196610], abs=1e-6)
    # a = 0.1^(1 + i/n): 0.1 at an epoch's first step, 0.1^1.5 halfway
    assert owm_alpha(0, 10) == pytest.approx(0.1)
    assert owm_alpha(5, 10) == pytest.approx(0.0316228, abs=1e-7)


def test_gate_weights_by_hand():
    # per sample: audio logits [0, 0] -> entropy ln 2 = 0.6931472; visual [2, 0] -> p = (0.8807971,
    # 0.1192029), entropy 0.3653339; w_visual = 1 / (1 + exp(-(0.6931472 - 0.3653339)))
    logits = torch.tensor([[[0.0, 0.0]], [[2.0, 0.0]]])  # [M=2, B=1, C=2]
    w = gate_weights(logits, "entropy").flatten().tolist()
    assert w == pytest.approx([0.4187728, 0.5812272], abs=1e-6)
    # the batch rule (released dim=0): audio [[0, 0], [0, 0]] has the uniform softmax over the
    # batch in each class column: entropy 2 ln 2; visual [[2, 0], [0, 0]]: column 0 has
    # (0.8807971, 0.1192029), entropy 0.3653339, column 1 ln 2 -> e = 1.0584811
    logits = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[2.0, 0.0], [0.0, 0.0]]])
    w = gate_weights(logits, "batch-entropy")
    e_a, e_v = 2 * 0.6931472, 0.3653339 + 0.6931472
    want_v = 1 / (1 + torch.exp(torch.tensor(e_v - e_a))).item()
    assert w[:, 0, 0].tolist() == pytest.approx([1 - want_v, want_v], abs=1e-6)
    assert torch.equal(w[:, 0], w[:, 1])  # one weight per modality and batch
    fixed = gate_weights(logits, "fixed", torch.tensor([0.55, 0.45]))
    assert fixed[:, 1, 0].tolist() == pytest.approx([0.55, 0.45])


def released_entropy(output):  # main.py lines 65-70
    probabilities = F.softmax(output, dim=0)
    log_probabilities = torch.log(probabilities)
    return -torch.sum(probabilities * log_probabilities)


def released_gating(out_1, out_2):  # lines 72-87
    e1, e2 = released_entropy(out_1), released_entropy(out_2)
    m = max(e1, e2)
    g1, g2 = torch.exp(m - e1), torch.exp(m - e2)
    return g1 / (g1 + g2), g2 / (g1 + g2)


def per_sample_gating(out_1, out_2):  # BalanceMM avclassify_model.py 673-700
    def entropy(o):
        p = F.softmax(o, dim=1)
        return -torch.sum(p * torch.log(p), dim=1, keepdim=True)
    e1, e2 = entropy(out_1), entropy(out_2)
    m = torch.max(e1, e2)
    g1, g2 = torch.exp(m - e1), torch.exp(m - e2)
    return g1 / (g1 + g2), g2 / (g1 + g2)


@pytest.mark.parametrize("gate", ["entropy", "batch-entropy", "fixed"])
def test_fused_eval_logits_are_the_released_test_time_fusion(gate):
    torch.manual_seed(0)
    t = trainer(mla_gate=gate)
    model = t.model.eval()
    batch = av_data()[0]
    with torch.no_grad():
        got = model(batch)
        feats = model.features(batch)
        head = model.fusion.fc_out
        out_a, out_v = head(feats["audio"]), head(feats["visual"])  # valid() lines 636-637
        if gate == "batch-entropy":  # --dynamic
            w_a, w_v = released_gating(out_a, out_v)
        elif gate == "entropy":
            w_a, w_v = per_sample_gating(out_a, out_v)
        else:
            w_a, w_v = 0.55, 0.45  # av_alpha * out_a + (1 - av_alpha) * out_v
        want = out_a * w_a + out_v * w_v
    torch.testing.assert_close(got["audio"], out_a, **TOL)
    torch.testing.assert_close(got["visual"], out_v, **TOL)
    torch.testing.assert_close(got["fused"], want, **TOL)
    # a checkpoint evaluates with the rule it was trained with (the gate is a buffer)
    fresh = build_model("tiny", model.spec["fusion"], CLASSES).eval()
    fresh.load_state_dict(model.state_dict())
    assert fresh.fusion.rule == gate
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch)["fused"], got["fused"], **TOL)


# --- the step against the released step ---------------------------------------------------------


@pytest.mark.parametrize("projection,stale,optimizer,modalities", [
    ("none", "zero", "sgd", ("audio", "visual")),  # the released HEAD
    ("owm", "zero", "sgd", ("audio", "visual")),  # the first release's projection
    ("owm-add", "none", "sgd", ("audio", "visual")),  # BalanceMM
    ("owm", "zero", "adam", ("audio", "visual")),
    ("owm", "zero", "sgd", ("audio", "visual", "text")),  # the released --modal3 order a, v, t
])
def test_steps_equal_the_released_step(projection, stale, optimizer, modalities):
    torch.manual_seed(0)
    t = trainer(modalities, optimizer=optimizer, mla_projection=projection,
                mla_stale_grads=stale)
    ref = copy.deepcopy(t.model)
    data = avt_data() if "text" in modalities else av_data()
    torch.manual_seed(1)  # the text encoder's dropout: the same draws in both runs
    want_losses, want_params, want_P = ref_train(ref, data, modalities, projection, stale,
                                                 optimizer)
    torch.manual_seed(1)
    got_params, got_metrics = our_train(t, data)
    for want, got in zip(want_losses, got_metrics):
        for m in modalities:
            assert got[f"uniloss_{m}"] == pytest.approx(want[m], rel=1e-6, abs=1e-6)
        assert sum(got[f"gate_{m}"] for m in modalities) == pytest.approx(1.0)
        assert ("headkept_audio" in got) == (projection != "none")
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    if projection != "none":
        torch.testing.assert_close(t.balancer.P, want_P, **TOL)
        assert abs(got_metrics[-1]["headkept_audio"] - 1) > 0.05  # the edit really bites
        assert got_metrics[0]["headkept_audio"] == 1.0  # skipped on the very first update


def test_stale_zero_gradients_move_the_first_encoder_again():
    """torch 1.8.1's zero_grad leaves zeros: the visual step moves the audio encoder by
    momentum and weight decay too; with `none` only the head and the visual encoder move."""
    data = av_data()
    moved = {}
    for stale in ("zero", "none"):
        torch.manual_seed(0)
        t = trainer(mla_stale_grads=stale)
        before = {k: p.detach().clone() for k, p in t.model.encoders["audio"].named_parameters()}
        t.model.train()
        t.train_step(data[0], 0)  # first step: momentum buffers start at the audio gradient
        after_one = {k: p.detach().clone() for k, p in
                     t.model.encoders["audio"].named_parameters()}
        moved[stale] = max(float((after_one[k] - before[k]).abs().max()) for k in before)
    assert moved["zero"] > moved["none"] > 0


# --- DDP ----------------------------------------------------------------------------------------


def _broadcast_run(rank: int, world: int) -> dict:
    from avtrain.balance.mla import _broadcast_from_rank0

    # buffers (BatchNorm statistics: float and int64) become rank 0's, as in DDP's forward
    buffers = [torch.full((3,), rank + 0.5), torch.tensor([rank + 7]), torch.ones(2) * rank]
    _broadcast_from_rank0(buffers)
    return {"buffers": buffers}


def test_every_rank_takes_rank_zeros_buffers(tmp_path):
    """MLA's own broadcast (its per-modality forwards bypass DDP's); the contract suite
    (test_contract.py) runs the method itself on two ranks, projection owm."""
    for r in run_gloo(_broadcast_run, tmp_path):
        assert [b.tolist() for b in r["buffers"]] == [[0.5] * 3, [7], [0.0, 0.0]]


# --- the real trainer ---------------------------------------------------------------------------


def test_a_fitted_run_probes_and_evaluates_with_its_gate(method_shards, tmp_path):
    """The gate option reaches the checkpoint's shared head (what eval fuses with) and the
    linear probe rebuilds that model; signals, report and resume: test_contract.py."""
    from avtrain.checkpoint import load_checkpoint, model_from_checkpoint
    from avtrain.evaluate import evaluate_checkpoint
    from cli import avtrain

    run = tmp_path / "run"
    out = CliRunner().invoke(avtrain, method_fit_args("mla", method_shards, run, 1,
                                                      "--mla-projection", "owm", "--linear-probe",
                                                      mla_gate="fixed"))
    assert out.exit_code == 0, out.output
    assert all(r["gate_audio"] == pytest.approx(0.55) for r in step_records(run))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "mla" and summary["fusion"] == "shared"  # the built model's
    assert "visual" in json.dumps(summary["linear_probe"])  # rebuilt with the shared head
    ckpt = load_checkpoint(str(run / "best.pt"))
    assert ckpt["spec"]["fusion"] == "shared"
    assert model_from_checkpoint(ckpt).fusion.rule == "fixed"
    again = evaluate_checkpoint(str(run / "best.pt"), str(method_shards), split="test",
                                batch_size=4, workers=0, device="cpu")
    assert again["acc"] == pytest.approx(summary["test"]["acc"])


def test_models_without_the_shared_head_are_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer

    model = build_model("tiny", "sum", CLASSES)
    with pytest.raises(UserError, match="needs per-modality encoders and the shared head"):
        build_balancer("mla", model, {}, modalities=model.modalities)
    with pytest.raises(UserError, match="released weights"):
        build_model("tiny", "shared", CLASSES, ["audio", "text"]).fusion.set_gate("fixed")
