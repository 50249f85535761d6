"""Evaluating models: one split of a shard set, a saved checkpoint, a finished run's best epoch.

    metrics = evaluate_checkpoint("RUN/best.pt", "OUT", split="test")
    probe = probe_checkpoint("RUN/best.pt", "OUT")

`evaluate` is what the loop runs after every epoch; `best_epoch_evaluations` what it runs once
at the end, on best.pt (Shapley shares, linear probe); `evaluate_checkpoint` and
`probe_checkpoint` are `avtrain eval`. The training loop, the linear probe (avtrain.probe) and
this module stay apart: the loop imports this module, this module imports the probe, never the
other way round.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import torch
import torch.nn.functional as F

from avprep.errors import UserError

from . import distributed as D
from .checkpoint import bare_model, load_checkpoint, model_from_checkpoint
from .data import ShardSet, eval_loader, open_shards
from .decode import DataOptions, check_decode_device, to_device
from .metrics import summarize
from .models import model_from_spec
from .probe import linear_probe
from .shapley import shapley_summary, subsets, zero_absent


def autocast(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA with --amp (training and evaluation alike), else nothing."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model, shards: ShardSet, split: str, opts: DataOptions, *, batch_size: int,
             ctx: D.Context | None = None, workers: int = 2, amp: bool = True,
             progress: bool = False, shapley: bool = False) -> dict:
    """Metrics of `model` on one split: every sample exactly once across ranks, gathered and
    summarised on every rank (acc, acc_<modality>, macro_f1, confusion, loss, n). `shapley`
    adds each modality's Shapley contribution to the fused accuracy (avtrain.shapley: one more
    forward per proper subset of the modalities, absent inputs zeroed)."""
    ctx = ctx or D.Context()
    bare = bare_model(model)
    was_training = bare.training
    bare.eval()
    labels, keys, preds, loss_sum = [], [], {}, 0.0
    partial = subsets(bare.modalities)[:-1] if shapley else []  # the full set is `fused`
    subset_preds: dict[tuple, list] = {s: [] for s in partial}
    loader = eval_loader(shards, split, opts, batch_size=batch_size, rank=ctx.rank,
                         world=ctx.world, workers=workers, device_type=ctx.device.type)
    bar = progress_bar(loader, progress and ctx.main, f"eval {split}", None)
    skipped = 0
    for batch in bar:
        skipped += len(batch.pop("skipped", ()))  # damaged samples: counted, not fatal
        batch = to_device(batch, ctx.device, opts)
        with autocast(ctx.device, amp):
            logits = bare(batch)
        y = batch["label"]
        loss_sum += float(F.cross_entropy(logits["fused"].float(), y, reduction="sum"))
        for name, value in logits.items():
            preds.setdefault(name, []).append(value.argmax(dim=1).cpu().numpy())
        for subset in partial:
            with autocast(ctx.device, amp):
                fused = bare(zero_absent(batch, subset, bare.modalities))["fused"]
            subset_preds[subset].append(fused.argmax(dim=1).cpu().numpy())
        labels.append(y.cpu().numpy())
        keys.extend(batch["key"])
    if was_training:
        bare.train()
    local = {"keys": keys, "labels": _cat(labels), "loss": loss_sum, "skipped": skipped,
             "preds": {k: _cat(v) for k, v in preds.items()},
             "subsets": {s: _cat(v) for s, v in subset_preds.items()}}
    parts = D.gather_objects(local, ctx)
    all_keys = [k for p in parts for k in p["keys"]]
    if not all_keys:
        raise UserError(f"{shards.root}: no samples could be read from the {split!r} split")
    y = np.concatenate([p["labels"] for p in parts])
    names = [n for n in parts[0]["preds"]] or [n for p in parts for n in p["preds"]]
    merged = {n: np.concatenate([p["preds"][n] for p in parts if n in p["preds"]])
              for n in names}
    result = summarize(y, merged, shards.num_classes,
                       loss=sum(p["loss"] for p in parts) / len(all_keys))
    if partial:
        correct = {s: float(np.mean(np.concatenate([p["subsets"][s] for p in parts]) == y))
                   for s in partial}
        result["shapley"] = shapley_summary({**correct, tuple(bare.modalities): result["acc"]},
                                            bare.modalities)
    result["split"] = split
    result["expected"] = shards.samples(split)
    result["duplicates"] = len(all_keys) - len(set(all_keys))
    result["skipped"] = sum(p["skipped"] for p in parts)
    return result


def _cat(arrays):
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


def progress_bar(iterable, enabled: bool, desc: str, total):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


def cache_bytes(size: str | int | None) -> int | None:
    """--cache-size as bytes (500M, 20G, ...); None keeps the default (10G)."""
    from avprep.shards import parse_size

    return parse_size(size) if size not in (None, "") else None


def data_options(cfg: dict, shards: ShardSet, modalities, image_size=None, frames=None,
                 decode_device="cpu") -> DataOptions:
    """A run's data options (`cfg`: its settings, e.g. a checkpoint's config) for these shards;
    `image_size` and `frames` override the run's."""
    return DataOptions.for_shards(
        shards, modalities=modalities, image_size=image_size or cfg.get("image_size") or 224,
        frames=frames or cfg.get("frames"), crop_columns=cfg.get("crop_columns"),
        decode_device=decode_device, eval_crop=cfg.get("eval_crop") or "centre",
        eval_resize=cfg.get("eval_resize") or "crop", train_crop=cfg.get("train_crop") or "clip",
        eval_seed=int(cfg.get("seed") or 0))


def evaluate_checkpoint(ckpt_path: str, shards_path: str, *, split: str = "test",
                        batch_size: int = 64, workers: int = 2, device: str = "auto",
                        decode_device: str = "cpu", image_size: int | None = None,
                        frames: int | None = None, amp: bool = True,
                        progress: bool = False, cache_dir: str | None = None,
                        cache_size: str | int | None = None, shapley: bool = False) -> dict:
    """Load a checkpoint and evaluate it on one split of a shard set (also under torchrun)."""
    ckpt = load_checkpoint(ckpt_path)
    shards = open_shards(shards_path, cache_dir, cache_bytes(cache_size))
    shards.require(split)
    check_decode_device(decode_device)
    ctx = D.setup(device)
    try:
        model = model_from_checkpoint(ckpt, shards).to(ctx.device)
        opts = data_options(ckpt.get("config") or {}, shards, model.modalities, image_size,
                            frames, decode_device)
        result = evaluate(model, shards, split, opts, batch_size=batch_size, ctx=ctx,
                          workers=workers, amp=amp, progress=progress,
                          shapley=shapley and len(model.modalities) > 1)
        result["checkpoint"] = ckpt["path"]
        result["epoch"] = ckpt.get("epoch")
        return result
    finally:
        D.teardown(ctx)


def probe_checkpoint(ckpt_path: str, shards_path: str, *, test_split: str = "test",
                     batch_size: int = 64, workers: int = 2, device: str = "auto",
                     decode_device: str = "cpu", amp: bool = True, cache_dir: str | None = None,
                     cache_size: str | int | None = None) -> dict:
    """`avtrain eval --linear-probe`: the probe of a saved checkpoint's encoders."""
    ckpt = load_checkpoint(ckpt_path)
    shards = open_shards(shards_path, cache_dir, cache_bytes(cache_size))
    check_decode_device(decode_device)
    ctx = D.setup(device)
    try:
        model = model_from_checkpoint(ckpt, shards).to(ctx.device)
        cfg = ckpt.get("config") or {}
        opts = data_options(cfg, shards, model.modalities, decode_device=decode_device)
        result = linear_probe(model, shards, opts, batch_size=batch_size, ctx=ctx,
                              workers=workers, amp=amp, test_split=test_split,
                              seed=int(cfg.get("seed", 0)))
        result["checkpoint"] = ckpt["path"]
        return result
    finally:
        D.teardown(ctx)


def best_epoch_evaluations(trainer, ctx: D.Context) -> dict:
    """What a finished run measures once, on its best epoch's model (best.pt): "shapley" (each
    modality's Shapley share; --shapley, two or more modalities) and "linear_probe"
    (--linear-probe). All ranks call it (DDP)."""
    c = trainer.config
    shapley = c.shapley and len(trainer.model.modalities) > 1
    out: dict = {}
    best = best_model(trainer, ctx) if c.linear_probe or shapley else None
    if shapley:
        out["shapley"] = modality_shapley(best, trainer, ctx)
    if c.linear_probe:
        out["linear_probe"] = linear_probe(
            best, trainer.shards, trainer.opts, batch_size=c.eval_batch_size or c.batch_size,
            ctx=ctx, workers=c.workers, amp=c.amp, seed=c.seed)
    return out


def best_model(trainer, ctx: D.Context) -> torch.nn.Module:
    """A fresh model holding best.pt's weights, on the device. Rank 0 wrote best.pt; the other
    ranks (maybe on other machines) get its weights from it."""
    c = trainer.config
    state = load_checkpoint(os.path.join(c.run_dir, "best.pt"))["model"] if ctx.main else None
    best = model_from_spec(trainer.spec, index=trainer.shards.index, options=c.model_options)
    best.load_state_dict(D.broadcast_object(state, ctx))
    return best.to(ctx.device)


def modality_shapley(model, trainer, ctx: D.Context) -> dict:
    """{split: each modality's Shapley contribution to the fused accuracy} of the best epoch's
    model on val (and test when the shards have it), as BalanceMM evaluates a trained model."""
    c = trainer.config
    splits = [c.val_split] + ([c.test_split] if trainer.has_test
                              and c.test_split != c.val_split else [])
    return {split: evaluate(model, trainer.shards, split, trainer.opts,
                            batch_size=c.eval_batch_size or c.batch_size, ctx=ctx,
                            workers=c.workers, amp=c.amp, shapley=True)["shapley"]
            for split in splits}
