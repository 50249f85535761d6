"""MMPareto: Pareto integration of the multimodal and the unimodal gradients of each encoder.

Paper: Y. Wei, D. Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024. Released code: GeWu-Lab/MMPareto_ICML2024 (HEAD a339db3),
code/MMPareto.py: `train_epoch` (lines 57-213: the encoder parameters 74-84, forward and the
three CE losses 97-103, one backward per loss with the gradients copied and zeroed between them
110-147, the cosines 149-150, the weights 157-174, `gamma=1.5` 178, the summed backward 180-181,
the per-parameter rescale 184-207, one optimizer step 209), `main` (SGD lr 0.002, momentum 0.9,
wd 1e-4, StepLR 30 / 0.1, 50 epochs, batch 64: lines 27-34, 295-301); code/min_norm_solvers.py
(`_min_norm_element_from2` 9-30, `_min_norm_2d` 32-58, `find_min_norm_element` 92-129: with two
vectors it returns the closed form, 127-129); code/models/models.py (`AVClassifier` 133-184: the
concat head `head` beside two unimodal heads `head_audio`, `head_video`). BalanceMM's version:
GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/MMPareto_trainer.py (`train_loop`
253-328, `training_step` 330-406) and configs/trainer_config.yaml (MMPareto block, lines 77-81).
No code is copied; tests/test_mmpareto_released.py checks our steps against a reference written
from the released semantics.

The model: the fusion's classifier (the released concat `head`) plus one trained linear head per
modality on its encoder's features (`trained_unimodal_heads`, as OLM's). One step:

- one forward; L_mm = CE(fused), L_m = CE(unimodal logits of m) (batch means);
- per modality m, with the gradients over *all* parameters of m's encoder (the released "shared"
  parameters: every parameter whose name holds the modality and not `head`, i.e. the whole
  `audio_net` / `visual_net`, BatchNorm affine included) as one vector each: g_mm (of L_mm),
  g_m (of L_m); cos_m = cosine(g_mm, g_m) -- one decision per modality encoder, not per layer;
- cos_m > 0: weights (w_mm, w_m) = (1/2, 1/2); else (the cosine 0 included) the two-task
  min-norm element (MGDA): c = (g_m.g_m - g_mm.g_m) / |g_mm - g_m|^2, clamped as released to
  0.999 when g_mm.g_m >= g_mm.g_mm and to 0.001 when g_mm.g_m >= g_m.g_m; (w_mm, w_m) = (c, 1-c);
- per parameter tensor p of the encoder (the magnitude rule is per tensor, as released):
  new_p = 2 w_mm g_mm[p] + 2 w_m g_m[p], r_p = |g_mm[p] + g_m[p]| / |new_p| (the norm of the
  summed gradient, released `three_norm`), grad_p = gamma * r_p * new_p if r_p > 1 else
  gamma * new_p -- rescaled up, never down, to the summed gradient's norm, times gamma (1.5);
- the heads keep their own losses' gradients (the fusion's from L_mm, head m from L_m: the
  released summed backward, whose head gradients nothing edits); one optimizer step.
The logged loss is L_mm + sum_m L_m (the released `_loss`).

How it is computed: one forward of the bare model; `autograd.grad` of L_mm w.r.t. every
encoder and the fusion, then of each L_m w.r.t. its encoder and head (M + 1 backward calls,
about two full backward passes of work; the released code adds a third, the summed backward,
whose encoder gradients are g_mm + g_m: we add the two instead). All of them go into one flat
vector (plus the step's losses for the log), averaged over the ranks with one all-reduce; the
rule then works per modality on contiguous slices of it: the dot products and the cosine on the
slice, the per-tensor norms with `torch._foreach_norm` over views, the per-tensor factors spread
over the slice with `repeat_interleave`. Python loops run over the modalities only (and over
the parameter list to hand each its gradient view); the weights, the branch and the factors stay
on the device: no host sync. The released code takes the branch and the factors on the host.

N modalities: the rule is per modality encoder, so any number of modalities (the released code is
audio-visual; BalanceMM writes it for N). Any fusion whose parameters are not an encoder's (the
fusion's parameters get L_mm's gradient, as the released head); a sequence model or a model
with parameters outside the encoders, fusion and unimodal heads (MMTM) is refused.

Option: `--mmpareto-gamma` (1.5: the released `gamma`, BalanceMM's `alpha`). The released code
has no modulation window (BalanceMM's [0, 80] is not used: `--modulation-start/-end` do not
apply).

DDP: the released code is single-process (DataParallel). The step runs the bare model
(`ctx.model`, never `ctx.net`: a DDP replica joins one backward per forward) and averages every
gradient over the ranks by hand before the rule, so cosines, weights and factors are those of the
global batch and identical on every rank; rank 0's buffers (BatchNorm statistics) are broadcast
before the forward, as DDP's forward does. `--compile` compiles `ctx.net`, which this step never
calls: MMPareto runs uncompiled.

Signal (`step_metrics`): `cos_<m>` (the cosine of g_mm and g_m), `minnorm_<m>` (1 where the
min-norm branch fired), `wmm_<m>` / `wuni_<m>` (the weights), `uniloss_<m>` and `loss_mm`.

Where we differ from the released code, and why: the encoder's g_mm + g_m for the magnitude rule
is the sum of the two gradients, not a third backward of the summed loss (equal up to float
rounding); the dot products of the min-norm solver are plain sums (released: every per-tensor
product summed once and the concatenated vector's once more, i.e. each doubled -- the solution
is scale-free, so the same weights); all of it on the device. BalanceMM deviates from the
authors, so it is not the reference: its per-loss backwards are not zeroed between the losses
(lines 349-351), so the "multimodal" and "unimodal" gradients it compares are both the summed
gradient (cosine 1: the min-norm branch never runs); were it to run, its result is assigned to
the loop variable (line 381) and the weights stay 0; its unimodal logits are slices of the
concat layer (avclassify_model.py 277-293), not trained unimodal heads; and it has a window [0,
80] outside which the step computes no gradient. Its step therefore is, with G the gradient of
the summed loss (its `total_loss.backward()`, line 384): on the encoders (a parameter whose name
holds the modality, lines 385-399) both recorded gradients are G, cos = 1, weights 1/2, 1/2,
new = 2 (G/2 + G/2) = 2G, whose norm exceeds |G| so it is not rescaled, times its alpha 1.5:
3G; on the fusion and heads (no modality in the name) G itself: 1x.

Bad input: one modality, --mmpareto-gamma not a number above 0, a sequence model: one `Error:`
line before training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from avprep.errors import UserError
from avtrain.options import Option, Search

from . import _dist
from ._checks import finite, require_two_modalities
from .base import Balancer, StepContext
from .mla import _broadcast_from_rank0


def min_norm_weight(v11: torch.Tensor, v12: torch.Tensor, v22: torch.Tensor) -> torch.Tensor:
    """The weight c of x1 in the min-norm element c x1 + (1 - c) x2 of two vectors, from their
    dot products (released `_min_norm_element_from2`): 0.999 if x1.x2 >= x1.x1, else 0.001 if
    x1.x2 >= x2.x2, else (x2.x2 - x1.x2) / (x1.x1 + x2.x2 - 2 x1.x2)."""
    inner = (v22 - v12) / (v11 + v22 - 2 * v12)
    return torch.where(v12 >= v11, torch.full_like(inner, 0.999),
                       torch.where(v12 >= v22, torch.full_like(inner, 0.001), inner))


def mmpareto_weights(g_mm: torch.Tensor, g_uni: torch.Tensor):
    """(cos, conflict, w_mm, w_uni) for one encoder's flat multimodal and unimodal gradients:
    weights 1/2, 1/2 where cos > 0, else the min-norm weights (c, 1 - c)."""
    cos = F.cosine_similarity(g_mm, g_uni, dim=0)
    c = min_norm_weight(torch.dot(g_mm, g_mm), torch.dot(g_mm, g_uni), torch.dot(g_uni, g_uni))
    conflict = ~(cos > 0)
    half = torch.full_like(c, 0.5)
    return cos, conflict, torch.where(conflict, c, half), torch.where(conflict, 1 - c, half)


def _combine(g_mm: torch.Tensor, g_uni: torch.Tensor, like: list[torch.Tensor],
             counts: torch.Tensor, gamma: float):
    """The rule on one encoder's flat gradients (tensors shaped as `like`, `counts` their sizes
    on the device) -> (flat new gradient, cos, conflict, w_mm, w_uni)."""
    cos, conflict, w_mm, w_uni = mmpareto_weights(g_mm, g_uni)
    new = (2 * w_mm) * g_mm + (2 * w_uni) * g_uni
    summed = g_mm + g_uni
    n_sum = torch.stack(torch._foreach_norm(list(_unflatten_dense_tensors(summed, like))))
    n_new = torch.stack(torch._foreach_norm(list(_unflatten_dense_tensors(new, like))))
    ratio = n_sum / n_new
    factor = gamma * torch.where(ratio > 1, ratio, torch.ones_like(ratio))
    new.mul_(torch.repeat_interleave(factor, counts.to(factor.device), output_size=g_mm.numel()))
    return new, cos, conflict, w_mm, w_uni


def mmpareto_gradient(g_mm: list[torch.Tensor], g_uni: list[torch.Tensor], gamma: float):
    """One encoder's new per-tensor gradients from its multimodal and unimodal ones (lists of
    tensors, one per parameter) -> (gradients, {"cos", "conflict", "w_mm", "w_uni"})."""
    counts = torch.tensor([g.numel() for g in g_mm], device=g_mm[0].device)
    new, cos, conflict, w_mm, w_uni = _combine(
        _flatten_dense_tensors(g_mm), _flatten_dense_tensors(g_uni), g_mm, counts, gamma)
    return (list(_unflatten_dense_tensors(new, g_mm)),
            {"cos": cos, "conflict": conflict, "w_mm": w_mm, "w_uni": w_uni})


class MMPareto(Balancer):
    """Min-norm or equal weights per encoder, upscaled to the summed gradient's norm (owns the
    step)."""

    name = "mmpareto"
    title = "MMPareto"
    paper = ("Y. Wei, D. Hu: MMPareto: Boosting Multimodal Learning with Innocent Unimodal "
             "Assistance, ICML")
    year = 2024
    summary = "Pareto mix of multimodal and unimodal encoder grads"
    code = ("GeWu-Lab/MMPareto_ICML2024 (code/MMPareto.py, code/min_norm_solvers.py) @ a339db3; "
            "GeWu-Lab/BalanceBenchmark (MMPareto_trainer.py, trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: the summed gradient is g_mm + g_m, not a third backward (equal up to "
        "rounding); all on the device; gradients averaged over the ranks by hand",
        "BalanceMM: its per-loss gradients are not zeroed between the losses (cosine 1, the "
        "min-norm branch never runs: encoders get 3G); unimodal logits are slices of the "
        "concat layer; a window [0, 80]",
    )
    signals = ("cos_<m>", "minnorm_<m>", "wmm_<m>", "wuni_<m>", "uniloss_<m>", "loss_mm")
    # bench --tune: gamma, the factor on the encoder gradients, is its one hyper-parameter
    options = (
        Option("gamma", float, 1.5, "factor on every encoder gradient after the Pareto combination (released gamma, BalanceMM's alpha)", minimum=0, exclusive_minimum=True, search=Search(0.5, 5.0, log=True)),
    )
    trained_unimodal_heads = True

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        require_two_modalities(self.name, self.modalities)
        self.gamma = finite("--mmpareto-gamma", self.opt.gamma)
        bare = getattr(model, "module", model)
        if getattr(bare, "encoders", None) is None or getattr(bare, "fusion", None) is None:
            raise UserError("--method mmpareto needs a model with per-modality encoders, a fusion "
                            "and unimodal heads (not a sequence model)")
        if not bare.trained_unimodal_heads or set(bare.aux_heads) != set(self.modalities):
            raise UserError("--method mmpareto needs the model built with trained unimodal heads "
                            "(build_model(..., trained_unimodal_heads=True))")

        def trained(module):
            return [p for p in module.parameters() if p.requires_grad]

        self.bare = bare
        self.enc = {m: trained(bare.encoders[m]) for m in self.modalities}
        self.fusion_params = trained(bare.fusion)
        self.head_params = {m: trained(bare.aux_heads[m]) for m in self.modalities}
        grouped = [*self.fusion_params]
        for m in self.modalities:
            grouped += [*self.enc[m], *self.head_params[m]]
        everything = trained(bare)
        if {id(p) for p in grouped} != {id(p) for p in everything} or len(grouped) != len(
                everything) or any(not self.enc[m] for m in self.modalities):
            raise UserError("--method mmpareto needs every trained parameter in an encoder, the "
                            "fusion or a unimodal head (not MMTM blocks or an output layer)")
        if len({p.dtype for p in everything}) != 1:
            raise UserError("--method mmpareto needs the model's parameters in one dtype")
        # the flat layout: [g_mm over enc_1 .. enc_M, fusion | g_1 over enc_1, head_1 | ...]
        self.mm_inputs = [*(p for m in self.modalities for p in self.enc[m]), *self.fusion_params]
        self.uni_inputs = {m: [*self.enc[m], *self.head_params[m]] for m in self.modalities}
        sizes = {m: sum(p.numel() for p in self.enc[m]) for m in self.modalities}
        self.mm_slices, offset = {}, 0
        for m in self.modalities:
            self.mm_slices[m] = (offset, offset + sizes[m])
            offset += sizes[m]
        self.fusion_slice = (offset, offset + sum(p.numel() for p in self.fusion_params))
        offset = self.fusion_slice[1]
        self.uni_slices, self.head_slices = {}, {}
        for m in self.modalities:
            self.uni_slices[m] = (offset, offset + sizes[m])
            offset += sizes[m]
            n = sum(p.numel() for p in self.head_params[m])
            self.head_slices[m] = (offset, offset + n)
            offset += n
        self.numel = offset
        self.counts = {m: torch.tensor([p.numel() for p in self.enc[m]], device=self.device)
                       for m in self.modalities}
        self._metrics: dict[str, torch.Tensor] = {}

    def train_step(self, ctx: StepContext):
        model, labels, optimizer = ctx.model, ctx.labels, ctx.optimizer
        modalities = self.modalities
        _broadcast_from_rank0(list(model.buffers()))  # as DDP's forward does
        with ctx.autocast():
            logits = model(ctx.batch)
        loss_mm = F.cross_entropy(logits["fused"].float(), labels)
        unilosses = [F.cross_entropy(logits[m].float(), labels) for m in modalities]
        grads = list(torch.autograd.grad(loss_mm, self.mm_inputs, retain_graph=True,
                                         materialize_grads=True))
        for i, m in enumerate(modalities):
            grads += torch.autograd.grad(unilosses[i], self.uni_inputs[m],
                                         retain_graph=i < len(modalities) - 1,
                                         materialize_grads=True)
        losses = torch.stack([loss_mm, *unilosses]).detach().to(grads[0].dtype)
        flat = _dist.mean_(_flatten_dense_tensors([*grads, losses]))  # global-batch gradients
        losses = flat[self.numel:]

        def part(bounds):
            return flat[bounds[0]:bounds[1]]

        new_grads, signal = [], []
        for m in modalities:
            new, cos, conflict, w_mm, w_uni = _combine(
                part(self.mm_slices[m]), part(self.uni_slices[m]), self.enc[m], self.counts[m],
                self.gamma)
            new_grads.append(new)
            signal.append(torch.stack([cos, conflict.to(cos.dtype), w_mm, w_uni]))
        params = [*self.fusion_params]
        views = list(_unflatten_dense_tensors(part(self.fusion_slice), self.fusion_params))
        for i, m in enumerate(modalities):
            params += [*self.enc[m], *self.head_params[m]]
            views += _unflatten_dense_tensors(new_grads[i], self.enc[m])
            views += _unflatten_dense_tensors(part(self.head_slices[m]), self.head_params[m])
        optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, views):  # hand each parameter its view (no kernel per tensor)
            p.grad = g
        ctx.clip_grad()
        optimizer.step()
        self._record(torch.stack(signal), losses)
        loss = (loss_mm + sum(unilosses)).detach()
        return loss, {k: v.detach() for k, v in logits.items()}

    def _record(self, signal: torch.Tensor, losses: torch.Tensor) -> None:
        self._metrics = {"loss_mm": losses[0]}
        for i, m in enumerate(self.modalities):
            cos, conflict, w_mm, w_uni = signal[i]
            self._metrics.update({f"cos_{m}": cos, f"minnorm_{m}": conflict,
                                  f"wmm_{m}": w_mm, f"wuni_{m}": w_uni,
                                  f"uniloss_{m}": losses[1 + i]})

    def step_metrics(self):
        return dict(self._metrics)
