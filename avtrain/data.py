"""Streaming data from avprep shards: `index.json` + WebDataset tars -> batches of tensors.

    shards = open_shards("OUT")                      # classes, preset, split sizes
    opts = DataOptions.for_shards(shards, image_size=224, frames=None)
    for batch in train_loader(shards, "train", opts, batch_size=64, steps=100, epoch=0): ...
    for batch in eval_loader(shards, "test", opts, batch_size=64): ...

A batch is a dict: "audio" [B, 1, F, T] in the shards' dtype (float16; `to_device` makes it
float32 on the device), "visual" [B, T, 3, H, W] uint8 (cropped and flipped; `to_device` makes
it float32, ImageNet normalised, on the device: a quarter of the bytes cross the worker queue
and the bus), "label" [B] long, "key" list of str. Sequences are right-padded with zeros and come
with their lengths: "text" [B, L] long UTF-8 byte ids of the `{key}.txt` transcript (0 = pad)
and "text_len" [B]; a modality the index lists under `features` (avprep import-features) is
read from `{key}.{modality}.npy` as [B, T, D] float32 with "{modality}_len" [B] (0 where the
clip lacks it), instead of the spectrogram or frames.

Train, `sampling="exact"` (the default; avtrain.sampling): every sample once per epoch in an
order that is a function of (seed, epoch) only, split evenly over ranks, the remainder of
N // (batch·ranks) dropped, as the papers' DataLoader(shuffle=True) (+ DistributedSampler);
samples read by byte range out of the tars, augmentation drawn per sample position, so neither
the worker count nor `--resume` changes a batch.
Train, `sampling="resample"` (web-scale sets, where an order over every sample costs too
much): shards resampled with a seed shared by every rank and worker, so the shard stream is
the same everywhere and each (rank, worker) takes its own slice of it (split by node, then by
worker); a shuffle buffer; per-sample augmentation; full batches only; `with_epoch(steps)` so
every rank runs the same number of steps. Each epoch's stream is a function of (seed, epoch,
rank, worker) only, which is what makes `--resume` reproduce an uninterrupted run; an epoch
sees about 2/3 of a small set's distinct samples.
Eval: every sample exactly once across all ranks and workers, the last partial batch kept.
Either way a sample that cannot be decoded is dropped, not fatal: its batch lists it under
"skipped" as (key, tar, reason), for the loop to count and name.
Per-sample decoding and the transforms matched to the released loaders: avtrain.decode.
"""

from __future__ import annotations

import functools
import json
import os
import random

import numpy as np
import torch
import webdataset as wds

from avprep.errors import UserError
from avprep.storage import ShardOpener, Store, finish_stream

from .decode import DataOptions, collate, decode_sample, skip_reason
from .sampling import ExactStream, sample_table
from .tarstream import tar_samples

SAMPLINGS = ("exact", "resample")
SKIPPED = "__skipped__"  # a decoded-stream item standing for a sample that could not be read


# --- the shard set ------------------------------------------------------------------------


class ShardSet:
    """A shard set described by its index.json: a local folder or an object-storage prefix
    (s3://, gs://, https://; avprep.storage). `cache_dir`/`cache_size`: a bounded local cache
    that remote tars are copied into while they stream (off by default)."""

    def __init__(self, root: str, index: dict, cache_dir: str | None = None,
                 cache_size: int | None = None):
        self.root = root
        self.store = Store.at(root)
        self.index = index
        self.cache_dir, self.cache_size = cache_dir, cache_size
        self.dataset = index.get("dataset")
        self.classes = list(index.get("classes") or [])
        self.num_classes = int(index.get("num_classes") or len(self.classes))
        self.preset = dict(index.get("preset") or {})
        self.modalities = list(index.get("modalities") or ["audio", "visual"])
        self.splits = dict(index.get("splits") or {})

    def samples(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("samples", 0))

    def urls(self, split: str) -> list[str]:
        shards = self.splits.get(split, {}).get("shards", [])
        out = []
        for entry in shards:
            if not entry.get("samples", 1):
                continue
            url = str(entry["url"])
            if os.path.isabs(url) or ".." in url.replace("\\", "/").split("/"):
                raise UserError(f"{self.root}/index.json: shard path {url!r} leaves the folder")
            out.append(self.store.url(url))
        return out

    def opener(self) -> ShardOpener:
        """Opens this set's tars by URL (and nothing else) for the loader's workers."""
        sizes = {str(e["url"]): int(e["bytes"]) for info in self.splits.values()
                 for e in info.get("shards", []) if e.get("bytes") is not None}
        return ShardOpener(self.store, self.cache_dir, self.cache_size, sizes)

    def require(self, split: str, batch_size: int | None = None, world_size: int = 1,
                items: int | None = None) -> None:
        """One clear line when a split cannot feed training or evaluation; `items`: the
        samples one pass holds, when not the index's count (an exact epoch's sample table)."""
        if split not in self.splits:
            raise UserError(f"{self.root}: no {split!r} split (has: "
                            f"{', '.join(self.splits) or 'none'})")
        n = self.samples(split)
        if n == 0 or not self.urls(split):
            raise UserError(f"{self.root}: the {split!r} split is empty")
        if self.store.local:
            missing = [u for u in self.urls(split) if not os.path.isfile(u)]
        elif self.store.writable:  # s3/gs: one listing of the prefix
            names = self.store.names()
            missing = [u for u in self.urls(split)
                       if u[len(self.store.root) + 1:] not in names]
        else:  # http(s) cannot list: ask for each tar
            missing = [u for u in self.urls(split)
                       if self.store.size(u[len(self.store.root) + 1:]) is None]
        if missing:
            raise UserError(f"{self.root}: shard listed in index.json is missing: {missing[0]}")
        n = n if items is None else items
        if batch_size is not None and batch_size * world_size > n:
            raise UserError(f"--batch-size {batch_size} x {world_size} process(es) is larger "
                            f"than the {split!r} split ({n} samples)")


def open_shards(path: str, cache_dir: str | None = None,
                cache_size: int | None = None) -> ShardSet:
    """The shard set at a folder or URL (s3://, gs://, https://); index.json read through the
    store, the tars later streamed by the loader."""
    if not path:
        raise UserError("no shard folder given (--shards)")
    store = Store.at(path)
    index_path = store.url("index.json")
    if store.local:
        if not os.path.isdir(path):
            raise UserError(f"shard folder not found: {path}")
        if not os.path.isfile(index_path):
            raise UserError(f"{path}: no index.json (not a shard folder written by avprep "
                            f"build-shards, or the build did not finish)")
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError) as exc:
            raise UserError(f"{index_path}: unreadable ({exc})") from None
    else:
        if store.size("index.json") is None:
            raise UserError(f"{path}: no index.json (not a shard set written by avprep "
                            f"build-shards, or the build did not finish)")
        index = store.read_json("index.json")
    if not isinstance(index, dict) or index.get("format") != "avbalance-shards":
        raise UserError(f"{index_path}: not an avbalance shard index")
    if int(index.get("format_version", 0)) > 1:
        raise UserError(f"{index_path}: format_version {index['format_version']} is newer than "
                        f"this avtrain understands (1)")
    if not index.get("classes") and not index.get("num_classes"):
        raise UserError(f"{index_path}: lists no classes")
    return ShardSet(path, index, cache_dir, cache_size)


# --- pipelines ----------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _same_everywhere() -> int:
    """Worker seed for ResampledShards: identical on every rank and worker, so they all see
    one shard stream and the split stages below hand out disjoint slices of it."""
    return 0


# Stages are module-level generators bound with functools.partial, so a pipeline pickles
# (DataLoader workers started with spawn/forkserver get a copy) and nothing is shared.


def _slice_stage(src, *, rank: int, world: int):
    """Keep item i where i ≡ rank·W + worker (mod world·W): split by node, then by worker."""
    worker, nworkers = _worker()
    start, step = rank * nworkers + worker, world * nworkers
    for i, item in enumerate(src):
        if i % step == start:
            yield item


def _slice_for(rank: int, world: int):
    return functools.partial(_slice_stage, rank=rank, world=world)


def _copies_stage(src, *, copies: dict[str, tuple[int, ...]], everything: int):
    """Each sample as it is (keeping every modality), then one more time per entry of
    `copies[key]`, each with its modality mask (bit i: the model's i-th modality is kept): the
    re-sampled training set of a data-level method, mixed by the shuffle stage after it."""
    for sample in src:
        yield {**sample, "__keep__": everything}
        for mask in copies.get(sample["__key__"], ()):
            yield {**sample, "__keep__": mask}


def _shuffle_stage(src, *, bufsize: int, seed: int, epoch: int, rank: int, salt: int):
    """A shuffle buffer that starts yielding after `min(100, bufsize)` samples and grows by
    one sample per yield up to `bufsize` (so the first batch does not wait for a full buffer).
    """
    worker, _ = _worker()
    rng = random.Random(wds.utils.make_seed(seed, epoch, rank, worker, salt, 17))
    initial = min(100, bufsize)
    src = iter(src)
    buf: list = []
    for sample in src:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(src, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= initial:
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _shuffle(bufsize: int, seed: int, epoch: int, rank: int, salt: int):
    return functools.partial(_shuffle_stage, bufsize=bufsize, seed=seed, epoch=epoch,
                             rank=rank, salt=salt)


def _decode_stage(src, *, opts: DataOptions, seed: int | None, epoch: int, rank: int):
    """Augmentation randomness from (seed, epoch, rank, worker) only; `seed` None = eval. A
    sample that cannot be decoded (a member missing, corrupt bytes) becomes a SKIPPED marker
    that `_batch_stage` hands to the loop, instead of ending the stream."""
    worker, _ = _worker()
    rng = np.random.default_rng([seed, epoch, rank, worker]) if seed is not None else None
    for sample in src:
        try:
            yield decode_sample(sample, opts, rng)
        except UserError:
            raise
        except Exception as exc:
            yield {SKIPPED: skip_reason(sample.get("__key__", "?"), sample.get("__url__", "?"),
                                        exc)}


def _batch_stage(src, *, batch_size: int, partial: bool):
    """Batches of decoded samples; the SKIPPED markers met on the way ride along with the
    next batch as its "skipped" list of (key, tar, reason)."""
    samples, skipped = [], []
    for item in src:
        if SKIPPED in item:
            skipped.append(item[SKIPPED])
            continue
        samples.append(item)
        if len(samples) == batch_size:
            out = collate(samples)
            out["skipped"] = skipped
            yield out
            samples, skipped = [], []
    if samples and partial:
        out = collate(samples)
        out["skipped"] = skipped
        yield out


def _batches(batch_size: int, partial: bool):
    return functools.partial(_batch_stage, batch_size=batch_size, partial=partial)


def _decode(opts: DataOptions, seed: int | None, epoch: int, rank: int):
    return functools.partial(_decode_stage, opts=opts, seed=seed, epoch=epoch, rank=rank)


def _tar_stage(src, *, opener, handler):
    """Each tar's samples (avtrain.tarstream: webdataset's grouping, less Python per member),
    each tar opened by the shard set's own opener (its prefix only, fsspec streams for remote
    stores, never gopen's `pipe:`). A tar that fails part-way is reported by `handler` and the
    stream goes on with the next one."""
    for item in src:
        url = item["url"]
        try:
            stream = opener(url)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            raise
        try:
            yield from tar_samples(stream, url)
            finish_stream(stream)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if not handler(exn):
                raise
        finally:
            stream.close()


def _tars(shards: ShardSet):
    return functools.partial(_tar_stage, opener=shards.opener(), handler=wds.warn_and_continue)


def worker_context():
    """How loader workers start. The DataLoader's default, fork, copies only the calling thread;
    under torch.distributed the process group's own threads (gloo's) can hold a lock at that
    instant, and the worker then waits for it forever (seen: an eval worker stuck right after
    fork() while the other rank waited in all_gather). A forkserver is a fresh interpreter
    with one thread, so the workers forked from it start clean; it is started once per
    process, with this module preloaded, so a worker costs a fork, not an import of torch.
    A single process keeps fork (PyTorch's tested path, and no pipeline pickling)."""
    import multiprocessing

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _loader(pipeline, workers: int, device_type: str, limit: int | None):
    kwargs = {"num_workers": workers, "batch_size": None, "pin_memory": device_type == "cuda"}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        kwargs["multiprocessing_context"] = worker_context()
    loader = wds.WebLoader(pipeline, **kwargs)
    return loader.with_epoch(limit) if limit else loader


def train_loader(shards: ShardSet, split: str, opts: DataOptions, *, batch_size: int,
                 steps: int | None = None, epoch: int = 0, seed: int = 0, rank: int = 0,
                 world: int = 1, workers: int = 2, shuffle_buffer: int = 1000,
                 augment: bool = True, device_type: str = "cpu", salt: int | None = None,
                 copies: dict[str, tuple[int, ...]] | None = None, modalities: int = 0,
                 sampling: str = "exact", groups: list[tuple[int, list[str]]] | None = None):
    """`steps` batches per rank (`loader.steps`), augmented unless `augment=False` (OLM-com's
    held-out val stream with --olm-heldout eval). `salt` gives a second stream (the held-out
    one) its own order and augmentation draws. `copies` (sample key -> modality masks, over the
    model's `modalities` in order) re-samples the set: every batch then has a "keep" mask per
    sample (the valuation method); `groups` (modality mask, keys), in order, replaces the set by
    batches of one group at a time (Remix; exact sampling only). Each batch lists the samples dropped from it as damaged
    under "skipped" (key, tar, reason).

    sampling "exact" (avtrain.sampling): every sample once per pass in a (seed, epoch) order;
    `steps` None = one pass less the remainder, more runs on into the next pass (an endless
    stream). "resample": shards drawn with replacement, a shuffle buffer, cut to `steps`."""
    salt = (0 if augment else 99) if salt is None else salt
    if sampling == "exact":
        stream = ExactStream(shards, sample_table(shards, split), opts, batch_size=batch_size,
                             epoch=epoch, seed=seed, rank=rank, world=world, steps=steps,
                             augment=augment, salt=salt, copies=copies, modalities=modalities,
                             groups=groups)
        loader = _loader(stream, max(0, min(workers, stream.steps)), device_type, None)
        loader.steps = stream.steps
        return loader
    if sampling != "resample":
        raise UserError(f"--sampling must be exact or resample, got {sampling!r}")
    if groups is not None:
        raise UserError("a training set re-assembled into groups (--method remix) needs "
                        "--sampling exact")
    if steps is None:
        raise ValueError("a resampled stream is endless: give it `steps`")
    urls = shards.urls(split)
    resample = ([functools.partial(_copies_stage, copies=copies,
                                   everything=(1 << modalities) - 1)]
                if copies is not None else [])
    pipeline = wds.DataPipeline(
        wds.ResampledShards(urls, seed=wds.utils.make_seed(seed, epoch, salt),
                            deterministic=True, worker_seed=_same_everywhere),
        _slice_for(rank, world),
        _tars(shards),
        *resample,
        _shuffle(shuffle_buffer, seed, epoch, rank, salt),
        _decode(opts, (seed if not salt else wds.utils.make_seed(seed, salt)) if augment
                else None, epoch, rank),
        _batches(batch_size, partial=False),
    )
    loader = _loader(pipeline, workers, device_type, steps)
    loader.steps = steps
    return loader


def eval_loader(shards: ShardSet, split: str, opts: DataOptions, *, batch_size: int,
                rank: int = 0, world: int = 1, workers: int = 2, device_type: str = "cpu"):
    """Every sample of the split exactly once across all ranks and workers.

    With at least one shard per (rank, worker) whole shards are handed out; with fewer shards
    every reader opens all of them and keeps every (ranks·workers)-th sample instead.
    """
    urls = shards.urls(split)
    workers = max(0, min(workers, len(urls)))
    readers = world * max(1, workers)
    if len(urls) >= readers:
        source = [wds.SimpleShardList(urls), _slice_for(rank, world),
                  _tars(shards)]
    else:
        source = [wds.SimpleShardList(urls),
                  _tars(shards),
                  _slice_for(rank, world)]
    pipeline = wds.DataPipeline(
        *source,
        _decode(opts, None, 0, rank),
        _batches(batch_size, partial=True),
    )
    return _loader(pipeline, workers, device_type, None)
