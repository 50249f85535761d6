"""The optimizer and learning-rate schedule of a run, built from its settings.

Its own module because the loop is not their only user: G-Blending's weight estimate trains
temporary copies of the model with an optimizer of the run's kind (avtrain.balance.gblending),
and a balancing method never imports the training loop.
"""

from __future__ import annotations

import torch

from avprep.errors import UserError

from .config import TrainConfig


def param_groups(config: TrainConfig, model) -> list[dict]:
    """The trainable parameters in groups: first everything at --lr (so the logged `lr`,
    group 0's, stays the run's), then one group per --lr-for modality (its encoder: backbone,
    pool and projection) at that modality's rate. Frozen parameters are left out."""
    rates = dict(config.lr_for or {})
    if not isinstance(model, torch.nn.Module):  # an iterable of parameters: one group
        if rates:
            raise UserError("--lr-for needs the model, not a list of its parameters")
        return [{"params": [p for p in model if p.requires_grad]}]
    encoders = getattr(model, "encoders", None)
    if rates and encoders is None:
        raise UserError("--lr-for sets an encoder's learning rate; this model has no "
                        "per-modality encoders")
    special = {m: {id(p) for p in encoders[m].parameters()} for m in rates}
    taken = set().union(*special.values()) if special else set()
    groups = [{"params": [p for p in model.parameters()
                          if p.requires_grad and id(p) not in taken]}]
    for m, lr in rates.items():
        groups.append({"params": [p for p in encoders[m].parameters() if p.requires_grad],
                       "lr": float(lr), "modality": m})
    return [g for g in groups if g["params"]]


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    """The run's optimizer over `params`: a model (per-modality learning rates, --lr-for,
    become parameter groups: `param_groups`) or an iterable of parameters (one group)."""
    groups = param_groups(config, params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer):
    if config.scheduler == "step":
        step = config.lr_step or max(1, round(0.7 * config.epochs))  # released: 70 of 100
        return torch.optim.lr_scheduler.StepLR(optimizer, step, config.lr_gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10**9, gamma=1.0)  # constant
