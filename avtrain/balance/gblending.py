"""Gradient-Blending: a weighted sum of per-branch losses, weights from held-out OGR estimates.

Paper: W. Wang, D. Tran, M. Feiszli, "What Makes Training Multi-modal Classification Networks
Hard?", CVPR 2020 (arXiv 1905.12681).

What the authors released (facebookresearch/VMZ, Caffe2, PR #119 "Av dev", on main at commit
4cc542d): the *weighted loss* only, with the weights given by hand --
c2/lib/models/audio_visual_model.py lines 483-498 (with `g_blend` an extra FC classifier on the
audio stream's and on the visual stream's last layer beside the joint AV head),
c2/lib/models/loss/loss_creator.py `add_weighted_loss` lines 119-200 (softmax CE of each head,
averaged over the batch, scaled by its weight, summed) and c2/tools/train_net.py lines 578-585
(`--audio_weight` 0, `--visual_weight` 0, `--av_weight` 1 by default); c2/tutorials/gradient_blending.md lists weights computed
offline. The *estimate* of the weights was not released, in Caffe2 or in PyTorch (VMZ's pt/
has no G-Blend). The estimate here follows BalanceMM's re-implementation: GeWu-Lab/
BalanceBenchmark (commit 4c1482f) balancemm/trainer/GBlending_trainer.py (`__init__` 28-31:
super_epoch, offline; `fit` 92-101: the schedule; `training_step` 292-303: the weighted loss;
`super_epoch_origin` 306-376: the estimate), balancemm/train.py `train_and_test` 82-88 (the
temporary model and optimizer, the optimizer's state at creation kept as
`temp_optimizer_origin`; `linear_probe_eval` 214-219 omits that argument of `fit`),
balancemm/models/avclassify_model.py 256-275 (`padding`: the listed modalities' inputs are
zeroed) and configs/trainer_config.yaml lines 34-39 (GBlending: method online, super_epoch 10).
No code is copied; tests/test_gblending_released.py checks ours against a plain-torch
reference written from those lines.

Level: hooks (`loss`) + start_epoch.

- step (VMZ loss_creator.py 194-200; BalanceMM 292-303): loss = sum over the branches k in
  (modalities..., fused) of w_k * CE_mean(logits_k, y); one backward, one step. The unimodal
  logits come from each modality's own classifier on its encoder's features, not detached
  (`trained_unimodal_heads`, VMZ's a_last_out / v_last_out), for every fusion.
- schedule (BalanceMM 92-95): before every epoch e with e % super_epoch == 0 (epoch 0
  included; also after --resume) the weights are re-estimated. `--gblending-offline`: super_epoch
  = --epochs (BalanceMM line 30-31), i.e. one estimate before training whose temporary
  training runs --epochs epochs. `--gblending-weights`: fixed weights, no estimate (the
  authors' released interface).
- estimate (BalanceMM 306-376), per branch k: a copy of the model (its current weights and
  buffers, train mode) and a fresh optimizer of the run's kind and settings at the initial lr
  (BalanceMM reloads `temp_optimizer_origin` for each branch, line 314) train super_epoch
  epochs of the run's steps per epoch on the CE of the *fused* logits, with every other
  modality's input zeroed (BalanceMM `padding`; the fused branch zeroes none), no gradient
  clipping (BalanceMM has none; --clip-grad is the main step's). L^T: the sum of
  the batch losses while training in the first and in the last of those epochs; L^V: the sum
  of the per-batch mean losses over the whole `--val-split` after the first and after the last
  epoch (eval mode, no grad). G = L^V_last - L^V_first, O = (L^V_last - L^T_last) -
  (L^V_first - L^T_first) (`gblending_ogr`), w_k = |G| / O^2, normalised to sum 1
  (`gblending_weights`).

Where BalanceMM deviates from the paper (we keep BalanceMM's, our reference for the estimate):
the paper measures G and O between the start and the end of a super-epoch; BalanceMM's "first"
values are taken after one epoch of the temporary training, its train losses are running sums
while training (not a re-evaluation), it takes |G| / O^2 (the paper: G as a decrease), it sums
batch losses instead of averaging, and it measures each unimodal branch by the fused output of
a zero-padded input, not by the unimodal head. BalanceMM's `test_loader` is its val loader
(fit line 95). BalanceMM's unimodal logits are concat's weight split of the fused layer
(avclassify_model.py 277-300), not the authors' separate heads: we keep the authors' heads
(the only part of the step they released); on `concat` BalanceMM's unimodal CE would also train
the fused layer's slices, ours trains the heads.

Where we differ from BalanceMM, and why:
- data: the temporary training reads one seeded stream of the train split (`ectx.batches`,
  train transforms), super_epoch x steps batches, the same for every branch, so a resumed run
  re-estimates exactly; BalanceMM's loader reshuffles for every pass (a different order for
  every branch and temporary epoch);
- DDP: the temporary model is not DDP-wrapped: its gradients are averaged over the ranks by
  hand (one flat all-reduce a step), its BatchNorm buffers start from rank 0's and are
  broadcast from rank 0 before each val pass, L^T is averaged over the ranks (the global
  batch's mean loss, as one process given the global batch) and L^V summed over them (each rank
  reads its part of the val split in whole batches, so a partial last batch may fall
  elsewhere than in one process); every rank gets the same weights. BalanceMM runs one process
  (MultiModalParallel);
- BalanceMM starts with no weights (`weights = {}`) and a resume at an epoch that is not due
  would fail; ours are in `state_dict`;
- O = 0 makes BalanceMM raise ZeroDivisionError; ours stops with one Error line that gives
  every branch's G and O (also when every G is 0: no finite weights);
- any number of modalities (the rule is per branch; BalanceMM loops over its modalities).

Signal (`step_metrics`, constant between estimates): gblend_w_<branch> for every branch.
State for --resume: the weights, the last estimate's loss sums (L^T, L^V first and last, G, O)
and its epoch; the schedule is a function of the epoch.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from avprep.errors import UserError
from avtrain.options import Option, Search

from ..config import TrainConfig
from ..optim import build_optimizer
from . import _dist
from ._checks import require_two_modalities
from .base import Balancer, EpochContext

STATS = ("train_first", "val_first", "train_last", "val_last", "G", "O")


def gblending_weights(G, O) -> torch.Tensor:  # noqa: E741 - the paper's names
    """w_k = |G_k| / O_k^2, normalised to sum 1 (BalanceMM 361-372). float64 [K]."""
    G = torch.as_tensor(G, dtype=torch.float64)
    O = torch.as_tensor(O, dtype=torch.float64)  # noqa: E741
    w = G.abs() / O.pow(2)
    return w / w.sum()


def gblending_ogr(train_first, val_first, train_last, val_last):
    """(G, O) of BalanceMM 361-364 from the four loss sums (tensors or floats)."""
    g = val_last - val_first
    o = (val_last - train_last) - (val_first - train_first)
    return g, o


class GBlending(Balancer):
    """Weighted per-branch CE; weights re-estimated every super-epoch (start_epoch)."""

    name = "gblending"
    title = "G-Blending"
    paper = ("W. Wang, D. Tran, M. Feiszli, What Makes Training Multi-modal Classification "
             "Networks Hard?, CVPR")
    year = 2020
    summary = "per-branch CE, weights from held-out overfitting ratios"
    code = ("GeWu-Lab/BalanceBenchmark (balancemm/trainer/GBlending_trainer.py, "
            "balancemm/train.py, configs/trainer_config.yaml) @ 4c1482f; facebookresearch/VMZ "
            "(c2/lib/models/loss/loss_creator.py, c2/tools/train_net.py) @ 4cc542d: the "
            "weighted loss only")
    differences = (
        "Authors' code: only the weighted loss with weights given by hand was released "
        "(--gblending-weights); the estimate follows BalanceMM's",
        "BalanceMM: unimodal logits from each modality's own head (the authors' VMZ), not the "
        "concat layer's weight split",
        "BalanceMM: the temporary training reads one seeded stream, the same for every branch "
        "(BalanceMM reshuffles each pass), so --resume re-estimates exactly",
        "BalanceMM: DDP (the temporary model's gradients averaged by hand, the same weights on "
        "every rank); BalanceMM runs one process",
        "BalanceMM: the weights are in the checkpoint (BalanceMM starts with none, so a resume "
        "between estimates fails)",
        "BalanceMM: O = 0 is one Error line (BalanceMM: ZeroDivisionError)",
    )
    signals = ("gblend_w_<m>", "gblend_w_fused")
    # bench --tune: super_epoch, how often the blending weights are re-estimated (offline and
    # fixed weights are variants)
    options = (
        Option("super_epoch", int, 10,
               "epochs between weight estimates, each a temporary training of that many epochs "
               "whose first and last are compared", minimum=2, search=Search(2, 10)),
        Option("offline", bool, False,
               "one estimate before training, over --epochs epochs (BalanceMM's method offline; "
               "its config: online)"),
        Option("weights", str, None,
               "fixed branch weights W_AUDIO,W_VISUAL[,...],W_FUSED (the authors' VMZ flags)",
               none_means="estimated, as BalanceMM"),
    )
    trained_unimodal_heads = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.branches = [*self.modalities, "fused"]
        k = len(self.branches)
        self.super_epoch = self.opt.super_epoch
        if self.opt.offline:
            epochs = int(c.get("epochs") or 0)
            if epochs < 2:
                raise UserError(f"--gblending-offline estimates over --epochs epochs and needs "
                                f"at least 2, got --epochs {epochs}")
            self.super_epoch = epochs
        self.fixed = self.opt.weights is not None
        if self.fixed:
            self.weights = self._parse_weights(self.opt.weights)
        else:
            self.weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
            val = c.get("val_split") or "val"
            if val == "train":
                raise UserError("--method gblending estimates its weights on held-out data: "
                                "--val-split must not be the train split")
            samples = c.get("split_samples")
            if samples is not None and not samples.get(val):
                raise UserError(f"--method gblending estimates its weights on held-out data "
                                f"and needs a non-empty {val!r} split (--val-split), found none")
        self.stats = torch.zeros(len(STATS), k, dtype=torch.float64)
        self.estimated_at = -1  # epoch of the last estimate (-1: none yet)
        self._refresh()

    def _parse_weights(self, text) -> torch.Tensor:
        names = ",".join(f"W_{b.upper()}" for b in self.branches)
        # "0.1,0.2,0.7"; a YAML list in config.yaml reaches us as its text "[0.1, 0.2, 0.7]"
        items = str(text).strip().removeprefix("[").removesuffix("]").split(",")
        try:
            values = [float(v) for v in items]
        except ValueError:
            values = []
        if (len(values) != len(self.branches) or min(values) < 0 or sum(values) <= 0
                or any(v != v for v in values)):
            raise UserError(f"--gblending-weights must be {len(self.branches)} numbers >= 0 "
                            f"({names}), not all 0, got {text!r}")
        return torch.tensor(values, dtype=torch.float64)

    def _refresh(self) -> None:
        """The weights as the step uses them (float32 on the device) and as it logs them."""
        self._w = self.weights.to(device=self.device, dtype=torch.float32)
        self._metrics = {f"gblend_w_{b}": self._w[i] for i, b in enumerate(self.branches)}

    # -- the step --

    def loss(self, logits, labels, *, epoch, step):
        total = self._w[0] * F.cross_entropy(logits[self.branches[0]].float(), labels)
        for i, b in enumerate(self.branches[1:], start=1):
            total = total + self._w[i] * F.cross_entropy(logits[b].float(), labels)
        return total

    def step_metrics(self):
        return self._metrics

    # -- the estimate --

    def due(self, epoch: int) -> bool:
        return not self.fixed and epoch % self.super_epoch == 0

    def start_epoch(self, ctx: EpochContext) -> None:
        if not self.due(ctx.epoch):
            return
        if ctx.eval_batches is None:
            raise RuntimeError("--method gblending needs whole-split batches (eval_batches)")
        bare = getattr(ctx.model, "module", ctx.model)
        sums = torch.stack([self._measure(bare, ctx, b) for b in self.branches], dim=1)
        g, o = gblending_ogr(*sums)
        weights = gblending_weights(g, o)
        bad = ~torch.isfinite(weights)
        if bool(bad.any()):  # once per estimate, not per step
            raise UserError(f"G-Blending estimate at epoch {ctx.epoch}: no finite weights "
                            f"(O = {o.tolist()}, G = {g.tolist()} for {self.branches}); give "
                            "--gblending-weights or another --gblending-super-epoch")
        self.weights = weights
        self.stats = torch.cat([sums, g[None], o[None]]).cpu()
        self.estimated_at = ctx.epoch
        self._refresh()

    def _optimizer(self, model):
        """A fresh optimizer of the run's kind and settings over `model` (BalanceMM's temp
        optimizer at its state when built, train.py 86-87 and trainer line 314), with the
        run's --lr-for parameter groups."""
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        c = TrainConfig(**{k: v for k, v in self.config.items() if k in names})
        return build_optimizer(c, model)

    def _masked(self, batch: dict, branch: str) -> dict:
        """BalanceMM's `padding`: every other modality's input zeroed (none for fused)."""
        if branch == "fused":
            return batch
        out = dict(batch)
        for m in self.modalities:
            if m != branch:
                out[m] = torch.zeros_like(batch[m])
        return out

    def _measure(self, bare, ctx: EpochContext, branch: str) -> torch.Tensor:
        """[L^T_first, L^V_first, L^T_last, L^V_last] (float64) of one branch: BalanceMM's
        temporary training (see the module docstring)."""
        temp = copy.deepcopy(bare)
        _dist.broadcast_buffers([temp])
        opt = self._optimizer(temp)
        params = [p for p in temp.parameters() if p.requires_grad]
        world = _dist.world_size()
        steps = ctx.steps_per_epoch
        stream = iter(ctx.batches(steps * self.super_epoch))
        out = torch.zeros(4, dtype=torch.float64, device=self.device)
        for e in range(self.super_epoch):
            temp.train()
            train_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for _ in range(steps):
                batch = next(stream)
                opt.zero_grad(set_to_none=True)
                with ctx.autocast():
                    logits = temp(self._masked(batch, branch))["fused"]
                loss = F.cross_entropy(logits.float(), batch["label"])
                loss.backward()
                if world > 1:
                    grads = [p.grad for p in params if p.grad is not None]
                    flat = _dist.mean_(_flatten_dense_tensors(grads))
                    torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))
                opt.step()
                train_sum += loss.detach().double()
            if e not in (0, self.super_epoch - 1):
                continue
            _dist.broadcast_buffers([temp])
            temp.eval()
            val_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            with torch.no_grad():
                for batch in ctx.eval_batches(ctx.val_split):
                    with ctx.autocast():
                        logits = temp(self._masked(batch, branch))["fused"]
                    # BalanceMM 349-350: the mean CE of each val batch, summed over the batches
                    val_sum += F.cross_entropy(logits.float(), batch["label"]).double()
            pair = torch.stack([_dist.mean_(train_sum), _dist.sum_(val_sum)])
            if e == 0:
                out[0:2] = pair
            if e == self.super_epoch - 1:
                out[2:4] = pair
        return out

    # -- --resume --

    def state_dict(self):
        return {"weights": self.weights.detach().cpu().clone(), "stats": self.stats.clone(),
                "estimated_at": self.estimated_at}

    def load_state_dict(self, state):
        if "weights" not in state:
            return
        if not self.fixed:  # fixed weights come from the command line
            self.weights = state["weights"].to(torch.float64).cpu()
        self.stats = state.get("stats", self.stats).to(torch.float64).cpu()
        self.estimated_at = int(state.get("estimated_at", -1))
        self._refresh()
