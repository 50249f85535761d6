"""ReconBoost: alternating boosting of the modality learners, with global rectification.

Paper: C. Hua, Q. Xu, S. Bao, Z. Yang, Q. Huang, "ReconBoost: Boosting Can Achieve Modality
Reconcilement", ICML 2024. Released code: github.com/huacong/ReconBoost (commit 14ab57a),
train.py: argparse defaults (lines 51-90), the stage loop (259-452: the learner phase 295-357,
`net_ensemble.add` 366, the rectification phase 369-402, the lr decay 445-451), schedule.py
(`schedule_model`, fixed_mode, lines 33-61: stage % 2, audio first), models/dynamic_net.py
(`Head` 5-15, `DynamicNet`: boost_rate 33, shared head 38-42, `add` 45-57, `parameters` 59-73,
`forward` 96-135, `forward_grad` 137-170), utils.py `check_status` (1001 stages, 5-8);
train_MSA.py for three modalities (pre-model 211-222). BalanceMM's re-implementation:
GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/ReconBoost_trainer.py (`fit` 73-89,
`train_loop` 212-313, `training_step1` 315-353, `training_step2` 355-382),
balancemm/models/avclassify_model.py (`BaseClassifierReconBoostModel` 737-809) and
configs/trainer_config.yaml (ReconBoost block, lines 70-76). No code is copied;
tests/test_reconboost_released.py checks our steps against a reference written from the
released semantics.

The model is an ensemble of one learner per modality, learner_m(x) = head_m(encoder_m(x_m)):
with `--fusion boost` (the released architecture, `--common_space True`) every learner shares
one MLP head and the ensemble is beta * sum of the learners, beta a learnable boost rate
(avtrain.models.fusions.BoostFusion); with `sum` each learner has its own linear head (the
released `--common_space False`, beta fixed at its initial 1.0); with `concat` the learner is
modality m's slice of the classifier, f_m . W_m^T + b/M (its shared bias, like a shared head).
Other fusions have no per-modality learners: an error.

Training runs in stages; stage s (epochs of this loop, `--reconboost-stage-epochs` T1 plus
`--reconboost-correct-epochs` T2 of them, released 4 + 4) picks the learner of modality
m = modalities[s mod M] (audio first, as released `stage % 2`):

1. learner phase, T1 epochs: only learner m's parameters are stepped (its encoder and its
   head: the shared head for `boost`), with the released boosting loss, per sample

       L = -w1 * mean_c(t_c log p_c) + w2 * mean_c(t_c q_c log p_c)
         = -(w1 - w2 q_y) log p_y / C,

   t the one-hot label, p = softmax(learner_m), q = softmax(beta * sum of the other learners
   already in the ensemble), computed without grad (`out_join.detach()`); at stage 0 the
   ensemble is empty and the released constant c0 gives q = 1. w1, w2: `--reconboost-weight1`
   5.0, `--reconboost-weight2` 1.0 (released CREMA-D/AVE values; train_MSA.py uses 1.0/0.25).
   The loss is the batch mean plus, from stage 1, `--alpha` (0.5) times the released "GA"
   term, MSE(softmax(learner_m), softmax(learner_prev)) with *both* sides detached, prev the
   previous stage's modality: it carries no gradient (as released), only the logged loss
   and one more train-mode forward of prev (its BatchNorm statistics, as released).
2. rectification phase (the paper's global rectification), T2 epochs: every learner in the
   ensemble and beta are stepped on CE(beta * sum of the learners, y), the batch mean.

The ensemble grows as the released `DynamicNet.add`: modality m joins after its first learner
phase, so at stage s < M the learners of modalities[s+1:] are not in it yet (for two
modalities: the visual learner during stage 0); `--fusion boost` leaves them out of the
prediction too (its `members` buffer; eval and best.pt use it).

Defaults are the released ones: T1 = T2 = 4 (`--epochs_per_stage`, `--correct_epoch`),
w1 5, w2 1, alpha 0.5, boost rate 1.0, a fresh optimizer at the start of every phase
(`--reconboost-reset-optimizer`: the optimizer's state -- SGD momentum -- is cleared, as the
released `optim.SGD(...)` per phase). The released optimizer and schedule are a run setting:
`--optimizer sgd --lr 0.01 --momentum 0.9 --weight-decay 5e-4` (m_lr = e_lr = 0.01), and for
CREMA-D x0.1 every 30 stages, `--scheduler step --lr-step 240 --lr-gamma 0.1` (30 stages of
8 epochs); the released run lasts 1001 stages.

Where we differ, and why:

- the modality learners are our model's encoders and heads (the released AudioNet/VisualNet
  are ResNet-18 + fc, the same with `--model resnet18 --fusion boost`); the released CREMA-D
  and AVE commands add `--use_pretrain` (start from unimodal checkpoints, both learners in the
  ensemble from stage 0); its argparse default, which we follow, starts from scratch;
- one learning rate for both phases (released m_lr and e_lr, equal by default);
- `sum`/`concat` are ours (no boost rate); with concat, modality m's learner phase leaves the
  other modalities' columns of the shared classifier weight as they were (restored after the
  step: a zero gradient would still move them through weight decay; their optimizer state
  is not restored, which matters only with --no-reconboost-reset-optimizer); `sum` and
  `concat` predict with every modality at every stage (no members mask);
- the three-modality order is our modality order (audio, visual, text); the released MOSEI
  schedule is text, visual, audio;
- evaluation and model selection: the released train.py tests only after each stage's
  rectification phase (line 408) and saves the best on the *test* set from stage 3 on (line
  420: `stage >= 3 and acc > best_acc`); `fit` evaluates after every epoch, learner-phase
  epochs included, and picks the best epoch on val from epoch 0 (a best epoch may thus fall
  inside a learner phase or before stage 3);
- the ensemble of stage s holds its own learner in both phases (`reconboost_stage`), so during
  stage 0's learner phase our prediction (`members`, eval, best.pt) is the audio learner alone,
  where the released ensemble is still empty until `net_ensemble.add` (line 366) -- it is never
  evaluated then, so this only changes what our per-epoch evaluations of stage 0 report;
- under DDP the step runs on the bare model and the gradients of the stepped parameters are
  averaged over the ranks here (one all-reduce), because a learner phase touches only part of
  the model; the schedule is a function of the epoch, identical on every rank.

BalanceMM deviates from the authors: each of its epochs runs, for every modality in turn, T
epochs of the learner phase and then T epochs of rectification (`T_epochs` 1 for both), so
every modality is boosted once per epoch; one optimizer for the whole run (no reset, momentum
carried across phases); its shared head is one Linear layer (`SharedHead`) instead of the
released Linear-ReLU-Linear MLP; the boost rate starts at 0.01 (released 1.0); every modality
is in the ensemble from the first step (no c0, no growing ensemble); the GA term is skipped in
its whole first epoch instead of the first stage; outside its window [modulation_starts,
modulation_ends] = [0, 80] it refers to an undefined `loss` (it would crash).

Everything per step stays on the device (no `.item()`); the state for --resume is the stage
and phase of the last step (the members buffer is in the model's state).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from avprep.errors import UserError
from avtrain.options import Option, Search

from ..models.fusions import BoostFusion, ConcatFusion, SumFusion
from . import _dist
from ._checks import require_two_modalities
from .base import Balancer, StepContext


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one epoch does. `others`: the ensemble's learners other than `learner` before it
    is added (the released list order); `ensemble`: the learners of the rectification phase
    (the list after `add`); `previous`: the GA term's pre-model (None at stage 0)."""

    stage: int
    phase: int  # 1: the learner phase, 2: the rectification phase
    learner: str
    others: tuple[str, ...]
    ensemble: tuple[str, ...]
    previous: str | None


def reconboost_stage(epoch: int, modalities, stage_epochs: int, correct_epochs: int) -> Stage:
    """The released schedule at `epoch`: stage s = epoch // (T1 + T2), learner modalities[s % M];
    the ensemble holds the learners of the last min(s, M) stages (+ this one after phase 1)."""
    modalities = list(modalities)
    n = len(modalities)
    stage, within = divmod(epoch, stage_epochs + correct_epochs)
    learner = modalities[stage % n]
    before = [modalities[t % n] for t in range(max(0, stage - n), stage)]
    return Stage(stage=stage, phase=1 if within < stage_epochs else 2, learner=learner,
                 others=tuple(m for m in before if m != learner),
                 ensemble=tuple(modalities[t % n] for t in range(max(0, stage - n + 1),
                                                                 stage + 1)),
                 previous=modalities[(stage - 1) % n] if stage > 0 else None)


def boosting_loss(logits: torch.Tensor, join: torch.Tensor | None, labels: torch.Tensor,
                  weight1: float, weight2: float) -> torch.Tensor:
    """Per-sample released boosting loss [B] (train.py lines 339-340): -w1 mean_c(t log p) +
    w2 mean_c(t softmax(join) log p); `join` None (an empty ensemble, the released c0) is q = 1."""
    logp = F.log_softmax(logits.float(), dim=1)
    target = F.one_hot(labels.long(), logp.shape[1]).to(logp.dtype)
    weighted = target if join is None else target * F.softmax(join.detach().float(), dim=1)
    return -weight1 * (target * logp).mean(-1) + weight2 * (weighted * logp).mean(-1)


class ReconBoost(Balancer):
    """Alternating learner phases with the boosting loss, then ensemble rectification
    (owns the step)."""

    name = "reconboost"
    title = "ReconBoost"
    paper = ("C. Hua, Q. Xu, S. Bao, Z. Yang, Q. Huang, \"ReconBoost: Boosting Can Achieve "
             "Modality Reconcilement\", ICML 2024")
    year = 2024
    summary = "boosts one modality's learner at a time, then rectifies"
    code = ("huacong/ReconBoost (train.py, schedule.py, models/dynamic_net.py) @ 14ab57a; "
            "BalanceMM: GeWu-Lab/BalanceBenchmark (ReconBoost_trainer.py) @ 4c1482f")
    differences = (
        "Authors' code: learners start from scratch, its argparse default (released CREMA-D "
        "and AVE commands: --use_pretrain)",
        "Authors' code: one learning rate for both phases (released m_lr = e_lr by default)",
        "Authors' code: evaluated after every epoch, best epoch on val (released: on test "
        "after each rectification, from stage 3)",
        "Authors' code: the three-modality order is ours, audio, visual, text (released MOSEI: "
        "text, visual, audio); --fusion sum and concat are ours (no boost rate)",
        "BalanceMM: every modality boosted once per epoch (T 1), one optimizer, a one-layer "
        "shared head, boost rate 0.01, every learner in the ensemble from the start",
    )
    signals = ("rb_stage", "rb_phase", "trained_<m>", "learner_loss", "ga_loss", "join_prob",
               "ensemble_loss", "boost_rate")
    # bench --tune: the stage length (how often the learner alternates) and w2, the weight of
    # the reconcilement against the learner's CE (alpha weighs a gradient-free term: not tuned)
    options = (
        Option("alpha", float, 0.5, "weight of its (gradient-free) GA term", minimum=0,
               shared=True),
        Option("stage_epochs", int, 4, "epochs of each stage's learner phase (released "
               "--epochs_per_stage)", minimum=1, search=Search(1, 4)),
        Option("correct_epochs", int, None, "epochs of each stage's global rectification, 0 "
               "for none", minimum=0,
               none_means="--reconboost-stage-epochs (released --correct_epoch 4)"),
        Option("weight1", float, 5.0, "boosting loss: weight w1 of the learner's CE",
               minimum=0),
        Option("weight2", float, 1.0, "boosting loss: weight w2 of the reconcilement term",
               minimum=0, search=Search(0.3, 3.0, log=True)),
        Option("reset_optimizer", bool, True, "clear the optimizer state at every phase (the "
               "released fresh SGD per phase)"),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.alpha, self.weight1, self.weight2 = self.opt.alpha, self.opt.weight1, self.opt.weight2
        for flag, value in (("--alpha", self.alpha), ("--reconboost-weight1", self.weight1),
                            ("--reconboost-weight2", self.weight2)):
            if not math.isfinite(value):  # the declarations bound them below only
                raise UserError(f"{flag} must be a finite number, got {value}")
        self.stage_epochs = self.opt.stage_epochs
        self.correct_epochs = self.opt.correct_epochs
        if self.correct_epochs is None:  # released: --correct_epoch 4 = --epochs_per_stage 4
            self.correct_epochs = self.stage_epochs
        self.reset = self.opt.reset_optimizer
        # --modulation-start/-end: not read (the stages run for the whole training); given,
        # they are ignored with one Warning (avtrain.options, shared window options)
        bare = getattr(model, "module", model)
        fusion = getattr(bare, "fusion", None)
        # exact types: CosineFusion is a ConcatFusion whose learner logits are not its slices
        if getattr(bare, "encoders", None) is None or type(fusion) not in (
                BoostFusion, SumFusion, ConcatFusion):
            raise UserError("--method reconboost needs per-modality learners: --fusion boost "
                            "(the released shared head), sum or concat, with the resnet18 or "
                            "tiny encoders")
        self.bare = bare
        self._last: tuple[int, int] | None = None  # (stage, phase) of the last step
        self._metrics: dict[str, torch.Tensor] = {}

    # -- the learners --

    def _beta(self):
        fusion = self.bare.fusion
        return fusion.boost_rate if isinstance(fusion, BoostFusion) else None

    def learner(self, modality: str, batch: dict) -> torch.Tensor:
        """learner_m(x) = head_m(encoder_m(x_m)): logits [B, C] of one modality's learner."""
        fusion = self.bare.fusion
        feat = self.bare.encoders[modality](batch[modality])
        if isinstance(fusion, BoostFusion):
            return fusion.head(feat)
        if isinstance(fusion, SumFusion):
            return fusion.fc[modality](feat)
        i = fusion.modalities.index(modality)
        weight = torch.split(fusion.fc_out.weight, fusion.dims, dim=1)[i]
        return feat @ weight.t() + fusion.fc_out.bias / len(fusion.modalities)

    def _ensemble(self, parts: dict[str, torch.Tensor], names) -> torch.Tensor:
        total = parts[names[0]]
        for name in names[1:]:
            total = total + parts[name]
        beta = self._beta()
        return beta * total if beta is not None else total

    # -- the step --

    def train_step(self, ctx: StepContext):
        s = reconboost_stage(ctx.epoch, self.modalities, self.stage_epochs, self.correct_epochs)
        key = (s.stage, s.phase)
        if key != self._last:
            if self.reset:  # the released fresh optim.SGD at every phase
                ctx.optimizer.state.clear()
            fusion = self.bare.fusion
            if isinstance(fusion, BoostFusion):
                fusion.members.copy_(torch.tensor(
                    [float(m in s.ensemble) for m in fusion.modalities]))
            self._last = key
        ctx.optimizer.zero_grad(set_to_none=True)
        if s.phase == 1:
            loss, logits, metrics = self._learner_phase(ctx, s)
        else:
            loss, logits, metrics = self._rectification_phase(ctx, s)
        self._average_gradients()
        ctx.clip_grad()
        kept = self._frozen_columns(s)
        ctx.optimizer.step()
        for weight, cols, value in kept:
            with torch.no_grad():
                weight[:, cols] = value
        trained = s.ensemble if s.phase == 2 else (s.learner,)
        metrics["rb_stage"] = torch.tensor(float(s.stage))
        metrics["rb_phase"] = torch.tensor(float(s.phase))
        for m in self.modalities:
            metrics[f"trained_{m}"] = torch.tensor(float(m in trained))
        beta = self._beta()
        if beta is not None:
            metrics["boost_rate"] = beta.detach().clone()
        self._metrics = metrics
        return loss, logits

    def _learner_phase(self, ctx: StepContext, s: Stage):
        labels = ctx.labels
        with ctx.autocast():
            with torch.no_grad():  # the released out_join: train mode, no grad
                others = {k: self.learner(k, ctx.batch) for k in s.others}
            out = self.learner(s.learner, ctx.batch)
        join = self._ensemble(others, s.others).detach() if s.others else None
        per = boosting_loss(out, join, labels, self.weight1, self.weight2)
        boost = per.mean()
        boost.backward()
        metrics = {"learner_loss": boost.detach()}
        loss = boost.detach()
        if s.previous is not None:  # the released GA term: both sides detached
            with torch.no_grad(), ctx.autocast():
                pre = self.learner(s.previous, ctx.batch)
            ga = F.mse_loss(F.softmax(out.detach().float(), dim=1),
                            F.softmax(pre.float(), dim=1))
            metrics["ga_loss"] = ga
            loss = loss + self.alpha * ga
        if join is not None:
            q = F.softmax(join.float(), dim=1).gather(1, labels.long().unsqueeze(1))
            metrics["join_prob"] = q.mean()
        parts = {**others, s.learner: out.detach()}
        names = [m for m in self.modalities if m in parts]
        logits = {"fused": self._ensemble(parts, names).detach(), **parts}
        return loss, logits, metrics

    def _rectification_phase(self, ctx: StepContext, s: Stage):
        with ctx.autocast():
            parts = {k: self.learner(k, ctx.batch) for k in s.ensemble}
            out = self._ensemble(parts, s.ensemble)
        loss = F.cross_entropy(out.float(), ctx.labels)
        loss.backward()
        logits = {"fused": out.detach(),
                  **{m: parts[m].detach() for m in self.modalities if m in parts}}
        return loss.detach(), logits, {"ensemble_loss": loss.detach()}

    def _average_gradients(self) -> None:
        """DDP: the mean over ranks of every gradient this step made (one all-reduce)."""
        if _dist.world_size() == 1:
            return
        grads = [p.grad for p in self.bare.parameters() if p.grad is not None]
        flat = _dist.mean_(_flatten_dense_tensors(grads))
        torch._foreach_copy_(grads, list(_unflatten_dense_tensors(flat, grads)))

    def _frozen_columns(self, s: Stage):
        """concat, learner phase: the other modalities' columns of the shared classifier weight
        (weight, column slice, their values) to put back after the step."""
        fusion = self.bare.fusion
        if s.phase != 1 or not isinstance(fusion, ConcatFusion):
            return []
        weight, kept, start = fusion.fc_out.weight, [], 0
        for m, width in zip(fusion.modalities, fusion.dims):
            if m != s.learner:
                cols = slice(start, start + width)
                kept.append((weight, cols, weight.detach()[:, cols].clone()))
            start += width
        return kept

    LOCAL = ("learner_loss", "ga_loss", "join_prob", "ensemble_loss")  # per-rank batch means

    def step_metrics(self):
        """The signal of the last step; the losses are averaged over the ranks here (called
        on every rank, only when the loop logs), so they are the global batch's."""
        out = dict(self._metrics)
        local = [k for k in self.LOCAL if k in out]
        if local and _dist.world_size() > 1:
            values = _dist.mean_(torch.stack([out[k].float() for k in local]))
            out.update(zip(local, values.unbind()))
        return out

    def state_dict(self) -> dict:
        stage, phase = self._last if self._last is not None else (-1, 0)
        return {"stage": torch.tensor(stage), "phase": torch.tensor(phase)}

    def load_state_dict(self, state: dict) -> None:
        if "stage" in state:
            stage, phase = int(state["stage"]), int(state["phase"])
            self._last = None if stage < 0 else (stage, phase)
