"""MLA: multimodal learning by alternating unimodal adaptation.

Paper: X. Zhang, J. Yoon, M. Bansal, H. Yao, "Multimodal Representation Learning by Alternating
Unimodal Adaptation", CVPR 2024. Released code: github.com/Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation (HEAD ab6c184), main.py: `train_epoch` with `--gs_flag` (lines
419-476: one encoder forward, then per modality fc_out, CE, backward, `before_update`, step,
zero_grad; all gradients deleted at the end, 468-470), `valid` (622-651: the shared head on
each modality, `--dynamic` entropy gate or fixed weights), `calculate_entropy` /
`calculate_gating_weights` (65-106), `main` (`main(av_alpha = 0.55)`, line 968; SGD momentum 0.9,
wd 1e-4, 749); utils/utils.py `GSPlugin` (12-41); models/basic_model.py (AVClassifier with
`gs_flag`: ConcatFusion(input_dim=512), i.e. fc_out = Linear(512, classes) read by every
modality, lines 30-34; forward returns the features, 73-77); models/fusion_modules.py
(ConcatFusion 16-24); requirements.txt (torch 1.8.1). BalanceMM's re-implementation:
GeWu-Lab/BalanceBenchmark (4c1482f) balancemm/trainer/MLA_trainer.py (`GSPlugin` 20-53,
`training_step` 129-179), balancemm/models/avclassify_model.py (`BaseClassifierMLAModel`
626-700) and configs/trainer_config.yaml (MLA block, lines 67-69). No code is copied;
tests/test_mla_released.py checks our steps against a reference written from the released
semantics.

The model: `--fusion concat` (the released flag; `shared` says the same) builds avtrain's
`shared` fusion, one head fc_out = Linear(D, classes) that reads every modality's features (all
of width D), as the released AVClassifier does under `--gs_flag`. Other fusions are refused: the
released MLA runs only with concat (`sum` has no fc_out, film/gated build no fusion).

One step (every epoch: the released MLA has no modulation window):

- the encoders run once in train mode (the bare model: see DDP below), f_m for every modality;
- for each modality m in order (audio, visual, text, as released):
  logits_m = fc_out(f_m) with the head as it is *now* (already updated by the earlier modalities
  of this step), loss_m = CE(logits_m, y) (batch mean), backward (gradients reach the head and
  encoder m only), the head-gradient edit (`--mla-projection`), the optimizer steps, gradients
  are zeroed (`--mla-stale-grads`);
- at the end every gradient is set to None (released `del p.grad`), so the next step's first
  update touches only the first modality and the head.

The logged loss is the mean of the unimodal losses (the released log weights them by av_alpha).

`--mla-stale-grads` (what zero_grad leaves behind between the modalities of a step):

- `zero` (default, the released code under its torch 1.8.1, whose `zero_grad()` writes zeros):
  parameters that got a gradient earlier in this step (the first modality's encoder) hold a zero
  gradient, so each later optimizer step moves them again by momentum and weight decay (SGD) or
  by Adam's moments;
- `none` (BalanceMM under torch >= 2, `zero_grad()` sets None): each step moves only the head
  and the modality just trained.

`--mla-projection` (the edit of the head's weight gradient before each step, `GSPlugin`):

- `none` (default): the released HEAD. Its `before_update` projects only a parameter named
  "module.weight", which the head's nn.Linear never has ("weight", "bias"): commit 11ae1ee ("Fix
  bugs", which also made `GSPlugin()` an instance so MLA runs at all) narrowed the test from
  `n == "module.weight" or n == "weight"`, so the released MLA trains without a projection;
- `owm`: the paper's orthogonal-weight-modification projection, as the first release (4735bbc)
  applied it: with P (D x D, init identity, one for all modalities, kept across steps) and
  r = the batch mean of f_m (over all ranks), k = P r^T, P <- P - (k k^T) / (a + k r),
  P <- P / ||P||_F, grad_W <- grad_W P^T (the bias untouched), a = 0.1^(1 + i / n) for the i-th
  step of an epoch of n steps; skipped on the run's very first modality update (the released
  `exp_count != 0`). As released, `a + k r` is `alpha + torch.mm(k, r)`: the D x D outer
  product, so the division is element-wise (textbook OWM, and the paper's equation, divide by
  the scalar a + r P r^T); we keep the released arithmetic;
- `owm-add`: BalanceMM's variant, grad_W <- grad_W + grad_W P^T (its `w.grad.add_`).

Evaluation and the `fused` logits: the model's fused logits are the gated combination
sum_m w_m fc_out(f_m) of the shared head's per-modality logits, so `avtrain` evaluates (val,
test, best checkpoint, `avtrain eval`) with MLA's test-time fusion; the rule is a buffer of the
model (`--mla-gate`, stored in every checkpoint):

- `entropy` (default): per sample, w_m = exp(max_k e_k - e_m) / sum_j exp(max_k e_k - e_j),
  e_m = -sum_c p_c log p_c of softmax(logits_m) over the classes -- the paper's uncertainty
  gate, BalanceMM's `calculate_gating_weights`, and the released line 67 (commented out);
- `batch-entropy`: the released `--dynamic` code exactly: its `calculate_entropy` takes the
  softmax over the batch axis (dim=0, line 66) and sums p log p over the whole batch, one weight
  per modality and eval batch; a sample's prediction then depends on the rest of its batch (and
  on --eval-batch-size and the number of ranks), which is why it is not the default;
- `fixed`: the released fusion without `--dynamic`: audio 0.55 / visual 0.45 (av_alpha 0.55 of
  `main(av_alpha = 0.55)`), audio 0.35 / visual 0.25 / text 0.4 for three modalities, text 0.55
  / visual 0.45 for its text-image models.
The entropies use log_softmax (the released log(softmax) gives NaN once a probability
underflows to 0).

DDP: the released code is single-process (DataParallel). Every forward and backward here runs
on the bare model (`ctx.model`), never `ctx.net`, since a DDP replica joins one backward per
forward; after each modality's backward the gradients of the head and of that encoder are
averaged over the ranks by hand (one flat all-reduce), which is what DDP's reducer would give.
DDP's forward also broadcasts rank 0's buffers (BatchNorm statistics) before computing; the step
does the same before its encoder forward. `--compile` compiles `ctx.net`, which this step never
calls: MLA runs uncompiled. r is averaged over ranks before it updates P, so every
rank keeps the same P and the projection equals one process with the global batch.

Signal (`step_metrics`, means over ranks): `uniloss_<m>` (each modality's CE), `gate_<m>` (its
mean gate weight on the training batch), and with a projection `headkept_<m>` = ||edited
grad_W|| / ||grad_W|| (how much of the head's gradient the projection keeps).

Where we differ from the released code, and why: the gate default (per sample, see above) and
log_softmax in the entropies; the projector is sized by the feature width D (released: a fixed
512 x 512 eye, which would not fit its own 768-wide models); any set of modalities of one width
(released: audio-visual, text-image, audio-visual-text); the loss for the log (mean, not
av_alpha-weighted). BalanceMM: `owm-add` as its projection (its name test fixed to "weight"),
stale gradients as `none`, a separate encoder forward per modality, per-sample gate, a window
[0, 80] after which it backpropagates CE on the fused logits (without an optimizer step); the
authors have no window.

Bad input: --fusion other than concat/shared, one modality, encoders of different widths, a
sequence model, an unknown choice: one `Error:` line before training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from avprep.errors import UserError
from avtrain.models.fusions import GATES
from avtrain.options import Option

from . import _dist
from ._checks import require_two_modalities
from .base import Balancer, EpochContext, StepContext

PROJECTIONS = ("none", "owm", "owm-add")
STALE_GRADS = ("zero", "none")


def owm_alpha(batch_index: int, steps_per_epoch: int) -> float:
    """The projection's regulariser a = 0.1^(1 + i / n) (released `before_update`)."""
    return 0.1 ** (batch_index / steps_per_epoch + 1)


def owm_update(P: torch.Tensor, r: torch.Tensor, alpha: float) -> torch.Tensor:
    """One update of the projector P [D, D] with the input mean r [1, D], as released:
    k = P r^T, P - (k k^T) / (alpha + k r), the division element-wise by the D x D matrix
    alpha + k r (`torch.mm(k, r)`; textbook OWM divides by the scalar alpha + r k), then
    normalised to Frobenius norm 1."""
    k = P @ r.t()
    P = P - (k @ k.t()) / (alpha + k @ r)
    return P / torch.linalg.norm(P)


def project_gradient(grad: torch.Tensor, P: torch.Tensor, mode: str) -> torch.Tensor:
    """The head's weight gradient [C, D] edited with P: grad P^T (`owm`), grad + grad P^T
    (`owm-add`)."""
    projected = grad @ P.t()
    return projected if mode == "owm" else grad + projected


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors (one dtype) over all ranks in place with one flat all-reduce."""
    if _dist.world_size() < 2 or not tensors:
        return
    flat = _dist.mean_(_flatten_dense_tensors(tensors))
    torch._foreach_copy_(tensors, list(_unflatten_dense_tensors(flat, tensors)))


def _broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values everywhere (DDP's buffer broadcast), one collective per dtype."""
    if _dist.world_size() < 2:
        return
    import torch.distributed as dist

    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    for group in groups.values():
        flat = _flatten_dense_tensors(group)
        dist.broadcast(flat, src=0)
        torch._foreach_copy_(group, list(_unflatten_dense_tensors(flat, group)))


class MLA(Balancer):
    """Alternating unimodal updates through one shared head (owns the step)."""

    name = "mla"
    title = "MLA"
    paper = ("X. Zhang, J. Yoon, M. Bansal, H. Yao: Multimodal Representation Learning by "
             "Alternating Unimodal Adaptation, CVPR")
    year = 2024
    summary = "alternating unimodal steps through one shared head"
    code = ("Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation (main.py, "
            "utils/utils.py GSPlugin, models/basic_model.py) @ ab6c184; "
            "GeWu-Lab/BalanceBenchmark (MLA_trainer.py, trainer_config.yaml) @ 4c1482f")
    differences = (
        "Authors' code: the test-time gate per sample (--mla-gate batch-entropy: the released "
        "softmax over the batch), entropies by log_softmax",
        "Authors' code: the projector sized by the feature width (released: a fixed 512 x 512)",
        "Authors' code: the logged loss is the mean of the unimodal CEs (released: av_alpha-"
        "weighted); gradients averaged over the ranks by hand (released: one process)",
        "BalanceMM: projection owm-add, stale gradients none, an encoder forward per modality, "
        "a window [0, 80] with fused CE after it; the authors have no window",
    )
    signals = ("uniloss_<m>", "gate_<m>", "headkept_<m>")
    # bench --tune: nothing; the released step has no weight or rate of its own, and each
    # option is a variant of the algorithm (the projection, the test-time gate, zero_grad)
    options = (
        Option("projection", str, "none", "edit of the shared head's weight gradient: none (the released code), owm (the paper, the first release) or owm-add (BalanceMM)", choices=PROJECTIONS),
        Option("gate", str, "entropy", "test-time fusion: entropy (per sample, the paper), batch-entropy (the released --dynamic code) or fixed (the released default without --dynamic: 0.55/0.45)", choices=GATES, released="batch-entropy", differs="the released softmax over the batch axis (README's 'MLA (dynamic fusion)') makes a sample's prediction depend on the rest of its batch; the paper's per-sample entropy is the default"),
        Option("stale_grads", str, "zero", "what zero_grad leaves between the modalities: zero (released, torch 1.8.1) or none (BalanceMM)", choices=STALE_GRADS),
    )

    @classmethod
    def model_fusion(cls, fusion: str) -> str:
        if fusion not in ("concat", "shared"):
            raise UserError(f"--method mla trains one shared head (the released concat model "
                            f"under --gs_flag): use --fusion concat or shared, not {fusion!r}")
        return "shared"

    def __init__(self, model, config=None, *, modalities=None, device="cpu"):
        super().__init__(model, config, modalities=modalities, device=device)
        from avtrain.models.fusions import SharedHeadFusion

        c = self.config
        require_two_modalities(self.name, self.modalities)
        bare = getattr(model, "module", model)
        if not isinstance(getattr(bare, "fusion", None), SharedHeadFusion) or getattr(
                bare, "encoders", None) is None:
            raise UserError("--method mla needs per-modality encoders and the shared head "
                            "(--fusion concat or shared; not a sequence model)")
        self.projection = self.opt.projection
        self.stale = self.opt.stale_grads
        bare.fusion.set_gate(self.opt.gate)
        self.bare = bare
        self.head = bare.fusion.fc_out
        self.steps_per_epoch = max(1, int(c.get("steps_per_epoch") or 1))
        # gradients each modality's loss reaches: its encoder and the head
        self.owned = {m: [*bare.encoders[m].parameters(), *self.head.parameters()]
                      for m in self.modalities}
        self.P = torch.eye(bare.fusion.dim, device=self.device)
        self.updates = 0  # modality updates so far (released `gs_plugin.exp_count`)
        self._epoch_first_step: int | None = None
        self._metrics: dict[str, torch.Tensor] = {}

    def start_epoch(self, ctx: EpochContext) -> None:
        self._epoch_first_step = None  # set by the epoch's first step

    # -- the step --

    def _edit_head_gradient(self, feats: torch.Tensor, batch_index: int) -> torch.Tensor:
        """Update P with this modality's global mean feature and edit the head's weight
        gradient (released `before_update`); returns ||edited|| / ||grad||."""
        grad = self.head.weight.grad
        if self.updates == 0:  # the released `train_exp_counter != 0`
            return torch.ones((), device=grad.device)
        r = _dist.mean_(feats.detach().float().mean(dim=0, keepdim=True))
        self.P = owm_update(self.P.to(r.device), r,
                            owm_alpha(batch_index, self.steps_per_epoch))
        edited = project_gradient(grad.float(), self.P, self.projection)
        kept = torch.linalg.norm(edited) / torch.linalg.norm(grad.float()).clamp_min(1e-30)
        grad.copy_(edited)
        return kept

    def train_step(self, ctx: StepContext):
        if self._epoch_first_step is None:
            self._epoch_first_step = ctx.step
        batch_index = ctx.step - self._epoch_first_step
        model, labels, optimizer = ctx.model, ctx.labels, ctx.optimizer
        _broadcast_from_rank0(list(model.buffers()))  # as DDP's forward does
        optimizer.zero_grad(set_to_none=True)
        with ctx.autocast():
            feats = model.features(ctx.batch)
        losses, logits, kept = [], {}, []
        for m in self.modalities:
            with ctx.autocast():
                out = self.head(feats[m])
            loss = F.cross_entropy(out.float(), labels)
            loss.backward()
            _all_reduce_mean([p.grad for p in self.owned[m] if p.grad is not None])
            if self.projection != "none":
                kept.append(self._edit_head_gradient(feats[m], batch_index))
            ctx.clip_grad()
            optimizer.step()
            optimizer.zero_grad(set_to_none=self.stale == "none")
            self.updates += 1
            losses.append(loss.detach())
            logits[m] = out.detach()
        optimizer.zero_grad(set_to_none=True)  # released: `del p.grad` for every parameter
        logits["fused"] = self.bare.fusion.fuse(logits)
        loss = torch.stack(losses).mean()
        self._record(torch.stack(losses), logits, kept)
        return loss, logits

    def _record(self, losses: torch.Tensor, logits: dict, kept: list) -> None:
        from avtrain.models.fusions import gate_weights

        stacked = torch.stack([logits[m] for m in self.modalities])
        gates = gate_weights(stacked, self.bare.fusion.rule, self.bare.fusion.fixed)
        signal = _dist.mean_(torch.cat([losses.float(), gates.mean(dim=(1, 2)).float()]))
        n = len(self.modalities)
        self._metrics = {}
        for i, m in enumerate(self.modalities):
            self._metrics[f"uniloss_{m}"] = signal[i]
            self._metrics[f"gate_{m}"] = signal[n + i]
            if kept:
                self._metrics[f"headkept_{m}"] = kept[i]

    def step_metrics(self):
        return dict(self._metrics)

    def state_dict(self) -> dict:
        return {"P": self.P.detach().cpu().clone(), "updates": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict) -> None:
        if "P" in state:
            self.P = state["P"].to(self.device, torch.float32).clone()
            self.updates = int(state["updates"])
