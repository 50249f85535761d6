"""PMR: prototypical modal rebalance.

Paper: Y. Fan, W. Xu, H. Wang, J. Wang, S. Guo, "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023. Released code: github.com/fanyunfeng-bit/Modal-Imbalance-PMR
(commit 3615e48), main_Prototype_grad.py: `train_epoch` (lines 91-288), `calculate_prototype`
(383-441), `main` (444-557), argparse defaults (22-66). BalanceMM's re-implementation:
GeWu-Lab/BalanceBenchmark balancemm/trainer/PMR_trainer.py, configs/trainer_config.yaml (PMR
block, lines 40-46). No code is copied; tests/test_pmr_released.py checks one epoch-start plus
steps against a reference written from the released semantics.

Each modality m has one prototype per class: the mean encoder feature (the vector the fusion
reads) of that class. Before every epoch they are measured again, the model in eval mode and
without grad, over the first `--pmr-proto-batches` training batches (released: the first
len(train_loader) // 10 batches, `sample_count >= all_num // 10`, i.e. at least one; train
transforms, as its train loader has them), class sums and counts summed over all ranks. From
the third epoch on, the new prototypes are blended with the previous ones:
P <- (1 - momentum) * P_new + momentum * P_old (released: the prototypes used in epoch E come
from `calculate_prototype(epoch=E-1)`, whose momentum branch needs E-1 > 0).

One step (inside the modulation window [--modulation-start, --modulation-end], inclusive):

- sim_m = -||f_m(x) - P_m[c]||_2 for every class c (B x C), from the training forward;
- prototype score s_m = sum over the batch of softmax(sim_m)[y] (summed over all ranks in DDP);
  rho = s_audio / s_visual;
- rho > 1 (audio dominates): loss = CE(fused) + alpha * CE(sim_visual); rho < 1:
  CE(fused) + alpha * CE(sim_audio); rho == 1: CE(fused) alone. CE is the batch mean.

Outside the window the loss is CE(fused). The prototype CE trains the weak modality's encoder
towards its prototypes (the paper's prototypical cross-entropy), so it speeds up that modality.

Options: `--alpha` (default 1.0, argparse line 49), `--modulation-start` / `--modulation-end`
(0 / 100, lines 47-48), `--pmr-momentum` (0.2, line 39), `--pmr-proto-batches` (steps per epoch
// 10, at least 1). The released run scripts (bash.sh) use alpha 2.0 and momentum 0.0 for CREMA-D
and AVE with --modulation_ends 70; BalanceMM's config uses alpha 0.6, momentum 0.5, end 80.

Where we differ, and why:

- a class with no sample in the prototype batches keeps its previous prototype (zeros before
  the first measurement); the released code divides by a zero count and gets NaN prototypes,
  which turn the whole loss NaN;
- AVE in the released code measures prototypes on its val split (all of it); we always use
  training batches: a val split that shapes training would no longer be held out;
- the prototypes are measured at the start of each epoch (also after --resume), with one extra
  measurement before epoch 0 the same as the released one; the released code measures after
  each epoch, which is the same model and the same data order for the next epoch;
- BalanceMM measures at the start of each epoch and applies momentum from epoch 1 (the released
  code from epoch 2), and for more than two modalities replaces the prototype loss with an
  OGM-GE-like gradient rule of its own (eta 0.01). The authors define PMR for two modalities
  only, so more than two is an error here.

Everything per step stays on the device: the coefficients are tensors chosen with
`torch.where`, no `.item()`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import number, require_two_modalities, window
from .base import Balancer, EpochContext


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """-Euclidean distance of each feature [B, D] to each prototype [C, D] -> [B, C], exact
    (no matrix-product shortcut, whose rounding the released loop does not have)."""
    return -torch.cdist(features.float().unsqueeze(0), prototypes.float().unsqueeze(0),
                        compute_mode="donot_use_mm_for_euclid_dist").squeeze(0)


def pmr_coefficients(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Prototype-CE weights [audio, visual] from the prototype scores [audio, visual]: alpha on
    the weaker modality, 0 on the stronger, 0 on both at a tie (released lines 169-177)."""
    ratio = scores[0] / scores[1]
    zero = torch.zeros_like(ratio)
    return torch.stack([torch.where(ratio < 1, zero + alpha, zero),
                        torch.where(ratio > 1, zero + alpha, zero)])


class PMR(Balancer):
    """Prototype CE on the weaker modality, decided by prototype scores (hooks + start_epoch)."""

    name = "pmr"
    title = "PMR"
    paper = ("Y. Fan, W. Xu, H. Wang, J. Wang, S. Guo, \"PMR: Prototypical Modal Rebalance for "
             "Multimodal Learning\", CVPR 2023")
    year = 2023
    summary = "prototype CE speeds up the weaker modality"
    code = ("fanyunfeng-bit/Modal-Imbalance-PMR (main_Prototype_grad.py) @ 3615e48; BalanceMM: "
            "GeWu-Lab/BalanceBenchmark (PMR_trainer.py) @ 4c1482f")
    differences = (
        "Authors' code: a class with no sample in the prototype batches keeps its prototype "
        "(released: 0/0, NaN)",
        "Authors' code: AVE's prototypes come from training batches too (released: its val "
        "split)",
        "Authors' code: prototypes are measured before each epoch (released: after each, the "
        "same model and data order)",
        "BalanceMM: alpha 0.6, momentum 0.5, window [0, 80], momentum from epoch 1 (released: "
        "epoch 2)",
        "BalanceMM: an OGM-GE-like rule (eta 0.01) for three modalities; ours: two, as the "
        "authors",
    )
    signals = ("proto_ratio", "proto_score_<m>", "pce_coeff_<m>")
    # bench --tune: alpha weighs the prototype CE (its strength); the window end is when the
    # rebalancing stops (released: epoch 100 of 150)
    options = (
        Option("alpha", float, 1.0, "weight of the prototype CE on the weak modality",
               minimum=0, shared=True, search=Search(0.3, 3.0, log=True)),
        Option("modulation_start", int, 0, "first modulated epoch (0-based, inclusive)",
               minimum=0, shared=True),
        Option("modulation_end", int, 100, "last modulated epoch (inclusive)", minimum=0,
               shared=True, search=Search(1, 100, log=True)),
        Option("momentum", float, 0.2, "prototype momentum: weight of the previous prototypes",
               minimum=0, maximum=1, exclusive_maximum=True),
        Option("proto_batches", int, None, "training batches per rank averaged into the "
               "prototypes before each epoch", minimum=1,
               none_means="steps per epoch // 10, at least 1, as released"),
    )

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        if len(self.modalities) > 2:
            raise UserError(f"--method pmr is defined for two modalities, got "
                            f"{', '.join(self.modalities)}")
        self.alpha = self.opt.alpha
        self.start, self.end = window(self.opt)
        self.momentum = self.opt.momentum
        self.proto_batches = self.opt.proto_batches
        if self.proto_batches is None:  # released: len(train_loader) // 10, at least one
            steps = int(number(c, "steps_per_epoch", 10) or 10)
            self.proto_batches = max(1, steps // 10)
        bare = getattr(model, "module", model)
        encoders = getattr(bare, "encoders", None)
        if encoders is None:
            raise UserError("--method pmr needs a model with per-modality encoders")
        num_classes = int(c.get("num_classes") or bare.spec["num_classes"])
        dims = [encoders[m].out_dim for m in self.modalities]
        if len(set(dims)) != 1:
            raise UserError(f"--method pmr needs encoders of one feature size, got {dims}")
        self.prototypes = torch.zeros(len(self.modalities), num_classes, dims[0],
                                      device=self.device)
        self.measured = 0  # prototype measurements so far (momentum needs a previous one)
        self._features: dict[str, torch.Tensor] = {}
        for m in self.modalities:
            encoders[m].register_forward_hook(self._keeper(m))
        self._metrics: dict[str, torch.Tensor] = {}

    def _keeper(self, modality: str):
        def keep(module, inputs, output):
            if module.training and torch.is_grad_enabled():  # the training forward only
                self._features[modality] = output
        return keep

    # -- before each epoch: the prototypes --

    @torch.no_grad()
    def measure(self, model, batches, autocast) -> torch.Tensor:
        """Per-class mean features [M, C, D] over `batches`, summed over all ranks; classes
        without a sample keep their current prototype."""
        num_classes = self.prototypes.shape[1]
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(num_classes, device=self.prototypes.device)
        for batch in batches:
            with autocast():
                feats = model.features(batch)
            y = batch["label"].to(self.prototypes.device).long()
            for i, m in enumerate(self.modalities):
                sums[i].index_add_(0, y, feats[m].float())
            counts += torch.bincount(y, minlength=num_classes).float()
        flat = _dist.sum_(torch.cat([sums.flatten(), counts]))
        sums = flat[:sums.numel()].view_as(sums)
        counts = flat[sums.numel():]
        seen = (counts > 0).view(1, -1, 1)
        return torch.where(seen, sums / counts.clamp_min(1).view(1, -1, 1), self.prototypes)

    def start_epoch(self, ctx: EpochContext) -> None:
        bare = getattr(ctx.model, "module", ctx.model)
        was_training = bare.training
        bare.eval()
        new = self.measure(bare, ctx.batches(self.proto_batches), ctx.autocast)
        if was_training:
            bare.train()
        # released: momentum once a previous measurement exists *and* epoch - 1 > 0
        if self.measured and ctx.epoch >= 2:
            new = (1 - self.momentum) * new + self.momentum * self.prototypes
        self.prototypes = new
        self.measured += 1

    # -- the step --

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch <= self.end

    def loss(self, logits, labels, *, epoch, step):
        ce = F.cross_entropy(logits["fused"].float(), labels)
        feats, self._features = self._features, {}
        if len(feats) != len(self.modalities):
            raise RuntimeError("PMR saw no encoder features from the training forward")
        sims = [prototype_logits(feats[m], self.prototypes[i])
                for i, m in enumerate(self.modalities)]
        index = labels.long().unsqueeze(1)
        scores = _dist.sum_(torch.stack([F.softmax(s.detach(), dim=1).gather(1, index).sum()
                                         for s in sims]))
        coeffs = pmr_coefficients(scores, self.alpha)
        if not self.in_window(epoch):
            coeffs = torch.zeros_like(coeffs)
        self._metrics = {"proto_ratio": scores[0] / scores[1]}
        for i, m in enumerate(self.modalities):
            self._metrics[f"proto_score_{m}"] = scores[i]
            self._metrics[f"pce_coeff_{m}"] = coeffs[i]
        if not self.in_window(epoch):
            return ce
        proto_ce = torch.stack([F.cross_entropy(s, labels) for s in sims])
        return ce + (coeffs * proto_ce).sum()

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.detach().cpu().clone(),
                "measured": torch.tensor(self.measured)}

    def load_state_dict(self, state: dict) -> None:
        if "prototypes" in state:
            self.prototypes = state["prototypes"].to(self.prototypes.device,
                                                     self.prototypes.dtype).clone()
            self.measured = int(state["measured"])
