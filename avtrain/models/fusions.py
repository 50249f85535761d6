"""Fusion modules: per-modality feature vectors in, fused logits out.

`sum` and `concat` are *decomposable*: the fused logits are exactly the sum of per-modality
logits (OGM-GE's weight split for concat), so `modality_logits` returns them. The others
(`film`, `gated`, `bilinear`, `attention`, `bilinear_tanh`, `mha`) mix the modalities
non-linearly; the model then adds auxiliary per-modality heads (see `AVModel`). Modalities are
always in the model's order (audio first), as the seeds concatenate [audio; visual].

`shared` is MLA's shared head (Zhang et al., CVPR 2024): one linear layer reads every
modality's features (all of one width); the per-modality logits are that head's outputs and the
fused logits their uncertainty-gated combination (`gate_logits`), the released test-time fusion.
It is `decomposable` in the sense the model needs: its per-modality logits come from the fusion
itself (no auxiliary heads), though they are weighted, not summed.

`film`, `gated`, `bilinear` and `attention` are the fusions of OLM's released code (Zong et
al., IJCAI 2024; github.com/anonymous-gitlab/OLM, models/fusion_modules.py: `FiLM(x_film=True)`,
`GatedFusion(x_gate=True)`, `Bilinear`, `Attention`, as its models/basic_model.py builds them,
x = audio, y = visual), the first two also OGM-GE's; `bilinear_tanh` and `mha` are ours.
`boost` is ReconBoost's shared-head ensemble (decomposable up to its boost rate: the fused
logits are beta times the sum of the per-modality logits).
`cosine` is MMCosine's (Xu et al., ICASSP 2023): concat's layer read through L2-normalised
features and weight rows, per modality, times a scaling, summed (`CosineFusion`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avprep.errors import UserError


class Fusion(nn.Module):
    decomposable = False

    def __init__(self, modalities: list[str], dims: dict[str, int], num_classes: int):
        super().__init__()
        self.modalities = list(modalities)

    def modality_logits(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SumFusion(Fusion):
    """fused = Σ_m fc_m(f_m); the per-modality logits are the summands."""

    decomposable = True

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(dims[m], num_classes) for m in modalities})

    def modality_logits(self, feats):
        return {m: self.fc[m](feats[m]) for m in self.modalities}

    def forward(self, feats):
        parts = self.modality_logits(feats)
        return sum(parts[m] for m in self.modalities)


class ConcatFusion(Fusion):
    """fused = W·[f_a; f_v] + b; modality m's logits = f_m·W_mᵀ + b/M (sum to fused)."""

    decomposable = True

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.dims = [dims[m] for m in modalities]
        self.fc_out = nn.Linear(sum(self.dims), num_classes)

    def modality_logits(self, feats):
        weights = torch.split(self.fc_out.weight, self.dims, dim=1)
        share = self.fc_out.bias / len(self.modalities)
        return {m: feats[m] @ w.t() + share for m, w in zip(self.modalities, weights)}

    def forward(self, feats):
        return self.fc_out(torch.cat([feats[m] for m in self.modalities], dim=1))


def _two(modalities: list[str], name: str) -> tuple[str, str]:
    if len(modalities) != 2:
        raise UserError(f"fusion {name!r} needs exactly two modalities, got {modalities}")
    return modalities[0], modalities[1]


class FiLMFusion(Fusion):
    """The first modality predicts (γ, β) that modulate the second: fc_out(γ·f_v + β)."""

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.cond, self.target = _two(self.modalities, "film")
        self.dim = dims[self.target]
        self.fc = nn.Linear(dims[self.cond], 2 * self.dim)
        self.fc_out = nn.Linear(self.dim, num_classes)

    def forward(self, feats):
        gamma, beta = torch.split(self.fc(feats[self.cond]), self.dim, dim=1)
        return self.fc_out(gamma * feats[self.target] + beta)


class GatedFusion(Fusion):
    """A sigmoid gate from the first modality scales the second: fc_out(σ(W_a f_a)·W_v f_v)."""

    def __init__(self, modalities, dims, num_classes, hidden: int = 512):
        super().__init__(modalities, dims, num_classes)
        self.gate_from, self.gated = _two(self.modalities, "gated")
        self.fc_gate = nn.Linear(dims[self.gate_from], hidden)
        self.fc_value = nn.Linear(dims[self.gated], hidden)
        self.fc_out = nn.Linear(hidden, num_classes)

    def forward(self, feats):
        gate = torch.sigmoid(self.fc_gate(feats[self.gate_from]))
        return self.fc_out(gate * self.fc_value(feats[self.gated]))


class BilinearFusion(Fusion):
    """OLM's `bilinear` (its fusion_modules.py `Bilinear`): fc_out(W_v f_v ⊙ W_a f_a).

    Two affine maps to the first modality's width (512 for ResNet-18, as OLM's 512 → 512),
    their element-wise product, a linear classifier; no non-linearity.
    """

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.first, self.second = _two(self.modalities, "bilinear")
        width = dims[self.first]
        self.proj_first = nn.Linear(dims[self.first], width)
        self.proj_second = nn.Linear(dims[self.second], width)
        self.fc_out = nn.Linear(width, num_classes)

    def forward(self, feats):
        return self.fc_out(self.proj_second(feats[self.second])
                           * self.proj_first(feats[self.first]))


class BilinearTanhFusion(Fusion):
    """Low-rank bilinear pooling with tanh (MLB): fc_out(tanh(U f_a) ⊙ tanh(V f_v)).

    Not in the seeds (this was `bilinear` before it became OLM's); the tanh bounds each factor.
    A full bilinear layer has D_a·D_v·C weights (80 M for ResNet-18 on VGGSound); the low-rank
    form keeps every multiplicative interaction at a rank of `rank`.
    """

    def __init__(self, modalities, dims, num_classes, rank: int = 512):
        super().__init__(modalities, dims, num_classes)
        self.first, self.second = _two(self.modalities, "bilinear_tanh")
        self.proj_first = nn.Linear(dims[self.first], rank)
        self.proj_second = nn.Linear(dims[self.second], rank)
        self.fc_out = nn.Linear(rank, num_classes)

    def forward(self, feats):
        joint = torch.tanh(self.proj_first(feats[self.first])) * torch.tanh(
            self.proj_second(feats[self.second]))
        return self.fc_out(joint)


class AttentionFusion(Fusion):
    """OLM's `attention` (its fusion_modules.py `Attention`): a two-way score weights the
    features before the classifier.

        score = fc_att(attention_mlp([f_a; f_v]))      # Linear(2D → D), Linear(D → 2)
        fused = fc_out(score_0 · f_a + score_1 · f_v)   # Linear(D → classes)

    No activation and no softmax: the two scores are raw linear outputs, as released.
    Both modalities need the same feature width D (512 for ResNet-18).
    """

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.first, self.second = _two(self.modalities, "attention")
        width = dims[self.first]
        if dims[self.second] != width:
            raise UserError(f"fusion 'attention' weights {self.first} and {self.second} features"
                            f" of one width; got {width} and {dims[self.second]} (use 'mha', or "
                            "--feature-dim D)")
        self.attention_mlp = nn.Linear(2 * width, width)
        self.fc_att = nn.Linear(width, 2)
        self.fc_out = nn.Linear(width, num_classes)

    def forward(self, feats):
        a, v = feats[self.first], feats[self.second]
        score = self.fc_att(self.attention_mlp(torch.cat([a, v], dim=1)))  # [B, 2]
        fused = a * score[:, :1] + v * score[:, 1:]
        return self.fc_out(fused)


class MHAFusion(Fusion):
    """One token per modality (projected, plus a learned modality embedding), one multi-head
    self-attention block over the tokens, mean-pooled into the classifier. Not in the seeds
    (this was `attention` before it became OLM's); works for any number of modalities."""

    def __init__(self, modalities, dims, num_classes, dim: int = 256, heads: int = 4):
        super().__init__(modalities, dims, num_classes)
        self.proj = nn.ModuleDict({m: nn.Linear(dims[m], dim) for m in modalities})
        self.embed = nn.Parameter(torch.zeros(len(modalities), dim))
        nn.init.normal_(self.embed, std=0.02)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.fc_out = nn.Linear(dim, num_classes)

    def forward(self, feats):
        tokens = torch.stack([self.proj[m](feats[m]) for m in self.modalities], dim=1)
        tokens = tokens + self.embed
        attended, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        tokens = self.norm1(tokens + attended)
        tokens = self.norm2(tokens + self.mlp(tokens))
        return self.fc_out(tokens.mean(dim=1))


class BoostFusion(Fusion):
    """ReconBoost's ensemble (Hua et al., ICML 2024; github.com/huacong/ReconBoost, commit
    14ab57a, models/dynamic_net.py): one head shared by every modality, the released `Head`
    (Linear(D, 256), ReLU, Linear(256, classes); train.py line 288 `model.fc =
    net_ensemble.head`, its `--common_space True` default), and a learnable boost rate beta
    (`DynamicNet.boost_rate`, init `--boost_rate` 1.0):

        modality m's logits = head(f_m)           (the modality's learner)
        fused = beta * sum_m members_m * head(f_m)

    `members` (a buffer, 1 per modality by default) says which learners are in the ensemble:
    `--method reconboost` adds them stage by stage, as the released `DynamicNet.add`. All
    modalities need one feature width D (the head is shared)."""

    decomposable = True

    def __init__(self, modalities, dims, num_classes, hidden: int = 256):
        super().__init__(modalities, dims, num_classes)
        widths = sorted({dims[m] for m in modalities})
        if len(widths) != 1:
            raise UserError(f"fusion 'boost' shares one head between the modalities, whose "
                            f"features need one width; got {', '.join(map(str, widths))} "
                            "(--feature-dim D projects every encoder's features to D)")
        self.head = nn.Sequential(nn.Linear(widths[0], hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))
        self.boost_rate = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("members", torch.ones(len(self.modalities)))

    def modality_logits(self, feats):
        return {m: self.head(feats[m]) for m in self.modalities}

    def forward(self, feats):
        parts = self.modality_logits(feats)
        total = sum(self.members[i] * parts[m] for i, m in enumerate(self.modalities))
        return self.boost_rate * total
GATES = ("entropy", "batch-entropy", "fixed")

# the released fixed-fusion weights (main.py: `main(av_alpha = 0.55)`, valid(): a_alpha 0.35,
# v_alpha 0.25, t_alpha 0.4); its text-image models put av_alpha on the text branch
FIXED_GATE_WEIGHTS = {
    ("audio", "visual"): {"audio": 0.55, "visual": 0.45},
    ("visual", "text"): {"visual": 0.45, "text": 0.55},
    ("audio", "visual", "text"): {"audio": 0.35, "visual": 0.25, "text": 0.4},
}


def _entropy_weights(entropy: torch.Tensor) -> torch.Tensor:
    """exp(max_m e_m - e_m) / sum_k exp(max e - e_k) over the modality axis 0 (released
    `calculate_gating_weights`): the less uncertain modality gets the larger weight."""
    w = torch.exp(entropy.max(dim=0, keepdim=True).values - entropy)
    return w / w.sum(dim=0, keepdim=True)


def gate_weights(logits: torch.Tensor, rule: str, fixed: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Weights [M, B, 1] of the per-modality logits [M, B, C] in the fused prediction.

    - `entropy`: per sample, e_m = -sum_c p log p of softmax over the classes (the paper's
      test-time fusion; BalanceMM's `calculate_entropy(dim=1)`; the released line 67, commented);
    - `batch-entropy`: the released `--dynamic` code exactly (main.py lines 65-87): softmax over
      the *batch* axis (dim=0), e_m summed over the whole batch, one weight per modality and
      batch -- a sample's prediction then depends on the others in its batch;
    - `fixed`: the released fixed fusion, constant weights (`fixed`, [M]).
    """
    x = logits.float()
    if rule == "fixed":
        return fixed.to(x.device, x.dtype).view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
    if rule == "batch-entropy":
        p = torch.softmax(x, dim=1)  # [M, B, C]: dim 1 is each modality's batch axis
        entropy = -(p * torch.log_softmax(x, dim=1)).sum(dim=(1, 2))  # [M]
        return _entropy_weights(entropy).view(-1, 1, 1).expand(x.shape[0], x.shape[1], 1)
    p = torch.softmax(x, dim=2)
    entropy = -(p * torch.log_softmax(x, dim=2)).sum(dim=2, keepdim=True)  # [M, B, 1]
    return _entropy_weights(entropy)


class SharedHeadFusion(Fusion):
    """MLA: one head fc_out (Linear(D, C)) for every modality; fused = sum_m w_m fc_out(f_m)
    with the gate weights w of `gate_weights`. The rule is a buffer (`gate`, an index into
    GATES; `fixed` its constant weights), so a checkpoint evaluates with the rule it was
    trained with; a method sets it with `set_gate`."""

    decomposable = True

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        widths = sorted({dims[m] for m in self.modalities})
        if len(widths) != 1:
            raise UserError(f"fusion 'shared' reads every modality with one head and needs "
                            f"features of one width, got {dims} (--feature-dim D projects "
                            "every encoder's features to D)")
        self.dim = widths[0]
        self.fc_out = nn.Linear(self.dim, num_classes)
        self.register_buffer("gate", torch.tensor(0))
        self.register_buffer("fixed", torch.full((len(self.modalities),),
                                                 1.0 / len(self.modalities)))
        self.rule = GATES[0]  # the buffer's value as a str: forward reads no device tensor

    def set_gate(self, rule: str) -> None:
        if rule not in GATES:
            raise UserError(f"gate must be one of {', '.join(GATES)}, got {rule!r}")
        if rule == "fixed":
            weights = FIXED_GATE_WEIGHTS.get(tuple(self.modalities))
            if weights is None:
                raise UserError("the fixed gate has released weights for "
                                f"{'; '.join(','.join(k) for k in FIXED_GATE_WEIGHTS)}, not "
                                f"{','.join(self.modalities)}")
            self.fixed.copy_(torch.tensor([weights[m] for m in self.modalities]))
        self.gate.fill_(GATES.index(rule))
        self.rule = rule

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "gate" in state_dict:  # once per load, never in a forward
            self.rule = GATES[int(state_dict[prefix + "gate"])]

    def modality_logits(self, feats):
        return {m: self.fc_out(feats[m]) for m in self.modalities}

    def fuse(self, logits: dict[str, torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack([logits[m] for m in self.modalities])
        weights = gate_weights(stacked, self.rule, self.fixed)
        return (stacked * weights.to(stacked.dtype)).sum(dim=0)

    def forward(self, feats):
        return self.fuse(self.modality_logits(feats))


COSINE_EVAL = ("cosine", "concat")  # CosineFusion's fused logits in eval mode


class CosineFusion(ConcatFusion):
    """MMCosine (Xu et al., ICASSP 2023): fused = sum_m s * cos(f_m, W_m) in training.

    Authors' code GeWu-Lab/MMCosine_ICASSP23 @ 00ba0a9, main_CD.py lines 113-118 (train) and
    185-189 (eval): the concat model's fc_out weight is split per modality (W_m, columns of
    modality m), features and each class row of W_m are L2-normalised, the cosine logits are
    multiplied by `scaling` (released default 10, line 59; BalanceMM's trainer_config.yaml
    uses 15) and summed. fc_out.bias exists but no loss reaches it, so it never changes (the
    released SGD skips parameters without a gradient); here it does not require grad, which
    is the same and lets DDP (no unused-parameter search) reduce this model. N modalities:
    the split is by widths (as BalanceMM's MMCosine_trainer.py lines 115-121 do for 2 or 3).

    In eval mode the fused logits follow `eval_rule` (a buffer, so a checkpoint evaluates as
    it was trained): `cosine` (this fusion's default, BalanceMM's validation_step lines 224-233) or
    `concat` -- the authors' `valid` (main_CD.py lines 181, 196) predicts from the model's own
    concat output W.[f_a; f_v] + b (features and weights not normalised, the untrained bias),
    and normalises only the per-modality logits. `scaling` is a buffer for the same reason.
    Per-modality logits are the scaled cosines in training and evaluation alike.
    """

    decomposable = True

    def __init__(self, modalities, dims, num_classes):
        super().__init__(modalities, dims, num_classes)
        self.fc_out.bias.requires_grad_(False)
        self.register_buffer("scaling", torch.tensor(10.0))
        self.register_buffer("eval_rule", torch.tensor(0))
        self.rule = COSINE_EVAL[0]  # the buffer as a str: forward reads no device tensor

    def set_scaling(self, scaling: float) -> None:
        self.scaling.fill_(float(scaling))

    def set_eval_rule(self, rule: str) -> None:
        if rule not in COSINE_EVAL:
            raise UserError(f"eval rule must be one of {', '.join(COSINE_EVAL)}, got {rule!r}")
        self.eval_rule.fill_(COSINE_EVAL.index(rule))
        self.rule = rule

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "eval_rule" in state_dict:  # once per load, never in a forward
            self.rule = COSINE_EVAL[int(state_dict[prefix + "eval_rule"])]

    def modality_logits(self, feats):
        weights = torch.split(self.fc_out.weight, self.dims, dim=1)
        return {m: self.scaling * (nn.functional.normalize(feats[m], dim=1)
                                   @ nn.functional.normalize(w, dim=1).t())
                for m, w in zip(self.modalities, weights)}

    def forward(self, feats):
        if not self.training and self.rule == "concat":
            return super().forward(feats)
        parts = self.modality_logits(feats)
        return sum(parts[m] for m in self.modalities)


FUSIONS: dict[str, Callable[..., Fusion]] = {
    "sum": SumFusion, "concat": ConcatFusion, "film": FiLMFusion, "gated": GatedFusion,
    "bilinear": BilinearFusion, "attention": AttentionFusion,
    "bilinear_tanh": BilinearTanhFusion, "mha": MHAFusion, "boost": BoostFusion,
    "shared": SharedHeadFusion, "cosine": CosineFusion,
}


def build_fusion(name: str, modalities: list[str], dims: dict[str, int],
                 num_classes: int) -> Fusion:
    if name not in FUSIONS:
        raise UserError(f"unknown fusion {name!r}; choose one of: {', '.join(FUSIONS)}")
    return FUSIONS[name](modalities, dims, num_classes)
