"""Per-modality encoders: a batch tensor in, one feature vector per clip out.

Registry by name, one name per modality (`--encoder visual=timm:efficientnet_b0`; `--model`
names the encoder of every modality not named otherwise):

- `resnet18`: torchvision's ResNet-18 built with `weights=None` (trained from scratch, as the
  OGM-GE/OLM seeds), with a fresh kaiming-initialised 1-channel stem for spectrograms: the
  released encoder, unchanged.
- `tiny`: three conv blocks for CPU tests and the demo.
- `timm:NAME`: any timm model through timm's own factory,
  `timm.create_model(NAME, pretrained=False, num_classes=0, in_chans=C)`; its feature width is
  the model's (`head_hidden_size`, else `num_features`). A spectrogram is a 1-channel image:
  timm builds the 1-channel stem itself and, when it adapts pretrained RGB weights to
  `in_chans=1`, sums the stem's kernels over the three colour channels. Models with a fixed
  input size (ViTs, Swin, ...: timm's `fixed_input_size`) get `img_size` = the input they will
  see: (frequency bins, time columns) of the shard preset's spectrogram for audio (an
  AST-style patch ViT over the spectrogram), (image size, image size) for frames; a patch
  model is built for the size rounded up to whole patches and its input zero-padded to it
  (bottom, right), so a size the patch does not divide (257 bins) loses no row.
- `torchvision:NAME` (or a bare torchvision classification name other than ours, e.g.
  `resnet50`): torchvision's `get_model(NAME, weights=None)` with its last Linear (the
  classifier) replaced by Identity; for audio, its first 3-channel convolution becomes a
  1-channel one whose kernels are the RGB kernels summed over the channels (the same rule as
  timm's, so a pretrained stem keeps its response to a grey image).

Loading our own 3-channel weights into a 1-channel stem (`--pretrained audio=FILE`) sums over
the channels too (`load_encoder_weights`). Visual encoders take [B, T, 3, H, W]: the T frames
are folded into the batch and their features averaged (released), or pooled by learned
attention weights over time (`temporal_pool="attention"`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from avprep.errors import UserError

IN_CHANNELS = {"audio": 1, "visual": 3}
TEMPORAL_POOLS = ("mean", "attention")
# where timm model names are listed (the one line an unknown name gets)
TIMM_LIST = "python -c \"import timm; print(timm.list_models('*vit*'))\""
PRETRAINED_LIBRARIES = ("timm", "torchvision")


class AttentionPool(nn.Module):
    """Attention-based pooling over time (Ilse, Tomczak, Welling, "Attention-based Deep
    Multiple Instance Learning", ICML 2018): a_t = softmax_t(w . tanh(V f_t)), out = sum a_t f_t.
    Frames that carry the class can outweigh the others, which a mean cannot do."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)
        self.score = nn.Linear(hidden, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, D]
        weights = torch.softmax(self.score(torch.tanh(self.proj(feats))), dim=1)
        return (weights * feats).sum(dim=1)


class Encoder(nn.Module):
    """A backbone and what follows it: pooling over time (visual), an optional Linear
    projection to `feature_dim` (fusions that read every modality with one head need one
    width). `out_dim` is the width of what it returns. `--freeze` freezes the backbone only:
    the pool and the projection are new layers and train."""

    def __init__(self, backbone: nn.Module, width: int, feature_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.backbone_dim = width
        self.out_dim = int(feature_dim or width)
        self.pool = None
        if feature_dim:
            self.project = nn.Linear(width, int(feature_dim))

    def out(self, feats: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, D] -> what the encoder returns [B, out_dim]."""
        project = getattr(self, "project", None)
        return feats if project is None else project(feats)


class FrameAveraged(Encoder):
    """Runs a 2-D image encoder on every frame and pools the features over time (mean as
    released, or `AttentionPool`)."""

    def __init__(self, backbone: nn.Module, width: int, temporal_pool: str = "mean",
                 feature_dim: int | None = None):
        super().__init__(backbone, width, feature_dim)
        self.pool = AttentionPool(width) if temporal_pool == "attention" else None

    def temporal(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, D] frame features -> [B, D] clip features."""
        return feats.mean(dim=1) if self.pool is None else self.pool(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a single frame per clip
            return self.out(self.backbone(x))
        b, t = x.shape[:2]
        feats = self.backbone(x.reshape(b * t, *x.shape[2:]))
        return self.out(self.temporal(feats.reshape(b, t, -1)))


class Plain(Encoder):
    """An image-shaped input (a spectrogram [B, 1, F, T]) straight through the backbone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.backbone(x))


def _wrap(modality: str, backbone: nn.Module, width: int, temporal_pool: str = "mean",
          feature_dim: int | None = None) -> nn.Module:
    if modality == "visual":
        return FrameAveraged(backbone, width, temporal_pool, feature_dim)
    return Plain(backbone, width, feature_dim)


def _sum_stem(conv: nn.Conv2d, channels: int) -> nn.Conv2d:
    """A copy of a 3-channel conv taking `channels` (1) inputs: kernels summed over RGB."""
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def resnet18(modality: str, *, pretrained: str | None = None, **_) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights="DEFAULT" if pretrained == "torchvision" else None)
    channels = IN_CHANNELS[modality]
    if channels != 3 and pretrained == "torchvision":
        net.conv1 = _sum_stem(net.conv1, channels)
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return net, 512


def tiny(modality: str, width: int = 32, **_) -> tuple[nn.Module, int]:
    """Three strided 3x3 conv blocks and global average pooling; `2*width` features."""
    c = IN_CHANNELS[modality]
    layers: list[nn.Module] = []
    for cin, cout in ((c, width // 2), (width // 2, width), (width, 2 * width)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), 2 * width


ENCODERS: dict[str, Callable[..., tuple[nn.Module, int]]] = {"resnet18": resnet18, "tiny": tiny}


# --- library encoders ------------------------------------------------------------------------


def torchvision_names() -> list[str]:
    from torchvision import models

    return models.list_models(module=models)  # the classification models only


def split_name(name: str) -> tuple[str, str]:
    """("ours" | "timm" | "torchvision", model name) of an encoder name; one Error line for a
    name no library has."""
    name = str(name)
    if name in ENCODERS:
        return "ours", name
    library, sep, model = name.partition(":")
    if sep and library == "timm":
        import timm

        if not timm.is_model(model):
            raise UserError(f"unknown timm model {model!r} (encoder {name!r}); list the names "
                            f"with: {TIMM_LIST}")
        return "timm", model
    if sep and library == "torchvision" or not sep:
        model = model if sep else name
        if model in torchvision_names():
            return "torchvision", model
        if sep:
            raise UserError(f"unknown torchvision classification model {model!r}; list the "
                            "names with: python -c \"import torchvision.models as m; "
                            "print(m.list_models(module=m))\"")
    raise UserError(f"unknown model {name!r}; choose resnet18, tiny, timm:NAME (any timm "
                    "model) or torchvision:NAME (any torchvision classification model)")


def needs_input_size(name: str) -> bool:
    """Whether the encoder is built for one input size (timm's `fixed_input_size`: ViTs, ...),
    which then comes from the shard preset (`input_size` of build_encoder)."""
    library, model = split_name(name)
    if library == "timm":
        import timm

        cfg = timm.models.get_pretrained_cfg(model)
        return bool(cfg is not None and cfg.fixed_input_size)
    return library == "torchvision" and model.startswith("vit_")


def _timm(model: str, modality: str, *, pretrained: str | None = None,
          input_size: tuple[int, int] | None = None, **_) -> tuple[nn.Module, int]:
    import timm

    kwargs = {"num_classes": 0, "in_chans": IN_CHANNELS[modality]}
    if needs_input_size(f"timm:{model}"):
        if input_size is None:
            raise UserError(f"timm:{model} is built for one input size; the {modality} input "
                            "size is not known (give the shard folder)")
        kwargs["img_size"] = tuple(int(v) for v in input_size)
    try:
        net = timm.create_model(model, pretrained=pretrained == "timm", **kwargs)
        patch = getattr(getattr(net, "patch_embed", None), "patch_size", None)
        if "img_size" in kwargs and patch:
            padded = tuple(-(-s // p) * p for s, p in zip(kwargs["img_size"], patch))
            if padded != kwargs["img_size"]:
                net = timm.create_model(model, pretrained=pretrained == "timm",
                                        **{**kwargs, "img_size": padded})
                net.register_forward_pre_hook(_zero_pad_to(padded))
    except TypeError as exc:
        if "img_size" in str(exc):
            raise UserError(f"timm:{model} has a fixed input size but takes no img_size; it "
                            f"cannot be built for the {modality} input "
                            f"{tuple(input_size)}") from None
        raise
    width = getattr(net, "head_hidden_size", None) or net.num_features
    return net, int(width)


def _zero_pad_to(size: tuple[int, int]):
    """A forward pre-hook padding an image batch with zeros (bottom, right) to `size`: a patch
    model is built for whole patches (257 spectrogram bins, patch 16: 272 rows, the last 15
    zeros); a hook, so timm's state-dict keys stay unchanged."""
    def pad(_module, args):
        x = args[0]
        return (torch.nn.functional.pad(x, (0, size[1] - x.shape[-1], 0, size[0] - x.shape[-2])),
                *args[1:])
    return pad


def _torchvision(model: str, modality: str, *, pretrained: str | None = None,
                 input_size: tuple[int, int] | None = None, **_) -> tuple[nn.Module, int]:
    from torchvision import models

    kwargs = {}
    if model.startswith("vit_") and input_size is not None:
        if input_size[0] != input_size[1]:
            raise UserError(f"torchvision:{model} takes square inputs only, not the {modality} "
                            f"input {tuple(input_size)}; use a timm ViT (timm:vit_...)")
        kwargs["image_size"] = int(input_size[0])
    net = models.get_model(model, weights="DEFAULT" if pretrained == "torchvision" else None,
                           **kwargs)
    if getattr(net, "aux_logits", False):  # GoogLeNet / Inception: the main head only
        net.aux_logits, net.AuxLogits, net.aux1, net.aux2 = False, None, None, None
    linears = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"torchvision:{model} has no Linear classifier to replace")
    head, linear = linears[-1]
    _set_module(net, head, nn.Identity())
    net.classifier_name = head  # its keys in a full state dict are dropped on loading
    channels = IN_CHANNELS[modality]
    if channels != 3:
        stem = next(((n, m) for n, m in net.named_modules()
                     if isinstance(m, nn.Conv2d) and m.in_channels == 3), None)
        if stem is None:
            raise UserError(f"torchvision:{model} has no 3-channel stem to adapt to "
                            f"{channels}-channel {modality} input")
        _set_module(net, stem[0], _sum_stem(stem[1], channels))
    return net, linear.in_features


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def build_encoder(name: str, modality: str, *, input_size: tuple[int, int] | None = None,
                  temporal_pool: str = "mean", pretrained: str | None = None,
                  feature_dim: int | None = None) -> nn.Module:
    """The `modality` encoder `name` names (see the module docstring). `pretrained`: None
    (random weights), or "timm" / "torchvision" for that library's named weights (downloaded
    by the library: needs hub access)."""
    if modality == "text":  # transcripts: the built-in byte-level encoder, sized by `name`
        from .text import build_text_encoder

        if name not in ENCODERS:
            raise UserError(f"the text encoder is sized by resnet18 or tiny, not {name!r}")
        return build_text_encoder(name)
    if modality not in IN_CHANNELS:
        raise UserError(f"unknown modality {modality!r}; choose from: {', '.join(IN_CHANNELS)}")
    if temporal_pool not in TEMPORAL_POOLS:
        raise UserError(f"--temporal-pool must be one of {', '.join(TEMPORAL_POOLS)}, "
                        f"got {temporal_pool!r}")
    library, model = split_name(name)
    if pretrained is not None and pretrained != library and not (
            library == "ours" and model == "resnet18" and pretrained == "torchvision"):
        raise UserError(f"--pretrained {modality}={pretrained}: the {name!r} encoder has no "
                        f"{pretrained} weights")
    build = {"ours": ENCODERS.get(model), "timm": _timm, "torchvision": _torchvision}[library]
    if library == "ours":
        backbone, width = build(modality, pretrained=pretrained)
    else:
        backbone, width = build(model, modality, pretrained=pretrained, input_size=input_size)
    return _wrap(modality, backbone, width, temporal_pool, feature_dim)


# --- weights from a local file -----------------------------------------------------------------


def read_state_dict(path: str, modality: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, loaded without running code: a .safetensors file,
    a plain state dict (.pt/.pth, `torch.load(weights_only=True)`; one under "state_dict" or
    "model" too), or an avbalance checkpoint, whose `encoders.MODALITY.` sub-dict is taken."""
    if not os.path.isfile(path):
        raise UserError(f"--pretrained {modality}={path}: no such file (or name a library's "
                        f"weights: {', '.join(PRETRAINED_LIBRARIES)})")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure: not a safetensors file
            raise UserError(f"--pretrained {modality}={path}: not a safetensors file "
                            f"({type(exc).__name__})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled objects, not a torch file
        raise UserError(f"--pretrained {modality}={path}: not a weights-only state dict "
                        f"({type(exc).__name__}); nothing in it was executed") from None
    if isinstance(state, dict) and state.get("format") == "avbalance-checkpoint":
        prefix = f"encoders.{modality}."
        sub = {k[len(prefix):]: v for k, v in (state.get("model") or {}).items()
               if k.startswith(prefix)}
        if not sub:
            mods = (state.get("spec") or {}).get("modalities")
            raise UserError(f"--pretrained {modality}={path}: this avbalance checkpoint has no "
                            f"{modality} encoder (its modalities: {mods})")
        return sub
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"--pretrained {modality}={path}: not a state dict of tensors")
    return state


def load_encoder_weights(encoder: nn.Module, state: dict[str, torch.Tensor], modality: str,
                         source: str) -> None:
    """Load `state` into the encoder's backbone (keys with or without the `backbone.` prefix;
    an attention pool's `pool.` keys when both have one). A full classification state dict's
    classifier keys are dropped (the encoder has no classifier); a 3-channel stem kernel for
    a 1-channel stem is summed over the channels. Keys or shapes that do not fit: one Error
    line naming the first few."""
    state = {_strip(k): v for k, v in state.items()}
    backbone_state, pool_state = {}, {}
    for key, value in state.items():
        if key.startswith("pool."):
            pool_state[key[len("pool."):]] = value
        else:
            backbone_state[key[len("backbone."):] if key.startswith("backbone.") else key] = value
    backbone = encoder.backbone
    own = backbone.state_dict()
    classifier = _classifier_name(backbone)
    if classifier:
        backbone_state = {k: v for k, v in backbone_state.items()
                          if k in own or not (k == classifier or k.startswith(classifier + "."))}
    channels = IN_CHANNELS.get(modality)
    for key, value in list(backbone_state.items()):
        want = own.get(key)
        if (want is not None and value.dim() == 4 and want.dim() == 4 and value.shape[1] == 3
                and want.shape[1] == channels == 1 and value.shape[0] == want.shape[0]
                and value.shape[2:] == want.shape[2:]):
            backbone_state[key] = value.sum(dim=1, keepdim=True)
    missing = [k for k in own if k not in backbone_state]
    unexpected = [k for k in backbone_state if k not in own]
    wrong = [f"{k} {tuple(backbone_state[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in backbone_state and backbone_state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", unexpected),
                                     ("wrong shape", wrong)) if keys]
        raise UserError(f"--pretrained {modality}={source} does not fit the {modality} "
                        f"encoder: {'; '.join(parts)}")
    backbone.load_state_dict(backbone_state)
    if encoder.pool is not None and pool_state:
        encoder.pool.load_state_dict(pool_state)


def _strip(key: str) -> str:
    """A key without DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def _classifier_name(backbone: nn.Module) -> str | None:
    """The classifier's name in a full state dict of the backbone's library (timm's
    pretrained_cfg["classifier"], the Linear that _torchvision replaced)."""
    name = getattr(backbone, "classifier_name", None)
    if name:
        return name
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier") if isinstance(cfg, dict) else None
    if classifier is None and hasattr(backbone, "fc") and isinstance(backbone.fc, nn.Identity):
        return "fc"  # our resnet18: torchvision's
    return classifier


# --- input sizes from the shard preset ---------------------------------------------------------


def spectrogram_bins(preset: dict) -> int:
    spec = dict(preset.get("spectrogram") or {})
    if spec.get("recipe") == "log_mel":
        return int(spec["n_mels"])
    if "n_fft" in spec:
        return int(spec["n_fft"]) // 2 + 1
    raise UserError("the shard set's preset does not say how many frequency bins its "
                    "spectrograms have")


def spectrogram_shape(preset: dict, crop_columns: int | None = None) -> tuple[int, int]:
    """(rows, columns) of the spectrogram the audio encoder sees: the preset's frequency bins
    by its time columns (the train crop, else the stored column count, else what a centred
    STFT of the clip length gives), swapped for `audio_layout: time_freq`."""
    bins = spectrogram_bins(preset)
    spec = dict(preset.get("spectrogram") or {})
    cols = crop_columns or preset.get("train_crop_columns") or preset.get("columns")
    if not cols and spec.get("recipe") == "stft_log" and preset.get("clip_seconds"):
        samples = int(round(float(preset["sample_rate"]) * float(preset["clip_seconds"])))
        cols = 1 + samples // int(spec["hop"])  # centred STFT (avprep.audio.stft_magnitude)
    if not cols:
        raise UserError("the shard set's preset gives spectrograms of varying length; an "
                        "encoder of fixed input size needs --crop-columns")
    cols = int(cols)
    return (cols, bins) if preset.get("audio_layout") == "time_freq" else (bins, cols)


def input_sizes(names: dict[str, str], index: dict | None, image_size: int = 224,
                crop_columns: int | None = None) -> dict[str, list[int]]:
    """{modality: [H, W]} for the encoders built for one input size (`needs_input_size`):
    the spectrogram's shape for audio, the frame crop for visual. Empty when none needs one."""
    out = {}
    for m, name in names.items():
        if m not in IN_CHANNELS or not needs_input_size(name):
            continue
        if m == "visual":
            out[m] = [int(image_size), int(image_size)]
        else:
            out[m] = list(spectrogram_shape((index or {}).get("preset") or {}, crop_columns))
    return out


def encoder_name(spec: dict, modality: str) -> str:
    """The encoder a spec (a checkpoint's, a model's) gives `modality`."""
    return (spec.get("encoders") or {}).get(modality, spec.get("model"))


def load_pretrained(model: nn.Module, sources: dict[str, str]) -> None:
    """Each modality's pretrained weights into `model`'s encoder backbone (after the `--init`
    scheme, which would otherwise overwrite them): a local file (`read_state_dict`,
    weights-only), or "timm" / "torchvision", the library's named weights for that encoder,
    built once more with them (the library downloads them: needs hub access)."""
    spec = model.spec
    for m, source in sources.items():
        encoder = model.encoders[m]
        if source in PRETRAINED_LIBRARIES:
            name = encoder_name(spec, m)
            size = (spec.get("input_sizes") or {}).get(m)
            fresh = build_encoder(name, m, input_size=size, pretrained=source)
            encoder.backbone.load_state_dict(fresh.backbone.state_dict())
        else:
            load_encoder_weights(encoder, read_state_dict(source, m), m, source)
