"""CML: calibrating multimodal learning (the confidence ranking regulariser).

Paper: H. Ma, Q. Zhang, C. Zhang, B. Wu, H. Fu, J. T. Zhou, Q. Hu, "Calibrating Multimodal
Learning", ICML 2023. Rule: the confidence (max softmax probability) of the prediction from a
subset of the modalities must not exceed that from the full set; a hinge on the excess is added
to the classification loss.

References read (no code copied; tests/test_cml_released.py checks our steps against reference
steps written in the test from these semantics):

- the authors' code, QingyangZhang/CML (commit 9d2496e): cpm/CPM_Nets.py `rank_loss` 98-124
  (confidence = max softmax, 112-113; per sample ReLU((conf_fewer - conf_more) * sign), summed
  over the batch and over the nested subsets, 121-123; sign "trick 1", 122: 0 where the smaller
  subset is right and the larger one wrong; input num has num views removed, cpm/util/get_sn.py
  `get_sn_for_multi_input` 39-59, so index num + 1 is the smaller subset) and its weight
  `belta` 168; miwae/train.py 221-308
  (nested subsets by a per-sample random order of removed views, their inputs replaced by the
  training mean, 67-86 and 229-234; every subset a separate forward of the same model in train
  mode, 280-291; the rank loss 294-302 with another sign and a detached "trick 2"; weight
  beta/100, README's example --beta 10, i.e. 0.1, 304). That code is for multi-view tabular
  data (CPM-Nets, MIWAE), not for audio-visual encoders;
- BalanceMM's audio-visual re-implementation, GeWu-Lab/BalanceBenchmark (commit 4c1482f):
  balancemm/trainer/CML_trainer.py (`conf_loss` 19-22; one shuffled modality order per epoch,
  62-67; `training_step` 107-216, two modalities 170-209) and configs/trainer_config.yaml (CML
  block 29-33: lam 0.1, modulation 0..80), balancemm/models/avclassify_model.py
  (`unimodality_calculate` 277-300: z_m = f_m . W_m^T + b/M for concat).

Our default is BalanceMM's step (the audio-visual form), for M modalities (BalanceMM: 2 and 3):

- one forward (train mode); out_0 = fused logits; at the start of each epoch the modalities are
  put in a random order and the last M-1 of it are removed one after another: out_k =
  out_{k-1} - z_{r_k} + b/M (concat: the classifier on the features with the removed
  modalities' features zeroed, full bias; sum fusion: out_{k-1} - fc_r(f_r)). Two modalities:
  ONE unimodal subset per epoch (the kept modality is random per epoch), not both;
- conf_k = max softmax(out_k) (with gradient through both sides, nothing detached);
- loss = (CE(out_0) + sum_k CE(out_k)) / M + lam * sum_k max(0, sum_batch(conf_k - conf_{k-1}))
  (CE batch means; the hinge is on the batch SUM of the differences, and the sign computed by
  BalanceMM's conf_loss is returned but never used);
- outside [--modulation-start, --modulation-end] (0, 80): CE(out_0) alone.

`--cml-form authors` takes the authors' penalty instead: sum_b ReLU((conf_k - conf_{k-1}) *
sign_b), per sample, with CPM-Nets' trick-1 sign (0 where out_k predicts right and out_{k-1}
wrong); the subsets and CE stay BalanceMM's (derived logits, not mean-imputed re-forwards).

Where we differ, and why:

- the epoch's modality order comes from a generator seeded by (--seed, epoch), the same on every
  rank and on resume (BalanceMM: Python's global `random.shuffle`); needed for DDP and exact
  --resume; no other state;
- DDP: BalanceMM runs DataParallel, so its hinge is over the sum of the whole (gathered) batch.
  We all-reduce the detached batch sum to gate the hinge globally and scale the local sum by
  the world size, so DDP's gradient average equals the gradient of lam * max(0, global sum);
  the loss value holds the global hinge on every rank; one process: identical to BalanceMM;
- BalanceMM's trainer at 4c1482f calls `model.Unimodality_Calculate()`, which the model renamed
  to `unimodality_calculate` (it fails with AttributeError there); the semantics are those of
  the method before the rename (commit 4909c17~1, the same formula).

Everything per step stays on the device (no `.item()`; the gate is a tensor comparison).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avtrain.options import Option, Search

from . import _dist
from ._checks import (
    finite,
    fused_model,
    number,
    require_two_modalities,
    summed_fusion,
    window,
)
from .base import Balancer, EpochContext
from .ogm import _mix

ORDER_SALT = 0xC3A1  # separates CML's order stream from the other methods' streams for a seed
FORMS = ("balancemm", "authors")


def cml_order(seed: int, epoch: int, count: int) -> list[int]:
    """The epoch's modality order (indices); the removed ones are popped from its end."""
    generator = torch.Generator()
    generator.manual_seed(_mix(int(seed) ^ ORDER_SALT, epoch))
    return torch.randperm(count, generator=generator).tolist()


def cml_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max softmax probability, argmax) per sample."""
    return F.softmax(logits.float(), dim=1).max(dim=1)


def cml_penalty_terms(conf_sub: torch.Tensor, pred_sub: torch.Tensor, conf_more: torch.Tensor,
                      pred_more: torch.Tensor, labels: torch.Tensor, form: str) -> torch.Tensor:
    """The local (this rank's) sum the hinge is taken of. balancemm: sum_b (conf_sub -
    conf_more), hinged afterwards on the global sum; authors: sum_b ReLU((conf_sub - conf_more)
    * sign), sign = not (pred_sub right and pred_more wrong)."""
    diff = conf_sub - conf_more
    if form == "balancemm":
        return diff.sum()
    sign = ~((pred_sub == labels) & (pred_more != labels))
    return F.relu(diff * sign.to(diff.dtype)).sum()


class CML(Balancer):
    """Confidence ranking: no modality subset may be more confident than the full set."""

    name = "cml"
    title = "CML"
    paper = ("H. Ma, Q. Zhang, C. Zhang, B. Wu, H. Fu, J. T. Zhou, Q. Hu: Calibrating "
             "Multimodal Learning, ICML")
    year = 2023
    summary = "hinge: no modality subset more confident than all"
    code = ("GeWu-Lab/BalanceBenchmark (CML_trainer.py, trainer_config.yaml) @ 4c1482f; "
            "QingyangZhang/CML (cpm/CPM_Nets.py rank_loss, miwae/train.py) @ 9d2496e")
    differences = (
        "Authors' code: written for multi-view tabular data (mean-imputed re-forwards, a "
        "per-sample hinge); the default is BalanceMM's audio-visual form "
        "(--cml-form authors: their per-sample penalty)",
        "BalanceMM: the epoch's modality order from a generator seeded by (--seed, epoch), "
        "not Python's global random; under DDP the hinge is gated on the global batch sum",
        "BalanceMM: any number of modalities (its trainer: 2 or 3); its trainer at 4c1482f "
        "calls a renamed model method (AttributeError): we follow the formula before the rename",
    )
    signals = ("penalty", "conf_fused", "conf_subset", "removed_<m>")
    # bench --tune: lam, the weight of the ranking hinge, is its strength (form is a variant)
    options = (
        Option("modulation_start", int, 0, "first epoch with the hinge (0-based, inclusive; BalanceMM's modulation_starts)", minimum=0, shared=True),
        Option("modulation_end", int, 80, "last epoch with the hinge (inclusive; BalanceMM's modulation_ends); CE alone outside", minimum=0, shared=True),
        Option("lam", float, 0.1, "weight of the confidence ranking hinge (BalanceMM's lam; the authors' README: beta 10 / 100)", minimum=0, search=Search(0.01, 1.0, log=True)),
        Option("form", str, "balancemm", "balancemm (the hinge on the batch sum, BalanceMM) or authors (per sample, QingyangZhang/CML)", choices=FORMS),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.lam = finite("--cml-lam", self.opt.lam)
        self.form = self.opt.form
        self.start, self.end = window(self.opt)
        self.seed = int(number(c, "seed", 0))
        bare = fused_model(model, self.name)
        summed_fusion(bare, self.name, "removes a modality's summand from the fused logits")
        fusion = bare.fusion
        self.fusion = fusion
        self.epoch = -1
        self.removed: list[str] = []
        self._metrics: dict[str, torch.Tensor] = {}

    def _begin(self, epoch: int) -> None:
        if epoch != self.epoch:
            order = cml_order(self.seed, epoch, len(self.modalities))
            self.epoch = epoch
            self.removed = [self.modalities[i] for i in reversed(order)][: len(order) - 1]

    def start_epoch(self, ctx: EpochContext) -> None:
        self._begin(ctx.epoch)

    def _bias_share(self) -> torch.Tensor | float:
        """What removing one summand must add back: b/M for concat (full bias kept), 0 for sum."""
        fc = getattr(self.fusion, "fc_out", None)
        return 0.0 if fc is None else fc.bias / len(self.modalities)

    def loss(self, logits, labels, *, epoch, step):
        fused = logits["fused"].float()
        ce = F.cross_entropy(fused, labels)
        if not self.start <= epoch <= self.end:
            self._metrics = {"penalty": torch.zeros((), device=fused.device)}
            return ce
        self._begin(epoch)
        world = _dist.world_size()
        share = self._bias_share()
        out_s = fused
        conf_s, pred_s = cml_confidence(out_s)
        conf_full = conf_s
        total_ce = ce
        local = []
        for m in self.removed:
            out_p = out_s - logits[m].float() + (share.float() if torch.is_tensor(share)
                                                  else share)
            conf_p, pred_p = cml_confidence(out_p)
            total_ce = total_ce + F.cross_entropy(out_p, labels)
            local.append(cml_penalty_terms(conf_p, pred_p, conf_s, pred_s, labels, self.form))
            out_s, conf_s, pred_s = out_p, conf_p, pred_p
        local_t = torch.stack(local)  # [M-1]
        glob = _dist.sum_(local_t.detach().clone())
        if self.form == "balancemm":
            gate = (glob > 0).to(local_t.dtype)
            penalty_value = (glob * gate).sum()
            penalty = (gate * local_t).sum() * world
        else:
            penalty_value = glob.sum()
            penalty = local_t.sum() * world
        # the value is the global hinge (what BalanceMM's loss holds), the gradient this rank's
        # share of it (DDP averages the ranks' gradients)
        penalty = penalty - penalty.detach() + penalty_value
        loss = total_ce / len(self.modalities) + self.lam * penalty
        self._metrics = {"penalty": penalty_value.detach(),
                         "conf_fused": conf_full.detach().mean(),
                         "conf_subset": conf_s.detach().mean()}
        for m in self.modalities:
            self._metrics[f"removed_{m}"] = torch.tensor(float(m in self.removed))
        return loss

    def step_metrics(self):
        return dict(self._metrics)
