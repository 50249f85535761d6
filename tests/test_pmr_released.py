"""PMR against the released code (differential), its rule by hand, DDP, resume and the CLI.

The reference is written from main_Prototype_grad.py of github.com/fanyunfeng-bit/
Modal-Imbalance-PMR (3615e48): `calculate_prototype` (lines 383-441: eval mode, no grad, per-sample
class sums over the first batches, divided by the counts, momentum when its `epoch` argument is
above 0, called before epoch 0 with 0 and after epoch e with e), `train_epoch` (91-271: the loop
`EU_dist`, scores as a Python sum of softmax entries, the if/elif on the ratio, CE mean,
`loss.backward()`, `optimizer.step()`). The network itself is a copy of avtrain's tiny model (its
`features` and `fusion`): the method, not the encoder, is under test.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from released import (
    as_batch,
    make_batches,
    step_trainer,
)

from avtrain.balance import pmr_coefficients
from avtrain.balance.base import EpochContext

CLASSES, BATCH = 3, 6
STEPS = ((0, 2), (1, 1), (2, 2))  # (epoch, steps); epoch 0 outside the window, epoch 2 momentum
WINDOW = (1, 2)
ALPHA, MOMENTUM, PROTO_BATCHES = 2.0, 0.5, 2
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def proto_data(epoch: int, n: int = BATCH):
    """PROTO_BATCHES batches for the prototypes of `epoch`, every class present."""
    batches = make_batches(100 + epoch, n, PROTO_BATCHES, CLASSES)
    out = []
    for audio, visual, _ in batches:
        y = torch.arange(n) % CLASSES
        audio[:, 0, 0, :CLASSES] += 2 * nn.functional.one_hot(y, CLASSES)
        out.append((audio, visual, y))
    return out


# --- the reference ------------------------------------------------------------------------------


def eu_dist(x1, x2):  # main_Prototype_grad.py lines 69-75
    d = torch.zeros(x1.shape[0], x2.shape[0])
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            d[i, j] = torch.sqrt(torch.dot(x1[i] - x2[j], x1[i] - x2[j]))
    return d


def ref_prototypes(model, batches, epoch, old):  # lines 383-441
    protos = [torch.zeros(CLASSES, model.encoders[m].out_dim) for m in ("audio", "visual")]
    count = [0] * CLASSES
    model.eval()
    with torch.no_grad():
        for audio, visual, label in batches:
            f = model.features({"audio": audio, "visual": visual})
            for c, lab in enumerate(label):
                count[lab] += 1
                protos[0][lab] += f["audio"][c]
                protos[1][lab] += f["visual"][c]
    for c in range(CLASSES):
        protos[0][c] /= count[c]
        protos[1][c] /= count[c]
    if epoch > 0:
        protos = [(1 - MOMENTUM) * p + MOMENTUM * o for p, o in zip(protos, old)]
    return protos


def ref_train(model, data):
    criterion, softmax = nn.CrossEntropyLoss(), nn.Softmax(dim=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    protos = ref_prototypes(model, proto_data(0), 0, None)  # before the first epoch (line 539)
    coeffs, params, step = [], [], 0
    for epoch, steps in STEPS:
        if epoch > 0:  # after epoch e: calculate_prototype(..., epoch=e) (line 557)
            protos = ref_prototypes(model, proto_data(epoch), epoch - 1, protos)
        model.train()
        for _ in range(steps):
            audio, visual, label = data[step]
            optimizer.zero_grad()
            f = model.features({"audio": audio, "visual": visual})
            a, v, out = f["audio"], f["visual"], model.fusion(f)
            audio_sim, visual_sim = -eu_dist(a, protos[0]), -eu_dist(v, protos[1])
            if WINDOW[0] <= epoch <= WINDOW[1]:
                score_a_p = sum([softmax(audio_sim)[i][label[i]] for i in range(len(label))])
                score_v_p = sum([softmax(visual_sim)[i][label[i]] for i in range(len(label))])
                ratio_a_p = score_a_p / score_v_p
                if ratio_a_p > 1:
                    beta, lam = 0, ALPHA
                elif ratio_a_p < 1:
                    beta, lam = ALPHA, 0
                else:
                    beta, lam = 0, 0
                loss = (criterion(out, label) + beta * criterion(audio_sim, label)
                        + lam * criterion(visual_sim, label))
                coeffs.append([float(beta), float(lam)])
            else:
                loss = criterion(out, label)
                coeffs.append([0.0, 0.0])
            loss.backward()
            optimizer.step()
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
    return coeffs, params


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True):
    return step_trainer("pmr", "concat", CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        alpha=ALPHA, modulation_start=WINDOW[0], modulation_end=WINDOW[1],
                        pmr_momentum=MOMENTUM, pmr_proto_batches=PROTO_BATCHES)


def epoch_context(t, epoch, part=slice(None)):
    def batches(n):
        return iter([as_batch(item, part) for item in proto_data(epoch)[:n]])
    return EpochContext(net=t.net, model=t.model, epoch=epoch, batches=batches)


def our_train(t, data, part=slice(None)):
    coeffs, params, metrics, step = [], [], [], 0
    for epoch, steps in STEPS:
        t.balancer.start_epoch(epoch_context(t, epoch, part))
        t.model.train()
        for _ in range(steps):
            t.step = step
            t.train_step(as_batch(data[step], part), epoch)
            m = {k: float(v) for k, v in t.balancer.step_metrics().items()}
            coeffs.append([m["pce_coeff_audio"], m["pce_coeff_visual"]])
            metrics.append(m)
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return coeffs, params, metrics


def test_coefficients_by_hand():
    # scores (audio, visual) = (3, 2): audio's prototypes fit better -> visual gets alpha
    assert pmr_coefficients(torch.tensor([3.0, 2.0]), 2.0).tolist() == [0.0, 2.0]
    assert pmr_coefficients(torch.tensor([1.0, 2.0]), 0.5).tolist() == [0.5, 0.0]
    assert pmr_coefficients(torch.tensor([2.0, 2.0]), 2.0).tolist() == [0.0, 0.0]  # tie


def test_prototype_logits_by_hand():
    from avtrain.balance import prototype_logits

    f = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    p = torch.tensor([[0.0, 0.0], [0.0, 4.0]])
    assert prototype_logits(f, p).tolist() == [[0.0, -4.0], [-5.0, -3.0]]


def test_steps_equal_the_released_step():
    torch.manual_seed(0)
    t = trainer()
    ref = copy.deepcopy(t.model)
    for enc in ref.encoders.values():
        enc._forward_hooks.clear()  # the copy must not feed our balancer
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    want_coeffs, want_params = ref_train(ref, data)
    got_coeffs, got_params, _ = our_train(t, data)
    assert got_coeffs == want_coeffs
    assert any(c != [0.0, 0.0] for c in got_coeffs[2:])  # the prototype CE really acted
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)


def test_more_than_two_modalities_is_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "sum", 3, ["audio", "visual", "text"])
    with pytest.raises(UserError, match="defined for two modalities"):
        build_balancer("pmr", model, {}, modalities=model.modalities)
