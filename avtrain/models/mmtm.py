"""MMTM blocks between the audio and visual encoders' stages: the cross-modal "bypass" of Greedy.

Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in
Multi-modal Deep Neural Networks", ICML 2022; github.com/nyukat/greedy_multimodal_learning
(a190e03), src/balanced_mmtm.py `MMTM_mitigate` (lines 16-154) as src/model.py `MMTM_MVCNN`
places it (lines 58-60, 81-97: after ResNet-18 layers 2, 3 and 4 of both branches, squeeze
ratio 4). BalanceMM's port (GeWu-Lab/BalanceBenchmark 4c1482f, balancemm/models/
avclassify_model.py `BaseClassifierGreedyModel` 387-534 and `MMTM` 537-624) puts one more after
layer 1 and handles video; we keep the authors' three positions and take BalanceMM's frame
handling. Built by `AVModel(..., mmtm=True)`, which `--method greedy` asks for.

One block, for the two modalities' stage outputs x_a [B, C_a, ...], x_v [B*T, C_v, H, W]:

    s_m = mean of x_m over every axis but batch and channel (the T frames of a clip too)
    e = relu(fc_squeeze([s_a; s_v]))              # Linear(C_a + C_v -> 2 (C_a + C_v) / 4)
    g_m = sigmoid(fc_excite[m](e))                 # Linear(-> C_m), one gate per channel
    x_m <- x_m * g_m (broadcast over space and frames)

A training forward also keeps, per block and modality, the running mean of g_m over all
training forwards so far (the batch mean of g_m folded in before it is used, released lines
113-116). Under `caring` = modality index i (a *re-balancing step* for modality i, the
released `curation_mode` with `caring_modality`), g_i is replaced by that running mean: the
other modality's information no longer reaches branch i, whose own features must carry it
(released lines 135-152). `torch.where` does the replacement, so fc_excite[i] gets zero
gradients instead of none (what the released torch-1.x `zero_grad()` left there) and DDP sees
every parameter used.

Differences from the released block, all deliberate:
- the running means are updated by training forwards only (the released one also counts the
  val and test forwards of every epoch, so test data would steer training), are buffers
  (saved, exact --resume) and, under DDP, fold in the mean of g over the *global* batch (one
  all-reduce), so every rank replaces with the same numbers;
- `average="own"` (default): each modality's running mean is of its own gates, as the paper
  describes and BalanceMM does; `average="released"`: the second modality's running mean
  accumulates the *first* modality's gates, as released line 114 does (a copy-paste slip;
  kept for exact comparison);
- eval forwards never replace gates (the released eval loop passes the last training step's
  curation mode on to val and test).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from avprep.errors import UserError

RATIO = 4  # released MMTM(128, 128, 4), MMTM(256, 256, 4), MMTM(512, 512, 4)


def _global_mean_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


class MMTMBlock(nn.Module):
    def __init__(self, modalities: list[str], dims: list[int], ratio: int = RATIO):
        super().__init__()
        self.modalities = list(modalities)
        total = sum(dims)
        hidden = int(2 * total / ratio)
        self.fc_squeeze = nn.Linear(total, hidden)
        self.fc_excite = nn.ModuleDict({m: nn.Linear(hidden, d)
                                        for m, d in zip(self.modalities, dims)})
        for m, d in zip(self.modalities, dims):
            self.register_buffer(f"avg_{m}", torch.zeros(d))
        self.register_buffer("count", torch.zeros(()))

    def forward(self, xs: dict[str, torch.Tensor], frames: dict[str, int], *,
                caring: torch.Tensor | None, average: str) -> dict[str, torch.Tensor]:
        mods = self.modalities
        squeezed = []
        for m in mods:
            x, t = xs[m], frames[m]
            squeezed.append(x.reshape(x.shape[0] // t, t, x.shape[1], -1).mean(dim=(1, 3)))
        excitation = torch.relu(self.fc_squeeze(torch.cat(squeezed, dim=1)))
        gates = {m: torch.sigmoid(self.fc_excite[m](excitation)) for m in mods}
        if self.training:
            with torch.no_grad():
                means = torch.cat([gates[m].float().mean(dim=0) for m in mods])
                _global_mean_(means)
                means = list(torch.split(means, [gates[m].shape[1] for m in mods]))
                if average == "released":
                    means[1] = means[0]
                n = self.count
                for m, mean in zip(mods, means):
                    avg = getattr(self, f"avg_{m}")
                    avg.copy_((mean + avg * n) / (n + 1))
                self.count.add_(1)
            if caring is not None:
                for i, m in enumerate(mods):
                    avg = getattr(self, f"avg_{m}").to(gates[m].dtype).expand_as(gates[m])
                    gates[m] = torch.where(caring == i, avg, gates[m])
        out = {}
        for m in mods:
            x, g, t = xs[m], gates[m], frames[m]
            g = g.unsqueeze(1).expand(g.shape[0], t, g.shape[1]).reshape(x.shape[0], -1)
            out[m] = x * g.reshape(g.shape + (1,) * (x.dim() - 2)).to(x.dtype)
        return out


# children of a timm model that belong to its head (`forward_head`), not to its stages
TIMM_HEAD = ("global_pool", "head_drop", "fc_norm", "head", "fc", "classifier")


class _Head(nn.Module):
    """A timm model's `forward_head` as a layer (pooling; its classifier is Identity)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.forward_head = backbone.forward_head

    def forward(self, x):
        return self.forward_head(x)


def _timm_stages(backbone: nn.Module):
    """A timm model cut at its `feature_info` stages (the modules timm's `features_only`
    returns): its children in order (a Sequential holding stages flattened one level), up to
    the head, which `forward_head` runs. Right only where the model's forward is its children
    in order: `MMTMFusionTrunk` checks that once on a random input."""
    names = [f["module"] for f in backbone.feature_info]
    layers = []
    for name, child in backbone.named_children():
        if name in TIMM_HEAD:
            break
        if isinstance(child, nn.Sequential) and any(n.startswith(name + ".") for n in names):
            layers += [(f"{name}.{sub}", c) for sub, c in child.named_children()]
        else:
            layers.append((name, child))
    order = [n for n, _ in layers]
    if not all(n in order for n in names):
        raise UserError("MMTM blocks need an encoder whose feature stages are its layers")
    cuts = [order.index(n) + 1 for n in names]
    stages = [nn.Sequential(*[c for _, c in layers[a:b]]) for a, b in zip([0, *cuts], cuts)]
    tail = [c for _, c in layers[cuts[-1]:]] + [_Head(backbone)]
    return stages, tail, [int(f["num_chs"]) for f in backbone.feature_info]


def encoder_stages(backbone: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[int]]:
    """(stages, tail, stage widths) of a resnet18 or tiny backbone: ResNet-18's stem + layer1,
    layer2, layer3, layer4 and its pooling; tiny's three conv blocks and its pooling; a timm
    model's `feature_info` stages and its head. Read from the backbone at every call, so a
    test that swaps a layer sees it."""
    from torchvision.models import ResNet

    if isinstance(backbone, ResNet):
        stem = [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool, backbone.layer1]
        stages = [nn.Sequential(*stem), backbone.layer2, backbone.layer3, backbone.layer4]
        widths = [64, 128, 256, 512]
        tail = [backbone.avgpool, nn.Flatten(), backbone.fc]
        return stages, tail, widths
    if isinstance(backbone, nn.Sequential):
        layers = list(backbone)
        starts = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Conv2d)]
        end = next(i for i, layer in enumerate(layers) if isinstance(layer, nn.AdaptiveAvgPool2d))
        bounds = [*starts, end]
        stages = [nn.Sequential(*layers[a:b]) for a, b in zip(bounds, bounds[1:])]
        widths = [layers[i].out_channels for i in starts]
        return stages, layers[end:], widths
    if isinstance(getattr(backbone, "feature_info", None), list) and hasattr(backbone,
                                                                             "forward_head"):
        return _timm_stages(backbone)
    raise UserError("MMTM blocks need resnet18, tiny or timm encoders with feature stages")


def _check_stages(encoder: nn.Module, modality: str, name: str) -> None:
    """The stages run one after another give the backbone's own output (one eval forward of
    a random 64x64 input, its own generator: the run's RNG is untouched), or one Error line:
    the model's forward does more than its layers in order (a ViT adds position embeddings)."""
    backbone = encoder.backbone
    stages, tail, _ = encoder_stages(backbone)
    channels = 1 if modality == "audio" else 3
    x = torch.randn(2, channels, 64, 64, generator=torch.Generator().manual_seed(0))
    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            want = backbone(x)
            got = x
            for layer in [*stages, *tail]:
                got = layer(got)
        same = got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)
    except Exception:  # noqa: BLE001 - a fixed input size, a stage that needs more
        same = False
    finally:
        backbone.train(was)
    if not same:
        raise UserError(f"MMTM blocks (--method greedy) go between encoder stages; the "
                        f"{modality} encoder {name!r} does not run as its feature stages in "
                        "order (a ViT's blocks need its embeddings): use resnet18, tiny or a "
                        "convolutional timm model")


class MMTMFusionTrunk(nn.Module):
    """The MMTM blocks of a two-modality model and the interleaved forward of its encoders.
    Blocks sit after every stage but the first (ResNet-18: layers 2-4, as released)."""

    def __init__(self, encoders: nn.ModuleDict, modalities: list[str]):
        super().__init__()
        if list(modalities) != ["audio", "visual"]:
            raise UserError(f"--method greedy puts MMTM blocks between the audio and visual "
                            f"encoders and is defined for those two modalities, got "
                            f"{', '.join(modalities)}")
        self.modalities = list(modalities)
        for m in self.modalities:
            if not isinstance(encoders[m].backbone, nn.Sequential) and hasattr(
                    encoders[m].backbone, "feature_info"):
                _check_stages(encoders[m], m, type(encoders[m].backbone).__name__)
        widths = [encoder_stages(encoders[m].backbone)[2] for m in self.modalities]
        if len({len(w) for w in widths}) != 1:
            raise UserError("MMTM blocks need encoders with the same number of stages")
        self.blocks = nn.ModuleList(
            [MMTMBlock(self.modalities, [w[i] for w in widths]) for i in range(1, len(widths[0]))])
        self.caring: torch.Tensor | None = None  # set by Greedy for its training forward
        self.average = "own"

    def forward(self, encoders: nn.ModuleDict, batch: dict) -> dict[str, torch.Tensor]:
        xs, frames, clips = {}, {}, {}
        for m in self.modalities:
            x = batch[m]
            clips[m] = x.shape[0]
            frames[m] = x.shape[1] if (m == "visual" and x.dim() == 5) else 1
            # clips' frames folded into the batch, one frame too ([B, 1, C, H, W] -> [B, C, H, W])
            xs[m] = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) if frames[m] > 1 or (
                m == "visual" and x.dim() == 5) else x
        parts = {m: encoder_stages(encoders[m].backbone) for m in self.modalities}
        caring = self.caring if self.training else None
        for i in range(len(parts[self.modalities[0]][0])):
            xs = {m: parts[m][0][i](xs[m]) for m in self.modalities}
            if i >= 1:
                xs = self.blocks[i - 1](xs, frames, caring=caring, average=self.average)
        feats = {}
        for m in self.modalities:
            f = xs[m]
            for layer in parts[m][1]:
                f = layer(f)
            if frames[m] > 1:
                f = encoders[m].temporal(f.reshape(clips[m], frames[m], -1))
            feats[m] = encoders[m].out(f)
        return feats
