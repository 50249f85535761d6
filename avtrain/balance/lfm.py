"""LFM: dynamically learning the modality gap.

Paper: F. Yang, F. Wan, ..., "Facilitating Multimodal Classification via Dynamically Learning
Modality Gap", NeurIPS 2024. Reference: the authors' code, njustkmg/NeurIPS24-LFM (commit
ad44fa0): Crema_epoch_learnable.py (`Alignment` 37-44, `getAlpha_Learnable_Fitted` 46-52,
`getAlpha_Learnable` 55-97, `train_audio_video` 101-130, the held-out batch 216-233, the epoch
loop 246-257), Crema_epoch.py (the README's run command: the fitted schedule, 47-53, 193-197),
model/AudioVideo.py (`AVClassifier` 46-67: two linear heads cls_a, cls_v on the pooled ResNet-18
features; output = their sum). BalanceMM's re-implementation, GeWu-Lab/BalanceBenchmark
(commit 4c1482f) balancemm/trainer/LFM_trainer.py (`Alignment` 32-39, `getAlpha_Learnable`
41-80, `fit` 145-150, `training_step` 332-349) and configs/trainer_config.yaml (LFM block,
lines 110-117), is compared below. No code is copied; tests/test_lfm_released.py checks our
steps against a reference written from the released semantics.

There is no contrastive loss in the released code. The "modality gap" term is an alignment of
the unimodal *class logits* (not the encoder features): with p = softmax(z_a), q = softmax(z_v),
m = (p + q) / 2,

    align = 0.5 * (KL(m || p) + KL(m || q)),   each KL summed over classes, averaged over the batch

(`F.kl_div(p.log(), m, reduction='batchmean')` is KL(m || p): the released "JS score" has the
KL terms the other way round from the Jensen-Shannon divergence; we keep the released one). It
is symmetric in the two modalities and has no temperature. One step:

    loss = 2 * (a_cls * CE(mean_m z_m, y) + a_align * align)      (CE averaged over the batch)

one backward, one optimizer step (`0.5 * o_v + 0.5 * o_a` is the released CE input: the mean
of the unimodal logits). N modalities: align is the mean over all pairs (BalanceMM's rule,
`manual_combinations`; the authors' code has two) and the CE input the mean of the M logits.

The weights (a_cls, a_align = 1 - a_cls), once per epoch before its first step:

- `learnable` (default; the paper's bilevel method, Crema_epoch_learnable.py, BalanceMM):
  starting from a_align = 0.95, before each epoch e on a fixed held-out batch (the authors: 16
  training samples held out from training, the first 8 used): L = a_cls * CE + a_align * align
  (no factor 2), g = dL/dθ (with its graph), c = dCE/dθ, h = (d(g . c)/dθ) for the *first
  parameter only* (the released `hessian_vector_prod[0]`: the audio encoder's first conv),
  lr_alpha halves when e % 20 == 0 and e > 0 (`--lfm-lr-alpha-halving`), a_align <-
  clip(a_align - lr_alpha * mean(h), 0.05, 0.95), a_cls = 1 - a_align. lr_alpha = 1e-4
  (`--lfm-lr-alpha`; both the authors' line 246 and BalanceMM's config line 117).
- `fitted` (Crema_epoch.py, the README's command): the polynomials of the epoch that the
  authors fitted to a learnable run on CREMA-D: a_cls(e) = sum_i c_i e^i.

Where BalanceMM differs from the authors (our options give both where it matters):

- it starts from a_cls = 0.95, a_align = 0.05 (`alpha = {1: 0.05, 0: 0.95}`), the authors from
  a_cls = 0.05, a_align = 0.95 (`cls_k = [0.05, 0.95]`): `--lfm-alpha-init` (0.95; BalanceMM 0.05);
- its CE input is the model's fused output, ours by default the authors' mean of the unimodal
  logits (`--lfm-cls-input mean|fused`; for `sum` the fused logits are M times the mean, for
  `concat` too up to its bias split);
- its held-out batch is the first quarter of the first *validation* batch (`valbatch[:B // 4]`),
  the authors' 8 of 16 held-out training samples; ours: `--lfm-heldout-size` (8) samples of the
  training stream (train transforms, as the authors' subset of the training dataset) drawn once
  before the first epoch and kept for the whole run (in the checkpoint). They are not removed
  from training (the training stream is resampled shards);
- it always runs the alpha step in train mode; the authors' loop runs it right after `val()`,
  so in eval mode from epoch 1 on (train mode, BatchNorm statistics updated, at epoch 0):
  `--lfm-alpha-mode released|train`;
- its config's `alpha`, `method: learning-fitted`, `modulation_starts/ends`, `modality` are
  read and not used: BalanceMM always runs the learnable schedule.

DDP. The alignment is per sample (a sum over classes, averaged over the batch): no sample
interacts with another, unlike a contrastive loss, so the per-rank batch means with DDP's
gradient averaging give exactly the global batch's gradient; nothing needs gathering. The alpha
step must give the same a on every rank: each rank contributes heldout_size / world of its
first batch, the pieces are all-gathered into one held-out batch, and every rank computes the
same hypergradient on the bare model (no DDP forward) -- the one-process run with that batch.
Token batches (text) may be padded to different lengths on different ranks: each piece is
padded with 0 (the pad id, masked by the encoder) to the longest before the all-gather.

The hypergradient runs in fp32 on the bare model with the math attention kernel (the fused
SDPA kernels have no double backward; the text encoder needs it).

Other differences: the log of p is log_softmax (the released softmax().log(), equal up to
rounding, finite where p underflows). The weights are device tensors (no `.item()`; the
released `alpha_grad` is a host float); the step adds no host sync.
"""

from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities
from .base import Balancer, EpochContext

# Crema_epoch.py lines 49-50: a_cls(e) and a_align(e) = sum_i c_i * e**i
FITTED_CLS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08,
              -5.39717505e-11)
FITTED_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06,
                -2.23835486e-08, 5.39717505e-11)


def lfm_alignment(logits: list[torch.Tensor]) -> torch.Tensor:
    """The released alignment, mean over all pairs of modalities: for p, q the softmax of two
    modalities' logits and m = (p + q) / 2, 0.5 * (KL(m || p) + KL(m || q)), each KL summed
    over classes and averaged over the batch."""
    logp = [F.log_softmax(z.float(), dim=-1) for z in logits]
    pairs = list(itertools.combinations(range(len(logits)), 2))
    total = logp[0].new_zeros(())
    for i, j in pairs:
        m = 0.5 * logp[i].exp() + 0.5 * logp[j].exp()
        kl_i = F.kl_div(logp[i], m, reduction="batchmean")
        kl_j = F.kl_div(logp[j], m, reduction="batchmean")
        total = total + 0.5 * (kl_i + kl_j)
    return total / len(pairs)


def lfm_fitted_alpha(epoch: int) -> tuple[float, float]:
    """(a_cls, a_align) of the authors' fitted schedule at `epoch` (0-based)."""
    return (sum(c * epoch ** i for i, c in enumerate(FITTED_CLS)),
            sum(c * epoch ** i for i, c in enumerate(FITTED_ALIGN)))


def lfm_alpha_update(align: torch.Tensor, lr: float, grad: torch.Tensor, epoch: int, *,
                     halving: int):
    """One learnable update -> (a_cls, a_align, lr): lr halves when epoch % halving == 0 and
    epoch > 0 (the released 20: `--lfm-lr-alpha-halving`), a_align <- clip(a_align - lr * grad,
    0.05, 0.95), a_cls = 1 - a_align."""
    if epoch % halving == 0 and epoch != 0:
        lr = lr / 2
    # float64, as the released Python float (`alpha[1] -= lr_alpha * alpha_grad.item()`):
    # in float32 a step below ~3e-8 at a_align ~0.95 (half a float32 ulp) would vanish
    align = align.to(torch.float64)
    align = (align - lr * grad.to(align.device, torch.float64)).clamp(0.05, 0.95)
    return 1.0 - align, align, lr


def _gather_padded(piece: torch.Tensor) -> torch.Tensor:
    """All ranks' `piece`s concatenated in rank order; a [B, L, ...] piece whose L differs
    between ranks (padded tokens) is padded with 0 at the end of dim 1 to the longest first."""
    world = _dist.world_size()
    if piece.dim() >= 2:
        longest = torch.tensor(piece.shape[1], device=piece.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)  # once per run, not in the step
        pad = [0, 0] * (piece.dim() - 2) + [0, int(longest) - piece.shape[1]]
        piece = F.pad(piece, pad)
    pieces = [torch.empty_like(piece) for _ in range(world)]
    dist.all_gather(pieces, piece.contiguous())
    return torch.cat(pieces)


class LFM(Balancer):
    """CE of the mean unimodal logits plus a logit alignment, weighted by a learned schedule."""

    name = "lfm"
    title = "LFM"
    paper = ("F. Yang, F. Wan, et al., Facilitating Multimodal Classification via Dynamically "
             "Learning Modality Gap, NeurIPS")
    year = 2024
    summary = "CE + unimodal logit alignment, weights learned per epoch"
    code = ("njustkmg/NeurIPS24-LFM (Crema_epoch_learnable.py, Crema_epoch.py, "
            "model/AudioVideo.py) @ ad44fa0; GeWu-Lab/BalanceBenchmark "
            "(balancemm/trainer/LFM_trainer.py, configs/trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: the held-out batch is 8 samples of the training stream drawn once and "
        "kept in the checkpoint, not removed from training (they hold out 16 training clips)",
        "Authors' code: log_softmax for the released softmax().log() (equal up to rounding)",
        "Authors' code: more than two modalities: the alignment is the mean over all pairs "
        "(BalanceMM's rule)",
        "BalanceMM: starts from a_align 0.95 (the authors'); BalanceMM 0.05 "
        "(--lfm-alpha-init)",
        "BalanceMM: CE of the mean unimodal logits (the authors'); BalanceMM the fused output "
        "(--lfm-cls-input fused)",
        "BalanceMM: held-out samples from the training stream; BalanceMM the first quarter "
        "of the first val batch",
        "BalanceMM: the weight step runs in eval mode after epoch 0 (the authors' loop); "
        "BalanceMM always in train mode (--lfm-alpha-mode train)",
    )
    signals = ("alpha_cls", "alpha_align", "loss_cls", "loss_align", "alpha_grad")
    # bench --tune: the alignment weight's start (authors 0.95, BalanceMM 0.05) and its step size
    # set how much of training aligns rather than classifies
    options = (
        Option("schedule", str, "learnable",
               "learnable (a hypergradient step before each epoch; Crema_epoch_learnable.py, "
               "BalanceMM) or fitted (the authors' polynomials of the epoch, Crema_epoch.py)",
               choices=("learnable", "fitted")),
        Option("alpha_init", float, 0.95,
               "initial weight of the alignment (the authors' cls_k; BalanceMM 0.05)",
               minimum=0.05, maximum=0.95, search=Search(0.05, 0.95)),
        Option("lr_alpha", float, 1e-4, "step size of the alignment weight", minimum=0,
               search=Search(1e-5, 1e-3, log=True)),
        Option("lr_alpha_halving", int, 20,
               "the weight's step size halves every this many epochs", minimum=1),
        Option("cls_input", str, "mean",
               "CE on the mean of the unimodal logits (the authors') or on the fused logits "
               "(BalanceMM)", choices=("mean", "fused")),
        Option("alpha_mode", str, "released",
               "the weight step's forward: released (train mode at epoch 0, eval after) or "
               "train (BalanceMM)", choices=("released", "train")),
        Option("heldout_size", int, 8,
               "training samples drawn once for the weight step (the authors' 16 // 2); the "
               "processes share them evenly", minimum=1),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        opt = self.opt
        self.schedule, self.cls_input, self.alpha_mode = opt.schedule, opt.cls_input, opt.alpha_mode
        self.lr_alpha = opt.lr_alpha  # halves every lr_alpha_halving epochs: in the state
        world = int(c.get("world_size") or 1)
        batch = c.get("batch_size")
        if opt.heldout_size % world:
            raise UserError(f"--lfm-heldout-size must be a number of samples that the {world} "
                            f"processes share evenly, got {opt.heldout_size}")
        self.heldout_size = opt.heldout_size
        if batch is not None and self.schedule == "learnable" and \
                self.heldout_size // world > int(batch):
            raise UserError(f"--lfm-heldout-size {self.heldout_size} needs "
                            f"{self.heldout_size // world} samples of each process's first "
                            f"batch, above --batch-size {batch}")
        bare = fused_model(model, self.name)
        if bare.spec["fusion"] not in ("sum", "concat") or bare.aux_heads:
            raise UserError(f"--method lfm aligns and classifies with per-modality logits "
                            f"that train the encoders: use --fusion sum (the authors' model) or "
                            f"concat, not {bare.spec['fusion']}")
        self.bare = bare
        # a_align (a_cls = 1 - a_align) in float64: the released code keeps a Python float
        self.align = torch.tensor(opt.alpha_init, dtype=torch.float64, device=self.device)
        self.heldout: dict[str, torch.Tensor] | None = None
        self.updated_epoch = -1  # the epoch whose weights are set
        self.alpha_grad = torch.zeros((), device=self.device)
        self._metrics: dict[str, torch.Tensor] = {}

    # -- the weights ---------------------------------------------------------------------------

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 - self.align, self.align

    def objectives(self, logits: dict[str, torch.Tensor], labels: torch.Tensor):
        """(CE, alignment) of one forward's logits."""
        parts = [logits[m] for m in self.modalities]
        if self.cls_input == "mean":
            out = sum(p.float() for p in parts) / len(parts)
        else:
            out = logits["fused"].float()
        return F.cross_entropy(out, labels), lfm_alignment(parts)

    def _draw_heldout(self, ctx: EpochContext) -> dict[str, torch.Tensor]:
        per = self.heldout_size // _dist.world_size()
        batch = next(iter(ctx.batches(1)))
        keys = [*self.modalities, "label"]
        keys += [f"{m}_len" for m in self.modalities if f"{m}_len" in batch]
        part = {k: batch[k][:per].contiguous() for k in keys}
        if _dist.world_size() > 1:
            for k in keys:
                part[k] = _gather_padded(part[k])
        return part

    def hypergradient(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """mean of (d/dθ_0)(dL/dθ . dCE/dθ) on `batch`, θ_0 the first encoder's first
        parameter (the released `hessian_vector_prod[0].mean()`)."""
        model = self.bare
        params = [p for p in model.parameters() if p.requires_grad]
        first = next(p for p in model.encoders[self.modalities[0]].parameters()
                     if p.requires_grad)
        cls_w, align_w = (w.float() for w in self.weights())  # a Python float x float32
        # the math attention kernel: the fused ones (text encoder) have no double backward
        with sdpa_kernel([SDPBackend.MATH]):
            ce, align = self.objectives(model(batch), batch["label"])
            total = cls_w * ce + align_w * align
            grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
            cls_grads = torch.autograd.grad(ce, params, retain_graph=True, create_graph=True,
                                            allow_unused=True)
            outs, vecs = [], []
            for g, v in zip(grads, cls_grads):
                if g is not None and v is not None and g.requires_grad:
                    outs.append(g)
                    vecs.append(v)
            (hvp,) = torch.autograd.grad(outs, [first], grad_outputs=vecs, allow_unused=True)
        if hvp is None:
            return torch.zeros((), device=first.device)
        return hvp.detach().mean()

    def start_epoch(self, ctx: EpochContext) -> None:
        if ctx.epoch == self.updated_epoch:
            return  # resumed inside an epoch whose weights are set
        if self.schedule == "fitted":
            self._fitted(ctx.epoch)
        else:
            if self.heldout is None:
                self.heldout = self._draw_heldout(ctx)
            self.update_alpha(self.heldout, ctx.epoch)
        self.updated_epoch = ctx.epoch

    def _fitted(self, epoch: int) -> None:
        # the two fitted polynomials sum to 1 (their coefficients cancel): a_cls = 1 - a_align
        self.align = torch.tensor(lfm_fitted_alpha(epoch)[1], dtype=torch.float64,
                                  device=self.device)
        self.updated_epoch = epoch

    def update_alpha(self, batch: dict[str, torch.Tensor], epoch: int) -> None:
        """The learnable step before `epoch` on the held-out `batch`."""
        model = self.bare
        was_training = model.training
        model.train(self.alpha_mode == "train" or epoch == 0)
        try:
            self.alpha_grad = self.hypergradient(batch)
        finally:
            model.train(was_training)
        _, self.align, self.lr_alpha = lfm_alpha_update(
            self.align.to(self.alpha_grad.device), self.lr_alpha, self.alpha_grad, epoch,
            halving=self.opt.lr_alpha_halving)

    # -- the step ------------------------------------------------------------------------------

    def loss(self, logits, labels, *, epoch, step):
        if self.schedule == "fitted" and self.updated_epoch != epoch:
            self._fitted(epoch)  # a step without start_epoch (a bare step in a test)
        ce, align = self.objectives(logits, labels)
        align_w = self.align.to(ce.device, ce.dtype)  # the released float scalar x float32 CE
        cls_w = (1.0 - self.align).to(ce.device, ce.dtype)
        # the logged objectives are the global batch's (ranks' means averaged, one collective)
        both = _dist.mean_(torch.stack([ce.detach(), align.detach()]))
        self._metrics = {"alpha_cls": 1.0 - self.align, "alpha_align": self.align.clone(),
                         "loss_cls": both[0], "loss_align": both[1],
                         "alpha_grad": self.alpha_grad.detach()}
        return 2 * (cls_w * ce + align_w * align)

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self):
        return {"align": self.align.clone(), "lr_alpha": self.lr_alpha,
                "updated_epoch": self.updated_epoch, "alpha_grad": self.alpha_grad.clone(),
                "heldout": None if self.heldout is None else dict(self.heldout)}

    def load_state_dict(self, state):
        if not state:
            return
        self.align = state["align"].to(self.device, torch.float64)
        self.lr_alpha = float(state["lr_alpha"])
        self.updated_epoch = int(state["updated_epoch"])
        self.alpha_grad = state["alpha_grad"].to(self.device)
        held = state.get("heldout")
        self.heldout = None if held is None else {k: v.to(self.device) for k, v in held.items()}
