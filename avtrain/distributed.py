"""Process-group setup for `torchrun` (NCCL on GPU, gloo on CPU) and small collectives.

Everything works unchanged in a single process: `world == 1` and the collectives return their
input. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; nothing else is needed.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from avprep.errors import UserError

if dist.is_available():
    # Imported here, before any process group exists, on purpose: this torch module binds
    # `group.WORLD` into its functions' default arguments when it is first imported, and
    # DDP's constructor imports it (through torch._dynamo). First imported after
    # init_process_group, it holds the group for good, so destroy_process_group cannot free
    # it: gloo's worker threads outlive the teardown and run into interpreter shutdown, where
    # one still releasing a collective's tensor needs the GIL and aborts the process
    # ("terminate called without an active exception", SIGABRT). Imported now, the defaults
    # are None and the teardown below really stops those threads.
    import torch.distributed.nn.functional  # noqa: F401


@dataclass
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we initialised the process group, so we tear it down

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda needs a CUDA GPU, and torch sees none on this machine; "
                        "use --device cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))


def setup(device: str = "auto") -> Context:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Context(0, 1, 0, dev, False)
    if dev.type == "cuda":
        check_one_gpu_per_process(int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                                  torch.cuda.device_count())
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                **({"device_id": dev} if dev.type == "cuda" else {}))
        owns = True
    return Context(rank, world, local_rank, dev, owns)


def check_one_gpu_per_process(local_processes: int, gpus: int) -> None:
    """NCCL refuses two ranks on one GPU ("Duplicate GPU detected", a traceback from every
    rank; seen on a one-GPU machine with --nproc_per_node 2): say it in one line first."""
    if local_processes > gpus:
        raise UserError(f"torchrun started {local_processes} processes on this machine and torch "
                        f"sees {gpus} GPU(s); NCCL needs one GPU per process: use "
                        f"--nproc_per_node {gpus}, or --device cpu (gloo)")


def teardown(ctx: Context) -> None:
    """Leave the process group in order. After a successful run every rank first meets the
    others at a barrier, so none destroys its group (closing its connections) while another
    is still inside a collective; destroy_process_group then joins gloo's threads (see the
    import at the top), so none is left running when the interpreter shuts down. Called from
    a `finally` while an exception propagates, it skips the barrier: the other ranks may be
    inside another collective, or gone, and a barrier would hang."""
    if not (ctx.owns_group and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    # a DDP wrapper or balancer left in a reference cycle still holds the group, and with it
    # gloo's threads, until the cycle collector happens to run: collect it now, so destroying
    # the group really ends them (found by a gloo test whose thread outlived the group)
    gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_objects(obj, ctx: Context) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def gather_objects_to_main(obj, ctx: Context) -> list | None:
    """Every rank's `obj`, in rank order, on rank 0 only (None elsewhere): what only rank 0
    works on need not be held by every rank."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world if ctx.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, ctx: Context):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
