"""Per-modality encoders: a batch tensor in, one feature vector per clip out.

Registry by name. `resnet18` is torchvision's ResNet-18 built with `weights=None` (trained from
scratch, as the OGM-GE/OLM seeds; nothing is downloaded), with a 1-channel stem for
spectrograms. `tiny` is a three-conv network for CPU tests and the demo. Visual encoders take
[B, T, 3, H, W]: the T frames are folded into the batch and their features averaged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from avprep.errors import UserError

IN_CHANNELS = {"audio": 1, "visual": 3}


class FrameAveraged(nn.Module):
    """Runs a 2-D image encoder on every frame and averages the features over time."""

    def __init__(self, backbone: nn.Module, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # a single frame per clip
            return self.backbone(x)
        b, t = x.shape[:2]
        feats = self.backbone(x.reshape(b * t, *x.shape[2:]))
        return feats.reshape(b, t, -1).mean(dim=1)


class Plain(nn.Module):
    """An image-shaped input (a spectrogram [B, 1, F, T]) straight through the backbone."""

    def __init__(self, backbone: nn.Module, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def _wrap(modality: str, backbone: nn.Module, out_dim: int) -> nn.Module:
    return FrameAveraged(backbone, out_dim) if modality == "visual" else Plain(backbone, out_dim)


def resnet18(modality: str) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None)
    channels = IN_CHANNELS[modality]
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.fc = nn.Identity()
    return _wrap(modality, net, 512)


def tiny(modality: str, width: int = 32) -> nn.Module:
    """Three strided 3x3 conv blocks and global average pooling; `2*width` features."""
    c = IN_CHANNELS[modality]
    layers: list[nn.Module] = []
    for cin, cout in ((c, width // 2), (width // 2, width), (width, 2 * width)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _wrap(modality, nn.Sequential(*layers), 2 * width)


ENCODERS: dict[str, Callable[[str], nn.Module]] = {"resnet18": resnet18, "tiny": tiny}


def build_encoder(name: str, modality: str) -> nn.Module:
    if name not in ENCODERS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(sorted(ENCODERS))}")
    if modality == "text":  # transcripts: the built-in byte-level encoder, sized by `name`
        from .text import build_text_encoder

        return build_text_encoder(name)
    if modality not in IN_CHANNELS:
        raise UserError(f"unknown modality {modality!r}; choose from: {', '.join(IN_CHANNELS)}")
    return ENCODERS[name](modality)
