"""The optimizer and learning-rate schedule of a run, built from its settings.

Its own module because the loop is not their only user: G-Blending's weight estimate trains
temporary copies of the model with an optimizer of the run's kind (avtrain.balance.gblending),
and a balancing method never imports the training loop.
"""

from __future__ import annotations

import torch

from .config import TrainConfig


def build_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer):
    if config.scheduler == "step":
        step = config.lr_step or max(1, round(0.7 * config.epochs))  # released: 70 of 100
        return torch.optim.lr_scheduler.StepLR(optimizer, step, config.lr_gamma)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=10**9, gamma=1.0)  # constant
