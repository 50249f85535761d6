"""The interface every balancing method implements, and the plain baseline (`none`).

The training loop drives a method through these hooks, once per step:

    logits = model(batch)                       # {"fused": ..., "audio": ..., "visual": ...}
    if balancer.needs_heldout:                  # OLM-com: a `val` batch, never `test`, with
        with torch.no_grad():                   # this step's weights (before the update)
            balancer.heldout(model(val_batch), val_labels)
    loss = balancer.loss(logits, labels, epoch=e, step=s)
    loss.backward()
    balancer.before_optimizer_step(logits, labels, epoch=e, step=s)   # may rescale gradients
    optimizer.step()
    balancer.after_optimizer_step()             # e.g. OLM's own coefficient optimizer

and `end_epoch(epoch)` after each epoch. `step_metrics()` returns 0-d tensors that the loop
turns into numbers only when it logs, so no method forces a host sync per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Balancer:
    name = "none"
    needs_heldout = False  # the loop feeds a held-out (val) batch every step
    trained_unimodal_heads = False  # the model's per-modality heads must train the encoders

    def __init__(self, model: nn.Module, config: dict | None = None, *,
                 modalities: list[str] | None = None, device: torch.device | str = "cpu"):
        self.model = model
        self.config = dict(config or {})
        self.modalities = list(modalities or getattr(model, "modalities", ["audio", "visual"]))
        self.device = torch.device(device)

    def loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, *, epoch: int,
             step: int) -> torch.Tensor:
        """The network's training loss; the baseline is CE on the fused logits."""
        return F.cross_entropy(logits["fused"].float(), labels)

    def before_optimizer_step(self, logits: dict[str, torch.Tensor], labels: torch.Tensor, *,
                              epoch: int, step: int) -> None:
        """Called after `backward()`: gradient modulation happens here."""

    def after_optimizer_step(self) -> None:
        """Called after the network's optimizer stepped."""

    def heldout(self, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """A held-out batch's logits (no grad), for methods with `needs_heldout`; called after
        the training forward and before `loss()`, so the step sees this batch's losses."""

    def end_epoch(self, epoch: int) -> None:
        """Called once after each training epoch."""

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """What this step did (scores, coefficients, weights), as 0-d tensors."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
