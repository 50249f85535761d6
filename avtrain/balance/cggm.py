"""CGGM: classifier-guided gradient modulation.

Paper: Z. Guo, T. Jin, J. Chen, Z. Zhao, "Classifier-guided Gradient Modulation for Enhanced
Multimodal Learning", NeurIPS 2024. Released code: github.com/zrguo/CGGM (commit 21e428c):
src/msatrain.py `train_model` (lines 39-133: the state kept across steps and epochs 46-47, the
loss with the previous step's l_gm 75-78, the classifiers' step 80-124, clipping and the
network's step 126-127), models/msamodel.py (`Classifier` 77-94, `ClassifierGuided` 97-132:
one classifier per modality on the *detached* encoder outputs), src/eval_metrics.py (`cal_cos`
165-173, `train_eval_iemo` 56-63: the batch accuracy), run/iemo_run.py (the classification
script: --rou 1.3, --lamda 0.2, --cls_lr 5e-4, Adam, --clip 0.8: lines 45-56); the two-modality
version is src/foodtrain.py (lines 57-135, --lamda 0.05 in run/food_run.py). BalanceMM has no
CGGM. No code is copied; tests/test_cggm_released.py checks our steps against a reference written
from the released semantics.

Each modality m has its own classifier on its encoder's detached features, trained with its own
Adam (lr 5e-4) on its CE. One step:

- one forward; loss = CE(fused) + lambda * l_gm, where l_gm is the previous step's (nothing at
  the first step); backward;
- the classifiers: CE of each on the detached features, summed; backward; cos_m = cosine of
  classifier m's output weight with the fused layer's weight for m (flattened, both before
  this step's updates);
- acc_m = classifier m's accuracy on the batch (summed over all ranks in DDP); the improvement
  d_m = acc_m - acc_m(previous step) (0 before the first); D = sum_m d_m + 1e-8;
  coeff_m = (D - d_m) / D -- a modality that improved less than the others gets more;
- l_gm = (sum_m |coeff_m| - sum_m coeff_m * cos_m) / M, kept with its graph for the next step's
  loss: its gradient reaches the fused layer's weight (and only it: the classifiers' gradients
  are zeroed before their own backward), evaluated at the weights it was built with;
- every parameter of encoder m: grad *= coeff_m * rho (rho 1.3); the classifiers' optimizer
  steps; all network gradients are clipped to total norm 0.8; the network's optimizer steps.

The last accuracies and l_gm carry over to the next epoch (released: `nonlocal`, set once).

The classifiers and the fused weights compared. The released model fuses with a transformer
whose output layer is [C, D], the size of each classifier's output layer. Ours: `concat` compares
classifier m with the fused layer's weight slice for m's features (the split of OGM-GE), `sum`
with m's summand `fc[m]`; other fusions have no per-modality part of the fused layer: an error.
The released classifier is a 2-layer transformer over the encoder's sequence, then
`out_layer(relu(proj1(proj1(x[0]))))` (proj1 applied twice, as written); our encoders give one
pooled vector per clip, so `--cggm-classifier released` is that head without the transformer,
`linear` a single Linear.

Options: `--cggm-rho` (1.3, iemo_run.py:55), `--cggm-lam` (0.2, :56; UPMC-Food 0.05),
`--cggm-lr` (5e-4, :49), `--cggm-clip` (0.8, :45; 0: off; the loop's `--clip-grad` comes after),
`--cggm-classifier` (released).

Where we differ, and why:

- the released code takes the cosine of the output layers' *weights* (`para`, though named
  `fusion_grad` / `cls_grad`), not of their gradients as the paper writes; we follow the code;
- the released l_gm is written for exactly three (MSA) or two (Food) modalities; ours sums over
  the model's modalities, the same for those;
- the released classifiers' optimizer is the network's optimizer class (Adam for IEMOCAP and
  MOSI; AdamW with weight decay 3e-3 for Food); ours is Adam without weight decay;
- DDP (released: one process): the accuracies are of the global batch, the classifiers' gradients
  are averaged over the ranks by hand, so every rank takes the same coefficients.

Per step nothing leaves the device: accuracies, improvements and coefficients are float64
tensors (the released Python floats), the graph of l_gm is replaced by the tensors it was built
from (the fused weights, the classifier weights, the coefficients), whose gradient is added to
the fused layer's before clipping. `state_dict` holds the classifiers, their optimizer, the last
accuracies and those tensors, so `--resume` continues exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, require_two_modalities
from .base import Balancer

EPS = 1e-8  # added to the sum of the improvements (released msatrain.py:109)


class ReleasedHead(nn.Module):
    """The released `Classifier` after its transformer: out_layer(relu(proj1(proj1(x))))."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.proj1 = nn.Linear(dim, dim)
        self.out_layer = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.out_layer(F.relu(self.proj1(self.proj1(x))))


class LinearHead(nn.Module):
    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.out_layer = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.out_layer(x)


def cggm_coefficients(acc_now: torch.Tensor, acc_before: torch.Tensor) -> torch.Tensor:
    """coeff_m = (D - d_m) / D, d = acc_now - acc_before, D = sum(d) + 1e-8 (released
    msatrain.py 107-113; the sum left to right as Python's `sum`)."""
    diff = acc_now - acc_before
    total = diff[0]
    for d in diff[1:]:
        total = total + d
    total = total + EPS
    return (total - diff) / total


def cggm_lgm(coeff: torch.Tensor, cosines: list[torch.Tensor]) -> torch.Tensor:
    """l_gm = (sum |coeff| - sum_m coeff_m * cos_m) / M (released msatrain.py 116-117)."""
    guided = coeff[0].float() * cosines[0]
    for i in range(1, len(cosines)):
        guided = guided + coeff[i].float() * cosines[i]
    return (coeff.abs().sum().float() - guided) / len(cosines)


def fused_part(bare, modality: str, grad: bool = False) -> torch.Tensor | None:
    """The part of the fused layer's weight (or of its gradient, `grad`) that reads
    `modality`'s features, [C, D_m]: sum's summand, concat's weight slice (a view)."""
    fusion = bare.fusion
    if isinstance(getattr(fusion, "fc", None), nn.ModuleDict):  # sum: its summands
        weight = fusion.fc[modality].weight
        return weight.grad if grad else weight
    whole = fusion.fc_out.weight.grad if grad else fusion.fc_out.weight
    if whole is None:
        return None
    return torch.split(whole, fusion.dims, dim=1)[bare.modalities.index(modality)]


class CGGM(Balancer):
    """Per-modality classifiers on detached features set the encoders' gradient scales and a
    cosine term on the fused layer (hooks)."""

    name = "cggm"
    title = "CGGM"
    paper = ("Z. Guo, T. Jin, J. Chen, Z. Zhao, \"Classifier-guided Gradient Modulation for "
             "Enhanced Multimodal Learning\", NeurIPS 2024")
    year = 2024
    summary = "encoder grads scaled by unimodal classifiers' progress"
    code = "zrguo/CGGM (src/msatrain.py, models/msamodel.py, run/iemo_run.py) @ 21e428c"
    differences = (
        "Authors' code: transformer fusion; ours compares each classifier with concat's "
        "weight slice (or sum's summand) for its modality",
        "Authors' code: the classifiers' 2-layer transformer is left out (our encoders give "
        "pooled features); --cggm-classifier released keeps the head after it",
        "Authors' code: the classifiers' optimizer is Adam without weight decay (released: the "
        "network's optimizer class; Food: AdamW, 3e-3)",
        "Authors' code: under DDP the accuracies are the global batch's and the classifiers' "
        "gradients are averaged by hand (released: one process)",
        "BalanceMM: has no CGGM",
    )
    signals = ("cggm_coeff_<m>", "cggm_acc_<m>", "cggm_cos_<m>", "cggm_lgm")
    # bench --tune: rho scales every encoder's gradient, lam weighs the cosine term
    options = (
        Option("rho", float, 1.3, "factor on every encoder gradient, times the modality's "
               "coefficient", minimum=0, exclusive_minimum=True,
               search=Search(0.5, 3.0, log=True)),
        Option("lam", float, 0.2, "weight of the cosine term l_gm in the loss", minimum=0,
               search=Search(0.01, 1.0, log=True)),
        Option("lr", float, 5e-4, "learning rate of the classifiers' Adam", minimum=0,
               exclusive_minimum=True),
        Option("clip", float, 0.8, "clip every network gradient to this total norm after the "
               "modulation (released --clip); 0: off", minimum=0),
        Option("classifier", str, "released", "the per-modality classifier: released (the "
               "released head after its transformer) or linear", choices=("released", "linear")),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        bare = fused_model(model, self.name)
        fusion = bare.fusion
        if not fusion.decomposable or bare.aux_heads or not (
                hasattr(fusion, "dims") or isinstance(getattr(fusion, "fc", None), nn.ModuleDict)):
            raise UserError(f"--method cggm compares each classifier with the fused layer's part "
                            f"for its modality: use --fusion concat or sum, not "
                            f"{bare.spec['fusion']}")
        self.bare = bare
        num_classes = int(bare.spec["num_classes"])
        head = ReleasedHead if self.opt.classifier == "released" else LinearHead
        self.classifiers = nn.ModuleDict(
            {m: head(bare.encoders[m].out_dim, num_classes) for m in self.modalities}
        ).to(self.device)
        self.cls_optimizer = torch.optim.Adam(self.classifiers.parameters(), lr=self.opt.lr)
        self.encoder_params = [[p for p in bare.encoders[m].parameters() if p.requires_grad]
                               for m in self.modalities]
        n = len(self.modalities)
        self.acc = torch.zeros(n, dtype=torch.float64, device=self.device)  # released acc1
        # what the previous step's l_gm was built from (released: its graph); None: no l_gm yet
        self.prev: dict[str, torch.Tensor] | None = None
        self._features: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            bare.encoders[m].register_forward_hook(self._keeper(m))
        self._metrics: dict[str, torch.Tensor] = {}

    def _keeper(self, modality: str):
        def keep(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # the training forward only
                self._features[modality] = output.detach()
        return keep

    def _prev_lgm(self, grad: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The previous step's l_gm, rebuilt from its tensors; with `grad`, over fresh leaves of
        the fused weights it was built with (returned too)."""
        p = self.prev
        fused = [p[f"fused_{m}"].clone().requires_grad_(grad) for m in self.modalities]
        cos = [F.cosine_similarity(p[f"cls_{m}"].view(-1), w.view(-1), dim=0)
               for m, w in zip(self.modalities, fused)]
        return cggm_lgm(p["coeff"], cos), fused

    def loss(self, logits, labels, *, epoch, step):
        loss = F.cross_entropy(logits["fused"].float(), labels)
        if self.prev is not None:  # its value; its gradient is added before the step
            with torch.no_grad():
                lgm, _ = self._prev_lgm(False)
            loss = loss + self.opt.lam * lgm
        return loss

    def before_optimizer_step(self, logits, labels, *, epoch, step):
        feats, self._features = self._features, {}
        if len(feats) != len(self.modalities):
            raise RuntimeError("CGGM saw no encoder features from the training forward")
        # the previous l_gm's gradient on the fused layer (released: part of this backward)
        if self.prev is not None:
            with torch.enable_grad():
                lgm, leaves = self._prev_lgm(True)
                grads = torch.autograd.grad(self.opt.lam * lgm, leaves)
            for m, g in zip(self.modalities, grads):
                part = fused_part(self.bare, m, grad=True)
                if part is not None:
                    part.add_(g)
        # the classifiers' step on the detached features
        self.cls_optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            outs = {m: self.classifiers[m](feats[m].float()) for m in self.modalities}
            cls_loss = sum(F.cross_entropy(outs[m], labels) for m in self.modalities)
            cls_loss.backward()
        grads = [p.grad for p in self.classifiers.parameters() if p.grad is not None]
        if _dist.world_size() > 1 and grads:
            flat = _dist.mean_(torch.cat([g.reshape(-1) for g in grads]))
            torch._foreach_copy_(grads, [v.view_as(g) for v, g in
                                         zip(flat.split([g.numel() for g in grads]), grads)])
        with torch.no_grad():
            cls_w = {m: self.classifiers[m].out_layer.weight.detach().clone()
                     for m in self.modalities}
            fused_w = {m: fused_part(self.bare, m).detach().clone()
                       for m in self.modalities}
            cos = [F.cosine_similarity(cls_w[m].view(-1), fused_w[m].view(-1), dim=0)
                   for m in self.modalities]
            counts = torch.stack(
                [(outs[m].argmax(dim=1) == labels).sum() for m in self.modalities]
                + [torch.tensor(labels.numel(), device=labels.device)]).double()
            counts = _dist.sum_(counts)
            acc = counts[:-1] / counts[-1]
            coeff = cggm_coefficients(acc, self.acc)
            self.acc = acc
            lgm = cggm_lgm(coeff, cos)
            self.prev = {"coeff": coeff, **{f"cls_{m}": cls_w[m] for m in self.modalities},
                         **{f"fused_{m}": fused_w[m] for m in self.modalities}}
            scale = (coeff * self.opt.rho).float()
            for i, params in enumerate(self.encoder_params):
                grads = [p.grad for p in params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, scale[i])
        self.cls_optimizer.step()
        if self.opt.clip:
            torch.nn.utils.clip_grad_norm_(self.bare.parameters(), self.opt.clip)
        self._metrics = {"cggm_lgm": lgm}
        for i, m in enumerate(self.modalities):
            self._metrics[f"cggm_coeff_{m}"] = coeff[i].float()
            self._metrics[f"cggm_acc_{m}"] = acc[i].float()
            self._metrics[f"cggm_cos_{m}"] = cos[i]

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"classifiers": {k: v.detach().clone()
                                for k, v in self.classifiers.state_dict().items()},
                "cls_optimizer": self.cls_optimizer.state_dict(),
                "acc": self.acc.detach().clone(),
                "prev": None if self.prev is None else {k: v.detach().clone()
                                                        for k, v in self.prev.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.classifiers.load_state_dict(state["classifiers"])
        self.cls_optimizer.load_state_dict(state["cls_optimizer"])
        self.acc = state["acc"].to(self.device, torch.float64).clone()
        prev = state.get("prev")
        self.prev = None if prev is None else {k: v.to(self.device).clone()
                                               for k, v in prev.items()}
