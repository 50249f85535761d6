"""LFM against the authors' released step (differential), its rules by hand, DDP, resume, CLI.

The reference is written from njustkmg/NeurIPS24-LFM (ad44fa0) Crema_epoch_learnable.py:
`Alignment` (lines 37-44: softmax, m = (p + q) / 2, `kl_div(p.log(), m, 'batchmean')` for
both, half their sum), `getAlpha_Learnable` (55-97: L = a0 CE + a1 align, theta_grads with
create_graph, cls_grads, the vector-Hessian product over model.parameters(), its first tensor's
mean, lr halving, the clip, a0 = 1 - a1), `train_audio_video` (101-130: CE of 0.5 o_v + 0.5 o_a,
loss 2 (a0 CE + a1 align), one SGD step) and the epoch loop (246-257: cls_k = [0.05, 0.95],
the weight step before each epoch on a fixed held-out batch, in eval mode after epoch 0 because
`val()` ran last). The network is avtrain's tiny model with the `sum` fusion (the released
AVClassifier's two heads and their sum): the method is under test.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
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
from torch.nn.attention import SDPBackend, sdpa_kernel

from avtrain.balance import lfm_alignment, lfm_alpha_update, lfm_fitted_alpha
from avtrain.balance.base import EpochContext
from avtrain.balance.lfm import _gather_padded

CLASSES, BATCH, HELD = 3, 6, 4
STEPS = ((0, 2), (1, 2), (2, 2))  # (epoch, steps)
LR_ALPHA = 0.5  # large, so that the tiny model's hypergradient moves the weights visibly
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rules by hand --------------------------------------------------------------------------


def test_alignment_by_hand():
    # p = softmax([ln 3, 0]) = [3/4, 1/4], q = softmax([0, 0]) = [1/2, 1/2], m = [5/8, 3/8]
    # KL(m || p) = 5/8 ln((5/8)/(3/4)) + 3/8 ln((3/8)/(1/4)) = 5/8 ln(5/6) + 3/8 ln(3/2)
    #            = 5/8 (-0.1823216) + 3/8 (0.4054651) = -0.1139510 + 0.1520494 = 0.0380984
    # KL(m || q) = 5/8 ln(5/4) + 3/8 ln(3/4) = 0.1394647 - 0.1078808 = 0.0315839
    # align = (0.0380984 + 0.0315839) / 2 = 0.0348412 (the released order: KL(m || .))
    a = torch.tensor([[math.log(3.0), 0.0]])
    v = torch.zeros(1, 2)
    want = 0.5 * (5 / 8 * math.log(5 / 6) + 3 / 8 * math.log(3 / 2)
                  + 5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4))
    assert want == pytest.approx(0.0348412, abs=1e-7)
    assert float(lfm_alignment([a, v])) == pytest.approx(want, abs=1e-7)
    assert float(lfm_alignment([v, a])) == pytest.approx(want, abs=1e-7)  # symmetric
    # batchmean: a second, identical-logits sample (align 0) halves it
    two = lfm_alignment([torch.cat([a, v]), torch.cat([v, v])])
    assert float(two) == pytest.approx(want / 2, abs=1e-7)
    # three modalities: mean over the pairs (a,v) = want, (a,v') = want, (v,v') = 0 -> 2/3 want
    assert float(lfm_alignment([a, v, v])) == pytest.approx(2 * want / 3, abs=1e-7)


def test_alpha_update_by_hand():
    # 0.95 - 1e-4 * 100 = 0.94; a_cls = 0.06; no halving at epoch 0
    cls_w, align, lr = lfm_alpha_update(torch.tensor(0.95), 1e-4, torch.tensor(100.0), 0,
                                        halving=20)
    assert float(align) == pytest.approx(0.94) and float(cls_w) == pytest.approx(0.06)
    assert lr == 1e-4
    # epoch 20 halves lr to 5e-5 first: 0.5 - 5e-5 * 2000 = 0.4
    _, align, lr = lfm_alpha_update(torch.tensor(0.5), 1e-4, torch.tensor(2000.0), 20,
                                    halving=20)
    assert lr == 5e-5 and float(align) == pytest.approx(0.4)
    # 21 does not halve; the clip: 0.5 + 1e-4 * 1e4 = 1.5 -> 0.95, 0.5 - 1 -> 0.05
    _, align, lr = lfm_alpha_update(torch.tensor(0.5), 1e-4, torch.tensor(-1e4), 21,
                                    halving=20)
    assert lr == 1e-4 and float(align) == pytest.approx(0.95)
    _, align, _ = lfm_alpha_update(torch.tensor(0.5), 1e-4, torch.tensor(1e4), 3, halving=20)
    assert float(align) == pytest.approx(0.05)
    # another period: epoch 10 halves with 10 and not with 20
    assert lfm_alpha_update(torch.tensor(0.5), 1e-4, torch.tensor(0.0), 10, halving=10)[2] \
        == 5e-5
    assert lfm_alpha_update(torch.tensor(0.5), 1e-4, torch.tensor(0.0), 10, halving=20)[2] \
        == 1e-4


def test_the_balancer_halves_its_step_size_with_its_option():
    """The balancer's weight step uses --lfm-lr-alpha-halving (declared default: the released
    20): with 2, the step size halves at epochs 2 and 4; with the default, not before 20."""
    torch.manual_seed(0)
    held = as_batch(make_batches(99, BATCH, 1, CLASSES)[0], slice(0, HELD))
    for halving, want in ((2, LR_ALPHA / 4), (None, LR_ALPHA)):
        extra = {} if halving is None else {"lfm_lr_alpha_halving": halving}
        b = trainer(**extra).balancer
        assert b.opt.lr_alpha_halving == (halving or 20)
        for epoch in range(5):
            b.update_alpha(held, epoch)
        assert b.lr_alpha == want


def test_small_weight_steps_are_kept_as_the_released_python_float():
    """The released a_align is a Python float (`alpha[1] -= lr_alpha * alpha_grad`, lines
    86-94): 20 steps of 2e-8 from 0.95 (each below half a float32 ulp there, 2.98e-8) move it
    by 4e-7. A float32 a_align would drop every one of them and stay at 0.95."""
    torch.manual_seed(0)
    balancer = trainer().balancer
    assert balancer.align.dtype == torch.float64
    align, released = balancer.align, 0.95
    grad = torch.tensor(2e-4)  # a float32 hypergradient, as the released .mean().item()
    for epoch in range(1, 21):
        _, align, _ = lfm_alpha_update(align, 1e-4, grad, epoch, halving=20)
        released -= (1e-4 / (2 if epoch == 20 else 1)) * grad.item()
    assert float(align) == released
    assert 0.95 - float(align) == pytest.approx(3.9e-7, rel=1e-9)  # 19 x 2e-8 + 1e-8
    balancer.load_state_dict({**balancer.state_dict(), "align": align.float()})
    assert balancer.align.dtype == torch.float64  # an older checkpoint's float32 comes back


def test_fitted_schedule_by_hand():
    # epoch 0: the constant terms
    assert lfm_fitted_alpha(0) == pytest.approx((0.204623704, 0.795376296), abs=1e-12)
    # epoch 10: 0.204623704 + 0.0335472727 + 0.0122989557 - 0.00292947416 + 0.000223835486
    #           - 0.00000539717505 = 0.2381709767 + 0.0122989557 - ... = 0.24775889655
    cls_w, align = lfm_fitted_alpha(10)
    assert cls_w == pytest.approx(0.24775889655, abs=1e-10)
    assert cls_w + align == pytest.approx(1.0, abs=1e-12)


# --- the reference ------------------------------------------------------------------------------


def ref_alignment(p, q):  # Crema_epoch_learnable.py lines 37-44
    p, q = F.softmax(p, dim=-1), F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean")
                  + F.kl_div(q.log(), m, reduction="batchmean"))


def ref_forward(model, batch):  # AVClassifier: o_a, o_v (result_b = their sum)
    out = model(batch)
    return [out[m] for m in model.modalities]


def ref_objectives(outs, label):
    """0.5 o_v + 0.5 o_a and Alignment(o_a, o_v); for N modalities the mean of the logits and
    the alignment summed over all pairs / their number (BalanceMM's manual_combinations)."""
    pairs = [(i, j) for i in range(len(outs) - 1) for j in range(i + 1, len(outs))]
    align = sum(ref_alignment(outs[i], outs[j]) for i, j in pairs) / len(pairs)
    mean = outs[1] * 0.5 + outs[0] * 0.5 if len(outs) == 2 else sum(outs) / len(outs)
    return F.cross_entropy(mean, label, reduction="none").mean(), align


def ref_alpha(epoch, val_batch, model, alpha, lr_alpha):  # lines 55-97
    loss_cls, loss_alignment = ref_objectives(ref_forward(model, val_batch), val_batch["label"])
    total = alpha[0] * loss_cls + alpha[1] * loss_alignment
    theta_grads = torch.autograd.grad(total, model.parameters(), create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, model.parameters(), retain_graph=True,
                                    create_graph=True)
    hvp = torch.autograd.grad(outputs=theta_grads, inputs=model.parameters(),
                              grad_outputs=cls_grads, retain_graph=True)
    with torch.no_grad():
        alpha_grad = hvp[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha


def ref_train(model, data, held, steps=STEPS, init=0.95):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    alpha, lr_alpha = [1 - init, init], LR_ALPHA  # the released cls_k = [0.05, 0.95]
    records, params, step = [], [], 0
    for epoch, n_steps in steps:
        if epoch > 0:
            model.eval()  # val() of the previous epoch
        with sdpa_kernel([SDPBackend.MATH]):  # text: only this kernel has a double backward
            alpha, lr_alpha = ref_alpha(epoch, held, model, alpha, lr_alpha)
        model.train()
        for _ in range(n_steps):
            batch = data[step]
            optimizer.zero_grad()
            loss_cls, loss_alignment = ref_objectives(ref_forward(model, batch), batch["label"])
            loss = 2 * (alpha[0] * loss_cls + alpha[1] * loss_alignment)
            loss.backward()
            optimizer.step()
            records.append({"alpha_cls": alpha[0], "alpha_align": alpha[1],
                            "loss_cls": float(loss_cls.detach()),
                            "loss_align": float(loss_alignment.detach()),
                            "loss": float(loss.detach())})
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return records, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, **extra):
    settings = {"optimizer": "sgd", "lr": 0.05, "lfm_lr_alpha": LR_ALPHA,
                "lfm_heldout_size": HELD, "batch_size": BATCH, **extra}
    return step_trainer("lfm", "sum", CLASSES, bn=bn, **settings)


def epoch_context(t, epoch, held_batch):
    return EpochContext(net=t.net, model=t.model, epoch=epoch,
                        batches=lambda n: iter([held_batch] * n))


def our_train(t, data, held_batch, part=slice(None), steps=STEPS):
    params, metrics, losses, step = [], [], [], 0
    for epoch, n_steps in steps:
        if epoch > 0:
            t.model.eval()  # as the loop after an evaluation: the method picks its own mode
        t.balancer.start_epoch(epoch_context(t, epoch, held_batch))
        t.model.train()
        for _ in range(n_steps):
            t.step = step
            batch = data[step] if isinstance(data[step], dict) else as_batch(data[step], part)
            loss, _ = t.train_step(batch, epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            losses.append(float(loss.detach()))
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics, losses


def test_steps_equal_the_released_step():
    torch.manual_seed(0)
    t = trainer()
    assert t.balancer.heldout_size == HELD
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    held_batch = as_batch(make_batches(99, BATCH, 1, CLASSES)[0])
    ref = copy.deepcopy(t.model)
    want_records, want_params = ref_train(ref, [as_batch(b) for b in data],
                                          as_batch(make_batches(99, BATCH, 1, CLASSES)[0],
                                                   slice(0, HELD)))
    got_params, got_metrics, got_losses = our_train(t, data, held_batch)
    for want, got, loss in zip(want_records, got_metrics, got_losses):
        for key in ("alpha_cls", "alpha_align", "loss_cls", "loss_align"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
        assert loss == pytest.approx(want["loss"], rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    aligns = [m["alpha_align"] for m in got_metrics]
    assert len({round(a, 9) for a in aligns}) == 3  # the weights moved every epoch...
    assert all(0.05 < a < 0.95 for a in aligns)  # ...without hitting the clip
    for name, buf in ref.named_buffers():  # epoch 0's train-mode held-out forward, as released
        torch.testing.assert_close(dict(t.model.named_buffers())[name], buf, **TOL)


def test_three_modalities_equal_the_reference():
    torch.manual_seed(0)
    t = trainer(modalities=["audio", "visual", "text"], lfm_alpha_init=0.5)
    no_dropout(t.model)  # both runs see the same network
    data = text_batches(7, BATCH, 5, CLASSES)
    held, data = data[0], data[1:]
    steps = ((0, 2), (1, 2))
    ref = copy.deepcopy(t.model)
    want_records, want_params = ref_train(ref, data, {k: v[:HELD] for k, v in held.items()},
                                          steps, init=0.5)
    got_params, got_metrics, _ = our_train(t, data, held, steps=steps)
    for want, got in zip(want_records, got_metrics):
        for key in ("alpha_cls", "alpha_align", "loss_cls", "loss_align"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    # from 0.5 (BalanceMM's init is 0.05): epoch 0's step moves it without the clip
    assert got_metrics[0]["alpha_align"] != pytest.approx(0.5)
    assert 0.05 < got_metrics[0]["alpha_align"] < 0.95


def test_fitted_schedule_and_fused_input():
    torch.manual_seed(0)
    t = trainer(lfm_schedule="fitted", lfm_cls_input="fused")
    data = make_batches(7, BATCH, 4, CLASSES)
    _, metrics, _ = our_train(t, data, None, steps=((0, 2), (10, 2)))
    assert metrics[0]["alpha_cls"] == pytest.approx(0.204623704, abs=1e-7)
    assert metrics[2]["alpha_cls"] == pytest.approx(0.24775889655, abs=1e-7)
    assert t.balancer.heldout is None  # no held-out batch drawn
    # the fused input: CE of the summed logits (the last step's loss_cls by hand)
    with torch.no_grad():
        logits = t.model(as_batch(data[3]))
        t.balancer.loss(logits, data[3][2], epoch=10, step=3)
        want = F.cross_entropy(logits["audio"] + logits["visual"], data[3][2])
    assert float(t.balancer.step_metrics()["loss_cls"]) == pytest.approx(float(want), rel=1e-6)


def _gather_tokens(rank: int, world: int) -> dict:
    # rank 0's token batch is padded to length 2, rank 1's to length 4
    tokens = torch.arange(1, 2 * (2 + 2 * rank) + 1).reshape(2, 2 + 2 * rank) + 10 * rank
    return {"text": _gather_padded(tokens), "label": _gather_padded(torch.tensor([rank, rank]))}


@pytest.mark.slow
def test_held_out_pieces_of_different_token_lengths_are_padded_and_gathered(tmp_path):
    ranks = run_gloo(_gather_tokens, tmp_path)
    want = torch.tensor([[1, 2, 0, 0], [3, 4, 0, 0], [11, 12, 13, 14], [15, 16, 17, 18]])
    for got in ranks:
        assert torch.equal(got["text"], want)
        assert torch.equal(got["label"], torch.tensor([0, 0, 1, 1]))


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"lfm_heldout_size": 9}, "above --batch-size 4"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "lfm", settings, words)
