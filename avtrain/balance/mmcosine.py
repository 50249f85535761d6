"""MMCosine: modality-wise L2 normalisation of features and classifier weights.

Paper: R. Xu, R. Feng, S.-X. Zhang, D. Hu, "MMCosine: Multi-Modal Cosine Loss Towards Balanced
Audio-Visual Fine-Grained Learning", ICASSP 2023. Authors' code: GeWu-Lab/MMCosine_ICASSP23
(HEAD 00ba0a9), main_CD.py:

- `get_arguments` lines 58-59 (`--mmcosine`, `--scaling` default 10) and 78 (`--lam` 0);
- `train_epoch` lines 103-146: the model's forward (109) gives the features a, v and the concat
  output; with `--mmcosine` (113-118) out_m = scaling * normalize(f_m) . normalize(W_m^T,
  dim=0), W_m the columns of fc_out.weight that multiply modality m (`[:, :512]`, `[:, 512:]`),
  out = out_a + out_v replaces the concat output; the true-class mean of each out_m is logged
  to TensorBoard (`data/logit_a`, `data/logit_v`, 128-135); loss = CE(out) + lam * NCE(a, v)
  (141, lam 0: the supplementary NCE term is off), CE(out_a) and CE(out_v) are computed for
  the log only (142-143, 148-150); one backward, one SGD step (144-146);
- `valid` lines 181-198: per-modality predictions from the scaled cosines (185-189), the fused
  prediction from the model's own output `out` (196), i.e. the concat layer
  W.[a; v] + b with nothing normalised;
- `main` lines 224-265: no `weight_init` (imported, never called), SGD(lr 1e-3, momentum 0.9,
  wd 1e-4) over all parameters, StepLR(100, 0.1); models/fusion_modules.py `ConcatFusion`
  (lines 20-28: fc_out = Linear(1024, classes)). main_vox2.py computes the same training
  logits (lines 123-128; its loss and backward, 136-142, sit in the non-mmcosine branch as
  indented) and scores its verification pairs with the cosine sum (182-193).

BalanceMM's re-implementation: GeWu-Lab/BalanceBenchmark (4c1482f)
balancemm/trainer/MMCosine_trainer.py (`training_step` 92-137: the same cosine logits for two
or three modalities, 115-125, CE of their sum, 131; outside its window [modulation_starts,
modulation_ends] CE of the plain output, 133-134; `validation_step` 208-248: fused = sum of
the scaled cosines) and configs/trainer_config.yaml lines 51-55 (MMCosine: window 0-80,
scaling 15). No code is copied; tests/test_mmcosine_released.py checks our steps against a
plain-torch reference of main_CD.py's step.

Our rule (the model is built with the `cosine` fusion, avtrain/models/fusions.py
`CosineFusion`, through `model_fusion`; `--fusion concat` or `cosine`):

- z_m = s * normalize(f_m) . normalize(W_m)^T per modality m (rows of W_m normalised), fused
  = sum_m z_m, the network loss CE(fused, y) (batch mean); every epoch (no window, as the
  authors). N modalities: W is split by the encoders' widths in the model's order (audio,
  visual, text), as BalanceMM's three-modality branch;
- fc_out.bias gets no gradient in the released step and stays at its initial value; here it
  does not require grad (excluded from the optimizer), which is the same and keeps DDP's
  reducer from waiting for it;
- evaluation: per-modality logits are z_m; fused logits `--mmcosine-eval-fused`: `concat`
  (default, the authors' `valid`: the plain concat layer with its untrained bias) or `cosine`
  (sum_m z_m, as in training; BalanceMM's validation). The rule and s are buffers of the
  model, stored in every checkpoint, so `avtrain eval` of a checkpoint gives the same.

Options: `--mmcosine-scaling` (10, the authors'; BalanceMM's config uses 15),
`--mmcosine-eval-fused` (concat | cosine).

Signal (`step_metrics`, batch means averaged over the ranks): `mmcosine_logit_<m>` the mean
true-class scaled cosine of modality m (the authors' TensorBoard `logit_a` / `logit_v`) and
`mmcosine_loss_<m>` its CE (the authors' logged `loss_a` / `loss_v`; no gradient).

Where we differ, and why: not at all in the step. Not offered: BalanceMM's window (after epoch
80 it trains the plain concat output, bias included; the authors have no window), the NCE term
(`--lam`, 0 by default, supplementary material only), the authors' film/gated variants (their
FiLM/gated fc_out reads both modulated features; ours differ). DDP: the loss is a batch mean,
so DDP's averaged gradients of equal per-rank batches are the global batch's. Nothing is
stateful; no host sync per step.

Bad input: --mmcosine-scaling not a number, <= 0 or infinite, a --fusion other than concat/cosine, a
sequence model, one modality: one `Error:` line before training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.models.fusions import COSINE_EVAL
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities
from .base import Balancer


def mmcosine_signal(logits: dict[str, torch.Tensor], labels: torch.Tensor,
                    modalities: list[str]) -> dict[str, torch.Tensor]:
    """Per modality: the batch mean of the true-class logit and the CE of its logits."""
    idx = labels.view(-1, 1)
    out = {}
    for m in modalities:
        z = logits[m].detach().float()
        out[f"mmcosine_logit_{m}"] = z.gather(1, idx).mean()
        out[f"mmcosine_loss_{m}"] = F.cross_entropy(z, labels)
    return out


class MMCosine(Balancer):
    """CE of the summed scaled cosine logits (hooks: the loss only)."""

    name = "mmcosine"
    title = "MMCosine"
    paper = ("R. Xu, R. Feng, S.-X. Zhang, D. Hu, MMCosine: Multi-Modal Cosine Loss Towards "
             "Balanced Audio-Visual Fine-Grained Learning, ICASSP")
    year = 2023
    summary = "CE of the summed scaled cosine logits of each modality"
    code = ("GeWu-Lab/MMCosine_ICASSP23 (main_CD.py, models/fusion_modules.py) @ 00ba0a9; "
            "GeWu-Lab/BalanceBenchmark (balancemm/trainer/MMCosine_trainer.py, "
            "configs/trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: not offered: the NCE term (--lam, 0 by default, supplementary "
        "material only) and the film/gated fusions",
        "BalanceMM: scaling 10 (the authors' main_CD.py); BalanceMM's config 15 "
        "(--mmcosine-scaling 15)",
        "BalanceMM: no window, as the authors (BalanceMM trains the plain concat output after "
        "epoch 80)",
        "BalanceMM: fused eval logits from the plain concat layer (the authors' valid); "
        "BalanceMM sums the cosines (--mmcosine-eval-fused cosine)",
    )
    signals = ("mmcosine_logit_<m>", "mmcosine_loss_<m>")
    # bench --tune: the scaling s of the cosine logits is its one strength (eval_fused a variant)
    options = (
        Option("scaling", float, 10.0,
               "factor s on each modality's cosine logits (the authors' main_CD.py; BalanceMM "
               "15)", minimum=0, exclusive_minimum=True, search=Search(3.0, 30.0, log=True)),
        Option("eval_fused", str, "concat",
               "fused logits at evaluation: concat (the plain W.[f_a; f_v] + b, the authors') or "
               "cosine (BalanceMM)", choices=COSINE_EVAL),
    )

    @classmethod
    def model_fusion(cls, fusion: str) -> str:
        if fusion not in ("concat", "cosine"):
            raise UserError(f"--method mmcosine normalises the concat layer's features and "
                            f"weights per modality (the authors' concat model): use --fusion "
                            f"concat or cosine, not {fusion!r}")
        return "cosine"

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        from avtrain.models.fusions import CosineFusion

        require_two_modalities(self.name, self.modalities)
        self.scaling, self.eval_fused = self.opt.scaling, self.opt.eval_fused
        if not math.isfinite(self.scaling):  # the declaration bounds it below only
            raise UserError(f"--mmcosine-scaling must be a finite number, got {self.scaling}")
        bare = fused_model(model, self.name)
        if not isinstance(bare.fusion, CosineFusion):
            raise UserError("--method mmcosine needs the cosine fusion (--fusion concat or "
                            f"cosine), not {bare.spec['fusion']}")
        bare.fusion.set_scaling(self.scaling)
        bare.fusion.set_eval_rule(self.eval_fused)
        self._metrics: dict[str, torch.Tensor] = {}

    def loss(self, logits, labels, *, epoch, step):
        self._metrics = mmcosine_signal(logits, labels, self.modalities)
        return F.cross_entropy(logits["fused"].float(), labels)

    def step_metrics(self):
        """The step's batch means, averaged over the ranks when the loop logs (every rank logs
        the same steps): the global batch's values, one small all-reduce, no host sync."""
        if not self._metrics:
            return {}
        keys = list(self._metrics)
        flat = _dist.mean_(torch.stack([self._metrics[k] for k in keys]))
        return {k: flat[i] for i, k in enumerate(keys)}
