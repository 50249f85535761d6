"""Linear probe: how much each frozen encoder learned, independent of the trained fusion.

Features of the train, val and test splits are extracted once with eval transforms; for each
modality (and for both modalities concatenated, "fused") a softmax classifier is fitted on
standardised train features with full-batch L-BFGS, its L2 strength chosen on val, and its
test accuracy reported. The gap between a modality's probe after joint training and after
training that modality alone is the imbalance the balancing methods try to close.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed as D
from .checkpoint import bare_model
from .data import ShardSet, eval_loader
from .decode import DataOptions, to_device

L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
PROBE_MAX_TRAIN = 30_000  # train samples the probe is fitted on at most (seeded subset)


@torch.no_grad()
def extract_features(model, shards: ShardSet, split: str, opts: DataOptions, *,
                     batch_size: int, ctx: D.Context | None = None, workers: int = 2,
                     amp: bool = True, limit: int | None = None
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """{modality: [N, D] float32} and labels [N] of one split, gathered on rank 0 (other ranks
    get (None, None)). `limit`: only the first ~limit samples (limit / world per rank, in the
    eval loader's fixed order): a fixed subset, for the cheap per-epoch probe."""
    ctx = ctx or D.Context()
    bare = bare_model(model)
    was_training = bare.training
    bare.eval()
    feats: dict[str, list] = {}
    labels, keys = [], []
    loader = eval_loader(shards, split, opts, batch_size=batch_size, rank=ctx.rank,
                         world=ctx.world, workers=workers, device_type=ctx.device.type)
    per_rank = None if limit is None else -(-limit // ctx.world)
    for batch in loader:
        if per_rank is not None and len(keys) >= per_rank:
            break
        batch = to_device(batch, ctx.device, opts)
        ctxm = (torch.autocast("cuda", dtype=torch.bfloat16)
                if ctx.device.type == "cuda" and amp else torch.autocast("cpu", enabled=False))
        with ctxm:
            out = bare.features(batch)
        for m, f in out.items():
            feats.setdefault(m, []).append(f.float().cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
        keys.extend(batch["key"])
    if was_training:
        bare.train()
    local = {"keys": keys, "labels": np.concatenate(labels) if labels else np.zeros(0, int),
             "feats": {m: np.concatenate(v) for m, v in feats.items()}}
    gathered = D.gather_objects_to_main(local, ctx)
    if gathered is None:
        return None, None
    parts = [p for p in gathered if len(p["keys"])]
    order_keys = [k for p in parts for k in p["keys"]]
    order = np.argsort(np.array(order_keys))  # a fixed order whatever the reader split was
    y = np.concatenate([p["labels"] for p in parts])[order]
    x = {m: np.concatenate([p["feats"][m] for p in parts])[order] for m in bare.modalities}
    return x, y


def fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float,
                iterations: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS; returns (W, b)."""
    xt, yt = torch.from_numpy(x).double(), torch.from_numpy(y).long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _acc(x: np.ndarray, y: np.ndarray, wb) -> float:
    w, b = wb
    pred = (torch.from_numpy(x).double() @ w + b).argmax(dim=1).numpy()
    return float((pred == y).mean())


def probe_features(train, val, test, num_classes: int) -> dict:
    """Fit on train, pick L2 on val, report val/test accuracy. Each arg is (x, y)."""
    (xtr, ytr), (xva, yva), (xte, yte) = train, val, test
    mean, std = xtr.mean(axis=0), xtr.std(axis=0) + 1e-6
    xtr, xva, xte = ((x - mean) / std for x in (xtr, xva, xte))
    best = None
    for l2 in L2_GRID:
        wb = fit_softmax(xtr, ytr, num_classes, l2)
        score = _acc(xva, yva, wb)
        if best is None or score > best[0]:
            best = (score, l2, wb)
    score, l2, wb = best
    return {"val_acc": score, "test_acc": _acc(xte, yte, wb), "train_acc": _acc(xtr, ytr, wb),
            "l2": l2}


def subsample(x: dict[str, np.ndarray], y: np.ndarray, limit: int | None, seed: int
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """At most `limit` samples, drawn without replacement in a seeded, fixed order: a probe on
    a few tens of thousands of samples ranks encoders as well as one on a million."""
    if limit is None or len(y) <= limit:
        return x, y
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=limit, replace=False))
    return {m: v[keep] for m, v in x.items()}, y[keep]


def linear_probe(model, shards: ShardSet, opts: DataOptions, *, batch_size: int = 64,
                 ctx: D.Context | None = None, workers: int = 2, amp: bool = True,
                 train_split: str = "train", val_split: str = "val", test_split: str = "test",
                 seed: int = 0, max_train: int | None = PROBE_MAX_TRAIN,
                 limit: int | None = None) -> dict:
    """{modality: {"test_acc", "val_acc", "train_acc", "l2"}, "fused": ..., "chance": 1/C,
    "train_samples": n}. Features are gathered and the probes fitted on rank 0 only; every
    rank returns rank 0's result. `limit`: features of a fixed subset of each split only."""
    ctx = ctx or D.Context()
    torch.manual_seed(seed)
    splits = {}
    for name in (train_split, val_split, test_split):
        shards.require(name)
        splits[name] = extract_features(model, shards, name, opts, batch_size=batch_size,
                                        ctx=ctx, workers=workers, amp=amp, limit=limit)
    result: dict | None = None
    if ctx.main:
        splits[train_split] = subsample(*splits[train_split], max_train, seed)
        modalities = list(splits[train_split][0])
        result = {}
        views = {m: (lambda feats, m=m: feats[m]) for m in modalities}
        if len(modalities) > 1:
            views["fused"] = lambda feats: np.concatenate([feats[m] for m in modalities], axis=1)
        for name, view in views.items():
            result[name] = probe_features(
                *[(view(splits[s][0]), splits[s][1]) for s in (train_split, val_split,
                                                                test_split)],
                shards.num_classes)
        result["chance"] = 1.0 / shards.num_classes
        result["train_samples"] = int(len(splits[train_split][1]))
    return D.broadcast_object(result, ctx)
