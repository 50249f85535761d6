"""fit: the training loop, top to bottom.

    summary = fit(make_config({"shards": "OUT", "run_dir": "RUN", "model": "tiny"}))

One `fit` call trains one run directory: RUN/config.yaml, RUN/metrics.jsonl (per-step and
per-epoch records), TensorBoard events in RUN/tb, RUN/last.pt every epoch, RUN/best.pt by
validation accuracy and RUN/summary.json at the end. Under `torchrun` every rank runs the same
code; rank 0 writes files. The balancing method is driven exactly as
`avtrain.balance.base` documents. Evaluation (each epoch, and of best.pt at the end) is
avtrain.evaluate; the optimizer and schedule avtrain.optim; the run directory's files (a new
run refused on an old one, the log trimmed on resume) avtrain.rundir.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from avprep.errors import UserError

from . import distributed as D
from .balance import build_balancer, get_method
from .balance.base import EpochContext, StepContext
from .balance.plugins import check_metrics, check_step_result
from .checkpoint import (
    bare_model,
    check_compatible,
    load_checkpoint,
    load_model_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_digest,
)
from .config import (
    TrainConfig,
    require_run_paths,
    resolve_alpha,
    selection_protocol,
    to_yaml,
)
from .data import eval_loader, open_shards, train_loader
from .decode import check_decode_device, to_device
from .evaluate import (
    autocast,
    best_epoch_evaluations,
    cache_bytes,
    data_options,
    evaluate,
    progress_bar,
)
from .imbalance import LogitNorms, epoch_probe
from .metrics import RunLog
from .models import MODEL_FLAGS, SEQUENCE_MODELS, build_model
from .models.encoders import input_sizes, load_pretrained
from .models.init import apply_init
from .optim import build_optimizer, build_scheduler
from .rundir import check_run_dir, clear_run_dir, trim_log, write_text
from .settings import make_config


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_training_model(config: TrainConfig, num_classes: int, *,
                         index: dict | None = None, pretrained: bool = True) -> torch.nn.Module:
    """The model a run trains: `build_model` for the config and its method, then the `--init`
    scheme (avtrain.models.init), then the `--pretrained` weights (`pretrained=False` on
    resume: the checkpoint holds the weights), then `--freeze`. It draws from the global torch
    RNG, so call it right after `_seed_everything`: every DDP rank then builds identical
    weights, as the released OGM-GE main.py builds and initialises its model right after
    `setup_seed` (lines 231-239)."""
    method = get_method(config.method)
    sequence = config.model in SEQUENCE_MODELS
    names = {m: config.encoders.get(m, config.model) for m in config.modalities}
    model = build_model(config.model, method.model_fusion(config.fusion), num_classes,
                        config.modalities,
                        trained_unimodal_heads=method.trained_unimodal_heads, index=index,
                        options=config.model_options,
                        **({} if sequence else {
                            "encoders": config.encoders, "temporal_pool": config.temporal_pool,
                            "feature_dim": config.feature_dim,
                            "input_sizes": input_sizes(names, index, config.image_size,
                                                       config.crop_columns)}),
                        **{flag: getattr(method, flag) for flag in MODEL_FLAGS})
    model = apply_init(model, config.init)
    if pretrained and config.pretrained:
        load_pretrained(model, config.pretrained)
    if config.freeze:
        model.freeze(config.freeze)
    return model


def auxiliary_loss(model, logits: dict, labels: torch.Tensor) -> torch.Tensor | None:
    """CE of the detached auxiliary heads of non-decomposable fusions: trains only those heads
    (their inputs are detached), so each modality's accuracy can be measured."""
    bare = bare_model(model)
    if bare.unimodal or bare.fusion.decomposable or bare.trained_unimodal_heads:
        return None
    return sum(F.cross_entropy(logits[m].float(), labels) for m in bare.modalities)


def _floats(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().float().cpu()
            out[key] = value.item() if value.numel() == 1 else value.tolist()
        else:
            out[key] = value
    return out


# --- training -----------------------------------------------------------------------------


class Trainer:
    """State of one run; `fit()` below is the readable entry point."""

    def __init__(self, config: TrainConfig, ctx: D.Context, resume: str | None):
        self.config, self.ctx = config, ctx
        c = config
        check_decode_device(c.decode_device)
        self.shards = open_shards(c.shards, c.cache_dir, cache_bytes(c.cache_size))
        self.shards.require("train")
        self.shards.require(c.val_split)
        self.has_test = self.shards.samples(c.test_split) > 0
        self.opts = data_options(c.to_dict(), self.shards, c.modalities,
                                  decode_device=c.decode_device)
        self.warned: set[tuple[str, str]] = set()  # damaged samples already named
        self.train_items = self._check_split("train")
        self.shards.require("train", c.batch_size, ctx.world, items=self.train_items)
        if get_method(c.method).needs_heldout:
            self.heldout_items = self._check_split(c.val_split)
        self.steps = self._steps_per_epoch()
        _seed_everything(c.seed)
        self.model = build_training_model(c, self.shards.num_classes, index=self.shards.index,
                                          pretrained=not resume)
        self.spec = self.model.spec
        self.model.to(ctx.device)
        if ctx.device.type == "cuda" and c.channels_last:  # NHWC conv weights: cuDNN's fast kernels
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(c, self.model)
        self.scheduler = build_scheduler(c, self.optimizer)
        self.balancer_config = {**c.to_dict(), "alpha": resolve_alpha(
                                    c, self.shards.dataset, get_method(c.method).option_default("alpha")),
                                "dataset": self.shards.dataset,
                                "num_classes": self.shards.num_classes,
                                "steps_per_epoch": self.steps, "world_size": ctx.world,
                                "split_samples": {"train": self.shards.samples("train"),
                                                  c.val_split: self.shards.samples(c.val_split)}}
        self.balancer = build_balancer(c.method, self.model, self.balancer_config,
                                       modalities=self.model.modalities, device=ctx.device)
        self.start_epoch, self.step = 0, 0
        self.best = {"epoch": None, "acc": -1.0, "val": None, "test": None}
        self.wall_before = 0.0  # seconds spent by earlier (interrupted) sessions of this run
        if resume:
            self._resume(resume)
        self.net = self.model
        if ctx.distributed:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        if c.compile:
            self.net = torch.compile(self.net)

    # -- checkpoints --

    def _resume(self, path: str) -> None:
        ckpt = load_checkpoint(path if not os.path.isdir(path) else os.path.join(path, "last.pt"))
        check_compatible(ckpt, num_classes=self.shards.num_classes, classes=self.shards.classes,
                         spec=self.spec)
        load_model_state(self.model, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.balancer.load_state_dict(ckpt.get("balancer") or {})
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.step = int(ckpt["step"])
        self.best = dict(ckpt.get("best") or self.best)
        self.wall_before = float(ckpt.get("wall_time", 0.0))
        if ckpt.get("rng"):
            set_rng_state(ckpt["rng"])

    def _state(self, epoch: int, metrics: dict, wall: float) -> dict:
        return {
            "model": bare_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "balancer": self.balancer.state_dict(),
            "epoch": epoch, "step": self.step, "rng": rng_state(),
            "config": self.config.to_dict(), "spec": self.spec,
            "classes": self.shards.classes, "dataset": self.shards.dataset,
            "best": self.best, "metrics": metrics, "wall_time": wall,
            "world_size": self.ctx.world,
        }

    # -- the data --

    def _check_split(self, split: str) -> int:
        """Items in one pass over `split`. With exact sampling its sample table is built here
        (once), and its damaged samples are named once (or refused under --strict) before any
        step; each epoch still counts them in train_skipped."""
        if self.config.sampling != "exact":
            return self.shards.samples(split)
        from .sampling import needed_members, sample_table

        table = sample_table(self.shards, split)
        damaged = table.damaged(needed_members(self.opts))
        self._skipped([(*table.where(row), why) for row, why in damaged.items()],
                      announce=self.ctx.main)
        return len(table)

    def _steps_per_epoch(self) -> int:
        """--steps-per-epoch, else one pass over train less the remainder; --epoch-steps
        shorter: at most the held-out pass's batches, the last one partial (OLM-com's released
        zip(train, held-out), whose held-out DataLoader keeps its last batch)."""
        c, world = self.config, self.ctx.world
        if c.steps_per_epoch:
            return c.steps_per_epoch
        steps = self.train_items // (c.batch_size * world)
        if c.epoch_steps == "shorter":
            steps = min(steps, -(-self.heldout_items // (c.batch_size * world)))
        return steps

    MAX_NAMED = 20  # damaged samples named one per line; more are only counted

    def _skipped(self, skipped, announce: bool = True) -> None:
        """Damaged samples (key, tar, reason): each named once in a warning line, or, under
        --strict, one error before the step that would have used them."""
        if not skipped:
            return
        if self.config.strict:
            key, url, why = skipped[0]
            more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
            raise UserError(f"{url}: sample {key} is damaged ({why}){more}; --strict stops "
                            "here (`avprep verify` names every problem; without --strict such "
                            "samples are skipped and counted)")
        for key, url, why in skipped:
            if (key, url) in self.warned:
                continue
            self.warned.add((key, url))
            if announce and len(self.warned) <= self.MAX_NAMED:
                print(f"Warning: skipping damaged sample {key} in {url} ({why}); counted in "
                      "train_skipped", file=sys.stderr, flush=True)
            elif announce and len(self.warned) == self.MAX_NAMED + 1:
                print("Warning: more damaged samples: counted in train_skipped, not named",
                      file=sys.stderr, flush=True)

    # -- one epoch --

    def train_epoch(self, epoch: int, log: RunLog) -> dict:
        c, ctx = self.config, self.ctx
        self.balancer.start_epoch(self._epoch_context(epoch))  # may run the model in eval mode
        self.net.train()
        copies = self.balancer.train_copies()  # a data-level method's re-sampled training set
        groups = self.balancer.train_groups()  # or its re-assembled one (batches of one group)
        steps = self.steps
        if copies is not None and not c.steps_per_epoch:  # the epoch grows with the copies
            extra = sum(len(masks) for masks in copies.values())
            steps = (self.train_items + extra) // (c.batch_size * ctx.world)
        if groups is not None and not c.steps_per_epoch:
            steps = None  # the groups' full global batches (the stream counts them)
        loader = train_loader(self.shards, "train", self.opts, batch_size=c.batch_size,
                              steps=steps, epoch=epoch, seed=c.seed, rank=ctx.rank,
                              world=ctx.world, workers=c.workers, shuffle_buffer=c.shuffle_buffer,
                              device_type=ctx.device.type, copies=copies,
                              modalities=len(self.model.modalities), sampling=c.sampling,
                              groups=groups)
        steps = loader.steps
        heldout = iter(self._heldout_loader(epoch)) if self.balancer.needs_heldout else None
        loss_sum = torch.zeros((), device=ctx.device)
        correct = torch.zeros((), device=ctx.device)
        seen, skipped, keys = 0, 0, set()
        norms = LogitNorms()
        started = time.time()
        bar = progress_bar(loader, c.progress and ctx.main, f"epoch {epoch}", steps)
        for batch in bar:
            dropped = batch.pop("skipped", ())
            if dropped:  # before the step: --strict stops with no step lost
                skipped += len(dropped)
                self._skipped(dropped)
            keys.update(batch["key"])
            batch = to_device(batch, ctx.device, self.opts)
            labels = batch["label"]
            loss, logits = self.train_step(batch, epoch, heldout)
            norms.add(logits)
            loss_sum += loss.detach().float()
            correct += (logits["fused"].detach().argmax(dim=1) == labels).sum()
            seen += labels.numel()
            self.step += 1
            if self.step % c.log_every == 0:
                self._log_step(epoch, loss, log, bar, correct, seen)
        # one reduction per epoch: samples trained on, distinct keys per rank (disjoint ranks
        # under exact sampling, so the sum is the distinct count), damaged samples skipped
        counts = torch.tensor([float(seen), float(len(keys)), float(skipped)], dtype=torch.float64)
        totals = D.all_reduce_sum(torch.cat([torch.stack([loss_sum, correct.float()]).double(),
                                             counts.to(ctx.device)]), ctx).tolist()
        steps_done = max(1, steps)
        return {"loss": totals[0] / (steps_done * ctx.world), "acc": totals[1] / max(1, totals[2]),
                "step_time": (time.time() - started) / steps_done,
                "logit_norm": norms.result(ctx), "samples": int(totals[2]),
                "distinct": int(totals[3]), "skipped": int(totals[4])}

    def train_step(self, batch: dict, epoch: int, heldout=None):
        """One optimisation step on a batch already on the device -> (loss, logits).

        `heldout`: an iterator of held-out (val) batches, for methods with `needs_heldout`; its
        forward comes right after the training forward, with the same weights, as OLM-com's
        released step (engine_logits_com.py). Does not advance `self.step`.
        """
        c = self.config
        clip = ((lambda: torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.clip_grad))
                if c.clip_grad else (lambda: None))
        ctx = StepContext(
            net=self.net, model=self.model, batch=batch, labels=batch["label"],
            optimizer=self.optimizer, epoch=epoch, step=self.step,
            autocast=lambda: autocast(self.ctx.device, c.amp), clip_grad=clip,
            extra_loss=lambda logits, labels: auxiliary_loss(self.model, logits, labels),
            feed_heldout=(lambda: self._feed_heldout(heldout)) if heldout is not None else None)
        return check_step_result(self.balancer, self.balancer.train_step(ctx))

    def _epoch_context(self, epoch: int) -> EpochContext:
        """What a method may use before an epoch: n training batches of their own stream
        (seeded by seed and epoch, train transforms), so the training order is untouched."""
        c, ctx = self.config, self.ctx

        def batches(n: int):
            loader = train_loader(self.shards, "train", self.opts, batch_size=c.batch_size,
                                  steps=n, epoch=epoch, seed=c.seed, rank=ctx.rank,
                                  world=ctx.world, workers=min(1, c.workers),
                                  shuffle_buffer=c.shuffle_buffer, salt=97,
                                  device_type=ctx.device.type, sampling=c.sampling)
            for batch in loader:
                self._skipped(batch.pop("skipped", ()))
                yield to_device(batch, ctx.device, self.opts)

        def eval_batches(split: str):
            loader = eval_loader(self.shards, split, self.opts,
                                 batch_size=c.eval_batch_size or c.batch_size, rank=ctx.rank,
                                 world=ctx.world, workers=c.workers,
                                 device_type=ctx.device.type)
            for batch in loader:
                yield to_device(batch, ctx.device, self.opts)

        return EpochContext(net=self.net, model=self.model, epoch=epoch, batches=batches,
                            autocast=lambda: autocast(ctx.device, c.amp),
                            steps_per_epoch=self.steps, eval_batches=eval_batches,
                            val_split=c.val_split)

    def _log_step(self, epoch, loss, log, bar, correct, seen) -> None:
        ctx = self.ctx
        mean_loss = D.all_reduce_sum(loss.detach().float(), ctx) / ctx.world
        record = {"kind": "step", "epoch": epoch, "step": self.step, "loss": float(mean_loss),
                  "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(_floats(check_metrics(self.balancer, self.balancer.step_metrics())))
        log.write(record, step=self.step, prefix="train/")
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{float(correct) / seen:.3f}")

    def _heldout_loader(self, epoch: int):
        """Endless shuffled `val` batches (never `test`): with exact sampling each pass over
        val in its own (seed, epoch) order, running on into the next pass. --olm-heldout train
        (released): with the train transforms, as OLM-com's held-out fold is read with them;
        eval: without."""
        c, ctx = self.config, self.ctx
        augment = self.balancer.heldout_train_mode
        return train_loader(self.shards, c.val_split, self.opts, batch_size=c.batch_size,
                            steps=10**12, epoch=epoch, seed=c.seed, rank=ctx.rank,
                            world=ctx.world, workers=min(1, c.workers), shuffle_buffer=100,
                            augment=augment, salt=98 if augment else 99,
                            device_type=ctx.device.type, sampling=c.sampling)

    def _feed_heldout(self, heldout) -> None:
        """The held-out forward, without grad (the released one builds a graph it never
        backpropagates: same numbers). --olm-heldout train (released): train mode, so
        BatchNorm uses the batch's statistics and updates its running ones (and dropout is
        on); eval: eval mode, so val data never enters the running statistics."""
        batch = next(heldout)
        self._skipped(batch.pop("skipped", ()))
        batch = to_device(batch, self.ctx.device, self.opts)
        train_mode = self.balancer.heldout_train_mode
        if not train_mode:
            self.model.eval()
        with torch.no_grad(), autocast(self.ctx.device, self.config.amp):
            logits = self.model(batch)
        if not train_mode:
            self.model.train()
        self.balancer.heldout(logits, batch["label"])

    def sync_buffers(self) -> None:
        """BatchNorm statistics drift apart after the last step (DDP only broadcasts buffers
        at the next training forward); give every rank rank 0's before evaluating/saving."""
        if self.ctx.distributed:
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)

    def eval_split(self, split: str) -> dict:
        c = self.config
        self.sync_buffers()
        return evaluate(self.model, self.shards, split, self.opts,
                        batch_size=c.eval_batch_size or c.batch_size, ctx=self.ctx,
                        workers=c.workers, amp=c.amp, progress=c.progress)


def _epoch_metrics(result: dict | None) -> dict | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in ("split",)}


def check_recipe_shards(config: TrainConfig) -> None:
    """A recipe's protocol needs shards built its way (split lists, preset, val policy)."""
    if config.recipe:
        from .recipes import check_shards, load_recipe

        check_shards(load_recipe(config.recipe), open_shards(config.shards).index,
                     where=config.shards)


def per_process_batch(config: TrainConfig, world: int) -> TrainConfig:
    """--global-batch-size N: each of the `world` processes takes N / world samples a step (the
    papers' batch of 64 is global: DataParallel over their GPUs)."""
    total = config.global_batch_size
    if not total:
        return config
    if total % world:
        raise UserError(f"--global-batch-size {total} does not split evenly over {world} "
                        "processes")
    return config.replace(batch_size=total // world)


def fit(config: TrainConfig | dict, *, resume: str | None = None,
        overwrite: bool = False, on_epoch=None) -> dict:
    """Train one run; returns the summary (also written to RUN/summary.json on rank 0).

    `resume`: a run directory (its last.pt) or a checkpoint to continue from; the config given
    must describe the same model (the CLI reads RUN/config.yaml for that). A run directory that
    already holds a run is refused unless `resume` or `overwrite` says what to do with it.
    `on_epoch(epoch, record)`: called after each epoch is saved (every rank); returning True
    ends the run there, with its summary (a tuning trial the pruner stops, avtrain.tune).
    """
    config = config if isinstance(config, TrainConfig) else make_config(config)
    require_run_paths(config)
    check_recipe_shards(config)
    stale = check_run_dir(config.run_dir, resume=resume, overwrite=overwrite)
    ctx = D.setup(config.device)
    try:
        config = per_process_batch(config, ctx.world)
        if ctx.main and stale:
            clear_run_dir(config.run_dir, stale)
        D.barrier(ctx)
        return _fit(config, ctx, resume, on_epoch)
    finally:
        D.teardown(ctx)


def _fit(config: TrainConfig, ctx: D.Context, resume: str | None, on_epoch=None) -> dict:
    started = time.time()
    trainer = Trainer(config, ctx, resume)
    c, run = config, config.run_dir
    if ctx.main:
        os.makedirs(run, exist_ok=True)
        write_text(os.path.join(run, "config.yaml"), to_yaml(c))
        if resume:
            trim_log(run, trainer.start_epoch - 1, trainer.step)
    D.barrier(ctx)
    log = RunLog(run, enabled=ctx.main, tensorboard=c.tensorboard)
    if ctx.main and trainer.start_epoch == 0:
        log.write({"kind": "start", "world_size": ctx.world, "steps_per_epoch": trainer.steps,
                   "device": str(ctx.device), "train_samples": trainer.shards.samples("train"),
                   "sampling": c.sampling,
                   "alpha": trainer.balancer_config["alpha"], "spec": trainer.spec})
    epoch, stopped = trainer.start_epoch, None
    try:
        for epoch in range(trainer.start_epoch, c.epochs):
            t0 = time.time()
            train = trainer.train_epoch(epoch, log)
            trainer.scheduler.step()
            trainer.balancer.end_epoch(epoch)
            val = trainer.eval_split(c.val_split)
            same = c.test_split == c.val_split  # legacy protocol: test is the val
            test = (val if same else trainer.eval_split(c.test_split)) if trainer.has_test \
                else None
            record = {"kind": "epoch", "epoch": epoch, "step": trainer.step,
                      "train_loss": train["loss"], "train_acc": train["acc"],
                      "train_samples": train["samples"], "train_distinct": train["distinct"],
                      "train_skipped": train["skipped"],
                      "lr": trainer.optimizer.param_groups[0]["lr"],
                      "val": _epoch_metrics(val), "test": _epoch_metrics(test),
                      "epoch_time": round(time.time() - t0, 3),
                      "step_time": round(train["step_time"], 6),  # loading included
                      "logit_norm": train["logit_norm"]}
            probe = epoch_probe(trainer, epoch)  # --probe-every: on a fixed subset
            if probe is not None:
                record["probe"] = probe
            improved = val["acc"] > trainer.best["acc"]
            if improved:
                trainer.best = {"epoch": epoch, "acc": val["acc"], "val": record["val"],
                                "test": record["test"]}
            wall = trainer.wall_before + time.time() - started
            if ctx.main:  # checkpoint first: an epoch in the log always has its last.pt
                state = trainer._state(epoch, {"val": record["val"], "test": record["test"]},
                                       wall)
                if improved:
                    save_checkpoint(os.path.join(run, "best.pt"), state)
                save_checkpoint(os.path.join(run, "last.pt"), state)
                log.write(record, step=trainer.step)
            D.barrier(ctx)
            if on_epoch is not None and on_epoch(epoch, record):
                stopped = epoch
                break
    except KeyboardInterrupt:
        if ctx.main:
            log.write({"kind": "interrupted", "epoch": epoch, "step": trainer.step})
            log.close()
        raise
    trainer.sync_buffers()
    digests = D.gather_objects(weights_digest(trainer.model), ctx)
    summary = {
        "run_dir": run, "method": c.method, "model": c.model,
        "fusion": get_method(c.method).model_fusion(c.fusion),  # the built one (MLA: shared)
        "modalities": trainer.model.modalities, "dataset": trainer.shards.dataset,
        "epochs": c.epochs, "steps": trainer.step, "world_size": ctx.world,
        "protocol": selection_protocol(c), "recipe": c.recipe,
        "best_epoch": trainer.best["epoch"], "val": trainer.best["val"],
        "test": trainer.best["test"],
        "wall_time": round(trainer.wall_before + time.time() - started, 3),
        "replica_digests": digests, "replicas_in_sync": len(set(digests)) == 1,
        **({"stopped_after_epoch": stopped} if stopped is not None else {}),
    }
    summary.update(best_epoch_evaluations(trainer, ctx))  # --shapley, --linear-probe: best.pt
    if ctx.main:
        log.write({"kind": "summary", **{k: v for k, v in summary.items()
                                         if k in ("best_epoch", "steps", "wall_time")}})
        write_text(os.path.join(run, "summary.json"), json.dumps(_clean(summary), indent=2))
    log.close()
    return summary


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
