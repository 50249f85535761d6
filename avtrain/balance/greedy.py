"""Greedy: balanced multi-modal learning by conditional learning speed (re-balancing steps).

Paper: N. Wu, S. Jastrzebski, K. Cho, K. J. Geras, "Characterizing and Overcoming the Greedy
Nature of Learning in Multi-modal Deep Neural Networks", ICML 2022 (Algorithm 1). Released code:
github.com/nyukat/greedy_multimodal_learning (commit a190e03): src/callbacks.py
`Bias_Mitigation_Strong` (lines 173-267: `compute_BDR` 199-233, the decision `on_backward_end`
240-263, the unlock `on_epoch_begin` 265-267), src/balanced_mmtm.py `MMTM_mitigate` (16-154),
src/model.py `MMTM_MVCNN` (MMTM after layers 2-4, 58-60 and 81-97; the two branch heads and
`(x_0 + x_1) / 2`, 99-108), train.py `blend_loss` (22-28: the sum of the branches' CE),
src/framework.py `train_loop` (epochs counted from 1, 293; zero_grad, forward, backward, the
callback, step, 310-315), configs/training_guided.gin (epsilon 0.01, window 5, starting_epoch 2;
SGD lr 0.1, momentum 0, wd 0). BalanceMM's port: GeWu-Lab/BalanceBenchmark (4c1482f)
balancemm/trainer/Greedy_trainer.py (`train_loop` 66-99, `training_step` 125-145,
`compute_learning_speed` 147-180), balancemm/models/avclassify_model.py
(`BaseClassifierGreedyModel` 387-534, `MMTM` 537-624), configs/trainer_config.yaml (Greedy,
lines 56-61: alpha 0.001, window_size 5, modulation 0-80). No code is copied;
tests/test_greedy_released.py checks our steps against a reference written from the released
semantics.

**The architecture.** Greedy is defined on a network with a cross-modal *bypass*: MMTM blocks
between the two encoders (the released MMTM_MVCNN). avtrain's models are late-fusion, so, as
BalanceMM does for its audio-visual ResNet-18s, `--method greedy` builds the model with MMTM
blocks between the audio and visual encoders' stages (avtrain/models/mmtm.py; the authors'
positions, after ResNet-18 layers 2, 3 and 4, or after tiny's 2nd and 3rd conv blocks). Without
them there is no bypass: no conditional learning speed to measure and no re-balancing step to
take, so the method is not offered without them (nothing here drops a late-fusion feature
instead). The blocks are part of the model (checkpointed, used in eval and by the probe).

**One step** (the released `train_loop` with `Bias_Mitigation_Strong`):

1. forward: a normal step, or a *re-balancing step for modality i* (the released curation mode
   with `caring_modality` i): branch i's MMTM gates are replaced by their running means, so the
   other modality's information stops flowing into branch i;
2. loss = sum over the modalities of CE(logits_m) (`--greedy-loss unimodal`, the released
   `blend_loss`; the fused prediction, the sum of the two, is what is evaluated: the released
   `(x_0 + x_1) / 2` up to a factor) or CE(fused) (`fused`, BalanceMM's); batch means;
3. backward, then -- unless this step was a re-balancing one -- the conditional learning speeds
   from this step's gradients and the weights before the step:
       r(P) = sum_{p in P} |grad p|^2 / sum_{p in P} |p|^2
       M_bypass_m += r(MMTM parameters of m: every block's fc_squeeze and its fc_excite[m])
       M_main_m   += r(parameters of branch m: encoder m, and `sum`'s head fc[m], as the
                       released branch includes its fc)
       BDR_m = log10(M_bypass_m / M_main_m);  d = BDR_0 - BDR_1      (modality 0 = audio)
4. the rule, from the first unlocked epoch on: if the last Q steps were not a window and
   |d| > epsilon, the next Q = --greedy-window steps are re-balancing steps for modality
   0 if d > 0, else 1 (the modality whose bypass learns relatively faster); otherwise normal
   steps. Before that epoch d is still accumulated every step and every step is normal;
5. clip (if asked), optimizer step.

The sums M accumulate over the whole run (never reset), only on steps that compute d.

Options and defaults (the authors'): `--greedy-epsilon` 0.01 (gin; BalanceMM 0.001),
`--greedy-window` 5 (both), `--modulation-start` 1 = the released `starting_epoch=2` in its
epochs counted from 1 (BalanceMM: 0, from the first step), `--modulation-end` none (the
released unlock is never undone; BalanceMM's 80 selects between two identical branches, so it
has no effect there either; after an end given here d is still accumulated, no window starts),
`--greedy-loss` unimodal (BalanceMM: fused), `--greedy-average` own (see mmtm.py; `released`
for the authors' slip). The released protocol (ModelNet40 two views, SGD lr 0.1 without
momentum, batch 8, ReduceLROnPlateau) is not a recipe.

Where we differ from the released code, and why:
- the MMTM blocks' running means (mmtm.py): training forwards only, own gates by default,
  global-batch means under DDP; eval forwards never re-balance;
- DDP: the gradients are DDP-averaged already; the eight squared norms are averaged over ranks
  once more (a no-op in value) so d, and every decision, is bit-identical on every rank;
- all of it stays on the device: the decision is a few `torch.where`s on 0-d tensors, no
  `.item()` (the released code takes one per parameter and step) and the norms are one
  `torch._foreach_norm` per parameter group;
- the squared norms are float32 norms squared in float64, the released float32 sums of squares
  added in Python floats: equal to float tolerance;
- more than two modalities, text, sequence models: an error (the rule is a difference of two).

BalanceMM's port differs from the authors in: its threshold (alpha 0.001), no warm-up epoch,
MMTM also after layer 1, CE on the fused (concat) logits, per-modality running means, and its
`MMTM.forward` as published resets `running_avg_weight` to {} before reading it (a KeyError) and
hard-codes a batch of 64 for video.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avprep.errors import UserError
from avtrain.models.fusions import SumFusion
from avtrain.options import Option, Search

from . import _dist
from ._checks import finite, require_two_modalities, window
from .base import Balancer, StepContext


def greedy_parameter_groups(model) -> list[list[torch.nn.Parameter]]:
    """[bypass_0, bypass_1, main_0, main_1]: the parameters of each conditional learning
    speed (released `compute_BDR`: 'mmtm' parameters of a modality and the shared ones; a
    branch's parameters, its head included)."""
    mods = model.modalities
    shared = [p for block in model.mmtm.blocks for p in block.fc_squeeze.parameters()]
    groups = []
    for m in mods:
        own = [p for block in model.mmtm.blocks for p in block.fc_excite[m].parameters()]
        groups.append(shared + own)
    for m in mods:
        main = list(model.encoders[m].parameters())
        if isinstance(model.fusion, SumFusion):
            main += list(model.fusion.fc[m].parameters())
        groups.append(main)
    return groups


def greedy_speed_terms(groups) -> torch.Tensor:
    """[8] float64: (sum |grad|^2, sum |p|^2) of each group, in order (missing grads: 0)."""
    out = []
    for params in groups:
        grads = [p.grad for p in params if p.grad is not None]
        g = torch.stack(torch._foreach_norm(grads)).double().square().sum() if grads else \
            torch.zeros((), dtype=torch.float64, device=params[0].device)
        w = torch.stack(torch._foreach_norm([p.detach() for p in params])).double()
        out += [g, w.square().sum()]
    return torch.stack(out)


def greedy_speed_difference(m_sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d, BDR [2]) from M = [bypass_0, bypass_1, main_0, main_1] (released lines 230-233)."""
    bdr = torch.log10(m_sums[:2] / m_sums[2:])
    return bdr[0] - bdr[1], bdr


def greedy_rule(state: dict, d: torch.Tensor, *, unlocked: bool, epsilon: float,
                window: int) -> dict:
    """The next mode from this step's d (released `on_backward_end`), on 0-d tensors:
    state = {curating (bool), caring (long), curation_step (long)}; returns the new state."""
    curating, caring, step = state["curating"], state["caring"], state["curation_step"]
    if not unlocked:
        return {"curating": torch.zeros_like(curating), "caring": torch.zeros_like(caring),
                "curation_step": step}
    trigger = ~curating & (d.abs() > epsilon)
    counted = torch.where(curating, step + 1, torch.zeros_like(step))
    ends = curating & (counted == window)
    start = torch.where(d > 0, torch.zeros_like(caring), torch.ones_like(caring))
    new_caring = torch.where(trigger, start, torch.where(curating, caring,
                                                         torch.zeros_like(caring)))
    new_curating = torch.where(curating, ~ends, trigger)
    return {"curating": new_curating, "caring": new_caring,
            "curation_step": torch.where(curating | trigger, counted, step)}


class Greedy(Balancer):
    """Re-balancing steps chosen by the conditional learning speed (owns the step)."""

    name = "greedy"
    title = "Greedy"
    paper = ("N. Wu, S. Jastrzebski, K. Cho, K. J. Geras: Characterizing and Overcoming the "
             "Greedy Nature of Learning in Multi-modal Deep Neural Networks, ICML")
    year = 2022
    summary = "re-balancing steps by conditional learning speed"
    code = ("nyukat/greedy_multimodal_learning (src/callbacks.py Bias_Mitigation_Strong, "
            "src/balanced_mmtm.py, configs/training_guided.gin) @ a190e03; "
            "GeWu-Lab/BalanceBenchmark (Greedy_trainer.py, trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: MMTM running means from training forwards only, each modality's own "
        "(--greedy-average released: the second's by the first's), global-batch under DDP",
        "Authors' code: the learning speeds and the decision stay on the device (no .item())",
        "Authors' code: audio-visual late-fusion encoders with MMTM blocks, not MMTM_MVCNN",
        "BalanceMM: threshold 0.001, no warm-up epoch, CE of the fused logits, MMTM also "
        "after layer 1; here the authors' 0.01, epoch 1, the branches' CE",
    )
    signals = ("speed_diff", "bdr_<m>", "rebalance_<m>")
    # bench --tune: epsilon decides when a re-balancing window starts, window how long it lasts
    options = (
        Option("modulation_start", int, 1, "first epoch of the rule, 0-based (released starting_epoch=2, counted from 1)", minimum=0, shared=True),
        Option("modulation_end", int, None, "last epoch a re-balancing window may start (inclusive; released: never undone)", minimum=0, shared=True, none_means="no end"),
        Option("epsilon", float, 0.01, "a re-balancing window starts when abs(BDR_audio - BDR_visual) exceeds this (BalanceMM 0.001)", minimum=0, search=Search(0.001, 0.1, log=True)),
        Option("window", int, 5, "re-balancing steps per window", minimum=1, search=Search(1, 10)),
        Option("loss", str, "unimodal", "unimodal (the sum of the per-modality CEs, as released) or fused (BalanceMM)", choices=("unimodal", "fused")),
        Option("average", str, "own", "own (each modality's MMTM gates replaced by their own running mean) or released (the second's by the first's)", choices=("own", "released"), released="released", differs="the released code averages the second modality's gates with the first's running mean, a slip the paper does not describe"),
    )
    mmtm = True  # build_training_model puts MMTM blocks between the encoders

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        c = self.config
        require_two_modalities(self.name, self.modalities)
        if len(self.modalities) > 2:
            raise UserError(f"--method greedy is defined for two modalities, got "
                            f"{', '.join(self.modalities)}")
        bare = getattr(model, "module", model)
        if getattr(bare, "mmtm", None) is None:
            raise UserError("--method greedy needs a model with MMTM blocks between its "
                            "encoders (build it with mmtm=True; resnet18 or tiny encoders)")
        self.bare = bare
        self.epsilon = finite("--greedy-epsilon", self.opt.epsilon)
        self.window = self.opt.window
        self.start, self.end = window(self.opt)
        self.loss_kind = self.opt.loss
        if self.loss_kind == "unimodal" and not bare.fusion.decomposable:
            raise UserError(f"--greedy-loss unimodal (released: the sum of the branches' CE) "
                            f"needs --fusion sum or concat, whose per-modality logits train the "
                            f"encoders; with {c.get('fusion')!r} use --greedy-loss fused")
        bare.mmtm.average = self.opt.average
        dev = self.device
        self.m_sums = torch.zeros(4, dtype=torch.float64, device=dev)
        self.state = {"curating": torch.zeros((), dtype=torch.bool, device=dev),
                      "caring": torch.zeros((), dtype=torch.long, device=dev),
                      "curation_step": torch.full((), self.window, dtype=torch.long,
                                                  device=dev)}
        self.d = torch.zeros((), dtype=torch.float64, device=dev)
        self.bdr = torch.zeros(2, dtype=torch.float64, device=dev)
        self.groups = greedy_parameter_groups(bare)
        self._metrics: dict[str, torch.Tensor] = {}

    def unlocked(self, epoch: int) -> bool:
        return self.start <= epoch and (self.end is None or epoch <= self.end)

    def loss(self, logits, labels, *, epoch, step):
        if self.loss_kind == "unimodal":
            return sum(F.cross_entropy(logits[m].float(), labels) for m in self.modalities)
        return F.cross_entropy(logits["fused"].float(), labels)

    def train_step(self, ctx: StepContext):
        labels = ctx.labels
        curating = self.state["curating"]
        caring = torch.where(curating, self.state["caring"], torch.full_like(
            self.state["caring"], -1))
        self.bare.mmtm.caring = caring
        try:
            logits = ctx.forward()
        finally:
            self.bare.mmtm.caring = None
        loss = self.loss(logits, labels, epoch=ctx.epoch, step=ctx.step)
        extra = ctx.extra_loss(logits, labels) if self.loss_kind == "fused" else None
        ctx.optimizer.zero_grad(set_to_none=True)
        (loss + extra if extra is not None else loss).backward()
        self._measure_and_decide(ctx.epoch, caring)
        ctx.clip_grad()
        ctx.optimizer.step()
        return loss, logits

    def _measure_and_decide(self, epoch: int, caring: torch.Tensor) -> None:
        unlocked = self.unlocked(epoch)
        with torch.no_grad():
            terms = _dist.mean_(greedy_speed_terms(self.groups))
            ratio = terms[0::2] / terms[1::2]
            # a re-balancing step measures nothing (released: compute_BDR only outside curation)
            measure = ~self.state["curating"] if unlocked else torch.ones_like(
                self.state["curating"])
            self.m_sums = torch.where(measure, self.m_sums + ratio, self.m_sums)
            d, bdr = greedy_speed_difference(self.m_sums)
            self.d = torch.where(measure, d, self.d)
            self.bdr = torch.where(measure, bdr, self.bdr)
            self.state = greedy_rule(self.state, d, unlocked=unlocked, epsilon=self.epsilon,
                                     window=self.window)
        self._metrics = {"speed_diff": self.d.float()}
        for i, m in enumerate(self.modalities):
            self._metrics[f"bdr_{m}"] = self.bdr[i].float()
        for i, m in enumerate(self.modalities):
            self._metrics[f"rebalance_{m}"] = (caring == i).float()

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"m_sums": self.m_sums.cpu(), "d": self.d.cpu(), "bdr": self.bdr.cpu(),
                **{k: v.cpu() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        dev = self.device
        self.m_sums = state["m_sums"].to(dev, torch.float64)
        self.d = state["d"].to(dev, torch.float64)
        self.bdr = state["bdr"].to(dev, torch.float64)
        self.state = {"curating": state["curating"].to(dev, torch.bool),
                      "caring": state["caring"].to(dev, torch.long),
                      "curation_step": state["curation_step"].to(dev, torch.long)}
