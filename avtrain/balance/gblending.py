"""Gradient-Blending: a weighted sum of per-branch losses, weights from held-out OGR estimates.

Paper: W. Wang, D. Tran, M. Feiszli, "What Makes Training Multi-modal Classification Networks
Hard?", CVPR 2020. The authors' code is Caffe2 (facebookresearch/VMZ) and not a reference
here; BalanceMM's trainer is: GeWu-Lab/BalanceBenchmark (commit 4c1482f)
balancemm/trainer/GBlending_trainer.py (the schedule 92-101, the weighted loss
`training_step` 292-303, the estimate `super_epoch_origin` 306-376) and
configs/trainer_config.yaml (GBlending block, lines 34-39: method online, super_epoch 10).
No code is copied; tests/test_gblending_released.py checks ours against a reference written
from those semantics.

Level: hooks + start_epoch.

- step (BalanceMM 292-303): loss = sum over branches k in (modalities..., fused) of
  w_k * CE_mean(logits_k, y), one backward, one step. The unimodal heads train the encoders
  (`trained_unimodal_heads`).
- schedule (BalanceMM 92-95): before every epoch e with e % super_epoch == 0 (epoch 0 included)
  the weights are re-estimated; `--gblending-offline` sets super_epoch = the run's epochs
  (BalanceMM `method: offline`, line 30-31), i.e. one estimate before training.
- estimate (BalanceMM 306-376), per branch k: a copy of the model (the current weights, train
  mode) and a fresh optimizer of the run's kind and settings (BalanceMM resets its temp
  optimizer to the state it was built with, line 314) are trained for super_epoch epochs of
  the run's steps per epoch, on the fused logits' CE with every *other* modality's input
  zeroed (BalanceMM `padding`; the fused branch sees all inputs). L^T: the sum of the batch
  losses during the first and during the last of those epochs (train mode, while training);
  L^V: the sum of the batch losses over the whole `val` split after the first and after the
  last epoch (eval mode, no grad). G = L^V_last - L^V_first, O = (L^V_last - L^T_last) -
  (L^V_first - L^T_first), w_k = |G| / O^2, normalised to sum 1 (`gblending_weights`).

Where BalanceMM deviates from the paper (we keep BalanceMM's, as the method's reference):
the paper measures G and O between the start and the end of a super-epoch (the weights before
it); BalanceMM's "first" values are taken after one epoch of the temporary training and its
train losses are running sums while training, not a re-evaluation; it takes |G| / O^2 with the
absolute value (the paper: G / O^2 with G a decrease); it sums batch losses rather than
averaging. BalanceMM's `test_loader` argument is its val loader (fit line 95); here the held
out split is always `--val-split` (the run refuses to start without one).

Where we differ from BalanceMM, and why:
- the temporary training reads `ectx.batches(steps)` (a seeded stream of the train split, with
  train transforms), so a resumed run re-estimates exactly; BalanceMM re-reads its loader;
- DDP: the temporary model's gradients are averaged over the ranks by hand (it is not
  DDP-wrapped) and the loss sums are summed over the ranks, so every rank holds the same
  weights; BalanceMM estimates on each rank separately;
- any number of modalities (the rule is per branch; BalanceMM loops over its modalities).

Signal (`step_metrics`, constant between estimates): gblend_w_<branch> for every branch.
State for --resume: the current weights (the schedule is a function of the epoch).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from avprep.errors import UserError

from . import _dist
from ._checks import number
from .base import Balancer, EpochContext


def gblending_weights(G, O) -> torch.Tensor:  # noqa: E741 - the paper's names
    """w_k = |G_k| / O_k^2, normalised (BalanceMM 361-372). float64 [K]."""
    G = torch.as_tensor(G, dtype=torch.float64)
    O = torch.as_tensor(O, dtype=torch.float64)  # noqa: E741
    w = G.abs() / O.pow(2)
    return w / w.sum()


class GBlending(Balancer):
    """Weighted per-branch CE; weights re-estimated every super-epoch (start_epoch)."""

    name = "gblending"
    trained_unimodal_heads = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        se = number(c, "gblending_super_epoch", 10)
        if se != int(se) or se < 2:
            raise UserError(f"--gblending-super-epoch must be a whole number of at least 2, "
                            f"got {c.get('gblending_super_epoch')}")
        self.super_epoch = int(se)
        if c.get("gblending_offline"):
            self.super_epoch = max(2, int(c.get("epochs") or self.super_epoch))
        samples = c.get("split_samples")
        val = c.get("val_split") or "val"
        if samples is not None and not samples.get(val):
            raise UserError(f"--method gblending estimates its weights on held-out data and "
                            f"needs a non-empty {val!r} split (--val-split), found none")
        self.branches = [*self.modalities, "fused"]
        k = len(self.branches)
        self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        self.last_stats = torch.zeros(4, k, dtype=torch.float64)  # G, O, ... for the log
        self._metrics = self._as_metrics()

    def _as_metrics(self):
        return {f"gblend_w_{b}": self.weights[i].to(torch.float32).to(self.device)
                for i, b in enumerate(self.branches)}

    def _w(self):
        if not hasattr(self, "_w_dev") or self._w_dev is None:
            self._w_dev = self.weights.to(torch.float32).to(self.device)
        return self._w_dev

    def loss(self, logits, labels, *, epoch, step):
        w = self._w()
        total = 0.0
        for i, b in enumerate(self.branches):
            total = total + w[i] * F.cross_entropy(logits[b].float(), labels)
        return total

    def step_metrics(self):
        return self._metrics

    # -- the estimate --

    def due(self, epoch: int) -> bool:
        return epoch % self.super_epoch == 0

    def start_epoch(self, ctx: EpochContext) -> None:
        if not self.due(ctx.epoch):
            return
        if ctx.eval_batches is None:
            raise RuntimeError("--method gblending needs whole-split batches (eval_batches)")
        bare = getattr(ctx.model, "module", ctx.model)
        G, O = [], []  # noqa: E741
        for b in self.branches:
            g, o = self._measure(bare, ctx, b)
            G.append(g)
            O.append(o)
        self.weights = gblending_weights(G, O)
        self.last_stats = torch.tensor([G, O], dtype=torch.float64)
        self._w_dev = None
        self._metrics = self._as_metrics()

    def _optimizer(self, params):
        from avtrain.config import TrainConfig
        from avtrain.loop import build_optimizer

        names = {f.name for f in dataclasses.fields(TrainConfig)}
        c = TrainConfig(**{k: v for k, v in self.config.items() if k in names})
        return build_optimizer(c, params)

    def _masked(self, batch, branch):
        if branch == "fused":
            return batch
        out = dict(batch)
        for m in self.modalities:
            if m != branch:
                out[m] = torch.zeros_like(batch[m])
        return out

    def _measure(self, bare, ctx: EpochContext, branch: str) -> tuple[float, float]:
        """(G, O) of one branch: BalanceMM's temporary training (see the module docstring)."""
        temp = copy.deepcopy(bare)
        temp.train()
        opt = self._optimizer(temp.parameters())
        world = _dist.world_size()
        first = last = (0.0, 0.0)
        for e in range(self.super_epoch):
            temp.train()
            train_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for batch in ctx.batches(ctx.steps_per_epoch):
                opt.zero_grad(set_to_none=True)
                with ctx.autocast():
                    out = temp(self._masked(batch, branch))
                loss = F.cross_entropy(out["fused"].float(), batch["label"])
                loss.backward()
                if world > 1:
                    for p in temp.parameters():
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad.div_(world)
                opt.step()
                train_sum += loss.detach().double()
            if e == 0 or e == self.super_epoch - 1:
                temp.eval()
                val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                with torch.no_grad():
                    for batch in ctx.eval_batches(ctx.val_split):
                        with ctx.autocast():
                            out = temp(self._masked(batch, branch))
                        # BalanceMM: mean CE of each val batch, summed over the batches
                        val_sum += F.cross_entropy(out["fused"].float(),
                                                   batch["label"]).double()
                sums = torch.stack([train_sum, val_sum])
                if world > 1:
                    dist.all_reduce(sums)
                pair = (float(sums[0]), float(sums[1]))
                if e == 0:
                    first = pair
                if e == self.super_epoch - 1:
                    last = pair
        g = last[1] - first[1]
        o = (last[1] - last[0]) - (first[1] - first[0])
        return g, o

    def state_dict(self):
        return {"weights": self.weights.clone(), "stats": self.last_stats.clone()}

    def load_state_dict(self, state):
        if "weights" in state:
            self.weights = state["weights"].to(torch.float64).cpu()
            self.last_stats = state.get("stats", self.last_stats)
            self._w_dev = None
            self._metrics = self._as_metrics()
