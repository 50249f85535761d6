"""ARL: asymmetric representation learning (unimodal regularisers, encoder gradients re-weighted).

Paper: S. Wei, C. Luo, Y. Luo, "Improving Multimodal Learning via Imbalanced Learning", ICCV
2025 (arXiv 2507.10203). Code read: shicaiwei123/ICCV2025-ARL @ 358af4f (the file its README
names as ARL's, main_arl_variance.py: `train_epoch` 76-182, argparse 27-72; models/backbone.py
`GradScale` 71-86 and `ResNet_weight.forward` 305-352; models/fusion_modules.py
`ConcatFusion_AUXI` 41-52 and `SumFusion_AUXI` 16-26; models/basic_model.py
`AVClassifier_AUXI_Weight` 137-215; cramed_arl.sh, ave_arl.sh, ks_arl.sh). No code is copied;
tests/test_arl_released.py checks our steps against a plain-torch reference of that step.

The released step (one forward, one backward, one SGD step), z_m the unimodal logits of the
parameter-shared classifier -- concat: the fused layer on [f_a; 0] and [0; f_v], i.e. the weight
slice *with the whole bias* (not our b/M split); sum: the fusion's own summands:

- epochs 0..start (start 5, `epoch > args.start`, so our first ARL epoch is 6):
  loss = CE(fused) + CE(z_a) + CE(z_v), batch means, nothing scaled;
- from epoch 6 on: loss = CE(fused) + gamma * (CE(z_a) + CE(z_v)), and every encoder's output
  gradient becomes g + g * w_m (`GradScale` after the last ResNet stage), i.e. each encoder's
  parameter gradients times (1 + w_m), before the clip (40) and the step;
- w_m: the released file sets `args.audio_weight = args.visual_weight = 0.5` (in the epochs
  before start) and never writes anything else into them, so both encoders get 1.5 times their
  gradient. The "modality analysis" of lines 114-157 is computed every step and printed, never
  used: ent_m = batch mean of the entropy of softmax(z_m), shares h_m = ent_m / sum, clamped
  below at 0.3; inverse shares i_m = (1/h_m) / sum(1/h); logit magnitudes c_m = batch mean of
  sum_k |z_m,k|, as shares; weights = softmax(T * [c_v * i_a, c_a * i_v]) (`weight`, T 8).

Options: `--arl-gamma` (released 4.0, cramed_arl.sh; AVE 5.0, KS 3.0, argparse 1.0),
`--modulation-start` (6: epoch > 5), `--arl-weights released|analysis`, `--arl-temperature`
(T, 8.0; read by `analysis` only). `--arl-weights analysis` applies the analysis weights (audio
the first, visual the second, computed on this step's batch) as w_m: our reading of what the
unused lines were for (the paper's variance-ratio coefficients); not the released behaviour.

What we found in the released code, and how we differ:

- main_arl_variance.py line 262 raises `EOFError` right after building the model: the file
  does not train as released. We take the step that follows it;
- `GradScale.backward` multiplies by `ctx.saved_tensors`, a *tuple*: `grad * (w,)` raises
  TypeError ("only integer tensors of a single element can be converted to an index"). We ran
  that function under torch 1.11.0 (the README's version, CPU wheel) and 2.14.1: it fails the
  same way in both, at the first backward of epoch start + 1. So no released run can have gone
  past epoch 5 with this file as it is, under any PyTorch; the README's notes (gamma depends on
  the software versions, PyTorch >= 2.0 lowered the results) cannot come from this step. We
  scale by (1 + w) as the line plainly means;
- the weights: as above, constant 0.5 (symmetric) in the released file; `analysis` is an option;
- gamma also waits for a non-zero sum of the unimodal heads' *test* accuracies of the previous
  epoch (`acc_a + acc_v != 0`); the GradScale does not. We do not read test during training;
  after 6 epochs both accuracies are not both zero in practice, so the condition is dropped;
- the released loop clips the gradient norm at 40 after the backward (line 171): that is the
  loop's `--clip-grad 40` (a recipe setting, as the optimizer), applied after our scaling as in
  the released order.

DDP: every loss term is a batch mean and the gradient scale is a constant of the step, so the
averaged gradients are the global batch's. The analysis statistics are batch means per rank,
averaged over the ranks (equal batches: the global batch's) before the softmax; one small
all-reduce per step, no host sync. Nothing is stateful.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities, summed_fusion
from .base import Balancer

RELEASED_WEIGHT = 0.5  # main_arl_variance.py:163-164, the only value ever given to the scale
ENTROPY_FLOOR = 0.3  # main_arl_variance.py:128-129, the clamp on the entropy shares


def arl_unimodal_logits(model, logits: dict[str, torch.Tensor],
                        modalities: list[str]) -> dict[str, torch.Tensor]:
    """The released parameter-shared unimodal logits: concat's weight slice with the whole bias
    (ConcatFusion_AUXI: the fused layer on the features with the others zeroed); sum's summands
    as they are. Our concat split carries b / M, so (M - 1) / M of the bias is added back."""
    z = {m: logits[m].float() for m in modalities}
    fc_out = getattr(model.fusion, "fc_out", None)
    if fc_out is not None and fc_out.bias is not None:
        rest = fc_out.bias.float() * (len(modalities) - 1) / len(modalities)
        z = {m: v + rest for m, v in z.items()}
    return z


def arl_statistics(z: torch.Tensor) -> torch.Tensor:
    """[magnitude, entropy] of one modality's logits: the batch mean of sum_k |z_k|, and of the
    entropy of softmax(z) with log(p + 1e-16), as the released analysis (lines 116-123)."""
    p = torch.softmax(z, dim=1)
    entropy = torch.sum(-p * torch.log(p + 1e-16), dim=1).mean()
    return torch.stack([z.abs().mean(0).sum(), entropy])


def arl_analysis_weights(magnitude: torch.Tensor, entropy: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """The released modality analysis for two modalities (lines 127-153), [audio, visual]:
    softmax(T * [c_v * i_a, c_a * i_v]) with c the magnitude shares and i the normalised
    inverses of the entropy shares clamped below at 0.3."""
    shares = torch.clamp(entropy / entropy.sum(), min=ENTROPY_FLOOR)
    inverse = 1.0 / shares
    inverse = inverse / inverse.sum()
    c = magnitude / magnitude.sum()
    return torch.softmax(temperature * torch.stack([c[1] * inverse[0], c[0] * inverse[1]]), 0)


class ARL(Balancer):
    """Fused + gamma-weighted unimodal CE; encoder gradients times (1 + w) from epoch 6 (hooks)."""

    name = "arl"
    title = "ARL"
    paper = ("S. Wei, C. Luo, Y. Luo, \"Improving Multimodal Learning via Imbalanced Learning\", "
             "ICCV 2025")
    year = 2025
    summary = "unimodal CE x gamma, encoder gradients x (1 + w)"
    code = ("shicaiwei123/ICCV2025-ARL (main_arl_variance.py, models/backbone.py, "
            "models/fusion_modules.py, cramed_arl.sh) @ 358af4f")
    differences = (
        "Authors' code: main_arl_variance.py raises EOFError after building the model, and "
        "GradScale multiplies by a tuple (TypeError under torch 1.11 and 2.x from epoch 6); we "
        "scale the encoder gradients by (1 + w) as the line means",
        "Authors' code: the unimodal weight also waits for non-zero test accuracies of the "
        "previous epoch; we never read test during training (not zero in practice by epoch 6)",
        "Authors' code: its clip_grad_norm_ 40 is the loop's --clip-grad 40 (a recipe setting)",
        "Authors' code: its analysis weights are computed but unused (w = 0.5 for both); "
        "--arl-weights analysis applies them (our reading, off by default)",
    )
    signals = ("arl_scale_<m>", "arl_analysis_<m>")
    # bench --tune: gamma (the unimodal CE's weight, 1..5 over the released scripts) is its
    # strength
    options = (
        Option("gamma", float, 4.0, "weight of the unimodal CE from the first ARL epoch on "
               "(released: 4 CREMA-D, 5 AVE, 3 KS; argparse 1)", minimum=0,
               search=Search(0.5, 8.0, log=True)),
        Option("modulation_start", int, 6, "first ARL epoch (0-based, inclusive; released: "
               "epoch > --start 5): gamma and the gradient scale from then on", minimum=0,
               shared=True),
        Option("weights", str, "released", "the encoder gradient weights w: released (0.5 for "
               "each modality, what the released file sets) or analysis (its unused softmax of "
               "the logit-magnitude and entropy shares, two modalities)",
               choices=("released", "analysis")),
        Option("temperature", float, 8.0, "T of the analysis weights (--T; read with "
               "--arl-weights analysis only)", minimum=0, exclusive_minimum=True),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.bare = fused_model(model, self.name)
        summed_fusion(self.bare, self.name, "trains the per-modality logits of the fused layer")
        if self.opt.weights == "analysis" and len(self.modalities) != 2:
            raise UserError(f"--arl-weights analysis is defined for two modalities, got "
                            f"{', '.join(self.modalities)}")
        self._on = False
        self._stats: torch.Tensor | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    def loss(self, logits, labels, *, epoch, step):
        z = arl_unimodal_logits(self.bare, logits, self.modalities)
        self._on = epoch >= self.opt.modulation_start
        unimodal = sum(F.cross_entropy(z[m], labels) for m in self.modalities)
        weight = self.opt.gamma if self._on else 1.0
        self._stats = torch.stack([arl_statistics(z[m].detach()) for m in self.modalities])
        return F.cross_entropy(logits["fused"].float(), labels) + weight * unimodal

    def weights(self, stats: torch.Tensor) -> dict[str, torch.Tensor]:
        """modality -> w of this step from the rank-averaged [magnitude, entropy] rows."""
        if len(self.modalities) == 2:
            analysis = arl_analysis_weights(stats[:, 0], stats[:, 1], self.opt.temperature)
        else:
            analysis = None
        self._metrics = ({f"arl_analysis_{m}": analysis[i] for i, m in enumerate(self.modalities)}
                         if analysis is not None else {})
        if self.opt.weights == "analysis":
            return {m: analysis[i] for i, m in enumerate(self.modalities)}
        return {m: stats.new_tensor(RELEASED_WEIGHT) for m in self.modalities}

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        stats = _dist.mean_(self._stats.clone())
        w = self.weights(stats)
        for m in self.modalities:
            scale = 1.0 + w[m] if self._on else torch.ones_like(w[m])
            if self._on:
                for p in self.bare.encoders[m].parameters():
                    if p.grad is not None:
                        p.grad.mul_(scale.to(p.grad.dtype))
            self._metrics[f"arl_scale_{m}"] = scale

    def step_metrics(self):
        return dict(self._metrics)
