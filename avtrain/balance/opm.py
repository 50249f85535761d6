"""OPM: on-the-fly prediction modulation.

Paper: Y. Wei, D. Hu, H. Du, J.-R. Wen, "On-the-fly Modulation for Balanced Multimodal
Learning", IEEE TPAMI 2024 (the journal extension of OGM-GE, CVPR 2022). Released code:
github.com/GeWu-Lab/BML_TPAMI2024 (commit 4b3aa4f), code/models/Classifier.py: `custom_autograd`
(lines 9-21), `Modality_drop.execute_drop` (24-55), `calcu_q` (58-72), `Classifier.forward`
(93-153: scores 112-143, drop 145-149); code/main.py: argparse defaults (42-44), `train`
(77-176: warm-up 91, the update_flag filter 95-101, CE 104, backward 114, step 171);
code/config.py (feature sizes `d` 41); code/scripts/train_opm.sh (q_base 0.5, lam 0.5,
p_exe 0.7). BalanceMM's re-implementation: GeWu-Lab/BalanceBenchmark (4c1482f)
balancemm/trainer/OPM_trainer.py (`Modality_drop` 16-49, `training_step` 138-207) and
configs/trainer_config.yaml (OPM block, lines 82-88). No code is copied;
tests/test_opm_released.py checks our steps against a reference written from the released
semantics.

One step, inside the window [--modulation-start, --modulation-end] (released: every epoch after
the 6 warm-up epochs 0-5, `warm_up = 1 if epoch <= 5`, and no end):

- the encoders run once (train mode); before the fusion, each modality's score
  s_m = sum over the batch of softmax(logits_m)[y] is measured from its own logits (concat:
  f_m . W_m^T + b/2 with the classifier's weights, as released; sum: fc_m(f_m); other fusions:
  the auxiliary heads), summed over all ranks in DDP;
- drop probabilities (released `calcu_q`): r_m = tanh(relu(s_m / s_other - 1)),
  q_m = clip(q_base * (1 + lambda * r_m), 0, 1) where r_m > 0, else 0 -- only the dominant
  modality gets a q above 0, none at a tie;
- with probability p_exe the step drops at all (one draw per step); then each sample's
  modality-m feature is zeroed with probability q_m (one draw per sample and modality) and
  *every* feature, kept or not, is divided by 1 - theta, theta = sum_m d_m q_m / sum_m d_m
  (d_m the feature sizes): the released inverse-dropout scale, one scalar for all modalities;
- the fusion runs on those features, loss = CE(fused) (batch mean), one backward, one step.

The gradient of theta, as released (`--opm-theta-grad released`, the default): the released
`custom_autograd.backward` (Classifier.py lines 17-21) returns theta itself as theta's gradient,
and theta is differentiable back to both encoders -- the scores come from the undetached
features (only the classifier's weight and bias are detached, lines 112-113), `calcu_q` writes
them in place into q, which then requires grad -- so the released step adds theta * d(theta)/d
(encoder parameters) to both encoders' gradients (3-6 % of their largest entry on the toy model
of tests/test_opm_released.py), and nothing to the fusion. It is an artefact (the gradient of
x / (1 - theta) in theta is not theta), but the default follows the released code, because the
published numbers were trained with it (the fidelity rule); `--opm-theta-grad none` measures the
scores without grad and gives the scale no gradient (this module's behaviour before the
option). Under DDP each rank's theta reaches only its own share of the global scores, so the
term is multiplied by the world size before DDP's average: N processes = one process with the
global batch.

The released code then drops samples whose every modality was dropped (`update_flag`); with two
modalities at most one has q > 0, so no sample is ever dropped there and we have no such
filter. The authors define the rule (`calcu_q`) for two modalities only; more is an error here.

Options: `--alpha` is lambda (default 0.5, argparse line 43), `--opm-q-base` (0.5, line 42),
`--opm-p-exe` (0.7, line 44), `--modulation-start` (6: after the warm-up of main.py line 91),
`--modulation-end` (none), `--opm-theta-grad` (released | none, above). The released protocol (AdamW lr 5e-5 wd 0.01, StepLR 40 x 0.1,
batch 32, 100 epochs, its weight_init; main.py 263-268, config.py 22-29) is not a recipe yet.

DDP and randomness: the scores are summed over ranks before q is computed, so every rank gets
the same q and theta. The draws (the per-step "drop at all" and the per-sample masks) come from
a generator seeded by (--seed, step), identical on every rank: each rank draws the masks of the
*global* batch and takes its own rows, so N processes drop exactly what one process with the
global batch drops (the released code is single-GPU, one mask per sample of its batch). The
released draws come from the global numpy (`np.random.rand`) and torch (`Bernoulli.sample`)
generators; ours from that seeded generator, with the released comparisons
(`u >= 1 - p_exe`, keep where `u < 1 - q`), so the same numbers give the same decisions.

Where we differ, and why: the draws' source (above, needed for DDP and exact --resume); the
window is configurable (released: a fixed 6-epoch warm-up); the released Classifier.py line 53
has a stray `]` (the file does not parse as published) -- read as the evident chunking of the
kept features. BalanceMM: q_base 0.4 (the released config.py's value, which the argparse
default 0.5 overrides), window [0, 80] without the warm-up, 1e-5 added to the score ratio's
denominator and to 1 - theta, and for three modalities a ratio to the *sum* of the other scores
with its sample filter; it also skips the backward entirely outside its window.

Everything per step stays on the device: q, theta and the masks are tensors, no `.item()`
(the released `theta.item()` becomes a tensor division).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, number, require_two_modalities, window
from .base import Balancer, StepContext
from .ogm import _mix

DRAW_SALT = 0x0F3A  # separates OPM's draw stream from OGM-GE's noise stream for a seed


def opm_drop_probabilities(scores: torch.Tensor, q_base: float, lam: float) -> torch.Tensor:
    """Drop probability per modality [2] from the scores [2] (released `calcu_q`)."""
    ratio = torch.tanh(torch.relu(scores / scores.flip(0) - 1))
    q = torch.where(ratio > 0, q_base * (1 + lam * ratio), torch.zeros_like(ratio))
    return q.clamp(0.0, 1.0)


def opm_draws(seed: int, step: int, rows: int, modalities: int, device) -> tuple[torch.Tensor,
                                                                                 torch.Tensor]:
    """(u_exe [1], u_mask [rows, modalities]): uniform [0, 1) draws of one step, the same on
    every rank (a generator seeded by seed and step on `device`)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix(int(seed) ^ DRAW_SALT, step))
    u_exe = torch.rand(1, generator=generator, device=device)
    u_mask = torch.rand(rows, modalities, generator=generator, device=device)
    return u_exe, u_mask


THETA_GRAD = ("released", "none")


class _ThetaAsItsGradient(torch.autograd.Function):
    """Identity on `x`; backward hands `theta` itself (times `factor`) to theta as its
    gradient -- what the released `custom_autograd.backward` returns (Classifier.py line 21),
    so autograd adds theta * d(theta)/d(parameters) to the encoders' gradients."""

    @staticmethod
    def forward(ctx, x, theta, factor):
        ctx.save_for_backward(theta)
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad, theta.detach() * ctx.factor, None


@contextmanager
def _as_constants(params):
    """The parameters as constants of the graph built inside (the released `.clone().detach()`
    of the classifier's weight and bias), the features still differentiable."""
    params = [p for p in params if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class OPM(Balancer):
    """Drops the dominant modality's features in the training forward (a fusion pre-hook)."""

    name = "opm"
    title = "OPM"
    paper = ("Y. Wei, D. Hu, H. Du, J.-R. Wen, \"On-the-fly Modulation for Balanced Multimodal "
             "Learning\", IEEE TPAMI 2024")
    year = 2024
    summary = "drops the dominant modality's features before fusion"
    code = ("GeWu-Lab/BML_TPAMI2024 (code/models/Classifier.py, code/main.py) @ 4b3aa4f; "
            "BalanceMM: GeWu-Lab/BalanceBenchmark (OPM_trainer.py) @ 4c1482f")
    differences = (
        "Authors' code: the draws come from a generator seeded by (--seed, step), the same on "
        "every rank (released: the global numpy and torch generators)",
        "Authors' code: the window is an option (released: a fixed warm-up, epochs 0-5, no "
        "end)",
        "Authors' code: Classifier.py line 53's stray `]` is read as the evident chunking",
        "BalanceMM: q_base 0.4, window [0, 80] without the warm-up, 1e-5 in the score ratio "
        "and in 1 - theta, no backward outside its window",
        "BalanceMM: three modalities against the sum of the other scores; ours: two, as the "
        "authors",
    )
    signals = ("drop_exe", "score_<m>", "drop_p_<m>", "dropped_<m>")
    # bench --tune: q_base and lambda set how much of the dominant modality is dropped; the
    # warm-up (released 6 epochs) decides whether a short run modulates at all
    options = (
        Option("alpha", float, 0.5, "lambda: how much the discrepancy raises the drop "
               "probability", minimum=0, shared=True, search=Search(0.15, 1.5, log=True)),
        Option("modulation_start", int, 6, "first modulated epoch (0-based, inclusive; "
               "released: after the warm-up epochs 0-5)", minimum=0, shared=True,
               search=Search(0, 8)),
        Option("modulation_end", int, None, "last modulated epoch (inclusive)", minimum=0,
               shared=True, none_means="no end"),
        Option("q_base", float, 0.5, "base drop probability of the dominant modality",
               minimum=0, maximum=1, search=Search(0.2, 0.8)),
        Option("p_exe", float, 0.7, "probability that a step drops features at all",
               minimum=0, maximum=1),
        Option("theta_grad", str, "released", "released (the custom autograd returns theta as "
               "its own gradient) or none (the scale carries no gradient)", choices=THETA_GRAD),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        if len(self.modalities) > 2:
            raise UserError(f"--method opm is defined for two modalities, got "
                            f"{', '.join(self.modalities)}")
        self.lam = self.opt.alpha
        self.q_base, self.p_exe = self.opt.q_base, self.opt.p_exe
        self.start, self.end = window(self.opt)
        self.theta_grad = self.opt.theta_grad
        self.seed = int(number(c, "seed", 0))
        bare = fused_model(model, self.name)
        self.bare = bare
        self.dims = torch.tensor([float(bare.encoders[m].out_dim) for m in self.modalities],
                                 device=self.device)
        bare.fusion.register_forward_pre_hook(self._drop)
        self._armed: tuple[torch.Tensor, int, int] | None = None  # (labels, epoch, step)
        self._metrics: dict[str, torch.Tensor] = {}

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch and (self.end is None or epoch <= self.end)

    # -- the step: the default hook sequence, with the fusion's input modulated --

    def train_step(self, ctx: StepContext):
        self._armed = (ctx.labels, ctx.epoch, ctx.step)
        try:
            return super().train_step(ctx)
        finally:
            self._armed = None

    def _scores(self, feats: dict[str, torch.Tensor], labels: torch.Tensor,
                grad: bool) -> torch.Tensor:
        """Each modality's sum of true-class probabilities [M], summed over all ranks. With
        `grad` (the released graph) they stay differentiable in this rank's features, the
        classifier's weights constants, and carry the other ranks' sum as a constant."""
        bare = self.bare
        decomposable = bare.fusion.decomposable and not bare.aux_heads
        heads = bare.fusion if decomposable else bare.aux_heads
        with torch.set_grad_enabled(grad), _as_constants(heads.parameters() if grad else []):
            inputs = feats if grad else {m: feats[m].detach() for m in feats}
            if decomposable:
                logits = bare.fusion.modality_logits(inputs)
            else:
                logits = {m: bare.aux_heads[m](inputs[m]) for m in self.modalities}
            index = labels.long().unsqueeze(1)
            scores = torch.stack([F.softmax(logits[m].float(), dim=1).gather(1, index).sum()
                                  for m in self.modalities])
        total = _dist.sum_(scores.detach().clone())
        return scores + (total - scores.detach()) if grad else total

    def _drop(self, module, args):
        if self._armed is None or not module.training:
            return None
        labels, epoch, step = self._armed
        self._armed = None  # one modulated fusion call per step
        (feats,) = args
        active = self.in_window(epoch)
        grad = self.theta_grad == "released" and active and torch.is_grad_enabled()
        scores = self._scores(feats, labels, grad)
        q = opm_drop_probabilities(scores, self.q_base, self.lam)
        if not active:
            q = torch.zeros_like(q)
        batch = labels.shape[0]
        world, rank = _dist.world_size(), _dist.rank()
        u_exe, u_mask = opm_draws(self.seed, step, world * batch, len(self.modalities),
                                  labels.device)
        execute = (u_exe[0] >= 1 - self.p_exe) & active
        keep_all = u_mask < 1 - q  # the global batch's masks, the same on every rank
        keep_all = keep_all | ~execute
        dims = self.dims.to(q.device)
        theta = torch.where(execute, (dims * q).sum() / dims.sum(), torch.zeros_like(q[0]))
        keep = keep_all[rank * batch:(rank + 1) * batch]
        out = {}
        for i, m in enumerate(self.modalities):
            f = feats[m]
            out[m] = f * keep[:, i:i + 1].to(f.dtype) / (1 - theta.detach()).to(f.dtype)
        if grad and theta.requires_grad:
            # once per step, as the released single custom_autograd call on the stacked
            # features; x world: DDP averages, and each rank's theta reaches only its own
            # scores' share of the global sum
            first = self.modalities[0]
            out[first] = _ThetaAsItsGradient.apply(out[first], theta, float(world))
        dropped = (~keep_all).float().mean(dim=0)
        self._metrics = {"drop_exe": execute.float()}
        for i, m in enumerate(self.modalities):
            self._metrics[f"score_{m}"] = scores[i].detach()
            self._metrics[f"drop_p_{m}"] = q[i].detach()
            self._metrics[f"dropped_{m}"] = dropped[i]
        return (out,)

    def step_metrics(self):
        return dict(self._metrics)
