"""Exact epochs over WebDataset shards: every training sample once per epoch, as the papers'
`DataLoader(shuffle=True, drop_last=True)` (+ `DistributedSampler`) gives, read by random access
into the plain tars.

    table = sample_table(shards, "train")     # key, tar, byte offset and length of each sample
    stream = ExactStream(shards, table, opts, batch_size=64, epoch=3, seed=0, rank=0, world=2)
    # stream.steps batches per rank; batch b is read by loader worker b % workers

Order. Pass p of an epoch is a permutation of the epoch's items seeded by (seed, salt, epoch,
p) only; the stream is pass 0, then pass 1, ... (an endless stream such as OLM-com's held-out
one simply runs on into the next pass). Global batch g is the positions [g·B·R, (g+1)·B·R) of
that stream (B the per-rank batch, R the ranks) and rank r takes its r-th B of them, so the
global batches are those of one process with batch B·R. An epoch is `steps = N // (B·R)`
batches on every rank (N = training samples, plus the extra copies of a data-level method):
the N mod (B·R) samples at the end of the permutation are not seen that epoch, as
DistributedSampler + drop_last; the permutation changes every epoch, so do they. Nothing
depends on the number of loader workers: worker w reads batches w, w+W, w+2W, ... and torch's
DataLoader hands an IterableDataset's outputs out round-robin over its workers, in order
(`_MultiProcessingDataLoaderIter`: task i goes to worker i mod W and results come back in task
order; a worker that is done is skipped only after its last batch), so the batches arrive as
0, 1, 2, ... Augmentation is drawn per sample from (seed, salt, epoch, stream position), so two
runs with different `--workers` (or a resumed one) get the same tensors, not just the same order.

Random access. Each sample is one contiguous byte range of its tar (its members' headers and
data). avprep build-shards records the ranges in each shard's stats file (`{shard}.json`,
"spans"); for a tar without them (older shard sets, cross-validation folds) or whose size no
longer matches its stats, one scan of its headers finds them (data skipped by seeking; a remote
tar is read once, into the cache when there is one; remote scans are cached in --cache-dir). A
sample is then one `pread` of a local file or a cached copy of a remote tar (remote tars are
copied whole into --cache-dir on first use), or one ranged GET (s3/gs/https) without a cache;
the bytes are parsed by the loader's own tar reader (avtrain.tarstream) and decoded by
`avtrain.decode.decode_sample` (npy without pickle, jpg, cls, json, txt: nothing is unpickled).
webdataset's `wids` was not used: it downloads shards with its own commands instead of
avprep.storage's prefix-checked opener and cache, and decodes with webdataset's default
decoders unless every caller remembers not to; the recorded ranges need neither an index file
beside the tars nor a change to them, which stay plain WebDataset tars. Measured with
benchmarks/loader.py (`--loaders exact,resample`, cremad-preset shards, batch 16): per sample
a `pread` and the header parse are ~0.1 ms beside ~2 ms of JPEG decode and crop, and exact
epochs ran at 0.86-1.17x the resampled stream (1 and 3 frames, 1 and 2 workers; a second run
of the slowest case 0.93x) — provisional, on a shared 2-core machine whose rounds overlap.

Damaged samples. A sample that lacks a member the run needs (`.cls`; `.spec.npy` when audio is
read from spectrograms; `.{m}.npy` for a feature modality) is known from the table before any
step: `damaged()` lists them (the loop warns once per sample, or stops with one line under
--strict). A sample that fails when read or decoded (corrupt bytes) is found by the worker.
Either way it is dropped from its batch, which is one sample shorter: every rank still runs
the same number of steps, and the sample counts as seen (its position in the permutation was
used), so the ranks never fall out of step; the batch carries ("key", "url", reason) of each
dropped sample under "skipped" for the loop to count (`train_skipped`) and name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from avprep.errors import UserError

from .decode import collate, decode_sample, skip_reason
from .tarstream import sample_at, tar_spans

OPEN_TARS = 64  # file descriptors a worker keeps open


@dataclass
class SampleTable:
    """Where each sample of a split is: its key, tar, byte range and member suffixes."""

    urls: list[str]
    keys: list[str]
    tar: np.ndarray  # int32 index into urls
    offset: np.ndarray  # int64
    length: np.ndarray  # int64
    suffixes: list[str]  # space-separated member suffixes, lower case

    def __len__(self) -> int:
        return len(self.keys)

    def damaged(self, needs: tuple[str, ...]) -> dict[int, str]:
        """Row -> the first needed member it lacks, for every sample lacking one (kept per
        `needs`: every epoch asks again)."""
        memo = self.__dict__.setdefault("_damaged_memo", {})
        if needs not in memo:
            memo[needs] = self._damaged(needs)
        return memo[needs]

    def _damaged(self, needs: tuple[str, ...]) -> dict[int, str]:
        out = {}
        for row, suffixes in enumerate(self.suffixes):
            have = suffixes.split(" ")
            for need in needs:
                if need not in have:
                    out[row] = f"no .{need} member"
                    break
        return out

    def where(self, row: int) -> tuple[str, str]:
        """(key, tar url) of a row."""
        return self.keys[row], self.urls[int(self.tar[row])]


def needed_members(opts) -> tuple[str, ...]:
    """The members `decode_sample` cannot do without, for these data options."""
    needs = ["cls"]
    if "audio" in opts.modalities and "audio" not in opts.features:
        needs.append("spec.npy")
    needs += [f"{m}.npy" for m in opts.features]
    return tuple(needs)


# --- the table ------------------------------------------------------------------------------


def _stats_names(url_name: str) -> list[str]:
    """Stats objects that may describe a tar: `NAME.json` for NAME.tar and NAME-001.tar."""
    stem = url_name[:-4] if url_name.endswith(".tar") else url_name
    names = [f"{stem}.json"]
    base = re.sub(r"-\d{3}$", "", stem)
    if base != stem:
        names.append(f"{base}.json")
    return names


def _relative_to(store, url: str) -> str:
    prefix = store.root.rstrip("/") + ("/" if not store.local else os.sep)
    return url[len(prefix):].replace(os.sep, "/")


def _relative(shards, url: str) -> str:
    return _relative_to(shards.store, url)


def _recorded(shards, url: str, stats_cache: dict) -> list | None:
    """The spans avprep recorded for this tar, if its stats have them and still describe it."""
    name = _relative(shards, url)
    for stats_name in _stats_names(name):
        if stats_name not in stats_cache:
            stats = None
            if shards.store.size(stats_name) is not None:
                try:
                    stats = json.loads(shards.store.read_bytes(stats_name))
                except ValueError:
                    stats = None
            stats_cache[stats_name] = stats if isinstance(stats, dict) else None
        stats = stats_cache[stats_name]
        if not stats or name not in (stats.get("spans") or {}):
            continue
        parts = stats.get("parts") or [{"url": stats.get("shard"), "bytes": stats.get("bytes")}]
        recorded = next((p.get("bytes") for p in parts if p.get("url") == name), None)
        if recorded is None or recorded != shards.store.size(name):
            return None  # the tar changed after the build (appended to, replaced): scan it
        return stats["spans"][name]
    return None


def _scan(shards, url: str) -> list:
    """One pass over a tar's headers; a remote tar's result is kept in the cache folder."""
    opener = shards.opener()
    name = _relative(shards, url)
    memo = None
    if not shards.store.local and shards.cache_dir:
        size = shards.store.size(name)
        digest = hashlib.sha256(f"{url} {size}".encode()).hexdigest()[:24]
        memo = os.path.join(shards.cache_dir, f"{digest}.spans.json")
        if os.path.isfile(memo):
            with open(memo, encoding="utf-8") as fh:
                return json.load(fh)
    path = opener.local_path(url)
    try:
        if path is not None:
            with open(path, "rb") as fh:
                spans = tar_spans(fh)
        else:
            stream = opener(url)
            try:
                spans = tar_spans(stream)
            finally:
                stream.close()
    except ValueError as exc:
        raise UserError(f"{url}: not a readable tar ({exc}); `avprep verify` names what is "
                        "wrong") from None
    spans = [list(s) for s in spans]
    if memo is not None:
        tmp = f"{memo}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(spans, fh)
        os.replace(tmp, memo)
    return spans


def sample_table(shards, split: str) -> SampleTable:
    """Every sample of a split, in tar order (computed once per shard set and split)."""
    tables = shards.__dict__.setdefault("_sample_tables", {})
    if split in tables:
        return tables[split]
    urls = shards.urls(split)
    keys, tar, offset, length, suffixes = [], [], [], [], []
    stats_cache: dict = {}
    for i, url in enumerate(urls):
        spans = _recorded(shards, url, stats_cache)
        if spans is None:
            spans = _scan(shards, url)
        for key, off, n, sfx in spans:
            keys.append(str(key))
            tar.append(i)
            offset.append(int(off))
            length.append(int(n))
            suffixes.append(str(sfx).lower())
    table = SampleTable(urls, keys, np.asarray(tar, dtype=np.int32),
                        np.asarray(offset, dtype=np.int64), np.asarray(length, dtype=np.int64),
                        suffixes)
    tables[split] = table
    return table


# --- reading one sample ---------------------------------------------------------------------


class TarReader:
    """Reads a sample's byte range: `pread` of a local file (the tar, or a remote tar's cached
    copy), else a ranged GET. File descriptors are opened per process (a forked worker never
    shares its parent's) and the least recently used closed past OPEN_TARS."""

    def __init__(self, opener, table: SampleTable):
        self.opener, self.table = opener, table
        self._fds: OrderedDict[str, int | None] = OrderedDict()
        self._pid = os.getpid()
        # copy remote tars whole into the cache only when the split fits in it: in a random
        # order a smaller cache would evict and fetch whole tars for single samples
        total = sum(opener.sizes.get(_relative_to(opener.store, u), 0) for u in table.urls)
        self.fetch = bool(opener.cache_dir) and total <= opener.cache_size

    def __getstate__(self):
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def _fd(self, url: str) -> int | None:
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        if url in self._fds:
            self._fds.move_to_end(url)
            return self._fds[url]
        path = self.opener.local_path(url, fetch=self.fetch)
        fd = None
        if path is not None:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # a cached copy evicted meanwhile: read ranges instead
                fd = None
        self._fds[url] = fd
        while len(self._fds) > OPEN_TARS:
            _, old = self._fds.popitem(last=False)
            if old is not None:
                os.close(old)
        return fd

    def read(self, row: int) -> dict:
        key, url = self.table.where(row)
        offset, length = int(self.table.offset[row]), int(self.table.length[row])
        fd = self._fd(url)
        data = (os.pread(fd, length, offset) if fd is not None
                else self.opener.read_range(url, offset, length))
        if len(data) != length:
            raise ValueError(f"{url} ends inside sample {key}")
        return sample_at(data, url, key)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()


# --- the epoch ------------------------------------------------------------------------------


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ExactStream(torch.utils.data.IterableDataset):
    """One rank's batches of an exact epoch (see the module docstring): `steps` batches, batch
    b read by loader worker b % workers. `copies` (key -> modality masks, the valuation
    method's re-sampled set) adds one item per mask, each batch then carrying "keep" masks;
    `groups` (an ordered list of (modality mask, keys), Remix's re-assembled set) replaces the
    epoch by its groups in turn: each group's samples once, in their own (seed, epoch, pass,
    group) order, in global batches of that group alone (its last N_g mod B·R samples not seen
    that pass), every sample carrying its group's mask;
    `augment=False` decodes with the eval transforms (OLM-com's held-out stream with
    --olm-heldout eval); `salt` gives a second stream its own order and draws."""

    def __init__(self, shards, table: SampleTable, opts, *, batch_size: int, epoch: int = 0,
                 seed: int = 0, rank: int = 0, world: int = 1, steps: int | None = None,
                 augment: bool = True, salt: int = 0,
                 copies: dict[str, tuple[int, ...]] | None = None, modalities: int = 0,
                 groups: list[tuple[int, list[str]]] | None = None):
        self.table, self.opts = table, opts
        self.batch_size, self.epoch, self.seed, self.salt = batch_size, epoch, seed, salt
        self.rank, self.world, self.augment = rank, world, augment
        rows = np.arange(len(table), dtype=np.int64)
        self.masks = None
        if copies is not None:
            first: dict[str, int] = {}
            for row, key in enumerate(table.keys):
                first.setdefault(key, row)
            extra = [(first[k], m) for k in sorted(copies) if k in first for m in copies[k]]
            rows = np.concatenate([rows, np.asarray([r for r, _ in extra], dtype=np.int64)])
            everything = (1 << modalities) - 1
            self.masks = np.asarray([everything] * len(table) + [m for _, m in extra],
                                    dtype=np.int64)
        self.rows = rows
        self.items = len(rows)
        self.per_pass = self.items // (batch_size * world)  # full global batches per pass
        self.groups = None
        if groups is not None:
            first = {}
            for row, key in enumerate(table.keys):
                first.setdefault(key, row)
            self.groups = [(int(mask), np.asarray([first[k] for k in keys if k in first],
                                                  dtype=np.int64)) for mask, keys in groups]
            sizes = [len(r) // (batch_size * world) for _, r in self.groups]
            self.group_ends = np.cumsum(sizes)  # global batches up to the end of each group
            self.items = sum(len(r) for _, r in self.groups)
            self.per_pass = int(sum(sizes))
        self.steps = self.per_pass if steps is None else int(steps)
        if self.groups is not None and self.steps and not self.per_pass:
            raise UserError(f"no group of the re-assembled training set fills a global batch of "
                            f"{batch_size * world} (group sizes "
                            f"{', '.join(str(len(r)) for _, r in self.groups)})")
        self.damaged = table.damaged(needed_members(opts))
        self.reader = TarReader(shards.opener(), table)
        self._perm: tuple | None = None

    def __len__(self) -> int:
        return self.steps

    def _item(self, position: int) -> tuple[int, int | None]:
        """(table row, modality mask or None) at a position of the endless stream."""
        if self.groups is not None:
            return self._grouped_item(position)
        p, i = divmod(position, self.items)
        if self._perm is None or self._perm[0] != p:
            rng = np.random.default_rng([self.seed, self.salt, self.epoch, p, 0x5EED])
            self._perm = (p, rng.permutation(self.items))
        j = int(self._perm[1][i])
        return int(self.rows[j]), (int(self.masks[j]) if self.masks is not None else None)

    def _grouped_item(self, position: int) -> tuple[int, int]:
        """The grouped epoch: global batch g of pass p lies in one group, whose permutation
        (seeded by seed, salt, epoch, p and the group's index) gives its samples in order."""
        width = self.batch_size * self.world
        g, offset = divmod(position, width)
        p, g = divmod(g, self.per_pass)
        k = int(np.searchsorted(self.group_ends, g, side="right"))
        before = int(self.group_ends[k - 1]) if k else 0
        if self._perm is None or self._perm[0] != (p, k):
            rng = np.random.default_rng([self.seed, self.salt, self.epoch, p, k, 0x6A0])
            self._perm = ((p, k), rng.permutation(len(self.groups[k][1])))
        mask, rows = self.groups[k]
        j = int(self._perm[1][(g - before) * width + offset])
        return int(rows[j]), mask

    def positions(self, b: int) -> range:
        start = (b * self.world + self.rank) * self.batch_size
        return range(start, start + self.batch_size)

    def batch(self, b: int) -> dict:
        samples, skipped = [], []
        for position in self.positions(b):
            row, mask = self._item(position)
            key, url = self.table.where(row)
            if row in self.damaged:
                skipped.append((key, url, self.damaged[row]))
                continue
            try:
                raw = self.reader.read(row)
                if mask is not None:
                    raw["__keep__"] = mask
                rng = (np.random.default_rng([self.seed, self.salt, self.epoch, position])
                       if self.augment else None)
                samples.append(decode_sample(raw, self.opts, rng))
            except UserError:
                raise
            except Exception as exc:  # corrupt bytes: this sample, not the run
                skipped.append(skip_reason(key, url, exc))
        if not samples:
            key, url, why = skipped[0]
            raise UserError(f"{url}: every sample of a batch is damaged (e.g. {key}: {why}); "
                            "`avprep verify` names what is wrong")
        out = collate(samples)
        out["skipped"] = skipped
        return out

    def __iter__(self):
        worker, workers = _worker()
        try:
            for b in range(worker, self.steps, workers):
                yield self.batch(b)
        finally:
            self.reader.close()
