"""Weight initialisation schemes a run can ask for (`--init`), applied once after the model is
built and before it moves to the device, is wrapped in DDP or gets an optimizer.

`torch` (default): leave every module as PyTorch (and torchvision) built it.

`ogm_ge`: the initialisation of OGM-GE's released code (Peng et al., "Balanced Multimodal
Learning via On-the-fly Gradient Modulation", CVPR 2022; github.com/GeWu-Lab/OGM-GE_CVPR2022
at 343dc1d). Its main.py builds `AVClassifier(args)` (line 237) and then calls
`model.apply(weight_init)` (line 239) -- on the whole model, encoders and fusion alike, after the
seed (`setup_seed`, line 231) and before `model.to(device)` (240), DataParallel (242) and the
SGD optimizer (246). `weight_init` (utils/utils.py lines 15-23) dispatches on the module type,
first match wins:

    isinstance(m, nn.Linear)      -> xavier_normal_(weight), bias = 0
    isinstance(m, nn.Conv2d)      -> kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")
                                     (bias untouched; the released convs have none)
    isinstance(m, nn.BatchNorm2d) -> weight = 1, bias = 0   (running statistics untouched)

and nothing else (Conv1d/3d, BatchNorm1d, LayerNorm, embeddings keep their own init). The
visible change on the released model is the concat classifier: xavier-normal std
sqrt(2 / (1024 + C)) (0.044 for CREMA-D's 6 classes) instead of PyTorch's uniform bound
1/sqrt(1024) (std 0.018); the encoders' BatchNorm scales become exactly 1 (the released ResNet
drew them from N(1, 0.02), models/backbone.py line 105) and every conv kernel is drawn again.

`nn.Module.apply` visits the modules children first, in registration order, so the random
draws happen in our model's module order. The values therefore equal what the released
`weight_init` does *to our model*, with the same torch RNG state -- not the released model's
values for the same seed: its modules are built in another order, and building them already
consumed the RNG differently. The distributions are the released ones.

One deliberate difference: a Linear without bias is left without one (the released function
would fail on it; none of its modules has one).
"""

from __future__ import annotations

from torch import nn

from avprep.errors import UserError

INITS = ("torch", "ogm_ge")


def ogm_ge_weight_init(m: nn.Module) -> None:
    """The released `weight_init` for one module (utils/utils.py lines 15-23); use with
    `model.apply`, which calls it on every submodule, children first."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_normal_(m.weight)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.constant_(m.weight, 1)
        nn.init.constant_(m.bias, 0)


def apply_init(model: nn.Module, name: str = "torch") -> nn.Module:
    """Initialise `model` in place with scheme `name` (see the module docstring); returns it.

    Uses the global torch RNG, so call it right after seeding and building, on every rank.
    """
    if name not in INITS:
        raise UserError(f"--init must be one of {', '.join(INITS)}, got {name!r}")
    if name == "ogm_ge":
        model.apply(ogm_ge_weight_init)  # main.py line 239: the whole model
    return model
