"""The interface every balancing method implements, and the plain baseline (`none`).

Two levels. The loop calls `balancer.train_step(ctx)` once per step and
`balancer.start_epoch(ectx)` before each epoch's first step; that is all it knows.

**Hooks** (most methods). `Balancer.train_step` is the hook sequence below; a method that only
changes the loss, edits gradients between `backward()` and `step()`, or keeps its own
coefficients overrides the hooks and nothing else:

    logits = ctx.forward(ctx.batch)             # {"fused": ..., "audio": ..., "visual": ...}
    if ctx.feed_heldout is not None:            # OLM-com: a `val` batch, never `test`, with
        ctx.feed_heldout()                      # this step's weights -> balancer.heldout(...)
    loss = balancer.loss(logits, labels, epoch=e, step=s)
    optimizer.zero_grad(); (loss + ctx.extra_loss(logits, labels)).backward()
    balancer.before_optimizer_step(logits, labels, epoch=e, step=s)   # may rescale gradients
    ctx.clip_grad(); optimizer.step()
    balancer.after_optimizer_step()             # e.g. OLM's own coefficient optimizer

(`extra_loss` trains the detached auxiliary heads of non-decomposable fusions; it is zero for
the others.) `end_epoch(epoch)` comes after each epoch.

**Owning the step.** A method whose step is not "one loss, one backward, one step" overrides
`train_step(ctx)` and does the whole step itself with what `StepContext` gives: the network to
call (DDP-wrapped, so gradients are averaged) and the bare model (its encoders, heads,
`features`), the batch and labels, the optimizer, `autocast()`, `clip_grad()`, epoch, step and
`forward`. It must return (loss, logits) -- the fused logits of the batch for the training
accuracy, a 0-d loss for the log -- and leave the optimizer stepped. Only one forward of
`ctx.net` may join a backward per step under DDP (use `ctx.model`, the bare model, for the
others and reduce their gradients itself, or run them under `no_grad`).

**Epoch-level work.** `start_epoch(ectx)` receives an `EpochContext`: the models, epoch,
`autocast()`, and `batches(n)`, n training batches (own order, train transforms) already on
the device, for methods that measure the model on data before an epoch (PMR's prototypes,
G-Blending's held-out weights); `eval_batches(split)` reads a whole split once across the
ranks without augmentation (Re-learning's diagnosis of train and `val_split`).

Which level each method of issue #19 needs -- the test of this design:

| method | level | why |
|---|---|---|
| none, OGM, OGM-GE | hooks | CE, then gradients scaled (and noised) before the step |
| OLM, OLM-com | hooks | loss of weighted logits, own optimizer after the step; held-out forward via `feed_heldout` |
| PMR | hooks + start_epoch | prototypes before each epoch; the step is CE plus a prototype CE on the weak modality, read from the same forward (encoder outputs kept by forward hooks) |
| MMPareto | owns the step | one forward of the bare model; `autograd.grad` of the multimodal and of each unimodal loss w.r.t. the encoders (and heads), averaged over the ranks by hand in one flat all-reduce; per encoder min-norm or equal weights by the cosine, each tensor rescaled up to the summed gradient's norm, times gamma; one step |
| MLA | owns the step | one encoder forward of the bare model, then per modality: CE of the shared head's logits, backward, gradients all-reduced by hand, head-gradient edit, optimizer step; its model is built with the `shared` fusion (`model_fusion`) |
| ReconBoost | owns the step | alternates which modality's learner is updated; reconcilement term from the other's frozen output |
| AGM | owns the step | extra forwards of the bare model with modalities' inputs zeroed (eval mode, with grad, as released) give each modality's Shapley contribution; the gradient reaching each contribution is scaled in the one backward, which DDP reduces whole |
| OPM | hooks + a forward pre-hook | the fusion's input changes: `train_step` arms a pre-hook on the bare model's fusion (with the step's labels, epoch, step) and runs the default sequence, so the one forward of `ctx.net` (DDP) scores the modalities and drops the dominant one's features before fusing |
| Greedy | owns the step | its model has MMTM blocks between the encoders (the authors' cross-modal bypass); a re-balancing step replaces one branch's MMTM gates by their running means in the one forward; the conditional learning speeds are read from that step's gradients before the optimizer step |
| G-Blending | hooks + start_epoch | the loss is the weighted sum of each branch's CE (the modalities' own trained heads and the fused logits); every super-epoch `start_epoch` re-estimates the weights: per branch a copy of the bare model with a fresh optimizer trains on `batches(n)` with the other modalities' inputs zeroed (gradients averaged over the ranks by hand), its losses on `eval_batches(val_split)` give the overfitting-to-generalisation ratio |
| Re-learning | start_epoch | re-initialises encoders between epochs; the step is the baseline's |
| AMCo | owns the step + a fusion forward hook | the dependent modality's unimodal logits are masked (BalanceMM masks class logits, not encoder features): the hook replaces the fusion's output by the sum of the masked unimodal logits inside the one forward of `ctx.net`; fused + unimodal CE, one backward; the model carries BalanceMM's `linear_star` (`output_layer`) |
| valuation | start_epoch + `train_copies` + a fusion pre-hook | every training sample valued in eval mode (`eval_batches("train")`: each modality's Shapley contribution to the sample's right prediction); the next epoch's stream adds copies of samples that keep one modality alone (`train_copies`, a re-sampled training set); the pre-hook zeroes each copy's dropped features before the fusion; CE as the baseline |
| CML | hooks (`loss`) | one forward; subset logits are the fused logits minus removed modalities' summands (one random order per epoch); CE of each, hinge on subset-minus-full max-softmax confidence, gated on the all-reduced batch sum under DDP |
| MBSD | hooks | the loss only: CE of the fused and of each modality's logits (the fused layer's split) plus, per pair, BalanceMM's sample-weighted KL and RS terms between the stronger and weaker modality's true-class probability / outputs, in the window |
| LFM | hooks + start_epoch | the loss is CE of the mean unimodal logits plus the logit alignment, weighted; the weights' hypergradient step (double backward on a held-out batch, bare model) in `start_epoch` |
| MMCosine | hooks (`loss`) + `model_fusion` | the model is built with the `cosine` fusion (per-modality L2-normalised features and weight rows of the concat layer, scaled, summed); the loss is CE of those fused logits; the eval rule (the authors' plain concat output, or the cosine sum) is a buffer of the model |
| Remix | start_epoch + `train_groups` + a fusion pre-hook | after its warm-up, each epoch every training sample is measured in eval mode (`eval_batches("train")`: each modality's own head's KL to the uniform distribution) and given to the modality it is least confident in; the epoch is those groups in turn (`train_groups`), batches of one group; the pre-hook zeroes the other modalities' features; CE of the fused and of the kept modality's head |
| Uni-Modal Teacher | hooks (`loss`) | one forward of `ctx.net`; forward hooks keep each encoder's features, each frozen single-modality teacher (a finished run's best.pt, outside the model and optimizer) gives its encoder's features of the batch under no_grad (train mode as BalanceMM, or eval); CE(fused) + scaling · Σ_m MSE, in the window |

`step_metrics()` returns 0-d tensors that the loop turns into numbers only when it logs, so no
method forces a host sync per step. `state_dict()` / `load_state_dict()` hold everything that
`--resume` needs to continue exactly (coefficients, prototypes, optimizers of the method).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from avprep.errors import UserError
from avtrain.options import Option, resolve_options


def _no_autocast():
    return contextlib.nullcontext()


@dataclasses.dataclass
class StepContext:
    """What one training step may use. `net` is what the loop trains (DDP-wrapped under
    torchrun, maybe compiled); `model` is the bare module."""

    net: nn.Module
    model: nn.Module
    batch: dict
    labels: torch.Tensor
    optimizer: torch.optim.Optimizer
    epoch: int
    step: int
    autocast: Callable[[], contextlib.AbstractContextManager] = _no_autocast
    clip_grad: Callable[[], None] = lambda: None
    extra_loss: Callable[[dict, torch.Tensor], torch.Tensor | None] = lambda logits, y: None
    feed_heldout: Callable[[], None] | None = None

    def forward(self, batch: dict | None = None) -> dict[str, torch.Tensor]:
        """The training forward of `net` under autocast (the step's batch by default)."""
        with self.autocast():
            return self.net(self.batch if batch is None else batch)


@dataclasses.dataclass
class EpochContext:
    """What `start_epoch` may use: `batches(n)` yields n training batches on the device (their
    own seeded order, train transforms; the same on every resume of this epoch)."""

    net: nn.Module
    model: nn.Module
    epoch: int
    batches: Callable[[int], Iterator[dict]]
    autocast: Callable[[], contextlib.AbstractContextManager] = _no_autocast
    steps_per_epoch: int = 1
    # every sample of a split exactly once across all ranks, eval transforms, on the device,
    # in eval-loader batches with their "key"s (Re-learning's diagnosis of train and val)
    eval_batches: Callable[[str], Iterator[dict]] | None = None
    val_split: str = "val"


class Balancer:
    """Plain cross-entropy on the fused logits: the baseline every method is compared with."""

    name = "none"
    # what `avtrain methods` shows (one line each; `differences` a tuple of lines)
    title = "baseline"  # the paper's short title
    paper = ""  # authors, title, venue
    year: int | None = None
    summary = "CE on the fused logits, nothing balanced"  # what the method changes
    code = ""  # the released code it was checked against (repository, files, commit)
    differences: tuple[str, ...] = ()  # what differs from its authors' code and from BalanceMM
    signals: tuple[str, ...] = ()  # the step_metrics keys it logs (drawn by avtrain report)
    # options: declared here, read as self.opt.NAME (avtrain.options)
    options: tuple[Option, ...] = ()
    option_prefix: str | None = None  # flags are --PREFIX-NAME; None: the method's name
    origin: str | None = None  # a plug-in's file, module or entry point (None: avbalance's own)
    needs_heldout = False  # the loop feeds a held-out (val) batch every step
    trained_unimodal_heads = False  # the model's per-modality heads must train the encoders
    # parts of the model this method needs (avtrain.models.MODEL_FLAGS; build_model's keywords)
    output_layer = False  # the model passes its fused logits through a Linear(C, C) (AMCo)
    mmtm = False  # MMTM blocks between the audio and visual encoders (Greedy)
    # the setting naming per-modality teacher runs (unimodal_teacher): `avtrain bench` fills it
    # with the same seed's `X only` reference runs and trains those first
    teacher_setting: str | None = None

    def __init__(self, model: nn.Module, config: dict | None = None, *,
                 modalities: list[str] | None = None, device: torch.device | str = "cpu"):
        self.model = model
        self.config = dict(config or {})
        self.opt = resolve_options(type(self), self.config)
        for opt in type(self).options:  # the flat spelling too, as the methods' code reads it
            self.config[opt.key(type(self).prefix())] = getattr(self.opt, opt.name)
        self.modalities = list(modalities or getattr(model, "modalities", ["audio", "visual"]))
        self.device = torch.device(device)

    @classmethod
    def who(cls) -> str:
        """How error lines name this method (a plug-in with where it came from)."""
        return f"plug-in method {cls.name!r} ({cls.origin})" if cls.origin else \
            f"method {cls.name!r}"

    def check_loss(self, loss, what: str = "loss()") -> None:
        """A loss must be a one-element tensor (a plug-in returning a float is one line)."""
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            got = (f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor)
                   else type(loss).__name__)
            raise UserError(f"{self.who()}: {what} must be a one-element tensor, got {got}")

    @classmethod
    def prefix(cls) -> str:
        return cls.option_prefix or cls.name

    @classmethod
    def option_default(cls, name: str):
        """The declared default of one of this method's options (None if it has none)."""
        return next((o.default for o in cls.options if o.name == name), None)

    @classmethod
    def model_fusion(cls, fusion: str) -> str:
        """The fusion this method's model is built with, given --fusion: that one for most
        methods; MLA builds its shared head. May raise UserError (before any training)."""
        return fusion

    def train_step(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step -> (loss, logits): the hook sequence of the module docstring.
        Override it only when the method must own the whole step."""
        labels = ctx.labels
        logits = ctx.forward()
        if ctx.feed_heldout is not None:
            ctx.feed_heldout()
        loss = self.loss(logits, labels, epoch=ctx.epoch, step=ctx.step)
        self.check_loss(loss)
        extra = ctx.extra_loss(logits, labels)
        ctx.optimizer.zero_grad(set_to_none=True)
        (loss + extra if extra is not None else loss).backward()
        self.before_optimizer_step(logits, labels, epoch=ctx.epoch, step=ctx.step)
        ctx.clip_grad()
        ctx.optimizer.step()
        self.after_optimizer_step()
        return loss, logits

    def start_epoch(self, ctx: EpochContext) -> None:
        """Called before each epoch's first step (also the first epoch after --resume)."""

    def loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, *, epoch: int,
             step: int) -> torch.Tensor:
        """The network's training loss; the baseline is CE on the fused logits."""
        return F.cross_entropy(logits["fused"].float(), labels)

    def before_optimizer_step(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, *,
                              epoch: int, step: int) -> None:
        """Called after `backward()`: gradient modulation happens here."""

    def after_optimizer_step(self) -> None:
        """Called after the network's optimizer stepped."""

    def heldout(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """A held-out batch's logits (no grad), for methods with `needs_heldout`; called after
        the training forward and before `loss()`, so the step sees this batch's losses."""

    @property
    def heldout_train_mode(self) -> bool:
        """The held-out forward (needs_heldout) in train mode with the train transforms
        (OLM-com's released choice) or in eval mode without them."""
        return True

    def train_copies(self) -> dict[str, tuple[int, ...]] | None:
        """Asked after `start_epoch`: extra copies of training samples for this epoch (a
        data-level method): sample key -> one modality mask per copy (bit i keeps the model's
        i-th modality; the others' features are zeroed). The epoch's steps grow with them.
        None: the training stream as it is."""
        return None

    def train_groups(self) -> list[tuple[int, list[str]]] | None:
        """Asked after `start_epoch`: this epoch's training set re-assembled by a data-level
        method (Remix), an ordered list of (modality mask, sample keys): the epoch is each group
        in turn, every batch from one group only, each sample once with its group's mask (bit i
        keeps the model's i-th modality). None: the training stream as it is."""
        return None

    def end_epoch(self, epoch: int) -> None:
        """Called once after each training epoch."""

    def _as_tensors(self, values: dict[str, float]) -> dict[str, torch.Tensor]:
        """Per-epoch figures kept as floats (in `state_dict`, so resume restores them) as the
        float32 tensors `step_metrics` logs."""
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device)
                for k, v in values.items()}

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """What this step did (scores, coefficients, weights), as 0-d tensors."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
