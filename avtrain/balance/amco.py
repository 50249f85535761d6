"""AMCo: adaptive mask co-optimization.

Paper: Y. Zhou, X. Liang, S. Zheng, H. Xuan, T. Kumada, "Adaptive Mask Co-Optimization for
Modal Dependence in Multimodal Learning", ICASSP 2023. No public code of the authors was found
(GitHub index, issue threads and web pages searched; the paper itself was not available here),
so the reference is BalanceMM's re-implementation, GeWu-Lab/BalanceBenchmark (commit 4c1482f):
balancemm/trainer/AMCo_trainer.py (`__init__` 20-30; `train_loop` 32-120: the per-epoch reset
61-64, the mask 72-83; `training_step` 122-159: window 127, forward 128-131, CE 140, backward
141-145, dependence 146-155), balancemm/models/avclassify_model.py (`BaseClassifierAMCoModel`
326-384: `linear_star` 329, `forward` 330-355, `unimodality_calculate` 357-384; the
DataParallel wrapper's scatter 171-185), configs/trainer_config.yaml (AMCo block, lines 20-28)
and configs/model_config.yaml (BaseClassifier_AMCo, lines 6-9: ResNet-18 encoders, concat). No
code is copied; tests/test_amco_released.py checks our steps against a reference written from
these semantics.

The model: per-modality logits z_m = f_m . W_m^T + b/M (concat's weight split; M modalities),
fused logits = linear_star(sum_m z_m), linear_star an extra Linear(C, C) that the model keeps in
evaluation too (our models: `output_layer=True`, which this method asks for).

One step, inside the window [--modulation-start, --modulation-end] (BalanceMM: [0, 80]):

- the mask: l is 0 at the start of each epoch and grows by epoch/10 after every step;
  pt = sin(pi/2 * min(eps, l) / eps), N = int(pt * C); the mask has N zeros and C - N ones over
  the C classes, in a random order, one mask for the whole batch;
- the modalities flagged dependent (all unflagged at the start of each epoch) have their
  unimodal logits multiplied by the mask: z_m <- z_m * mask;
- fused = linear_star(sum_m z_m); loss = CE(fused) + sum_m CE(z_m) (batch means; BalanceMM
  backpropagates them one by one, the same gradient), one optimizer step;
- dependence for the next step: s_m = sum over the batch of softmax([z_1 ... z_M])[class slice
  of m] / B, the share of modality m in one softmax over all unimodal logits (masked ones as
  they are, zeros included); m is dependent if s_m > sigma.

Outside the window: fused = linear_star(fusion(f)), loss = CE(fused) alone, no mask, no
dependence update. With the defaults (eps 0.3) epoch 0 never masks (l stays 0) and from epoch
1 on the dependent modality's logits are fully masked after the first few steps of each epoch
(epoch 1: N/C = 0, 1/2, 0.87, 1, ...).

Options: `--amco-sigma` (0.5), `--amco-eps` (0.3), `--modulation-start` (0), `--modulation-end`
(80): BalanceMM's trainer_config.yaml. Its `alpha` (0.1), `U` (512) and `method` are read by
the trainer but never used; so is its `pt` argument of the model's forward.

Fusions: BalanceMM computes the unimodal logits for concat only (other fusions fail there);
we also allow `sum`, whose logits are its summands fc_m(f_m), the same rule. Other fusions and
sequence models have no per-modality summands: an error. Any number of modalities (BalanceMM's
rule is written for N: b/M, one softmax over M*C logits).

Where we differ, and why:

- the mask's order comes from a generator seeded by (--seed, step), identical on every rank,
  instead of the global numpy RNG (`np.random.shuffle`): needed for DDP and exact --resume;
  with permutation p the mask is [1]*(C-N) + [0]*N reordered by p, the released construction;
- BalanceMM builds the mask as [2, C] (`expand(2, -1)`, equal rows), which broadcasts against
  the logits only when its DataParallel wrapper splits it over two GPUs, one row each (on one
  GPU with a batch above 2 the multiply fails); we apply the one row to every sample, as two
  GPUs do;
- the shares are summed over all ranks and divided by the global batch (BalanceMM: the
  DataParallel-gathered batch, the same); the flags stay device tensors (no `bool()` sync);
- outside the window (and in evaluation) the fused logits are linear_star(fusion(f)), which for
  concat and sum equals BalanceMM's linear_star(sum_m z_m) up to float rounding; inside it we
  sum the (masked) z_m, as BalanceMM does.

Everything per step stays on the device: the flags, shares and mask are tensors, the ramp is
host arithmetic on the step counter, no `.item()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import fused_model, number, require_two_modalities, summed_fusion, window
from .base import Balancer, EpochContext, StepContext
from .ogm import _mix

DRAW_SALT = 0xA3C0  # separates AMCo's mask stream from the other methods' streams for a seed


def amco_masked_count(level: float, eps: float, classes: int) -> tuple[float, int]:
    """(pt, N): the ramp pt = sin(pi/2 * min(eps, level) / eps) and the number of masked
    classes N = int(pt * classes) (BalanceMM AMCo_trainer.py lines 73-74)."""
    pt = math.sin(math.pi / 2 * (min(eps, level) / eps))
    return pt, int(pt * classes)


def amco_mask(order: torch.Tensor, masked: int) -> torch.Tensor:
    """The mask [C] for a permutation `order` of C classes: [1]*(C-N) + [0]*N reordered by
    `order` (entry i is element order[i] of that list)."""
    return (order < order.numel() - masked).float()


def amco_order(seed: int, step: int, classes: int, device) -> torch.Tensor:
    """The permutation of one step's mask, the same on every rank."""
    generator = torch.Generator(device=device)
    generator.manual_seed(_mix(int(seed) ^ DRAW_SALT, step))
    return torch.randperm(classes, generator=generator, device=device)


def amco_share_sums(parts: list[torch.Tensor]) -> torch.Tensor:
    """Each modality's share of one softmax over all unimodal logits, summed over the batch
    [M] (divide by the batch size for BalanceMM's s_m)."""
    joint = F.softmax(torch.cat([p.float() for p in parts], dim=1), dim=1)
    return joint.view(joint.shape[0], len(parts), -1).sum(dim=(0, 2))


class AMCo(Balancer):
    """Masks the dependent modality's unimodal logits, co-optimises fused and unimodal CE."""

    name = "amco"
    title = "AMCo"
    paper = ("Y. Zhou, X. Liang, S. Zheng, H. Xuan, T. Kumada, \"Adaptive Mask Co-Optimization "
             "for Modal Dependence in Multimodal Learning\", ICASSP 2023")
    year = 2023
    summary = "masks the dependent modality's unimodal logits"
    code = ("GeWu-Lab/BalanceBenchmark (AMCo_trainer.py, avclassify_model.py) @ 4c1482f; no "
            "public code of the authors")
    differences = (
        "Authors' code: none public; the defaults and the step are BalanceMM's",
        "BalanceMM: the mask's order comes from the global numpy generator (ours: one seeded "
        "by (--seed, step), the same on every rank)",
        "BalanceMM: its [2, C] mask broadcasts only when split over two GPUs; ours applies "
        "the one row to every sample, as two GPUs do",
        "BalanceMM: outside the window the fused logits are linear_star(fusion(f)), equal to "
        "its linear_star(sum z_m) up to rounding; --fusion sum is ours",
    )
    signals = ("mask_ratio", "share_<m>", "dependent_<m>")
    # bench --tune: sigma decides which modality is masked, eps how fast the mask ramps up
    options = (
        Option("modulation_start", int, 0, "first modulated epoch (0-based, inclusive)",
               minimum=0, shared=True),
        Option("modulation_end", int, 80, "last modulated epoch (inclusive)", minimum=0,
               shared=True),
        Option("sigma", float, 0.5, "a modality whose share of the joint softmax over the "
               "unimodal logits exceeds this is masked next step", minimum=0, maximum=1,
               search=Search(0.3, 0.7)),
        Option("eps", float, 0.3, "length of the mask ramp sin(pi/2 min(eps, l)/eps)",
               minimum=0, exclusive_minimum=True, search=Search(0.03, 3.0, log=True)),
    )
    output_layer = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        self.sigma, self.eps = self.opt.sigma, self.opt.eps
        if not math.isfinite(self.eps):  # declared above 0; inf would never mask
            raise UserError(f"--amco-eps must be a finite number, got {self.eps}")
        self.start, self.end = window(self.opt)
        self.seed = int(number(c, "seed", 0))
        bare = fused_model(model, self.name)
        summed_fusion(bare, self.name, "masks per-modality logits that sum to the fused ones")
        fusion = bare.fusion
        if getattr(bare, "output_layer", None) is None:
            raise UserError("--method amco needs the model built with its output layer "
                            "(build_model(..., output_layer=True))")
        self.bare = bare
        self.classes = int(bare.spec["num_classes"])
        fusion.register_forward_hook(self._mask_hook)
        self._armed: torch.Tensor | None = None  # this step's per-modality factors [M, C]
        self._parts: list[torch.Tensor] = []
        self.epoch = -1  # the epoch the ramp and the flags belong to
        self.level = 0.0  # BalanceMM's l_t
        self.dependent = torch.zeros(len(self.modalities), dtype=torch.bool, device=self.device)
        self._metrics: dict[str, torch.Tensor] = {}

    def in_window(self, epoch: int) -> bool:
        return self.start <= epoch <= self.end

    def _begin(self, epoch: int) -> None:
        """BalanceMM's train_loop start: l_t = 0, no modality dependent."""
        if epoch != self.epoch:
            self.epoch, self.level = epoch, 0.0
            self.dependent = torch.zeros_like(self.dependent)

    def start_epoch(self, ctx: EpochContext) -> None:
        self._begin(ctx.epoch)

    # -- the masked forward: the fusion's output becomes the sum of the masked unimodal logits --

    def _mask_hook(self, module, args, output):
        if self._armed is None or not module.training:
            return None
        factors, self._armed = self._armed, None  # one masked fusion call per step
        (feats,) = args
        logits = module.modality_logits(feats)
        self._parts = [logits[m] * factors[i].to(logits[m].dtype)
                       for i, m in enumerate(self.modalities)]
        fused = torch.zeros_like(output)
        for part in self._parts:
            fused = fused + part
        return fused

    def train_step(self, ctx: StepContext):
        self._begin(ctx.epoch)
        labels = ctx.labels
        _, masked = amco_masked_count(self.level, self.eps, self.classes)
        self.level += ctx.epoch / 10
        active = self.in_window(ctx.epoch)
        if active:
            mask = amco_mask(amco_order(self.seed, ctx.step, self.classes, labels.device), masked)
            dependent = self.dependent.to(labels.device)
            self._armed = torch.where(dependent.unsqueeze(1), mask.unsqueeze(0),
                                      torch.ones_like(mask).unsqueeze(0))
        try:
            logits = ctx.forward()
        finally:
            self._armed = None
        loss = F.cross_entropy(logits["fused"].float(), labels)
        total = loss
        if active:
            parts, self._parts = self._parts, []
            logits = {**logits, **dict(zip(self.modalities, parts))}
            total = loss + sum(F.cross_entropy(p.float(), labels) for p in parts)
        else:
            parts = [logits[m] for m in self.modalities]
        ctx.optimizer.zero_grad(set_to_none=True)
        total.backward()
        ctx.clip_grad()
        ctx.optimizer.step()
        with torch.no_grad():
            count = torch.full((1,), float(labels.shape[0]), device=labels.device)
            sums = _dist.sum_(torch.cat([amco_share_sums([p.detach() for p in parts]), count]))
            shares = sums[:-1] / sums[-1]
        self._metrics = {"mask_ratio": torch.tensor(masked / self.classes if active else 0.0)}
        for i, m in enumerate(self.modalities):
            self._metrics[f"share_{m}"] = shares[i]
            self._metrics[f"dependent_{m}"] = (self.dependent[i] & active).float()
        if active:
            self.dependent = shares > self.sigma
        return loss, logits

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self):
        return {"epoch": self.epoch, "level": self.level, "dependent": self.dependent.clone()}

    def load_state_dict(self, state):
        if not state:
            return
        self.epoch = int(state["epoch"])
        self.level = float(state["level"])
        self.dependent = state["dependent"].to(self.device, torch.bool)
