"""AGM: adaptive gradient modulation.

Paper: H. Li, X. Li, P. Hu, Y. Lei, C. Li, Y. Zhou, "Boosting Multi-modal Model Performance with
Adaptive Gradient Modulation", ICCV 2023 (arXiv 2308.07686). Released code: github.com/
lihong2303/AGM (commit 5a65542; its README: "the official Pytorch implementation", by the first
author; a lihongcs/AGM copy could not be fetched here),
model/CREMAD_net.py: `Modality_Audio` / `Modality_Visual` (lines 7-17), `GradMod` (25-72: the
backward hooks 42-51, `update_scale` 53-55, the forward 57-72); run/CREMAD_main.py: `train`
(13-268: contributions 63-66, CE 69, scores 130-143, coefficients 145-152, running averages
154-155, window and backward 159-166, conditional clipping 233-243, step 244), `CREMAD_main`
(the scores start at 0 and carry over epochs, 612-613 and 637; epochs count from 1, 635);
utils/config.py: argparse defaults (alpha 1.0, modulation_starts 0, modulation_ends 20; lines
74-76). Three modalities: model/URFunny_net.py (`Modality_Text/Audio/Visual` 6-31, `GradMod`
39-120) and run/URFunny_main.py (`train`, lines 98-145 and 204-207). BalanceMM's
re-implementation: GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/AGM_trainer.py
(`newGrad` 221-271, `AGMTrainer.training_step` 535-589) and configs/trainer_config.yaml (AGM
block, lines 14-19). No code is copied; tests/test_agm_released.py checks our steps against a
reference written from the released semantics (GradMod's hooks, the Python-float rule).

One step (every step; the window only decides whether the coefficients are applied):

- the training forward of the network (train mode): f(M), the fused logits with every modality;
- then, the model in **eval** mode and **with grad** (as released: GradMod runs `self.net.eval()`
  without `no_grad`, so these outputs are part of the graph), one forward per non-empty proper
  subset S of the modalities, the others' inputs replaced by zeros (`torch.zeros_like` of the
  input, as released `pad_audio` / `pad_visual`): f(S); the model goes back to train mode;
- each modality's contribution is the Shapley value of the fused logits with f(empty) = 0:
  m_i = sum over S in M\\{i} of |S|! (N-|S|-1)! / N! * (f(S+i) - f(S)); two modalities:
  m_a = (f(av) - f(v) + f(a)) / 2 (released `Modality_Audio`), so sum_i m_i = f(M); three:
  URFunny_net.py's formulas (released zero_padding_out is computed but unused);
- s_i = mean over the batch of -log softmax(m_i)[y], a sample with p < 1e-8 counting
  -log(1e-8) (CREMAD_main.py 133-143), summed and counted over all ranks in DDP; the released
  three-modality script has no such floor (URFunny_main.py 112-115: -log p as it is, inf when
  p underflows to 0): `--agm-floor 0` follows it;
- ratio_i = exp(N/(N-1) * (mean(s) - s_i)) (two modalities: exp(s_v - s_a) for audio,
  CREMAD_main.py 145-146; three: URFunny_main.py 117-121), the same rule on the running
  scores t gives optimal_i, and k_i = exp(alpha * min(optimal_i - ratio_i, cap));
- the running scores are the cumulative mean of every step's s over the whole run, updated
  after k is computed: t <- t (n-1)/n + s/n at the run's n-th step, t = 0 at the start
  (released: iteration = (epoch-1) * batches + step + 1, carried over epochs);
- inside the window, GradMod's scales become k (`update_scale`); loss = CE(sum_i m_i, y), the
  batch mean, and the gradient reaching each m_i is multiplied by its scale (the released
  full-backward hooks on `Modality_out`), so modality i's contribution is trained k_i times as
  hard; one backward, through the training forward and the padded ones;
- the released conditional clipping: if the fused classifier's weight gradient has an entry
  above `--agm-clip` or below -`--agm-clip` (released: 1.0 for CREMA-D), every gradient is
  clipped to total norm `--agm-clip` (`clip_grad_norm_`); then the loop's own `--clip-grad`,
  and the step.

Outside the window the scales are not updated, and the released hooks keep applying the last
ones: 1 before the window, the last in-window coefficients after it (`--agm-after-window
hold`, the default). `--agm-after-window reset` applies 1 after the window instead (plain CE).

Options: `--alpha` (1.0, the argparse default; the README's example command uses 2.5),
`--modulation-start` / `--modulation-end` (0 / 19: the released 0 / 20 count epochs from 1, so
its window is the first 20 epochs; our epochs count from 0), `--agm-cap` (10, CREMAD_main.py
151-152; URFunny_main.py uses 7, the AVE, AV-MNIST and MOSEI scripts no cap: `inf`),
`--agm-clip` (1.0, CREMAD_main.py 237-238; URFunny 5.0; 0 turns it off), `--agm-after-window`,
`--agm-floor` (1e-8, CREMAD_main.py 133-141; URFunny 0: no floor). The defaults are the CREMA-D
script's for any number of modalities; for the UR-Funny script pass `--agm-cap 7 --agm-clip 5
--agm-floor 0`.

The authors define AGM for N modalities (two: CREMA-D, AVE, AV-MNIST, MOSEI; three: UR-Funny),
so any number of modalities >= 2 is accepted: 2^N - 2 extra forwards per step.

DDP: only the training forward goes through `ctx.net` (DDP); the padded forwards use the bare
model. They join the same backward, and autograd sums every path's gradient into a parameter
before its accumulation hook fires, which is when DDP's reducer takes it -- so DDP averages the
whole gradient, padded paths included (tests/test_agm_released.py: 2 gloo processes = one
process with the global batch, BatchNorm off because per-rank batch statistics differ from the
global batch's). The scores are summed with their counts over all ranks, so every rank computes
the same coefficients and running scores; the clipping test reads the averaged gradients.

Where we differ, and why: the scores, ratios and coefficients are device tensors (float64 for
the rule, as the released Python floats) instead of `.item()` and `math.exp`, so there is no
host sync per step; the conditional clipping is a device-side `where` with the same result;
the released loop's own accuracy bookkeeping is not part of the method. BalanceMM differs from
the authors in: the padded forwards run under `no_grad` and the coefficients multiply the
gradients of every non-1-D parameter whose name contains the modality after the backward
(instead of scaling the contributions' gradients); its Shapley sum skips the empty coalition
(two modalities: m_a = (f(av) - f(v)) / 2); its ratio has the opposite sign,
exp(N/(N-1) (s_i - mean(s))), so it modulates the other way round; cap 7; it applies the
coefficients at every step (its modulation_starts/ends are read but not used); it clips at 5
(threshold and norm); alpha 0.1, window 0-80; its training forward comes after the padded ones.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import require_two_modalities, window
from .base import Balancer, StepContext

AFTER_WINDOW = ("hold", "reset")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` (GradMod's hook on `Modality_out`)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def coalitions(modalities: list[str]) -> list[frozenset]:
    """The non-empty proper subsets of `modalities` (each an extra, padded forward)."""
    n = len(modalities)
    return [frozenset(c) for size in range(1, n) for c in itertools.combinations(modalities, size)]


def agm_contributions(outputs: dict[frozenset, torch.Tensor], modalities: list[str]
                      ) -> dict[str, torch.Tensor]:
    """Each modality's Shapley contribution to the fused logits, with f(empty) = 0:
    m_i = sum_{S in M\\{i}} |S|! (N-|S|-1)! / N! (f(S + i) - f(S)). `outputs` maps the kept
    modalities (frozenset) to the fused logits of that forward; the full set is the training
    forward. Two modalities: m_a = (f(av) - f(v) + f(a)) / 2, as released."""
    n = len(modalities)
    out = {}
    for m in modalities:
        others = [o for o in modalities if o != m]
        total = None
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                gain = outputs[s | {m}] - outputs[s] if s else outputs[s | {m}]
                total = weight * gain if total is None else total + weight * gain
        out[m] = total
    return out


def agm_scores(contributions: dict[str, torch.Tensor], labels: torch.Tensor,
               modalities: list[str], floor: float = 1e-8) -> torch.Tensor:
    """Mean over the batch (all ranks) of -log softmax(m_i)[y], a probability below `floor`
    counting -log(floor) (CREMAD_main.py 133-141); floor 0: none, as URFunny_main.py 112-115
    (a probability that underflows to 0 then makes the score inf): [N], float64."""
    index = labels.long().unsqueeze(1)
    sums = []
    for m in modalities:
        p = F.softmax(contributions[m].detach().float(), dim=1).gather(1, index).squeeze(1)
        nll = -torch.log(p)
        if floor > 0:
            least = -torch.log(torch.tensor(floor, dtype=torch.float32, device=labels.device))
            nll = torch.where((p < floor) | torch.isinf(nll), least, nll)
        sums.append(nll.sum())
    count = torch.tensor(float(labels.shape[0]), device=labels.device)
    totals = _dist.sum_(torch.stack([*sums, count]))
    return (totals[:-1] / totals[-1]).double()


def agm_coefficients(scores: torch.Tensor, running: torch.Tensor, alpha: float,
                     cap: float = 10.0) -> torch.Tensor:
    """k_i = exp(alpha * min(optimal_i - ratio_i, cap)) with ratio_i = exp(N/(N-1) (mean(s) -
    s_i)) from this step's scores and optimal_i the same from the running scores."""
    n = scores.numel()
    factor = n / (n - 1)
    ratio = torch.exp(factor * (scores.mean() - scores))
    optimal = torch.exp(factor * (running.mean() - running))
    return torch.exp(alpha * torch.clamp(optimal - ratio, max=cap))


def fused_head_weights(model: nn.Module) -> list[torch.Tensor]:
    """The fused classifier's weight(s), whose gradient triggers the released clipping
    (`fusion_module.fc_out.weight`): the fusion's `fc_out`, the `sum` fusion's per-modality
    layers (together, the concat layer's weight), a sequence model's `fused_head`."""
    head = getattr(model, "fused_head", None)
    if isinstance(head, nn.Linear):
        return [head.weight]
    fusion = getattr(model, "fusion", None)
    if isinstance(getattr(fusion, "fc_out", None), nn.Linear):
        return [fusion.fc_out.weight]
    if isinstance(getattr(fusion, "fc", None), nn.ModuleDict):
        return [layer.weight for layer in fusion.fc.values()]
    raise UserError("--method agm: this model has no fused classifier layer to watch for "
                    "--agm-clip; use --agm-clip 0")


class AGM(Balancer):
    """Shapley contributions from padded forwards; their gradients scaled (owns the step)."""

    name = "agm"
    title = "AGM"
    paper = ("H. Li, X. Li, P. Hu, Y. Lei, C. Li, Y. Zhou, \"Boosting Multi-modal Model "
             "Performance with Adaptive Gradient Modulation\", ICCV 2023")
    year = 2023
    summary = "scales each modality's Shapley contribution's gradient"
    code = ("lihong2303/AGM (model/CREMAD_net.py, run/CREMAD_main.py, utils/config.py) @ "
            "5a65542; BalanceMM: GeWu-Lab/BalanceBenchmark (AGM_trainer.py) @ 4c1482f")
    differences = (
        "Authors' code: scores, ratios and coefficients stay device tensors (float64) instead "
        "of .item() and math.exp: the same numbers, no host sync",
        "Authors' code: the defaults are the CREMA-D script's for any number of modalities "
        "(UR-Funny's: --agm-cap 7 --agm-clip 5 --agm-floor 0)",
        "BalanceMM: padded forwards under no_grad, coefficients on the gradients of every "
        "non-1-D parameter named after the modality, the opposite ratio sign",
        "BalanceMM: its Shapley sum skips the empty coalition; cap 7, clip 5, alpha 0.1, "
        "applied at every step (its window [0, 80] unused)",
    )
    signals = ("agm_score_<m>", "agm_running_<m>", "agm_coeff_<m>", "agm_scale_<m>",
               "agm_clipped")
    # bench --tune: alpha scales its coefficients (its strength); the window end, how long they
    # act (released: the first 20 epochs)
    options = (
        Option("alpha", float, 1.0, "strength of its coefficients", minimum=0, shared=True,
               search=Search(0.3, 3.0, log=True)),
        Option("modulation_start", int, 0, "first modulated epoch (0-based, inclusive)",
               minimum=0, shared=True),
        Option("modulation_end", int, 19, "last modulated epoch (inclusive; released: the "
               "first 20 epochs, counted from 1)", minimum=0, shared=True,
               search=Search(1, 19, log=True)),
        Option("cap", float, 10.0, "upper bound of optimal - ratio in k = exp(alpha * "
               "min(optimal - ratio, cap)); inf: none (released CREMA-D 10, UR-Funny 7)",
               minimum=0, exclusive_minimum=True),
        Option("clip", float, 1.0, "clip every gradient to this total norm when a "
               "fused-classifier weight gradient leaves [-clip, clip]; 0: off", minimum=0),
        Option("after_window", str, "hold", "after the window: hold (the last coefficients "
               "keep scaling, as released) or reset (1)", choices=AFTER_WINDOW),
        Option("floor", float, 1e-8, "a true-class probability below this counts as it in the "
               "scores; 0: none (released CREMA-D 1e-8, UR-Funny 0)", minimum=0,
               maximum=1, exclusive_maximum=True),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.alpha = self.opt.alpha
        self.start, self.end = window(self.opt)
        self.cap, self.clip, self.floor = self.opt.cap, self.opt.clip, self.opt.floor
        if not math.isfinite(self.clip):  # declared 0 or more; inf would never clip
            raise UserError(f"--agm-clip must be 0 (off) or a finite number, got {self.clip}")
        self.after_window = self.opt.after_window
        bare = getattr(model, "module", model)
        if getattr(bare, "unimodal", False):
            raise UserError("--method agm needs a multimodal model")
        self.head_weights = fused_head_weights(bare) if self.clip else []
        self.coalitions = coalitions(self.modalities)
        n = len(self.modalities)
        self.running = torch.zeros(n, dtype=torch.float64, device=self.device)
        self.count = 0  # steps averaged into `running`
        self.scale = torch.ones(n, dtype=torch.float64, device=self.device)  # GradMod's scales
        self._metrics: dict[str, torch.Tensor] = {}

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch <= self.end

    # -- the step --

    def padded_outputs(self, ctx: StepContext, full: torch.Tensor) -> dict[frozenset, torch.Tensor]:
        """Fused logits of every coalition: the training forward's for all modalities, the bare
        model's in eval mode (with grad) for the others, absent inputs replaced by zeros."""
        bare = getattr(ctx.model, "module", ctx.model)
        outputs = {frozenset(self.modalities): full}
        was_training = bare.training
        bare.eval()
        try:
            for kept in self.coalitions:
                batch = dict(ctx.batch)
                for m in self.modalities:
                    if m not in kept:
                        batch[m] = torch.zeros_like(batch[m])
                with ctx.autocast():
                    outputs[kept] = bare(batch)["fused"].float()
        finally:
            if was_training:
                bare.train()
        return outputs

    def _clip_released(self, model: nn.Module) -> None:
        """clip_grad_norm_(all parameters, clip) if a fused-head weight gradient leaves
        [-clip, clip] -- decided and applied on the device."""
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        heads = [w.grad for w in self.head_weights if w.grad is not None]
        if not grads or not heads:
            return
        high = torch.stack([g.amax() for g in heads]).amax()
        low = torch.stack([g.amin() for g in heads]).amin()
        trigger = (high > self.clip) | (low < -self.clip)
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp(self.clip / (total + 1e-6), max=1.0)
        coef = torch.where(trigger, coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef)
        self._metrics["agm_clipped"] = trigger.float()

    def train_step(self, ctx: StepContext):
        labels = ctx.labels
        logits = ctx.forward()  # the one forward of ctx.net (DDP), train mode
        outputs = self.padded_outputs(ctx, logits["fused"].float())
        contrib = agm_contributions(outputs, self.modalities)
        scores = agm_scores(contrib, labels, self.modalities, self.floor).to(self.running.device)
        coeffs = agm_coefficients(scores, self.running, self.alpha, self.cap)
        self.count += 1
        self.running = self.running * (self.count - 1) / self.count + scores / self.count
        if self.in_window(ctx.epoch):
            self.scale = coeffs
        elif ctx.epoch > self.end and self.after_window == "reset":
            self.scale = torch.ones_like(self.scale)
        scale = self.scale.float().to(labels.device)
        fused = None
        for i, m in enumerate(self.modalities):
            part = _ScaleGrad.apply(contrib[m], scale[i])
            fused = part if fused is None else fused + part
        loss = F.cross_entropy(fused, labels)
        extra = ctx.extra_loss(logits, labels)
        ctx.optimizer.zero_grad(set_to_none=True)
        (loss + extra if extra is not None else loss).backward()
        self._metrics = {}
        if self.clip:
            self._clip_released(getattr(ctx.model, "module", ctx.model))
        ctx.clip_grad()
        ctx.optimizer.step()
        for i, m in enumerate(self.modalities):
            self._metrics[f"agm_score_{m}"] = scores[i]
            self._metrics[f"agm_running_{m}"] = self.running[i]
            self._metrics[f"agm_coeff_{m}"] = coeffs[i]
            self._metrics[f"agm_scale_{m}"] = self.scale[i]
        return loss, logits

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"running": self.running.detach().cpu().clone(), "count": torch.tensor(self.count),
                "scale": self.scale.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running = state["running"].to(self.device, torch.float64).clone()
            self.count = int(state["count"])
            self.scale = state["scale"].to(self.device, torch.float64).clone()
