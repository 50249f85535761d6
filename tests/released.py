"""Shared pieces of the differential tests against released code (test_olm_released.py,
test_ogm_released.py) and of the gloo DDP tests (test_balance_ddp.py).

- `ref_trunk`: the tiny encoder's layers in plain torch, for references written without avtrain;
- `make_batches` / `as_batch`: fixed audio-visual batches in which audio knows the label;
- `step_trainer`: a real `avtrain.loop.Trainer` for a tiny model, built the way
  `Trainer.__init__` builds it (`build_training_model`, optimizer, scheduler, balancer), without
  shards: only `Trainer.train_step` is meant to run;
- `run_gloo`: run a function in N gloo processes and collect what each returns.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

WIDTH = 32  # the tiny encoder's width (avtrain.models.encoders.tiny)


def ref_trunk(channels: int, bn: bool = True) -> nn.Sequential:
    """The tiny encoder's layers up to (not including) pooling: 3 strided conv blocks."""
    layers: list[nn.Module] = []
    for cin, cout in ((channels, WIDTH // 2), (WIDTH // 2, WIDTH), (WIDTH, 2 * WIDTH)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(cout) if bn else nn.Identity(), nn.ReLU()]
    return nn.Sequential(*layers)


def make_batches(seed: int, n: int, steps: int, classes: int):
    """`steps` (audio [n,1,16,16], visual [n,2,3,16,16] frames-first, labels) batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        y = torch.randint(0, classes, (n,), generator=g)
        audio = torch.randn(n, 1, 16, 16, generator=g)
        audio[:, 0, 0, :classes] += 2 * F.one_hot(y, classes)  # audio knows the label
        visual = torch.randn(n, 2, 3, 16, 16, generator=g)
        out.append((audio, visual, y))
    return out


def as_batch(item, part=slice(None)) -> dict:
    audio, visual, y = item
    return {"audio": audio[part], "visual": visual[part], "label": y[part]}


def step_trainer(method: str, fusion: str, classes: int, *, bn: bool = True, **settings):
    """A `Trainer` holding what `Trainer.__init__` builds for a tiny model on the CPU (no
    shards: only `train_step` runs). Seed torch before calling it for reproducible weights.
    `bn=False` replaces BatchNorm by Identity (DDP tests: per-rank statistics would differ
    from the global batch's)."""
    from avtrain import distributed as D
    from avtrain.balance import build_balancer
    from avtrain.config import make_config
    from avtrain.loop import Trainer, build_optimizer, build_scheduler, build_training_model

    c = make_config({"method": method, "model": "tiny", "fusion": fusion, "device": "cpu",
                     "amp": False, **settings})
    t = Trainer.__new__(Trainer)
    t.config, t.ctx, t.opts, t.step = c, D.Context(), None, 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    t.ctx.rank, t.ctx.world = (dist.get_rank(), world) if world > 1 else (0, 1)
    t.model = build_training_model(c, classes)
    if not bn:
        for enc in t.model.encoders.values():
            for i, layer in enumerate(enc.backbone):
                if isinstance(layer, nn.BatchNorm2d):
                    enc.backbone[i] = nn.Identity()
    t.optimizer = build_optimizer(c, t.model.parameters())
    t.scheduler = build_scheduler(c, t.optimizer)
    t.balancer = build_balancer(method, t.model, {**c.to_dict(), "world_size": world},
                                modalities=t.model.modalities)
    t.net = torch.nn.parallel.DistributedDataParallel(t.model) if world > 1 else t.model
    return t


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str, fn) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.save(fn(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn, out_dir, world: int = 2) -> list:
    """`fn(rank, world)` in `world` spawned processes joined in one gloo group; returns what
    each rank's call returned (tensors, dicts, lists: saved and loaded weights-only).
    `fn` must be a module-level function (it is pickled by name)."""
    out_dir = str(out_dir)
    mp.spawn(_gloo_worker, args=(world, os.path.join(out_dir, "init"), out_dir, fn),
             nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True)
            for r in range(world)]
