"""Re-learning against the released code (differential), its rule by hand, DDP, resume and CLI.

The reference is written from code/ours.py of github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024
(025085e): the initial weights saved right after the model is built (lines 345-349),
`train_epoch` (172-213: CE mean, backward, step), after each epoch the schedule (418-427:
`epoch % reinit_epoch == 0 and epoch > 0`, a counter up to reinit_num), `get_feature` (300-324:
eval mode, no grad, the encoder features), `reinit_score` (99-135: MinMaxScaler(-1, 1),
KMeans(n_clusters, random_state=0), `purity_score` 63-95 with its label remapping and
histogram vote, tanh(move_lambda * |gap|)) and `reinit` (139-169: every encoder parameter,
w * init + (1 - w) * current). The clustering is sklearn's in the reference and in ours
(`--relearning-kmeans sklearn`); the torch k-means is checked against sklearn separately. The
network is a copy of avtrain's tiny model: the method, not the encoder, is under test.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from released import (
    as_batch,
    assert_fit_refused,
    make_batches,
    step_trainer,
)

from avtrain.balance import kmeans, minmax_scale, purity, relearning_weight
from avtrain.balance.base import EpochContext

CLASSES, BATCH = 3, 6
STEPS = ((0, 2), (1, 1), (2, 2), (3, 1))  # (epoch, steps)
EVERY, TIMES, LAM, N_INIT = 1, 2, 3.0, 4  # re-initialise after epochs 1 and 2, not after 3
TOL = {"rtol": 1e-6, "atol": 1e-6}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def split_data(split: str):
    """The whole `train` / `val` split for the diagnosis: fixed batches, keys in order."""
    seed, n = (40, 3) if split == "train" else (41, 2)
    return make_batches(seed, BATCH, n, CLASSES)


# --- the reference ------------------------------------------------------------------------------


def ref_purity(y_true, y_pred):  # purity_score, lines 63-95
    y_voted = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    for k in range(labels.shape[0]):
        y_true[y_true == labels[k]] = np.arange(labels.shape[0])[k]
    labels = np.unique(y_true)
    bins = np.concatenate((labels, [np.max(labels) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        y_voted[y_pred == cluster] = np.argmax(hist)
    return float(np.mean(y_true == y_voted))


def ref_features(model, split):  # get_feature, lines 300-324
    model.eval()
    feats, labels = {"audio": [], "visual": []}, []
    with torch.no_grad():
        for audio, visual, y in split_data(split):
            f = model.features({"audio": audio, "visual": visual})
            for m in feats:
                feats[m].append(f[m].data.cpu())
            labels.append(y)
    return {m: torch.cat(v) for m, v in feats.items()}, torch.cat(labels)


def ref_weights(model):  # reinit_score, lines 99-135
    from sklearn import preprocessing
    from sklearn.cluster import KMeans

    (train, y_train), (val, y_val) = ref_features(model, "train"), ref_features(model, "val")
    weights, purities = {}, {}
    for m in ("audio", "visual"):
        p = []
        for fea, y in ((train[m], y_train), (val[m], y_val)):
            result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(fea)
            y_pred = KMeans(n_clusters=CLASSES, random_state=0, n_init=N_INIT).fit_predict(result)
            p.append(ref_purity(np.array(y), y_pred))
        weights[m] = torch.tanh(torch.tensor(LAM * np.abs(p[0] - p[1])))
        purities[m] = p
    return weights, purities


def ref_reinit(model, checkpoint, weights):  # reinit, lines 139-169
    for name, param in model.named_parameters():
        for m in ("audio", "visual"):
            if f"encoders.{m}." in name:
                param.data = weights[m] * checkpoint[name] + (1 - weights[m]) * param.data


def ref_train(model, data):
    checkpoint = copy.deepcopy(model.state_dict())  # init_para.pkl
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    params, diagnoses, step, flag = [], [], 0, 0
    for epoch, steps in STEPS:
        model.train()
        for _ in range(steps):
            audio, visual, label = data[step]
            optimizer.zero_grad()
            out = model({"audio": audio, "visual": visual})["fused"]
            criterion(out, label).backward()
            optimizer.step()
            params.append({k: p.detach().clone() for k, p in model.named_parameters()})
            step += 1
        if epoch % EVERY == 0 and epoch > 0:
            flag += 1
            if flag <= TIMES:
                weights, purities = ref_weights(model)
                ref_reinit(model, checkpoint, weights)
                diagnoses.append((weights, purities))
    return params, diagnoses


# --- ours ---------------------------------------------------------------------------------------


def trainer(bn=True, kmeans_backend="sklearn"):
    return step_trainer("relearning", "concat", CLASSES, bn=bn, optimizer="sgd", lr=0.05,
                        relearning_every=EVERY, relearning_times=TIMES, relearning_lambda=LAM,
                        relearning_kmeans=kmeans_backend, relearning_n_init=N_INIT)


def keyed(split, part=slice(None)):
    out = []
    for b, item in enumerate(split_data(split)):
        batch = as_batch(item)
        batch["key"] = [f"{split}{b:02d}{i:02d}" for i in range(BATCH)]
        out.append({k: v[part] for k, v in batch.items()})
    return out


def epoch_context(t, epoch, part=slice(None)):
    return EpochContext(net=t.net, model=t.model, epoch=epoch, batches=lambda n: iter(()),
                        eval_batches=lambda split: iter(keyed(split, part)), val_split="val")


def our_train(t, data, part=slice(None)):
    params, metrics, step = [], [], 0
    for epoch, steps in STEPS:
        t.balancer.start_epoch(epoch_context(t, epoch, part))
        t.model.train()
        for _ in range(steps):
            t.step = step
            t.train_step(as_batch(data[step], part), epoch)
            metrics.append({k: float(v) for k, v in t.balancer.step_metrics().items()})
            params.append({k: p.detach().clone() for k, p in t.model.named_parameters()})
            step += 1
    return params, metrics


def test_rule_by_hand():
    # purity: clusters {0,0,1 | 2,2 | 1}: majorities 2 + 2 + 1 of 6
    y = torch.tensor([0, 0, 1, 2, 2, 1])
    c = torch.tensor([5, 5, 5, 7, 7, 9])
    assert float(purity(y, c)) == pytest.approx(5 / 6)
    assert float(purity(y, torch.zeros(6, dtype=torch.long))) == pytest.approx(2 / 6)
    assert float(relearning_weight(0.9, 0.6, 3.0)) == pytest.approx(np.tanh(0.9))
    assert float(relearning_weight(0.5, 0.7, 3.0)) == pytest.approx(np.tanh(0.6))
    assert float(relearning_weight(0.5, 0.5, 3.0)) == 0.0
    # min-max to [-1, 1] per column; a constant column maps to -1 (sklearn)
    x = torch.tensor([[0.0, 2.0, 4.0], [10.0, 2.0, 2.0], [5.0, 2.0, 3.0]])
    assert minmax_scale(x).tolist() == [[-1.0, -1.0, 1.0], [1.0, -1.0, -1.0], [0.0, -1.0, 0.0]]


def test_soft_reinit_by_hand():
    torch.manual_seed(0)
    t = trainer()
    b = t.balancer
    enc = t.model.encoders["audio"]
    init = [p.detach().clone() for p in enc.parameters()]
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    other = [p.detach().clone() for p in t.model.encoders["visual"].parameters()]
    b.reinit(t.model, {"audio": 0.25, "visual": 0.0})
    for p, p0 in zip(enc.parameters(), init):
        torch.testing.assert_close(p, 0.25 * p0 + 0.75 * (p0 + 1.0))
    for p, p0 in zip(t.model.encoders["visual"].parameters(), other):
        assert torch.equal(p, p0)


def test_schedule_is_the_released_one():
    torch.manual_seed(0)
    b = step_trainer("relearning", "concat", CLASSES).balancer  # defaults 20, 3
    assert [e for e in range(100) if b.due(e)] == [21, 41, 61]  # after epochs 20, 40, 60


def test_torch_kmeans_finds_what_sklearn_finds():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 6
    x = minmax_scale(torch.randn(6, 20, generator=g)[y] * 4 + torch.randn(240, 20, generator=g))
    ours = kmeans(x, 6, n_init=10, generator=torch.Generator().manual_seed(3))
    theirs = torch.as_tensor(KMeans(6, random_state=0, n_init=10).fit_predict(x.numpy()))
    pairs = set(zip(ours.tolist(), theirs.tolist()))
    assert len(pairs) == 6  # the same partition, up to the cluster names
    assert float(purity(y, ours)) == 1.0
    again = kmeans(x, 6, n_init=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, again)


def test_torch_kmeans_by_hand():
    x = torch.tensor([[0.0], [0.2], [10.0], [10.4], [20.0], [20.2]])
    labels = kmeans(x, 3, n_init=1, generator=torch.Generator().manual_seed(0))
    assert labels[0] == labels[1] and labels[2] == labels[3] and labels[4] == labels[5]
    assert len(set(labels.tolist())) == 3


def test_epochs_and_steps_equal_the_released_ones():
    torch.manual_seed(0)
    t = trainer()
    ref = copy.deepcopy(t.model)
    data = make_batches(7, BATCH, sum(n for _, n in STEPS), CLASSES)
    want_params, diagnoses = ref_train(ref, data)
    got_params, metrics = our_train(t, data)
    assert len(diagnoses) == TIMES
    for got, want in zip(got_params, want_params):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **TOL)
    # the log shows each diagnosis from the epoch it opens: steps 3 (epoch 2) and 5 (epoch 3)
    assert metrics[0] == {"relearn_weight_audio": 0.0, "relearn_weight_visual": 0.0}
    for index, (weights, purities) in zip((3, 5), diagnoses):
        for m in ("audio", "visual"):
            assert metrics[index][f"relearn_weight_{m}"] == pytest.approx(float(weights[m]))
            assert metrics[index][f"purity_train_{m}"] == pytest.approx(purities[m][0])
            assert metrics[index][f"purity_val_{m}"] == pytest.approx(purities[m][1])
    assert any(0 < float(w[m]) < 1 for w, _ in diagnoses for m in w)  # it really re-learnt
    assert t.balancer.initial is None and t.balancer.reinits == TIMES  # done: weights dropped


def test_state_restores_the_initial_weights():
    torch.manual_seed(0)
    a = trainer()
    torch.manual_seed(1)
    b = trainer()  # other initial weights
    b.balancer.load_state_dict(a.balancer.state_dict())
    for m in ("audio", "visual"):
        for x, y in zip(a.balancer.initial[m], b.balancer.initial[m]):
            assert torch.equal(x, y)


# --- the real trainer ---------------------------------------------------------------------------


@pytest.mark.parametrize("settings,words", [
    ({"relearning_lambda": "inf"}, "--relearning-lambda must be a finite number, got inf"),
])
def test_bad_input_is_one_error_line(method_shards, tmp_path, settings, words):
    """Its own rows; those of every method are test_contract.py's."""
    assert_fit_refused(method_shards, tmp_path / "run", "relearning", settings, words)


def test_too_few_samples_to_cluster_is_refused():
    from avprep.errors import UserError
    from avtrain.balance import build_balancer
    from avtrain.models import build_model

    model = build_model("tiny", "concat", 6)
    with pytest.raises(UserError, match="needs at least that many samples"):
        build_balancer("relearning", model, {"num_classes": 6,
                                             "split_samples": {"train": 60, "val": 4}})
