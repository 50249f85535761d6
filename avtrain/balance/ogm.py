"""OGM and OGM-GE: on-the-fly gradient modulation (Peng et al., CVPR 2022).

After `backward()`, each modality's confidence on the batch is measured as its score, the sum
over samples of the softmax probability of the true class (summed over all ranks in DDP). The
dominant modality's encoder gradients are scaled down by k = 1 - tanh(alpha * rho); OGM-GE
also adds Gaussian noise with the std of each gradient tensor to both modalities' encoders
(generalisation enhancement). Everything stays on the device: no host sync per step.

Paper: X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022. Released code: github.com/GeWu-Lab/OGM-GE_CVPR2022 (commit
343dc1d), main.py: argparse defaults (window 0-50, alpha required; lines 41-43), scores and
coefficients (105-123), the modulation of the 4-D (conv) encoder gradients (132-147). Its README
recommends alpha 0.1 for VGGSound and 0.8 for CREMA-D (line 151), which the dataset presets
hold. BalanceMM's re-implementation: GeWu-Lab/BalanceBenchmark (4c1482f)
balancemm/trainer/OGM_trainer.py and configs/trainer_config.yaml (OGM block, lines 9-13).

Two modalities follow the released code exactly, including its discontinuity: with
rho = score_2 / score_1, the second modality gets 1 - tanh(alpha * rho) when rho > 1,
otherwise the first gets 1 - tanh(alpha / rho) -- so at a tie (rho == 1) the first modality
(audio) is scaled by 1 - tanh(alpha), and just above the tie the other one is. N modalities:
rho_m = score_m / mean(other scores), k_m = 1 - tanh(alpha * rho_m) where rho_m > 1, else 1.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from avprep.errors import UserError
from avtrain.models.encoders import Encoder
from avtrain.options import Option, Search

from . import _dist
from ._checks import number, require_two_modalities, window
from .base import Balancer

GE_EPS = 1e-8  # added to each gradient's std, as the released code
# alpha when neither the user nor the dataset gives one (the loop resolves the dataset's preset
# first: avtrain.config.resolve_alpha); only a balancer built outside the loop sees None
FALLBACK_ALPHA = 0.8


def ogm_scores(logits: dict[str, torch.Tensor], labels: torch.Tensor,
               modalities: list[str]) -> dict[str, torch.Tensor]:
    """Per-modality sum over the batch of softmax(logits_m)[y] (0-d float32 tensors)."""
    index = labels.long().unsqueeze(1)
    return {m: F.softmax(logits[m].detach().float(), dim=1).gather(1, index).sum()
            for m in modalities}


def _rule(scores: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, k) for a stacked score vector, on its device, without leaving it."""
    tiny = torch.finfo(scores.dtype).tiny
    s = scores.clamp_min(tiny)  # a modality with no confidence at all is not a 0/0
    one = torch.ones_like(s[0])
    if s.numel() == 2:
        ratio = s[1] / s[0]
        first_dominates = ratio <= 1  # the released code's `else` branch, tie included
        k0 = torch.where(first_dominates, 1 - torch.tanh(alpha / ratio), one)
        k1 = torch.where(first_dominates, one, 1 - torch.tanh(alpha * ratio))
        return torch.stack([1 / ratio, ratio]), torch.stack([k0, k1])
    others = (s.sum() - s) / (s.numel() - 1)
    rho = s / others.clamp_min(tiny)
    return rho, torch.where(rho > 1, 1 - torch.tanh(alpha * rho), torch.ones_like(rho))


def ogm_coefficients(scores: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """OGM's gradient coefficient per modality from its score (see the module docstring).

    `scores` maps modality -> 0-d tensor (sum of true-class softmax probabilities over the
    batch, as `ogm_scores` gives); with two modalities the order of the dict decides which
    is "audio" (first) and "visual" (second) in the released rule. Returns 0-d tensors on the
    scores' device; k = 1 leaves a modality untouched.
    """
    if len(scores) < 2:
        raise UserError("OGM needs scores for at least two modalities")
    if alpha < 0:
        raise UserError(f"--alpha must be 0 or more, got {alpha}")
    names = list(scores)
    stacked = torch.stack([torch.as_tensor(scores[m]).float().reshape(()) for m in names])
    _, k = _rule(stacked, float(alpha))
    return dict(zip(names, k.unbind(0)))


def modulated_parameters(encoder: nn.Module, modulate: str = "conv") -> list[nn.Parameter]:
    """The encoder parameters whose gradients OGM scales.

    `conv`: the kernels of the convolutions (the released code's 4-D gradients);
    `encoder`: every parameter with more than one dimension (BalanceMM's choice), so biases
    and normalisation scales are never touched.
    """
    if modulate == "conv":
        return [mod.weight for mod in encoder.modules()
                if isinstance(mod, nn.modules.conv._ConvNd) and mod.weight.requires_grad]
    return [p for p in encoder.parameters() if p.requires_grad and p.dim() > 1]


CONV_SHARE = 0.5  # `--modulate conv` needs at least this share of an encoder's weights in convs


def check_conv_share(encoder: nn.Module, modality: str) -> None:
    """`--modulate conv` scales the conv kernels only, which on the released ResNet-18 are all
    of its weights. An encoder whose trainable weights (parameters with more than one
    dimension) are mostly not conv kernels -- a ViT's only conv is its patch embedding, a
    ConvNeXt's MLPs are Linear -- would be left mostly unmodulated: one Error line pointing
    to `--modulate encoder` when the kernels hold less than half of them. Checked for the
    encoders of encoder + fusion models (resnet18 and tiny are all convs; the sequence
    models' encoders are modulated as before)."""
    weights = [p for p in encoder.parameters() if p.requires_grad and p.dim() > 1]
    conv = sum(p.numel() for p in modulated_parameters(encoder, "conv"))
    total = sum(p.numel() for p in weights)
    if total and conv / total < CONV_SHARE:
        raise UserError(f"--modulate conv scales conv kernels, which hold {conv / total:.0%} of "
                        f"the {modality} encoder's weights (the rest would not be modulated); "
                        "use --modulate encoder (every weight with more than one dimension)")


def _mix(seed: int, step: int) -> int:
    """One generator seed per (run seed, step): the same on every rank, new every step."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB)
    x &= (1 << 64) - 1
    x ^= x >> 31
    return x & ((1 << 63) - 1)


NOISE_CHUNK = 1 << 22  # elements per independently seeded piece of the GE noise


def draw_unit_noise(out: torch.Tensor, seed: int) -> None:
    """Fill `out` (1-D) with N(0, 1), piece i of NOISE_CHUNK elements from a generator seeded by
    (seed, i). The pieces depend on nothing but the seed and the size, so every rank draws the
    same whatever its thread count; on a CPU they are drawn in parallel threads, since one
    `normal_` runs on one core (22 M values: 110 ms on one core, 59 ms on two)."""
    pieces = list(out.split(NOISE_CHUNK))
    seeds = [_mix(seed, i) for i in range(len(pieces))]

    def fill(indices):
        generator = torch.Generator(device=out.device)
        for i in indices:
            generator.manual_seed(seeds[i])
            pieces[i].normal_(generator=generator)

    threads = min(len(pieces), torch.get_num_threads()) if out.device.type == "cpu" else 1
    if threads <= 1:
        fill(range(len(pieces)))
        return
    errors: list[BaseException] = []

    def fill_or_keep_error(indices):
        try:
            fill(indices)
        except BaseException as exc:  # re-raised below: half-drawn noise must not be used
            errors.append(exc)

    workers = [threading.Thread(target=fill_or_keep_error,
                                args=(range(t, len(pieces), threads),))
               for t in range(1, threads)]
    for worker in workers:  # started and joined within the step: no idle threads at a fork
        worker.start()
    fill(range(0, len(pieces), threads))
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


class OGM(Balancer):
    """Scales the dominant modality's encoder gradients inside the modulation window."""

    name = "ogm"
    title = "OGM"
    paper = ("X. Peng, Y. Wei, A. Deng, D. Wang, D. Hu, \"Balanced Multimodal Learning via "
             "On-the-fly Gradient Modulation\", CVPR 2022")
    year = 2022
    summary = "scales the dominant modality's encoder gradients"
    code = ("GeWu-Lab/OGM-GE_CVPR2022 (main.py) @ 343dc1d; BalanceMM: GeWu-Lab/BalanceBenchmark "
            "(OGM_trainer.py) @ 4c1482f")
    differences = (
        "Authors' code: written for two modalities; for N, rho_m = score_m / mean(other scores)",
        "Authors' code: under DDP the scores are summed over all ranks (released: one process)",
        "BalanceMM: alpha 0.3, window [10, 80], 1e-5 added to the ratio's denominator, no "
        "scaling at a tie, three modalities against the lowest score",
        "BalanceMM: scales every non-1-D parameter whose name holds the modality (ours: "
        "--modulate encoder; released: the encoders' conv kernels)",
    )
    signals = ("score_<m>", "rho_<m>", "coeff_<m>")
    # bench --tune: alpha is the method's strength; the window end, when modulation lets go so
    # both encoders converge (released: half the run)
    options = (
        Option("alpha", float, None, "strength: the dominant modality's gradients are scaled "
               "by k = 1 - tanh(alpha * rho)", minimum=0, shared=True,
               none_means="the dataset's preset (released README: CREMA-D 0.8, VGGSound 0.1), "
               "else 0.8", search=Search(0.1, 2.0, log=True)),
        Option("modulation_start", int, 0, "first modulated epoch (0-based, inclusive)",
               minimum=0, shared=True),
        Option("modulation_end", int, 50, "last modulated epoch (inclusive)", minimum=0,
               shared=True, search=Search(1, 50, log=True)),
        Option("modulate", str, "conv", "parameters scaled: conv (the encoders' conv kernels, "
               "as released) or encoder (every encoder parameter with more than one dimension)",
               choices=("conv", "encoder"), setting="modulate"),
    )
    noise = False

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.alpha = FALLBACK_ALPHA if self.opt.alpha is None else self.opt.alpha
        self.start, self.end = window(self.opt)
        self.modulate = self.opt.modulate
        self.seed = int(number(c, "seed", 0))
        encoders = getattr(getattr(model, "module", model), "encoders", None)
        if encoders is None:
            raise UserError(f"--method {self.name} needs a model with per-modality encoders")
        self.groups: list[list[nn.Parameter]] = []
        for m in self.modalities:
            params = modulated_parameters(encoders[m], self.modulate)
            frozen = not any(p.requires_grad for p in encoders[m].parameters())
            if not params and not frozen:  # a frozen encoder has nothing to scale
                raise UserError(f"the {m} encoder has no {self.modulate} parameters to modulate;"
                                " try --modulate encoder")
            if self.modulate == "conv" and not frozen and isinstance(encoders[m], Encoder):
                check_conv_share(encoders[m], m)
            self.groups.append(params)
        self._metrics: dict[str, torch.Tensor] = {}

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch <= self.end

    def coefficients(self, logits, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores, rho, k), each [num_modalities], scores summed over all ranks."""
        scores = ogm_scores(logits, labels, self.modalities)
        stacked = _dist.sum_(torch.stack([scores[m] for m in self.modalities]))
        rho, k = _rule(stacked, self.alpha)
        return stacked, rho, k

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        scores, rho, k = self.coefficients(logits, labels)
        active = self.in_window(epoch)
        applied = k if active else torch.ones_like(k)
        self._metrics = {}
        for i, m in enumerate(self.modalities):
            self._metrics[f"score_{m}"] = scores[i]
            self._metrics[f"rho_{m}"] = rho[i]
            self._metrics[f"coeff_{m}"] = applied[i]
        if not active:
            return
        grads = [[p.grad for p in group if p.grad is not None] for group in self.groups]
        flat = [g for group in grads for g in group]
        # GE: sigma from the unscaled gradients, so measure before scaling
        noise = self._noise(flat, step) if self.noise and flat else None
        for i, group in enumerate(grads):
            if group:
                torch._foreach_mul_(group, k[i])
        if noise:
            torch._foreach_addcmul_(flat, *noise)  # grad += unit_noise * sigma

    def _noise(self, grads: list[torch.Tensor], step: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Unit Gaussian noise shaped like each gradient and sigma = std(grad) + 1e-8 per
        tensor; the noise is seeded by (seed, step), so every rank draws the same."""
        sigma = [g.std() if g.numel() > 1 else torch.zeros((), device=g.device, dtype=g.dtype)
                 for g in grads]
        torch._foreach_add_(sigma, GE_EPS)
        flat = torch.empty(sum(g.numel() for g in grads), device=grads[0].device,
                           dtype=grads[0].dtype)
        draw_unit_noise(flat, _mix(self.seed, step))
        unit = [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]),
                                                   grads)]
        return unit, sigma

    def step_metrics(self):
        return dict(self._metrics)


class OGMGE(OGM):
    """OGM plus generalisation enhancement: Gaussian noise on both modalities' gradients."""

    name = "ogm_ge"
    title = "OGM-GE"
    summary = "OGM plus Gaussian noise on both encoders' gradients"
    differences = (
        *OGM.differences[:2],
        "Authors' code: the noise comes from a generator seeded by (--seed, step), the same on "
        "every rank (released: the global torch generator)",
        *OGM.differences[2:],
    )
    noise = True
