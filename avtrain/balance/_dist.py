"""The two collectives the balancing methods need, and nothing when there is one process.

The methods run inside the training loop's process group (DDP under torchrun), so they ask
torch.distributed directly instead of taking a context object: a method built in a plain
script or a test works unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks in place (stays on the device: no host sync on NCCL)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_(t: torch.Tensor) -> torch.Tensor:
    """Average `t` over all ranks in place."""
    n = world_size()
    if n > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(n)
    return t


def broadcast_buffers(modules) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, before an eval-mode pass: DDP
    broadcasts them at each training forward, and the last step updated them per rank."""
    if world_size() > 1:
        for module in modules:
            for buf in module.buffers():
                dist.broadcast(buf, src=0)
