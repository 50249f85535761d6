"""Sequence transformers over N modalities: `emt`, `mbt`, `umt`, `ca` (as in the OLM code).

The OLM paper trains these on MER-MULTI frame-level features with audio and visual only; here
every model takes any number of modalities (audio, visual, text, ...), each a sequence with
its own length, and returns logits per modality plus fused:

    model = build_sequence_model("emt", num_classes=6, modalities=["audio", "visual", "text"],
                                 inputs={"audio": {"kind": "features", "dim": 1024}, ...})
    out = model({"audio": x_a, "audio_len": n_a, ...})   # {"fused": [B, C], "audio": [B, C], ...}

Inputs per modality (`inputs[m]["kind"]`; `input_specs(index, modalities)` derives them from a
shard set's index.json):

- `features`: float [B, T, D] precomputed features (`{key}.{m}.npy` members), `m_len` [B];
- `spectrogram`: [B, 1, F, T] log-mel/STFT, cut into patches of `patch` columns;
- `frames`: [B, T, 3, H, W] frames (faces), a CNN per frame (`frame_backbone`);
- `tokens`: long [B, L] UTF-8 byte ids (0 = pad) through the built-in `TextEncoder`.

Every modality's sequence gets a learned [CLS] token in front (never masked, so a clip whose
modality is missing -- length 0 -- still has one valid position) and a key-padding mask built
from its length; padded positions are zeroed at the input and masked in every attention and
pooling, so they cannot change the output. Per-modality logits are a linear head on the
masked mean of that modality's output; the fused logits a head on the mean of the shared
bottleneck tokens (emt, mbt, umt) or of all modalities' outputs (ca). As `AVModel` does for
non-decomposable fusions, the per-modality heads read *detached* features unless the model is
built with `trained_unimodal_heads=True` (OLM), when their loss trains the encoders.

`model.encoders[m]` holds everything specific to modality m (input projection, [CLS], its
own layer stack), which is what OGM scales; its input projection is a 1x1 convolution, so the
default `--modulate conv` finds a kernel to scale, and `--modulate encoder` scales the whole
stack. Generalisations to N modalities (the released code has exactly two):

- emt: the bottleneck cross-attends to each modality; modality m's gate reads
  [cls_m; mean of the other modalities' cls] (the released [cls_v; cls_a] for two);
- mbt: from layer `fusion_layer` on, each modality's layer runs on [x_m; bottleneck] and the
  bottleneck updates are averaged over modalities (Nagrani et al. 2021);
- umt: propagation (each modality <- bottleneck) then collection (bottleneck <- each
  modality, updates averaged), every layer; the released code collects first, which leaves
  the last propagation layer outside the fused logits (untrained by a fused-only loss, and an
  unused-parameter error under DDP);
- ca: each modality cross-attends to the concatenation of all the others; all modalities
  update at once from the previous layer's outputs (the released code updates visual first).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from avprep.errors import UserError

from .encoders import spectrogram_bins
from .text import VOCAB, TextEncoder, masked_mean, padding_mask

DEFAULTS = {"d_model": 768, "heads": 8, "layers": 3, "bottleneck": 12, "ff": 1024,
            "dropout": 0.1, "fusion_layer": 1, "patch": 4, "text_dim": 256, "text_layers": 2,
            "frame_backbone": "tiny"}
KINDS = ("features", "spectrogram", "frames", "tokens")
CANONICAL = ("audio", "visual", "text")


# --- what each modality's batch tensor is -------------------------------------------------


def input_specs(index: dict, modalities) -> dict[str, dict]:
    """{modality: {"kind", "dim"}} for a shard set's index.json: precomputed features where
    the index lists them (`features: {m: {"dim": D}}`), else the raw member of that modality
    (audio: spectrogram with the preset's frequency bins, visual: frames, text: bytes)."""
    features = index.get("features") or {}
    preset = index.get("preset") or {}
    out = {}
    for m in modalities:
        if m in features:
            out[m] = {"kind": "features", "dim": int(features[m]["dim"])}
        elif m == "audio":
            out[m] = {"kind": "spectrogram", "dim": spectrogram_bins(preset)}
        elif m == "visual":
            out[m] = {"kind": "frames", "dim": 3}
        elif m == "text":
            out[m] = {"kind": "tokens", "dim": VOCAB}
        else:
            raise UserError(f"modality {m!r} has no features in this shard set's index.json "
                            f"and no raw form (raw modalities: {', '.join(CANONICAL)})")
    return out


# --- input adapters: a batch tensor -> tokens [B, T, d] and their padding mask --------------


def _lengths(lengths, batch: int, size: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long, device=device)
    return torch.as_tensor(lengths, device=device).long().clamp(0, size)


class FeatureInput(nn.Module):
    """[B, T, D] features -> a 1x1 convolution (a per-step linear map) to d_model."""

    def __init__(self, dim: int, d_model: int, **_):
        super().__init__()
        self.proj = nn.Conv1d(dim, d_model, kernel_size=1)

    def forward(self, x, lengths):
        if x.dim() != 3:
            raise ValueError(f"features must be [B, T, D], got {tuple(x.shape)}")
        x = x.float()
        lengths = _lengths(lengths, x.shape[0], x.shape[1], x.device)
        mask = padding_mask(lengths, x.shape[1])
        x = x.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.proj(x.transpose(1, 2)).transpose(1, 2), mask


class SpectrogramInput(nn.Module):
    """[B, 1, F, T] -> non-overlapping patches of `patch` columns -> d_model per patch."""

    def __init__(self, dim: int, d_model: int, patch: int = 4, **_):
        super().__init__()
        self.patch = int(patch)
        self.proj = nn.Conv1d(dim, d_model, kernel_size=self.patch, stride=self.patch)

    def forward(self, x, lengths):
        x = x.float()
        if x.dim() == 4:
            x = x.squeeze(1)
        b, _, t = x.shape
        lengths = _lengths(lengths, b, t, x.device)
        x = x.masked_fill(padding_mask(lengths, t).unsqueeze(1), 0.0)
        extra = (-t) % self.patch
        if extra:
            x = nn.functional.pad(x, (0, extra))
        y = self.proj(x).transpose(1, 2)
        steps = torch.div(lengths + self.patch - 1, self.patch, rounding_mode="floor")
        return y, padding_mask(steps, y.shape[1])


class FramesInput(nn.Module):
    """[B, T, 3, H, W] -> a CNN on every frame (the `tiny` or `resnet18` image encoder) ->
    d_model per frame."""

    def __init__(self, dim: int, d_model: int, frame_backbone: str = "tiny", **_):
        super().__init__()
        from .encoders import ENCODERS, build_encoder

        if frame_backbone not in ENCODERS:
            raise UserError(f"unknown frame backbone {frame_backbone!r}; choose one of: "
                            f"{', '.join(sorted(ENCODERS))}")
        image = build_encoder(frame_backbone, "visual")
        self.backbone = image.backbone
        self.proj = nn.Linear(image.out_dim, d_model)

    def forward(self, x, lengths):
        if x.dim() == 4:
            x = x.unsqueeze(1)
        b, t = x.shape[:2]
        lengths = _lengths(lengths, b, t, x.device)
        mask = padding_mask(lengths, t)
        feats = self.backbone(x.reshape(b * t, *x.shape[2:]).float()).reshape(b, t, -1)
        feats = feats.masked_fill(mask.unsqueeze(-1), 0.0)
        return self.proj(feats), mask


class TokensInput(nn.Module):
    """long [B, L] byte ids -> the built-in TextEncoder -> d_model per position."""

    def __init__(self, dim: int, d_model: int, text_dim: int = 256, text_layers: int = 2,
                 heads: int = 8, dropout: float = 0.1, **_):
        super().__init__()
        text_heads = math.gcd(int(heads), int(text_dim)) or 1
        self.text = TextEncoder(dim=int(text_dim), layers=int(text_layers), heads=text_heads,
                                dropout=dropout)
        self.proj = nn.Conv1d(int(text_dim), d_model, kernel_size=1)

    def forward(self, x, lengths):
        seq, mask = self.text.sequence(x, lengths)
        return self.proj(seq.transpose(1, 2)).transpose(1, 2), mask


ADAPTERS = {"features": FeatureInput, "spectrogram": SpectrogramInput, "frames": FramesInput,
            "tokens": TokensInput}


# --- blocks (post-norm, as the released code) ---------------------------------------------


def _attention(d_model, heads, dropout):
    return nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)


def _feedforward(d_model, ff, dropout):
    return nn.Sequential(nn.Linear(d_model, ff), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(ff, d_model))


class SelfBlock(nn.Module):
    """Self-attention + feed-forward (a transformer encoder layer)."""

    def __init__(self, d_model, heads, ff, dropout):
        super().__init__()
        self.attn = _attention(d_model, heads, dropout)
        self.ff = _feedforward(d_model, ff, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = self.norm1(x + self.drop(self.attn(x, x, x, key_padding_mask=mask,
                                               need_weights=False)[0]))
        return self.norm2(x + self.drop(self.ff(x)))


class CrossBlock(nn.Module):
    """Self-attention, cross-attention to `memory`, feed-forward (a decoder layer)."""

    def __init__(self, d_model, heads, ff, dropout):
        super().__init__()
        self.self_attn = _attention(d_model, heads, dropout)
        self.cross_attn = _attention(d_model, heads, dropout)
        self.ff = _feedforward(d_model, ff, dropout)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, mask=None, memory_mask=None):
        x = self.norm1(x + self.drop(self.self_attn(x, x, x, key_padding_mask=mask,
                                                    need_weights=False)[0]))
        x = self.norm2(x + self.drop(self.cross_attn(x, memory, memory,
                                                     key_padding_mask=memory_mask,
                                                     need_weights=False)[0]))
        return self.norm3(x + self.drop(self.ff(x)))


class PivotBlock(nn.Module):
    """EMT's fusion step: the bottleneck ("pivot") tokens read every modality, each read gated
    by that modality's [CLS] against the others', the reads summed and fed forward."""

    def __init__(self, modalities, d_model, heads, ff, dropout):
        super().__init__()
        self.modalities = list(modalities)
        self.attn = nn.ModuleDict({m: _attention(d_model, heads, dropout) for m in modalities})
        self.gate = nn.ModuleDict({m: nn.Linear(2 * d_model, d_model) for m in modalities})
        self.norm_read = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in modalities})
        self.norm_gate = nn.ModuleDict({m: nn.LayerNorm(d_model) for m in modalities})
        self.ff = _feedforward(d_model, ff, dropout)
        self.norm_out = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, pivot, xs: dict, masks: dict):
        cls = {m: xs[m][:, 0] for m in self.modalities}
        total = None
        for m in self.modalities:
            read = self.attn[m](pivot, xs[m], xs[m], key_padding_mask=masks[m],
                                need_weights=False)[0]
            read = self.norm_read[m](pivot + self.drop(read))
            others = torch.stack([cls[n] for n in self.modalities if n != m]).mean(dim=0)
            gate = torch.sigmoid(self.gate[m](torch.cat([cls[m], others], dim=-1)))
            read = self.norm_gate[m](read + read * gate.unsqueeze(1))
            total = read if total is None else total + read
        return self.norm_out(total + self.drop(self.ff(total)))


# --- the models ---------------------------------------------------------------------------


class ModalityEncoder(nn.Module):
    """Everything specific to one modality: input adapter, [CLS] token, its layer stack."""

    def __init__(self, spec: dict, d_model: int, layers: list[nn.Module], options: dict):
        super().__init__()
        kind = spec.get("kind")
        if kind not in ADAPTERS:
            raise UserError(f"unknown input kind {kind!r}; choose one of: {', '.join(KINDS)}")
        self.kind = kind
        self.adapter = ADAPTERS[kind](int(spec["dim"]), d_model, **options)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.layers = nn.ModuleList(layers)
        self.out_dim = d_model

    def embed(self, x, lengths, drop: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """-> tokens [B, 1 + T, d] with [CLS] first, padding mask [B, 1 + T]."""
        tokens, mask = self.adapter(x, lengths)
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens],
                           dim=1)
        mask = torch.cat([torch.zeros_like(mask[:, :1]), mask], dim=1)
        return drop(tokens), mask


class SharedFusion(nn.Module):
    """The parts shared by all modalities (bottleneck tokens, fusion blocks). Not
    decomposable: the fused logits are not a sum of per-modality logits."""

    decomposable = False


class SequenceModel(nn.Module):
    """Common plumbing of the four transformers; subclasses build layers and `mix` them."""

    name = "sequence"
    uses_bottleneck = True
    unimodal = False

    def __init__(self, num_classes: int, modalities, inputs: dict, *,
                 trained_unimodal_heads: bool = False, **options):
        super().__init__()
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise UserError(f"unknown option {unknown[0]!r} for model {self.name!r}; choose "
                            f"from: {', '.join(DEFAULTS)}")
        opts = {**DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        modalities = list(modalities)
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise UserError(f"model {self.name!r} fuses two or more distinct modalities, got "
                            f"{modalities}")
        missing = [m for m in modalities if m not in inputs]
        if missing:
            raise UserError(f"model {self.name!r}: no input description for modality "
                            f"{missing[0]!r}")
        if num_classes < 2:
            raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
        d, h = int(opts["d_model"]), int(opts["heads"])
        if d < 1 or h < 1 or d % h:
            raise UserError(f"d_model ({d}) must be a positive multiple of heads ({h})")
        n_layers = int(opts["layers"])
        if n_layers < 1:
            raise UserError(f"layers must be at least 1, got {n_layers}")
        if self.uses_bottleneck and int(opts["bottleneck"]) < 1:
            raise UserError(f"model {self.name!r} needs at least 1 bottleneck token")
        self.modalities = ([m for m in CANONICAL if m in modalities]
                           + [m for m in modalities if m not in CANONICAL])
        self.options = opts
        self.inputs = {m: dict(inputs[m]) for m in self.modalities}
        self.trained_unimodal_heads = bool(trained_unimodal_heads)
        self.d_model, self.n_layers = d, n_layers
        self.spec = {"model": self.name, "fusion": self.name, "num_classes": int(num_classes),
                     "modalities": list(self.modalities),
                     "trained_unimodal_heads": self.trained_unimodal_heads,
                     "inputs": self.inputs, "options": dict(opts)}
        adapter_opts = {k: opts[k] for k in ("patch", "text_dim", "text_layers", "heads",
                                             "dropout", "frame_backbone")}
        self.encoders = nn.ModuleDict({
            m: ModalityEncoder(self.inputs[m], d, self.modality_layers(m), adapter_opts)
            for m in self.modalities})
        self.fusion = SharedFusion()
        self.build_fusion(self.fusion)
        self.drop = nn.Dropout(float(opts["dropout"]))
        self.norm = nn.LayerNorm(d)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m in self.modalities})
        self.fused_head = nn.Linear(d, num_classes)
        self.apply(_init_weights)
        for m in self.modalities:
            nn.init.trunc_normal_(self.encoders[m].cls, std=0.02)

    # subclasses
    def modality_layers(self, m: str) -> list[nn.Module]:
        raise NotImplementedError

    def build_fusion(self, fusion: SharedFusion) -> None:
        """Add the shared parameters to `fusion`."""

    def mix(self, xs: dict, masks: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """Run the layers: -> (outputs per modality, fused tokens, their padding mask)."""
        raise NotImplementedError

    def _block_args(self):
        o = self.options
        return self.d_model, int(o["heads"]), int(o["ff"]), float(o["dropout"])

    def _bottleneck(self, batch: int) -> torch.Tensor:
        return self.drop(self.fusion.bottleneck.expand(batch, -1, -1))

    @property
    def heads(self) -> nn.ModuleDict:
        return self.aux_heads

    def _run(self, batch: dict):
        xs, masks = {}, {}
        for m in self.modalities:
            if m not in batch:
                raise KeyError(f"the batch has no {m!r} input (modalities: {self.modalities})")
            xs[m], masks[m] = self.encoders[m].embed(batch[m], batch.get(f"{m}_len"), self.drop)
        outs, fused, fused_mask = self.mix(xs, masks)
        pooled = {m: masked_mean(self.norm(outs[m]), masks[m]) for m in self.modalities}
        return pooled, masked_mean(self.norm(fused), fused_mask)

    def features(self, batch: dict) -> dict[str, torch.Tensor]:
        """One vector per clip and modality, {m: [B, d_model]} (linear probes)."""
        return self._run(batch)[0]

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        pooled, fused = self._run(batch)
        out = {"fused": self.fused_head(fused)}
        for m in self.modalities:
            f = pooled[m] if self.trained_unimodal_heads else pooled[m].detach()
            out[m] = self.aux_heads[m](f)
        return out


def _init_weights(module: nn.Module) -> None:
    """As the released code: truncated-normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _no_mask(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)


class EMT(SequenceModel):
    """Efficient multimodal transformer: per-modality encoder layers plus gated bottleneck
    ("pivot") tokens that read every modality after each layer."""

    name = "emt"

    def modality_layers(self, m):
        return [SelfBlock(*self._block_args()) for _ in range(self.n_layers)]

    def build_fusion(self, fusion):
        fusion.bottleneck = nn.Parameter(torch.zeros(1, int(self.options["bottleneck"]),
                                                     self.d_model))
        fusion.blocks = nn.ModuleList(PivotBlock(self.modalities, *self._block_args())
                                      for _ in range(self.n_layers))

    def mix(self, xs, masks):
        pivot = self._bottleneck(next(iter(xs.values())).shape[0])
        for i in range(self.n_layers):
            xs = {m: self.encoders[m].layers[i](xs[m], masks[m]) for m in self.modalities}
            pivot = self.fusion.blocks[i](pivot, xs, masks)
        return xs, pivot, _no_mask(pivot)


class MBT(SequenceModel):
    """Multimodal bottleneck transformer: modalities exchange information only through shared
    bottleneck tokens, from layer `fusion_layer` on."""

    name = "mbt"

    def modality_layers(self, m):
        start = int(self.options["fusion_layer"])
        if not 0 <= start < self.n_layers:
            raise UserError(f"fusion_layer must be in [0, {self.n_layers - 1}] for {self.n_layers}"
                            f" layers, got {start}")
        return [SelfBlock(*self._block_args()) for _ in range(self.n_layers)]

    def build_fusion(self, fusion):
        fusion.bottleneck = nn.Parameter(torch.zeros(1, int(self.options["bottleneck"]),
                                                     self.d_model))

    def mix(self, xs, masks):
        start = int(self.options["fusion_layer"])
        neck = self._bottleneck(next(iter(xs.values())).shape[0])
        n = neck.shape[1]
        for i in range(self.n_layers):
            if i < start:
                xs = {m: self.encoders[m].layers[i](xs[m], masks[m]) for m in self.modalities}
                continue
            updates, new = [], {}
            for m in self.modalities:
                joint = torch.cat([xs[m], neck], dim=1)
                joint_mask = torch.cat([masks[m], _no_mask(neck)], dim=1)
                y = self.encoders[m].layers[i](joint, joint_mask)
                new[m] = y[:, :-n]
                updates.append(y[:, -n:])
            xs, neck = new, torch.stack(updates).mean(dim=0)
        return xs, neck, _no_mask(neck)


class UMT(SequenceModel):
    """Unified multimodal transformer: each layer, the bottleneck propagates to every
    modality, then collects from each (cross-attention, updates averaged)."""

    name = "umt"

    def modality_layers(self, m):  # propagation: modality m <- bottleneck
        return [CrossBlock(*self._block_args()) for _ in range(self.n_layers)]

    def build_fusion(self, fusion):
        fusion.bottleneck = nn.Parameter(torch.zeros(1, int(self.options["bottleneck"]),
                                                     self.d_model))
        fusion.collect = nn.ModuleDict({  # collection: bottleneck <- modality m
            m: nn.ModuleList(CrossBlock(*self._block_args()) for _ in range(self.n_layers))
            for m in self.modalities})

    def mix(self, xs, masks):
        neck = self._bottleneck(next(iter(xs.values())).shape[0])
        for i in range(self.n_layers):
            xs = {m: self.encoders[m].layers[i](xs[m], neck, masks[m], None)
                  for m in self.modalities}
            reads = [self.fusion.collect[m][i](neck, xs[m], None, masks[m])
                     for m in self.modalities]
            neck = neck + torch.stack(reads).mean(dim=0)
        return xs, neck, _no_mask(neck)


class CA(SequenceModel):
    """Co-attention transformer: each modality cross-attends to all the other modalities;
    the fused representation is the mean over every modality's outputs."""

    name = "ca"
    uses_bottleneck = False

    def modality_layers(self, m):
        return [CrossBlock(*self._block_args()) for _ in range(self.n_layers)]

    def mix(self, xs, masks):
        for i in range(self.n_layers):
            new = {}
            for m in self.modalities:
                others = [n for n in self.modalities if n != m]
                memory = torch.cat([xs[n] for n in others], dim=1)
                memory_mask = torch.cat([masks[n] for n in others], dim=1)
                new[m] = self.encoders[m].layers[i](xs[m], memory, masks[m], memory_mask)
            xs = new
        fused = torch.cat([xs[m] for m in self.modalities], dim=1)
        return xs, fused, torch.cat([masks[m] for m in self.modalities], dim=1)


SEQUENCE_MODELS: dict[str, type[SequenceModel]] = {"emt": EMT, "mbt": MBT, "umt": UMT,
                                                   "ca": CA}


def build_sequence_model(name: str, num_classes: int, modalities, inputs: dict, *,
                         trained_unimodal_heads: bool = False, **options) -> SequenceModel:
    if name not in SEQUENCE_MODELS:
        raise UserError(f"unknown sequence model {name!r}; choose one of: "
                        f"{', '.join(SEQUENCE_MODELS)}")
    return SEQUENCE_MODELS[name](num_classes, modalities, inputs,
                                 trained_unimodal_heads=trained_unimodal_heads, **options)
