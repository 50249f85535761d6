"""Diagnosing & Re-learning: soft re-initialisation of each encoder from its learning state.

Paper: Y. Wei, S. Li, R. Feng, D. Hu, "Diagnosing and Re-learning for Balanced Multimodal
Learning", ECCV 2024. Released code: github.com/GeWu-Lab/Diagnosing_Relearning_ECCV2024
(commit 025085e), code/ours.py: argparse defaults (lines 53-56: move_lambda 3, reinit_epoch 20,
reinit_num 3), `purity_score` (63-95), `reinit_score` (99-135), `reinit` (139-169),
`train_epoch` (172-213: plain CE, the baseline's step), `get_feature` (300-324), the schedule in
`main` (345-349 the initial weights, 378-427 the loop); code/script/ours.sh (the CREMA-D run:
90 epochs, the same three values); code/dataset/av_dataset.py (lines 35-42, 85-109: the
`my_train` and `val` splits both read without augmentation). BalanceMM's re-implementation:
GeWu-Lab/BalanceBenchmark (commit 4c1482f) balancemm/trainer/ReLearning_trainer.py
(`get_feature` 67-88, `reinit_score` 90-119, `reinit` 122-134, the schedule 179-201) and
configs/trainer_config.yaml (ReLearning block, lines 96-102). No code is copied;
tests/test_relearning_released.py checks our epochs and steps against a reference written from
the released semantics.

Level: start_epoch. The step is the baseline's (CE on the fused logits, one backward, one
step). Between epochs:

- schedule (released lines 418-420): after training epoch e (0-based) with e > 0 and
  e % reinit_epoch == 0, for the first reinit_num such epochs -- with the defaults after
  epochs 20, 40 and 60. The released code does it after that epoch's evaluation, so here it
  is the start of epoch e + 1 (`start_epoch`), which is the same model and the same moment;
- diagnosis (released `get_feature`, `reinit_score`): the model in eval mode, without grad,
  encodes every sample of the training split and of the val split (no augmentation: the
  released loaders read `my_train` and `val`, and av_dataset.py augments only mode
  'train'); for each modality m and each of the two feature sets, every feature column is
  scaled to [-1, 1] (sklearn MinMaxScaler(feature_range=(-1, 1)); a constant column maps to
  -1), k-means with k = the number of classes clusters the features, and the purity
  P = sum over clusters of the count of its most frequent label / N measures how well the
  encoder separates the classes;
- strength (released lines 122-127): w_m = tanh(lambda * |P_m(train) - P_m(val)|), lambda =
  move_lambda: an encoder whose training representation separates the classes much better than
  the held-out one is over-fitting (well-learnt) and is pulled back more;
- soft re-initialisation (released `reinit`): every parameter theta of modality m's encoder
  (released: every name containing audio_net / visual_net -- convolutions and BatchNorm
  affine parameters; not the buffers, not the heads) becomes
  theta <- w_m * theta_init + (1 - w_m) * theta, with theta_init the weights the model had
  before training (released: init_para.pkl, saved right after the model is built). The
  optimizer state (momentum) is left as it is, as released.

Options: `--relearning-lambda` (3), `--relearning-every` (20), `--relearning-times` (3), as
released and in its ours.sh; `--relearning-kmeans` (torch | sklearn) and `--relearning-n-init`
(10). BalanceMM's config: reinit_epoch 15, reinit_num 2, lambda 3.

Clustering (the one part we re-implement): the released code calls sklearn's
KMeans(n_clusters, random_state=0), whose defaults are k-means++ seeding (greedy, 2 + ln k
local trials), Lloyd iterations (max_iter 300, tol 1e-4 times the mean feature variance,
stopping when the labels no longer change or the centres move less than that), the data
centred first, and the best of n_init runs by inertia. `--relearning-kmeans torch` (default)
is that algorithm written in torch: it runs on the training device, its random draws come from
a generator seeded by (--seed, epoch), so every run, resume and rank draws the same; it cannot
draw sklearn's numbers (numpy's MT19937 with random_state=0), so its clusters can differ from
sklearn's where k-means has several local optima. `--relearning-kmeans sklearn` calls
sklearn.cluster.KMeans(random_state=0) itself, as released (scikit-learn is not one of our
dependencies; it is importable where librosa pulled it in, else that choice is an error).
n_init: the released code passes none, so it gets its sklearn's default: 10 before sklearn 1.4
(the versions the authors' Python could run; we infer this, the repository pins nothing),
'auto' = 1 run for k-means++ from 1.4 on. We default to 10 and pass it explicitly to sklearn.

DDP: every rank encodes its part of each split (every sample exactly once across ranks); the
features, labels and sample keys are gathered on rank 0 and put in key order, so the clustering
sees the same data in the same order whatever the number of processes (N processes = one);
rank 0 computes the weights and broadcasts them, and every rank applies the same convex
combination to its identical parameters, so the replicas stay equal. Before encoding, the
encoders' BatchNorm statistics are broadcast from rank 0 (eval mode reads them).

State for --resume: the initial encoder weights (until the last re-initialisation is done;
then they are dropped, from memory and from the checkpoint), the number of
re-initialisations done and the last diagnosis (for the log). The schedule is a function of
the epoch, so a resumed run re-initialises exactly where the uninterrupted one does.

Signal (`step_metrics`, constant between diagnoses): relearn_weight_<m> (0 before the first),
and once diagnosed purity_train_<m>, purity_val_<m>.

Where we differ from the released code, and why:

- the clustering's random draws (above): seeded by (seed, epoch) instead of numpy's global
  random_state=0, needed for identical ranks and exact resume on the device; or sklearn;
- the released `get_feature` reads the training split in its shuffled loader order; we cluster
  in sample-key order (k-means++ seeding depends on the order; a fixed order makes N processes
  equal one);
- any number of modalities: the rule is per modality (BalanceMM loops over its modalities; the
  authors' code has audio and visual);
- the val split here is also the split that picks the best epoch (the released code picks on
  test and diagnoses on val); the method needs held-out data by definition;
- the features are computed under the loop's autocast (bf16 on CUDA with --amp, as our
  training forward; the released code runs fp32 throughout);
- a protocol note, not a method difference: the released ours.py also *trains* on `my_train`
  without augmentation (av_dataset.py augments only mode 'train'); our training keeps the
  run's train transforms, the diagnosis reads both splits without augmentation as released;
- empty k-means clusters are refilled with the farthest points in descending distance order
  (sklearn: the same points, in argpartition's order).

BalanceMM deviates from the authors: reinit_epoch 15 and reinit_num 2; it re-initialises
every parameter whose name contains a modality's name; it diagnoses on its training loader
(augmented, shuffled, under DDP each rank only its own shard, without gathering); and it
re-initialises before that epoch's validation rather than after it.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import finite, number, require_two_modalities
from .base import Balancer, EpochContext

KMEANS = ("torch", "sklearn")


# --- the diagnosis, reusable on its own ----------------------------------------------------------


def minmax_scale(x: torch.Tensor) -> torch.Tensor:
    """Every column of [N, D] scaled to [-1, 1]: sklearn MinMaxScaler(feature_range=(-1, 1))
    fit_transform, its formula (x * scale + min) and its handling of (near-)constant columns
    (a range below 10 eps counts as 1)."""
    lo, hi = x.min(dim=0).values, x.max(dim=0).values
    span = hi - lo
    span = torch.where(span < 10 * torch.finfo(x.dtype).eps, torch.ones_like(span), span)
    scale = 2.0 / span
    return x * scale + (-1.0 - lo * scale)


def purity(labels: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Sum over clusters of the count of its most frequent label, over N (released
    `purity_score`: each cluster votes its majority label, then the accuracy of those votes).
    0-d float64."""
    labels, clusters = labels.long().flatten(), clusters.long().flatten()
    _, labels = torch.unique(labels, return_inverse=True)
    _, clusters = torch.unique(clusters, return_inverse=True)
    n_labels = int(labels.max()) + 1
    n_clusters = int(clusters.max()) + 1
    counts = torch.bincount(clusters * n_labels + labels, minlength=n_clusters * n_labels)
    majority = counts.view(n_clusters, n_labels).max(dim=1).values.sum()
    return majority.double() / labels.numel()


def relearning_weight(train_purity, val_purity, lam: float) -> torch.Tensor:
    """Re-initialisation strength w = tanh(lambda * |P_train - P_val|) (released 122-127)."""
    gap = (torch.as_tensor(train_purity, dtype=torch.float64)
           - torch.as_tensor(val_purity, dtype=torch.float64)).abs()
    return torch.tanh(lam * gap)


def _sq_distances(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, K] as sklearn's: ||x||^2 - 2 x.c + ||c||^2, >= 0."""
    d = x_sq[:, None] - 2.0 * (x @ centers.T) + (centers * centers).sum(dim=1)[None, :]
    return d.clamp_min_(0)


def _kmeans_plusplus(x, x_sq, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (sklearn `_kmeans_plusplus`): the first centre uniformly, then
    2 + int(ln k) candidates drawn with probability proportional to the current squared
    distance, keeping the one that lowers the potential most."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=generator))
    centers = [x[first]]
    closest = _sq_distances(x[first:first + 1], x_sq[first:first + 1], x).squeeze(0)
    pot = closest.double().sum()
    for _ in range(1, k):
        u = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device)
        cumulative = torch.cumsum(closest.double(), dim=0)
        ids = torch.searchsorted(cumulative, u * pot).clamp_(max=n - 1)
        cand = _sq_distances(x[ids], x_sq[ids], x)  # [trials, N]
        cand = torch.minimum(cand, closest[None, :])
        pots = cand.double().sum(dim=1)
        best = int(pots.argmin())
        pot, closest = pots[best], cand[best]
        centers.append(x[ids[best]])
    return torch.stack(centers)


def _lloyd(x, x_sq, centers, k: int, max_iter: int, tol: float):
    """Lloyd iterations as sklearn's `_kmeans_single_lloyd` -> (labels, inertia)."""
    labels_old = None
    strict = False
    for _ in range(max_iter):
        labels = _sq_distances(x, x_sq, centers).argmin(dim=1)
        onehot = F.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(dim=0)
        sums = onehot.T @ x
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:  # sklearn `_relocate_empty_clusters_dense`: the farthest points
            far = ((x - centers[labels]) ** 2).sum(dim=1)
            order = torch.sort(far, descending=True, stable=True).indices[:len(empty)]
            for j, i in zip(empty, order.tolist()):
                old = int(labels[i])
                sums[old] -= x[i]
                counts[old] -= 1
                sums[j] = x[i]
                counts[j] = 1
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if labels_old is not None and torch.equal(labels, labels_old):
            strict = True
            break
        if shift <= tol:
            break
        labels_old = labels
    if not strict:
        labels = _sq_distances(x, x_sq, centers).argmin(dim=1)
    inertia = float(((x - centers[labels]) ** 2).sum())
    return labels, inertia


def kmeans(x: torch.Tensor, k: int, *, n_init: int, max_iter: int = 300, tol: float = 1e-4,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Cluster labels [N] of x [N, D]: sklearn's KMeans(k) algorithm (k-means++, Lloyd, the best
    of n_init by inertia) in torch, its draws from `generator` (a CPU generator)."""
    if x.shape[0] < k:
        raise ValueError(f"k-means needs at least {k} samples, got {x.shape[0]}")
    generator = generator or torch.Generator().manual_seed(0)
    x = x - x.mean(dim=0)
    tol_abs = float(x.var(dim=0, unbiased=False).mean()) * tol
    x_sq = (x * x).sum(dim=1)
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        centers = _kmeans_plusplus(x, x_sq, k, generator)
        labels, inertia = _lloyd(x, x_sq, centers, k, max_iter, tol_abs)
        if best is None or inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def sklearn_kmeans(x: torch.Tensor, k: int, *, n_init: int) -> torch.Tensor:
    """The released clustering itself: sklearn KMeans(n_clusters=k, random_state=0)."""
    from sklearn.cluster import KMeans

    labels = KMeans(n_clusters=k, random_state=0, n_init=n_init).fit_predict(
        x.detach().cpu().numpy())
    return torch.as_tensor(labels, dtype=torch.long)


def diagnose(features: torch.Tensor, labels: torch.Tensor, k: int, *, backend: str,
             n_init: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Purity of one feature set [N, D] against its labels: scaled, clustered, voted."""
    scaled = minmax_scale(features.float())
    if backend == "sklearn":
        clusters = sklearn_kmeans(scaled, k, n_init=n_init)
    else:
        clusters = kmeans(scaled, k, n_init=n_init, generator=generator)
    return purity(labels.cpu(), clusters.cpu())


# --- the balancer ------------------------------------------------------------------------------


class ReLearning(Balancer):
    """Baseline step; between epochs, diagnose each encoder and pull it back to its initial
    weights by tanh(lambda * purity gap) (start_epoch)."""

    name = "relearning"
    title = "Diagnosing & Re-learning"
    paper = ("Y. Wei, S. Li, R. Feng, D. Hu: Diagnosing and Re-learning for Balanced "
             "Multimodal Learning, ECCV")
    year = 2024
    summary = "soft re-initialisation of encoders by purity gap"
    code = ("GeWu-Lab/Diagnosing_Relearning_ECCV2024 (code/ours.py, code/script/ours.sh) "
            "@ 025085e; GeWu-Lab/BalanceBenchmark (ReLearning_trainer.py, "
            "trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: k-means in torch seeded by (--seed, epoch), on the samples in key "
        "order (--relearning-kmeans sklearn: KMeans(random_state=0) as released)",
        "Authors' code: the val split also picks the best epoch (released: picks on test)",
        "Authors' code: any number of modalities; features under the run's autocast",
        "BalanceMM: every 15 epochs, 2 times; diagnoses on its augmented training loader, "
        "per rank; re-initialises every parameter named after a modality",
    )
    signals = ("relearn_weight_<m>", "purity_train_<m>", "purity_val_<m>")
    # bench --tune: lambda is the strength of the re-initialisation, every how often it happens
    # (released every 20 of 90 epochs: the range reaches down to short runs)
    options = (
        Option("lam", float, 3.0, "strength w = tanh(lambda * abs(purity(train) - purity(val))) of the soft re-initialisation", minimum=0, setting="relearning_lambda", search=Search(1.0, 10.0, log=True)),
        Option("every", int, 20, "diagnose and re-initialise after every N-th epoch (BalanceMM 15)", minimum=1, search=Search(2, 20, log=True)),
        Option("times", int, 3, "at most this many re-initialisations (BalanceMM 2)", minimum=0),
        Option("kmeans", str, "torch", "torch (sklearn's algorithm, seeded) or sklearn (KMeans, random_state=0, as released)", choices=KMEANS, released="sklearn", differs="the same Lloyd/k-means++ algorithm in torch, seeded by --seed and the epoch, so scikit-learn is not needed"),
        Option("n_init", int, 10, "k-means runs, the best inertia kept (sklearn's default before 1.4)", minimum=1),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.lam = finite("--relearning-lambda", self.opt.lam)
        self.every, self.times = self.opt.every, self.opt.times
        self.n_init = self.opt.n_init
        self.backend = self.opt.kmeans
        if self.backend == "sklearn":
            try:
                import sklearn.cluster  # noqa: F401
            except ImportError:
                raise UserError("--relearning-kmeans sklearn needs scikit-learn, which is not "
                                "installed; use --relearning-kmeans torch") from None
        self.seed = int(number(c, "seed", 0))
        bare = getattr(model, "module", model)
        encoders = getattr(bare, "encoders", None)
        if encoders is None or not hasattr(bare, "features") or any(
                m not in encoders for m in self.modalities):
            raise UserError("--method relearning needs a model with per-modality encoders")
        self.num_classes = int(c.get("num_classes") or bare.spec["num_classes"])
        for split, n in (c.get("split_samples") or {}).items():
            if n < self.num_classes:
                raise UserError(f"--method relearning clusters the {split!r} split into "
                                f"{self.num_classes} classes and needs at least that many "
                                f"samples there, got {n}")
        self.names = {m: [f"encoders.{m}.{n}" for n, _ in encoders[m].named_parameters()]
                      for m in self.modalities}
        # released: init_para.pkl, saved right after the model is built (before any step)
        self.initial: dict[str, list[torch.Tensor]] | None = (
            {m: [p.detach().clone() for p in encoders[m].parameters()] for m in self.modalities}
            if self.times > 0 else None)
        self.reinits = 0
        self.last: dict[str, float] = {f"relearn_weight_{m}": 0.0 for m in self.modalities}
        self._metrics = self._as_tensors(self.last)

    def due(self, epoch: int) -> bool:
        """Re-initialise before `epoch`: epoch - 1 just ended, is > 0, a multiple of
        --relearning-every, and among the first --relearning-times multiples."""
        done = epoch - 1
        return done > 0 and done % self.every == 0 and done // self.every <= self.times

    # -- before an epoch --

    def start_epoch(self, ctx: EpochContext) -> None:
        if not self.due(ctx.epoch):
            return
        if ctx.eval_batches is None:
            raise RuntimeError("--method relearning needs whole-split batches (eval_batches)")
        if self.initial is None:
            raise RuntimeError("relearning: the initial encoder weights are gone")
        bare = getattr(ctx.model, "module", ctx.model)
        _dist.broadcast_buffers(bare.encoders[m] for m in self.modalities)  # eval reads them
        was_training = bare.training
        bare.eval()
        train = self._encode(bare, ctx.eval_batches("train"), ctx.autocast)
        val = self._encode(bare, ctx.eval_batches(ctx.val_split), ctx.autocast)
        if was_training:
            bare.train()
        values = torch.zeros(3 * len(self.modalities), dtype=torch.float64)
        if _dist.rank() == 0:
            values = self._weights(train, val, ctx.epoch)
        if _dist.world_size() > 1:
            values = values.to(self.device)
            dist.broadcast(values, src=0)
        values = values.cpu().view(3, len(self.modalities))
        self.reinit(bare, {m: float(values[0, i]) for i, m in enumerate(self.modalities)})
        self.reinits += 1
        self.last = {}
        for i, m in enumerate(self.modalities):
            self.last[f"relearn_weight_{m}"] = float(values[0, i])
            self.last[f"purity_train_{m}"] = float(values[1, i])
            self.last[f"purity_val_{m}"] = float(values[2, i])
        self._metrics = self._as_tensors(self.last)
        if (ctx.epoch - 1) // self.every >= self.times:
            self.initial = None  # the last re-initialisation: nothing needs them any more

    @torch.no_grad()
    def _encode(self, bare, batches, autocast):
        """This rank's features, labels and keys -> all of them on rank 0, in key order."""
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels, keys = [], []
        for batch in batches:
            with autocast():
                out = bare.features(batch)
            for m in self.modalities:
                feats[m].append(out[m].float().cpu())
            labels.append(batch["label"].cpu())
            keys.extend(batch.get("key") or [f"{_dist.rank()}:{len(keys) + i}"
                                             for i in range(len(batch["label"]))])
        local = {"feats": {m: torch.cat(v) if v else torch.zeros(0) for m, v in feats.items()},
                 "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
                 "keys": keys}
        parts = [local]
        if _dist.world_size() > 1:
            parts = [None] * _dist.world_size() if _dist.rank() == 0 else None
            dist.gather_object(local, parts, dst=0)
        if _dist.rank() != 0:
            return None
        all_keys = [k for p in parts for k in p["keys"]]
        order = torch.tensor(sorted(range(len(all_keys)), key=all_keys.__getitem__),
                             dtype=torch.long)
        out = {m: torch.cat([p["feats"][m] for p in parts if len(p["keys"])])[order]
               for m in self.modalities} if len(all_keys) else {}
        y = torch.cat([p["labels"] for p in parts])[order] if len(all_keys) else None
        return out, y

    def _weights(self, train, val, epoch: int) -> torch.Tensor:
        """[w; P_train; P_val] per modality (float64), on rank 0."""
        for split, data in (("train", train), ("val", val)):
            if data[1] is None or data[1].numel() < self.num_classes:
                n = 0 if data[1] is None else data[1].numel()
                raise UserError(f"--method relearning: the {split} split gave {n} samples, "
                                f"fewer than the {self.num_classes} clusters")
        generator = torch.Generator().manual_seed(
            zlib.crc32(f"relearning:{self.seed}:{epoch}".encode()))
        rows = []
        for m in self.modalities:
            p_train, p_val = (diagnose(d[0][m].to(self.device), d[1], self.num_classes,
                                       backend=self.backend, n_init=self.n_init,
                                       generator=generator) for d in (train, val))
            rows.append(torch.stack([relearning_weight(p_train, p_val, self.lam),
                                     p_train, p_val]))
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def reinit(self, bare, weights: dict[str, float]) -> None:
        """theta <- w * theta_init + (1 - w) * theta for every parameter of each encoder."""
        for m in self.modalities:
            w = weights[m]
            params = [p.data for p in bare.encoders[m].parameters()]
            scaled_init = torch._foreach_mul(self.initial[m], w)
            torch._foreach_mul_(params, 1 - w)
            torch._foreach_add_(params, scaled_init)

    # -- log and state --

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        state = {"reinits": torch.tensor(self.reinits),
                 "last": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.last.items()}}
        if self.initial is not None:
            state["initial"] = {name: t.detach().cpu().clone()
                                for m in self.modalities
                                for name, t in zip(self.names[m], self.initial[m])}
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.reinits = int(state.get("reinits", 0))
        if "last" in state:
            self.last = {k: float(v) for k, v in state["last"].items()}
            self._metrics = self._as_tensors(self.last)
        if "initial" in state:
            init = state["initial"]
            missing = [n for m in self.modalities for n in self.names[m] if n not in init]
            if missing:
                raise UserError(f"checkpoint: relearning's initial weights lack {missing[0]}")
            self.initial = {m: [init[n].to(t.device, t.dtype).clone()
                                for n, t in zip(self.names[m], self.initial[m])]
                            if self.initial is not None else
                            [init[n].to(self.device).clone() for n in self.names[m]]
                            for m in self.modalities}
        else:
            self.initial = None
