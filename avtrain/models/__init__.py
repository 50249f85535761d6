"""Audio-visual classifiers: one encoder per modality, one fusion, a dict of logits.

    model = build_model("tiny", "concat", num_classes=6)
    logits = model(batch)        # {"fused": [B, C], "audio": [B, C], "visual": [B, C]}
    feats = model.features(batch)  # {"audio": [B, D], "visual": [B, D]} (linear probe)

Per-modality logits follow DESIGN §5: for `sum`/`concat` they are the exact summands of the
fused logits; for the other fusions they come from auxiliary linear heads on *detached*
features (they measure each encoder, they do not train it). A model built with
`trained_unimodal_heads=True` (OLM, OLM-com) gives *every* fusion, `sum` and `concat` included,
its own unimodal heads on the encoders' features (not detached), beside the fusion's classifier
-- OLM's AVClassifier (`o_x`, `o_y` in its fusion_modules.py) -- so the three branches are three
classifiers, not slices of one layer.
A single modality (`modalities=["audio"]`) gives a unimodal model whose "fused" logits are
that modality's logits.
A model built with `output_layer=True` (AMCo) passes the fused logits through one more
Linear(C, C) -- BalanceMM's `BaseClassifierAMCoModel.linear_star` -- in every forward, training
and evaluation alike; the per-modality logits are unchanged.
A model built with `mmtm=True` (Greedy) runs its audio and visual encoders stage by stage with
MMTM blocks between them (avtrain/models/mmtm.py): `features` then gives the gated features.

Encoders are named per modality (`encoders={"visual": "timm:efficientnet_b0"}`; `encoder` names
the others; avtrain/models/encoders.py). `freeze(modalities)` freezes encoder backbones: their
parameters stop requiring grad and `train()` leaves them in eval mode (BatchNorm keeps its
running statistics, dropout is off), whoever calls it: the loop at the start of every epoch,
a method after its own eval passes.
"""

from __future__ import annotations

import torch
from torch import nn

from avprep.errors import UserError

from .encoders import ENCODERS, TEMPORAL_POOLS, build_encoder, encoder_name
from .fusions import FUSIONS, build_fusion
from .sequence import SEQUENCE_MODELS, build_sequence_model, input_specs

MODALITIES = ("audio", "visual", "text")
# parts of a model that a balancing method asks for (a class attribute of the same name on its
# Balancer, `build_model` keyword arguments); recorded in the spec when set, so a checkpoint
# rebuilds with them (`model_from_spec`)
MODEL_FLAGS = ("output_layer", "mmtm")

__all__ = ["AVModel", "build_model", "ENCODERS", "FUSIONS", "MODALITIES", "MODEL_FLAGS",
           "SEQUENCE_MODELS", "encoder_name", "model_from_spec", "model_spec"]


class AVModel(nn.Module):
    def __init__(self, encoder: str, fusion: str, num_classes: int,
                 modalities: list[str] | tuple[str, ...] = MODALITIES,
                 trained_unimodal_heads: bool = False, output_layer: bool = False,
                 mmtm: bool = False, *, encoders: dict | None = None,
                 input_sizes: dict | None = None, temporal_pool: str = "mean",
                 feature_dim: int | None = None):
        super().__init__()
        modalities = list(modalities)
        if not modalities or len(set(modalities)) != len(modalities):
            raise UserError(f"modalities must be distinct and not empty, got {modalities}")
        bad = [m for m in modalities if m not in MODALITIES]
        if bad:
            raise UserError(f"unknown modality {bad[0]!r}; choose from: {', '.join(MODALITIES)}")
        if fusion not in FUSIONS:
            raise UserError(f"unknown fusion {fusion!r}; choose one of: {', '.join(FUSIONS)}")
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        # keep the canonical order (audio first) whatever order the user typed
        self.modalities = [m for m in MODALITIES if m in modalities]
        encoders = dict(encoders or {})
        bad = [m for m in encoders if m not in self.modalities]
        if bad:
            raise UserError(f"--encoder {bad[0]}=...: this model's modalities are "
                            f"{', '.join(self.modalities)}")
        input_sizes = {m: tuple(v) for m, v in (input_sizes or {}).items()}
        self.spec = model_spec(encoder, fusion, num_classes, self.modalities,
                               trained_unimodal_heads, output_layer=output_layer, mmtm=mmtm,
                               encoders=encoders, input_sizes=input_sizes,
                               temporal_pool=temporal_pool, feature_dim=feature_dim)
        self.trained_unimodal_heads = bool(trained_unimodal_heads)
        self.encoders = nn.ModuleDict({m: build_encoder(
            encoders.get(m, encoder), m, input_size=input_sizes.get(m),
            temporal_pool=temporal_pool, feature_dim=feature_dim) for m in self.modalities})
        self.frozen: list[str] = []
        dims = {m: self.encoders[m].out_dim for m in self.modalities}
        self.unimodal = len(self.modalities) == 1
        if self.unimodal:
            self.fusion = None
            self.aux_heads = nn.ModuleDict({m: nn.Linear(dims[m], num_classes)
                                            for m in self.modalities})
        else:
            self.fusion = build_fusion(fusion, self.modalities, dims, num_classes)
            separate = self.trained_unimodal_heads or not self.fusion.decomposable
            self.aux_heads = nn.ModuleDict(
                {m: nn.Linear(dims[m], num_classes) for m in self.modalities}
                if separate else {})
        # AMCo's linear_star on the fused logits (None: the fused logits are the fusion's)
        self.output_layer = (nn.Linear(num_classes, num_classes)
                             if output_layer and not self.unimodal else None)
        self.mmtm = None
        if mmtm:
            from .mmtm import MMTMFusionTrunk

            self.mmtm = MMTMFusionTrunk(self.encoders, self.modalities)

    def freeze(self, modalities) -> None:
        """Freeze these modalities' encoder backbones (requires_grad False, eval mode kept
        through every `train()`); their pool and projection, new layers, still train."""
        for m in modalities:
            if m not in self.encoders:
                raise UserError(f"--freeze {m}: this model's modalities are "
                                f"{', '.join(self.modalities)}")
            self.encoders[m].backbone.requires_grad_(False)
            if m not in self.frozen:
                self.frozen.append(m)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "frozen", ()):
            self.encoders[m].backbone.eval()
        return self

    @property
    def heads(self) -> nn.ModuleDict:
        """modality -> linear head giving that modality's logits from its features: the
        summands of `sum`, the auxiliary heads of non-decomposable fusions, the separate trained
        heads of an OLM model, the classifier of a unimodal model. Empty for `concat`, whose
        per-modality logits are slices of one layer's weight (see
        `ConcatFusion.modality_logits`)."""
        if self.fusion is not None and self.fusion.decomposable and not self.aux_heads:
            return getattr(self.fusion, "fc", nn.ModuleDict())
        return self.aux_heads

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """One feature vector per clip and modality: {modality: [B, D]}."""
        if self.mmtm is not None:
            return self.mmtm(self.encoders, batch)
        return {m: self.encoders[m](batch[m]) for m in self.modalities}

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        feats = self.features(batch)
        if self.unimodal:
            (m,) = self.modalities
            logits = self.aux_heads[m](feats[m])
            return {"fused": logits, m: logits}
        out = {"fused": self.fusion(feats)}
        if self.output_layer is not None:
            out["fused"] = self.output_layer(out["fused"])
        if self.fusion.decomposable and not self.aux_heads:
            out.update(self.fusion.modality_logits(feats))
        else:
            for m in self.modalities:
                f = feats[m] if self.trained_unimodal_heads else feats[m].detach()
                out[m] = self.aux_heads[m](f)
        return out


def model_spec(encoder: str, fusion: str, num_classes: int, modalities, trained_unimodal_heads,
               *, encoders: dict | None = None, input_sizes: dict | None = None,
               temporal_pool: str = "mean", feature_dim: int | None = None,
               **flags: bool) -> dict:
    """What a checkpoint must match to be loaded into a model (stored in every checkpoint).
    The MODEL_FLAGS and the encoder settings are recorded only when set (`encoders`: every
    modality's encoder name, when one is named apart from `model`; `input_sizes`: of encoders
    built for one input size), so the specs of other models stay as they were."""
    spec = {"model": encoder, "fusion": fusion, "num_classes": int(num_classes),
            "modalities": list(modalities), "trained_unimodal_heads": bool(trained_unimodal_heads)}
    spec.update({flag: True for flag in MODEL_FLAGS if flags.get(flag)})
    if encoders:
        spec["encoders"] = {m: encoders.get(m, encoder) for m in modalities}
    if input_sizes:
        spec["input_sizes"] = {m: list(v) for m, v in input_sizes.items()}
    if temporal_pool != "mean":
        spec["temporal_pool"] = temporal_pool
    if feature_dim:
        spec["feature_dim"] = int(feature_dim)
    return spec



def model_from_spec(spec: dict, *, index: dict | None = None,
                    options: dict | None = None) -> nn.Module:
    """A fresh model as `spec` describes it (a checkpoint's, a trainer's), flags included.
    Raises KeyError when the spec lacks its model, fusion, classes or modalities."""
    return build_model(spec["model"], spec["fusion"], spec["num_classes"], spec["modalities"],
                       spec.get("trained_unimodal_heads", False), index=index,
                       inputs=spec.get("inputs"),
                       options=spec.get("options") if options is None else options,
                       encoders=spec.get("encoders"), input_sizes=spec.get("input_sizes"),
                       temporal_pool=spec.get("temporal_pool", "mean"),
                       feature_dim=spec.get("feature_dim"),
                       **{flag: bool(spec.get(flag, False)) for flag in MODEL_FLAGS})


def build_model(model: str = "resnet18", fusion: str = "concat", num_classes: int = 2,
                modalities=("audio", "visual"), trained_unimodal_heads: bool = False, *,
                index: dict | None = None, inputs: dict | None = None,
                options: dict | None = None, output_layer: bool = False,
                mmtm: bool = False, encoders: dict | None = None,
                input_sizes: dict | None = None, temporal_pool: str = "mean",
                feature_dim: int | None = None) -> nn.Module:
    """An encoder + fusion `AVModel`, or a sequence transformer (emt, mbt, umt, ca) whose
    per-modality inputs come from `inputs` or the shard set's `index` (index.json).
    `output_layer` (AMCo's linear_star) exists for `AVModel` only. `encoders`: per-modality
    encoder names beside `model`; `input_sizes`: {modality: [H, W]} of encoders built for one
    input size (avtrain.models.encoders.input_sizes). Pretrained weights are loaded after
    the `--init` scheme (avtrain.models.encoders.load_pretrained)."""
    if model in SEQUENCE_MODELS:
        if encoders or feature_dim or temporal_pool != "mean":
            raise UserError(f"--encoder, --feature-dim and --temporal-pool "
                            f"apply to encoder + fusion models, not to the sequence model "
                            f"{model!r}")
        if mmtm:
            raise UserError(f"MMTM blocks (--method greedy) go between resnet18 or tiny "
                            f"encoders, not into the sequence model {model!r}")
        return build_sequence_model(model, num_classes, modalities,
                                    inputs or input_specs(index or {}, modalities),
                                    trained_unimodal_heads=trained_unimodal_heads,
                                    **(options or {}))
    if temporal_pool not in TEMPORAL_POOLS:
        raise UserError(f"--temporal-pool must be one of {', '.join(TEMPORAL_POOLS)}, "
                        f"got {temporal_pool!r}")
    return AVModel(model, fusion, num_classes, modalities, trained_unimodal_heads, output_layer,
                   mmtm=mmtm, encoders=encoders, input_sizes=input_sizes,
                   temporal_pool=temporal_pool, feature_dim=feature_dim)
