"""DGL: disentangled gradient learning (encoders from unimodal losses, fusion from the fused one).

Paper: S. Wei, C. Luo, Y. Luo, "Boosting Multimodal Learning via Disentangled Gradient
Learning", ICCV 2025 (arXiv 2507.10213). Code read: shicaiwei123/ICCV2025-GDL @ b72a55f
(main_dgl.py `train_epoch` 69-165 and argparse 24-65; models/fusion_modules.py
`ConcatFusion_DGL` 45-59 and `SumFusion_DGL` 16-30; models/basic_model.py `AVClassifier_DGL`
10-86; cramed_dgl.sh, ks_dgl.sh). No code is copied; tests/test_dgl_released.py checks our
steps against a plain-torch reference of that step.

The released step, f_m the encoders' pooled features:

- fused logits from *detached* features: concat fc_out([f_a; f_v].detach()), sum
  fc_a(f_a.detach()) + fc_v(f_v.detach()) -- the fused loss never reaches an encoder
  ("multimodal gradient truncation");
- unimodal logits of the same classifier on each encoder's live features: concat fc_out on
  [f_a; 0] and [0; f_v] (the weight slice with the whole bias), sum the summands;
- `(CE(z_a) + CE(z_v)) * alpha` is back-propagated first (retain_graph), then every parameter
  whose name has "fusion" in its second component (the fusion module: its classifier) gets
  `grad = None` -- the unimodal loss never trains the classifier ("unimodal gradient
  truncation") -- then CE(fused) is back-propagated, the gradient norm clipped at 40 and one SGD
  step taken. CE is the batch mean. No window: every epoch, from the first step.

So the encoders get alpha times the unimodal CE's gradient (through the classifier's weights,
which that loss does not move) and the classifier gets the fused CE's gradient alone. We
compute exactly that in one backward: loss = CE(fused from detached features) + alpha *
sum_m CE(z_m) with the classifier's weight and bias detached inside z_m; the features come from
forward hooks on the encoders during the one training forward (the model's own logits are the
same values; the loop reads them for the training accuracy).

Options: `--alpha` (4.0: main_dgl.py's default and cramed_dgl.sh's first run; its second run
and the KS script use 5, 2 and 3). The released lr is 0.002 (both scripts), SGD momentum 0.9,
weight decay 1e-4, MultiStepLR at epoch 70: loop and recipe settings, not the method's.

Where we differ, and why:

- the released step clips the gradient norm at 40 (line 129): the loop's `--clip-grad 40` (a
  recipe setting, as the optimizer), after the same gradients;
- `ConcatFusion_DGL` also builds `fc_auxi`, a Linear that no forward uses (no gradient, no
  update); our model has no such layer (it changes nothing the step computes; it does draw
  its initial weights from the RNG, so a seeded released run's other weights differ);
- film and gated fusions (FiLM_DGL, GatedFusion_DGL) are not built here: our film/gated have
  no parameter-shared unimodal logits, so DGL needs `--fusion concat` or `sum`;
- the released step writes each step's per-encoder gradient sizes (sum over the encoder's
  tensors of mean |grad|, after the clip) to a CSV with a host sync per tensor; we log the same
  sums before the clip as `dgl_grad_<m>`, on the device.

DDP: every term is a batch mean and nothing depends on the batch beyond it, so the averaged
gradients are the global batch's. The logged CE values are averaged over the ranks when read;
the gradient sizes are of the already averaged gradients. Nothing is stateful.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities, summed_fusion
from .base import Balancer


def dgl_logits(fusion, feats: dict[str, torch.Tensor],
               modalities: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(fused logits from detached features, {m: unimodal logits with the classifier detached})
    for our `concat` (fc_out) or `sum` (fc[m]) fusion, as ConcatFusion_DGL / SumFusion_DGL
    with the unimodal gradient removed from the classifier."""
    f = {m: feats[m].float() for m in modalities}
    if hasattr(fusion, "fc_out"):
        w, b = fusion.fc_out.weight.float(), fusion.fc_out.bias.float()
        fused = F.linear(torch.cat([f[m].detach() for m in modalities], 1), w, b)
        slices = torch.split(w.detach(), [f[m].shape[1] for m in modalities], dim=1)
        z = {m: F.linear(f[m], s, b.detach()) for m, s in zip(modalities, slices)}
        return fused, z
    heads = fusion.fc
    fused = sum(F.linear(f[m].detach(), heads[m].weight.float(), heads[m].bias.float())
                for m in modalities)
    z = {m: F.linear(f[m], heads[m].weight.float().detach(), heads[m].bias.float().detach())
         for m in modalities}
    return fused, z


def dgl_loss(fused: torch.Tensor, z: dict[str, torch.Tensor], labels: torch.Tensor,
             alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CE(fused) + alpha * sum_m CE(z_m) -> (loss, {branch: its CE, detached})."""
    ce = {m: F.cross_entropy(v, labels) for m, v in z.items()}
    ce["fused"] = F.cross_entropy(fused, labels)
    loss = ce["fused"] + alpha * sum(ce[m] for m in z)
    return loss, {k: v.detach() for k, v in ce.items()}


class DGL(Balancer):
    """Encoders trained by alpha * unimodal CE only, the classifier by the fused CE (hooks)."""

    name = "dgl"
    title = "DGL"
    paper = ("S. Wei, C. Luo, Y. Luo, \"Boosting Multimodal Learning via Disentangled Gradient "
             "Learning\", ICCV 2025")
    year = 2025
    summary = "encoders get alpha x unimodal CE, classifier fused CE"
    code = ("shicaiwei123/ICCV2025-GDL (main_dgl.py, models/fusion_modules.py, cramed_dgl.sh) "
            "@ b72a55f")
    differences = (
        "Authors' code: its clip_grad_norm_ 40 is the loop's --clip-grad 40 (a recipe setting)",
        "Authors' code: ConcatFusion_DGL's unused fc_auxi layer is not built (no effect on the "
        "step)",
        "Authors' code: film and gated (FiLM_DGL, GatedFusion_DGL) are not built; --fusion "
        "concat or sum",
        "Authors' code: per-encoder gradient sizes logged before the clip (released: after it, "
        "to a CSV)",
    )
    signals = ("dgl_ce_<branch>", "dgl_grad_<m>")
    # bench --tune: alpha (the unimodal CE's weight on the encoders, 2..5 in the released
    # scripts) is its one hyper-parameter
    options = (
        Option("alpha", float, 4.0, "weight of the unimodal CE, the encoders' only loss "
               "(released: 4 or 5 CREMA-D, 2 or 3 KS)", minimum=0, exclusive_minimum=True,
               shared=True, search=Search(0.5, 8.0, log=True)),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.bare = fused_model(model, self.name)
        summed_fusion(self.bare, self.name, "needs the parameter-shared unimodal logits")
        self._features: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            self.bare.encoders[m].register_forward_hook(self._keeper(m))
        self._metrics: dict[str, torch.Tensor] = {}

    def _keeper(self, modality: str):
        def keep(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # the training forward only
                self._features[modality] = output
        return keep

    def loss(self, logits, labels, *, epoch, step):
        fused, z = dgl_logits(self.bare.fusion, self._features, self.modalities)
        self._features = {}
        loss, ce = dgl_loss(fused, z, labels, self.opt.alpha)
        self._metrics = {f"dgl_ce_{k}": v for k, v in ce.items()}
        return loss

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        for m in self.modalities:
            sizes = [p.grad.abs().mean() for p in self.bare.encoders[m].parameters()
                     if p.grad is not None]
            self._metrics[f"dgl_grad_{m}"] = (torch.stack(sizes).sum() if sizes
                                              else labels.new_zeros((), dtype=torch.float32))

    def step_metrics(self):
        """The CE values averaged over the ranks (one small all-reduce when the loop logs);
        the gradient sizes are already the ranks' common values."""
        if not self._metrics:
            return {}
        ce = [k for k in self._metrics if k.startswith("dgl_ce_")]
        flat = _dist.mean_(torch.stack([self._metrics[k].float() for k in ce]))
        out = {k: flat[i] for i, k in enumerate(ce)}
        out.update({k: v for k, v in self._metrics.items() if k not in out})
        return out
