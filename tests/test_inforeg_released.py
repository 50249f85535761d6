"""InfoReg against its released step (differential) and its rule by hand.

The reference is written from GeWu-Lab/InfoReg_CVPR2025 (939b2ed) main.py `train_epoch`
(lines 231-604) and `main` (the trace history's ten leading zeros, line 694): before the epoch
the acquisition rate k from the audio trace history (237-243) and a deep copy of the model
(259); per step the concat head's split logits with bias / 2 (361-363), three batch-mean CEs,
backward of the visual, the audio and the fused loss in that order (456-458), the scores as a
Python sum over the batch (460-461), the coefficient branches (465-485), the proximal gradient on
every parameter of the leading encoder (489-495), the audio encoder's Conv2d/Linear squared
gradients accumulated elementwise (507-514), the optimizer step; after the epoch each layer's
mean, summed, appended to the history (569-595). The released logging pass (one backward per
loss, gradients copied, then zeroed: 406-453) changes nothing the step uses and is left out.
The released `k > 0.05` and `[-10:]` / `[-11:-1]` are the reference's `threshold` and `window`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from released import as_batch, make_batches, step_trainer

from avprep.errors import UserError
from avtrain.balance import fisher_trace, inforeg_betas, inforeg_rate
from avtrain.balance.base import EpochContext

CLASSES, BATCH = 3, 6
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the rule by hand ---------------------------------------------------------------------------


def test_rate_by_hand():
    assert inforeg_rate([]) == 1.0  # epoch 0: k = 1
    # one epoch, window 10: padded [0]*10 + [2]: now = 2/10, before = 0 -> k = 1
    assert inforeg_rate([2.0]) == pytest.approx(1.0)
    # window 2, history [1, 3]: padded [0, 0, 1, 3]; now = (1 + 3) / 2 = 2, before = (0 + 1) / 2
    assert inforeg_rate([1.0, 3.0], 2) == pytest.approx((2 - 0.5) / 2)
    # a falling trace: [4, 1, 1]: now = 1, before = 2.5 -> k = -1.5
    assert inforeg_rate([4.0, 1.0, 1.0], 2) == pytest.approx(-1.5)
    # window 10, three epochs [1, 2, 4]: now = 7/10, before = 3/10 -> 4/7
    assert inforeg_rate([1.0, 2.0, 4.0]) == pytest.approx(4 / 7)
    # nothing acquired in the last window (released: division by zero): 0
    assert inforeg_rate([3.0, 0.0, 0.0], 2) == 0.0


def test_betas_by_hand():
    coeffs = torch.tensor([0.95, 0.1])
    # audio leads by 2: 0.95 * exp(tanh(2)) = 0.95 * exp(0.9640276) = 0.95 * 2.6222365
    beta = inforeg_betas(torch.tensor([3.0, 1.0]), coeffs)
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(2.0)), 0.0], abs=1e-6)
    assert beta[0].item() == pytest.approx(2.4911247, abs=1e-6)
    # visual leads by 0.5: 0.1 * exp(tanh(0.5)) = 0.1 * exp(0.4621172) = 0.1587431
    beta = inforeg_betas(torch.tensor([1.0, 1.5]), coeffs)
    assert beta.tolist() == pytest.approx([0.0, 0.1587431], abs=1e-6)
    # a tie: neither (the released `else`)
    assert inforeg_betas(torch.tensor([2.0, 2.0]), coeffs).tolist() == [0.0, 0.0]
    # three modalities: audio leads, its gap to the mean of the others: 3 - (1 + 2) / 2 = 1.5
    beta = inforeg_betas(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.95, 0.1, 0.1]))
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(1.5)), 0.0, 0.0], abs=1e-6)
    # a tie for the highest of three: nobody
    assert inforeg_betas(torch.tensor([2.0, 2.0, 1.0]), torch.tensor([0.95, 0.1, 0.1])
                         ).tolist() == [0.0, 0.0, 0.0]


def test_fisher_trace_by_hand():
    a, b = torch.zeros(2, 2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2.0])
    # mean(1, 4, 9, 16) = 7.5, plus 4
    assert fisher_trace([a, b]).item() == 11.5


# --- the reference ------------------------------------------------------------------------------


def ref_train(model, data, epochs, steps, *, threshold=0.05, window=10, c_audio=0.95,
              c_visual=0.1):
    """The released train_epoch loop on `model` (ours, deep-copied: its encoders are the
    released audio_net / visual_net, its fusion.fc_out the concat `head`)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    criterion, softmax, tanh = nn.CrossEntropyLoss(), nn.Softmax(dim=1), nn.Tanh()
    audio_net, visual_net = model.encoders["audio"], model.encoders["visual"]
    head = model.fusion.fc_out
    d = audio_net.out_dim
    audio_trace_list = [0] * window  # main.py 694
    losses, params, ks, step = [], [], [], 0
    for epoch in range(epochs):
        if epoch == 0:
            k = 1
        else:
            tr1 = sum(audio_trace_list[-window:]) / window
            tr2 = sum(audio_trace_list[-window - 1:-1]) / window
            k = (tr1 - tr2) / tr1
        ks.append(k)
        global_model = copy.deepcopy(model)
        g_audio = global_model.encoders["audio"]
        g_visual = global_model.encoders["visual"]
        model.train()
        fim_audio = {name: torch.zeros_like(mod.weight) for name, mod in audio_net.named_modules()
                     if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.weight.requires_grad}
        for _ in range(steps):
            batch = data[step]
            label = batch["label"]
            optimizer.zero_grad()
            a = audio_net(batch["audio"])
            v = visual_net(batch["visual"])
            out = head(torch.cat((a, v), 1))
            out_v = torch.mm(v, torch.transpose(head.weight[:, d:], 0, 1)) + head.bias / 2
            out_a = torch.mm(a, torch.transpose(head.weight[:, :d], 0, 1)) + head.bias / 2
            loss = criterion(out, label)
            loss_out_v = criterion(out_v, label)
            loss_out_a = criterion(out_a, label)
            loss_out_v.backward(retain_graph=True)
            loss_out_a.backward(retain_graph=True)
            loss.backward()
            score_v = sum([softmax(out_v)[i][label[i]] for i in range(out_v.size(0))])
            score_a = sum([softmax(out_a)[i][label[i]] for i in range(out_a.size(0))])
            if score_a > score_v and k > threshold:
                beta, beta2 = c_audio * torch.exp(tanh(score_a - score_v)), 0
            elif score_a < score_v and k > threshold:
                beta, beta2 = 0, c_visual * torch.exp(tanh(score_v - score_a))
            else:
                beta, beta2 = 0, 0
            with torch.no_grad():
                for p, p0 in zip(audio_net.parameters(), g_audio.parameters()):
                    p.grad += beta * (p - p0)
                for p, p0 in zip(visual_net.parameters(), g_visual.parameters()):
                    p.grad += beta2 * (p - p0)
            for name, mod in audio_net.named_modules():
                if name in fim_audio:
                    fim_audio[name] += mod.weight.grad * mod.weight.grad
            optimizer.step()
            losses.append(float((loss + loss_out_a + loss_out_v).detach()))
            params.append({k_: p.detach().clone() for k_, p in model.named_parameters()})
            step += 1
        audio_trace_list.append(sum(f.mean().item() for f in fim_audio.values()))
    return losses, params, ks, audio_trace_list[window:]


# --- ours ---------------------------------------------------------------------------------------


def trainer(**settings):
    return step_trainer("inforeg", "concat", CLASSES, optimizer="sgd", lr=0.05, **settings)


def our_train(t, data, epochs, steps):
    losses, params, metrics, step = [], [], [], 0
    for epoch in range(epochs):
        t.balancer.start_epoch(EpochContext(net=t.net, model=t.model, epoch=epoch,
                                            batches=lambda n: iter(()), steps_per_epoch=steps))
        t.model.train()
        for _ in range(steps):
            t.step = step
            loss, _ = t.train_step(data[step], epoch)
            losses.append(float(loss.detach()))
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
        t.balancer.end_epoch(epoch)
    return losses, params, metrics


def compare(epochs, steps, ref_settings=None, seed=0, **settings):
    torch.manual_seed(seed)
    t = trainer(**settings)
    data = [as_batch(b) for b in make_batches(7, BATCH, epochs * steps, CLASSES)]
    ref = copy.deepcopy(t.model)
    want_losses, want_params, want_k, want_traces = ref_train(ref, data, epochs, steps,
                                                              **(ref_settings or {}))
    got_losses, got_params, metrics = our_train(t, data, epochs, steps)
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=1e-6)
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL, msg=name)
    assert t.balancer.history == pytest.approx(want_traces, rel=1e-5)
    got_k = [metrics[e * steps]["inforeg_k"] for e in range(epochs)]
    assert got_k == pytest.approx(want_k, rel=1e-5, abs=1e-6)
    return metrics, want_k


def test_steps_equal_the_released_step_in_the_window():
    # released defaults: k = 1 (epoch 0), 1 (epoch 1), then T1 / (T0 + T1): all in the window
    metrics, ks = compare(3, 3)
    assert all(k > 0.05 for k in ks)
    betas = [m["inforeg_beta_audio"] + m["inforeg_beta_visual"] for m in metrics]
    assert all(b > 0 for b in betas)  # someone led at every step and was pulled back
    assert any(m["inforeg_beta_audio"] > 0 for m in metrics)  # audio knows the label


def test_the_window_closes_and_opens_as_released():
    # window 2: k = (T_{e-1} - T_{e-3}) / (T_{e-1} + T_{e-2}), below 0.3 in some epochs
    threshold, window = 0.3, 2
    metrics, ks = compare(5, 2, {"threshold": threshold, "window": window},
                          inforeg_threshold=threshold, inforeg_window=window)
    assert any(k <= threshold for k in ks) and any(k > threshold for k in ks[1:]), ks
    for e, k in enumerate(ks):
        for m in metrics[2 * e:2 * e + 2]:
            pulled = m["inforeg_beta_audio"] + m["inforeg_beta_visual"] > 0
            assert pulled == (k > threshold), (e, k, m)


def test_other_constants_reach_the_step():
    metrics, _ = compare(2, 2, {"c_audio": 2.0, "c_visual": 0.5},
                         inforeg_beta_audio=2.0, inforeg_beta_other=0.5)
    leads = [m for m in metrics if m["inforeg_beta_audio"] > 0]
    assert leads and all(m["inforeg_beta_audio"] > 2.0 for m in leads)  # 2 * exp(tanh(gap))


# --- what the method refuses ----------------------------------------------------------------------


def test_a_trace_modality_the_model_lacks_is_one_line():
    with pytest.raises(UserError, match="--inforeg-trace-modality text is not a modality"):
        trainer(inforeg_trace_modality="text")


def test_the_visual_trace_drives_k_when_asked():
    torch.manual_seed(0)
    t = trainer(inforeg_trace_modality="visual")
    assert t.balancer.traced == [m.weight for m in t.model.encoders["visual"].modules()
                                 if isinstance(m, nn.Conv2d)]
    data = [as_batch(b) for b in make_batches(7, BATCH, 2, CLASSES)]
    our_train(t, data, 1, 2)
    assert t.balancer.history[0] > 0


def test_state_round_trips():
    torch.manual_seed(0)
    t = trainer()
    data = [as_batch(b) for b in make_batches(7, BATCH, 4, CLASSES)]
    our_train(t, data, 2, 2)
    fresh = trainer()
    fresh.balancer.load_state_dict(t.balancer.state_dict())
    assert fresh.balancer.history == t.balancer.history and len(t.balancer.history) == 2
    assert inforeg_rate(fresh.balancer.history) == inforeg_rate(t.balancer.history)
    assert F.mse_loss(fresh.balancer.trace, t.balancer.trace) == 0
