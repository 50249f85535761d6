"""import-features: precomputed per-clip feature sequences -> shards (`{key}.{modality}.npy`).

Users of MER-MULTI (and others) often already have frame-level features (HuBERT, MANet,
MacBERT, ... as one `{clip}.npy` of shape [time, dim] per clip and modality). This packs them,
with the manifest's labels and splits, into the same shard layout as build-shards:

    summary = import_features(manifest.records, {"audio": "feats/audio", "text": "feats/text"},
                              "OUT", classes=manifest.classes, dataset="mer")

- a file matches a record by the record's key, its `extra.clip` name or its video's stem;
- every modality's dim is read from the files' headers first (no data loaded) and must be the
  same across clips: otherwise one error names the files that differ. A folder in which no
  file matches any record is an error too (wrong folder, or keys named differently);
- a clip missing a modality is dropped and listed in `missing.jsonl`, or with
  `keep_missing=True` kept with an empty [0, dim] sequence for that modality (the models mask
  it) and the modality named in its JSON `masked` list;
- a file that cannot be read (truncated, pickled objects, NaN) is a per-sample failure in
  `failures.jsonl`; the rest is kept;
- the transcript of a record (`extra.transcript`) goes in as `{key}.txt`, as build-shards does.

The tars, stats files, resume rule and index.json are build-shards' own (`avprep.shards`);
index.json additionally lists `features: {modality: {"dim", "dtype", "clips", "missing"}}`.
"""

from __future__ import annotations

import json
import os
import random
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from . import __version__
from .errors import UserError
from .manifest import SPLITS, Record, safe_key, validate
from .shards import (
    add_member,
    build_fingerprint,
    finished_stats,
    make_index,
    npy_bytes,
    prepare_shard_dir,
)
from .storage import Store, local_scratch, remove_scratch

DTYPES = ("float16", "float32")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass
class FeatureJob:
    """One shard of feature samples: (record, {modality: file or None}) pairs, in order."""

    split: str
    index: int
    records: list[tuple[dict, dict]]  # named as ShardJob's, which the executors count
    out: str
    dims: dict[str, int]
    dtype: str = "float16"

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass
class ImportSummary:
    out: str
    index: dict
    failures: list[dict]
    missing: list[dict]
    shards_written: int
    shards_skipped: int
    seconds: float

    def describe(self) -> str:
        lines = [f"feature shards in {self.out}: {self.shards_written} written, "
                 f"{self.shards_skipped} already done ({self.seconds:.1f} s)"]
        for m, info in self.index["features"].items():
            lines.append(f"  {m:>6}: dim {info['dim']}, {info['clips']} clip(s), "
                         f"{info['missing']} missing")
        for split, info in self.index["splits"].items():
            lines.append(f"  {split:>6}: {info['samples']} samples in {len(info['shards'])} "
                         "shard(s)")
        kept = self.index.get("keep_missing")
        if self.missing:
            verb = "kept with masked modalities" if kept else "dropped"
            lines.append(f"  {len(self.missing)} clip(s) lack a modality: {verb} "
                         "(see missing.jsonl)")
        if self.failures:
            lines.append(f"  {len(self.failures)} sample(s) failed (see failures.jsonl), "
                         f"e.g. {self.failures[0]['error']}")
        return "\n".join(lines)


# --- finding and checking the files ---------------------------------------------------------


def parse_feature_args(values) -> dict[str, str]:
    """["audio=DIR", ...] (the CLI's repeated --feature) -> {"audio": "DIR", ...}."""
    out: dict[str, str] = {}
    for value in values or ():
        name, sep, folder = str(value).partition("=")
        name = name.strip()
        if not sep or not name or not folder:
            raise UserError(f"--feature expects MODALITY=DIR, got {value!r}")
        if safe_key(name) != name or "-" in name:
            raise UserError(f"--feature {value!r}: a modality name uses letters, digits and "
                            "'_' only")
        if name in out:
            raise UserError(f"--feature {name} given twice")
        out[name] = folder
    if not out:
        raise UserError("give at least one --feature MODALITY=DIR")
    return out


def scan_folder(folder: str, max_depth: int = 2) -> dict[str, str]:
    """stem -> path of every .npy under `folder` (subfolders up to `max_depth`)."""
    if not os.path.isdir(folder):
        raise UserError(f"feature folder not found: {folder}")
    found: dict[str, str] = {}
    base = os.path.abspath(folder)
    for dirpath, dirnames, filenames in os.walk(base):
        depth = os.path.relpath(dirpath, base).count(os.sep) + (dirpath != base)
        if depth >= max_depth:
            dirnames[:] = []
        dirnames.sort()
        for name in sorted(filenames):
            if not name.endswith(".npy"):
                continue
            stem = name[:-4]
            path = os.path.join(dirpath, name)
            if stem in found:
                raise UserError(f"{folder}: two feature files for clip {stem!r}: "
                                f"{found[stem]} and {path}")
            found[stem] = path
    return found


def _candidates(record: Record) -> list[str]:
    names = [record.key]
    extra = record.extra or {}
    if extra.get("clip"):
        names.append(str(extra["clip"]))
    for path in (record.video, record.audio):
        if path:
            names.append(os.path.splitext(os.path.basename(path))[0])
    return names


def match_files(records: list[Record], files: dict[str, str]) -> dict[str, str]:
    """record key -> feature file, by key, `extra.clip` or the media file's stem."""
    matched = {}
    for r in records:
        for name in _candidates(r):
            if name in files:
                matched[r.key] = files[name]
                break
    return matched


def header(path: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a .npy without reading its data or unpickling anything; ValueError
    when the file is not a .npy or is shorter than its header says (truncated copy)."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            fh.close()
            array = np.load(path, mmap_mode="r", allow_pickle=False)
            return tuple(array.shape), array.dtype
        offset = fh.tell()
    shape = tuple(int(s) for s in shape)
    if dtype.kind != "O":
        expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if os.path.getsize(path) < expected:
            raise ValueError(f"truncated: {os.path.getsize(path)} bytes, header says {expected}")
    return shape, dtype


def feature_dim(modality: str, folder: str, matched: dict[str, str]) -> tuple[int, list[dict]]:
    """The one dim of a modality's files, and the files whose header could not be read.

    Raises UserError naming the files when dims differ, a file is not [time, dim] or [dim],
    or its values are not numbers (object arrays would need unpickling)."""
    dims: dict[int, list[str]] = defaultdict(list)
    unreadable = []
    for key, path in sorted(matched.items()):
        try:
            shape, dtype = header(path)
        except (OSError, ValueError) as exc:
            unreadable.append({"key": key, "path": path, "stage": "features",
                               "error": f"{os.path.basename(path)}: not a readable .npy "
                                        f"({exc})"})
            continue
        if dtype.kind not in "fiub":
            raise UserError(f"{path}: {modality} features must be numbers, got dtype {dtype} "
                            "(object arrays are never unpickled)")
        if len(shape) not in (1, 2) or shape[-1] < 1:
            raise UserError(f"{path}: {modality} features must be [time, dim] (or [dim]), got "
                            f"shape {list(shape)}")
        dims[shape[-1]].append(path)
    if len(dims) > 1:
        parts = []
        for dim, paths in sorted(dims.items(), key=lambda kv: -len(kv[1])):
            names = ", ".join(os.path.basename(p) for p in paths[:3])
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            parts.append(f"dim {dim} in {names}{more}")
        raise UserError(f"{folder}: {modality} feature dims differ across clips: "
                        + "; ".join(parts))
    if not dims:
        raise UserError(f"{folder}: none of the matching {modality} feature files is readable, "
                        f"e.g. {unreadable[0]['error']}")
    return next(iter(dims)), unreadable


# --- one shard ------------------------------------------------------------------------------


def load_feature(path: str, dim: int, dtype: str) -> np.ndarray:
    """One clip's features as [time, dim] in `dtype`; ValueError says what is wrong."""
    array = np.load(path, allow_pickle=False)
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"shape {list(array.shape)}, expected [time, {dim}]")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("contains NaN or infinite values")
    if dtype == "float16" and array.size and float(np.abs(array).max()) > FLOAT16_MAX:
        raise ValueError("values exceed the float16 range; import with --dtype float32")
    return array.astype(dtype)


def feature_members(record: dict, paths: dict, dims: dict, dtype: str) -> dict[str, bytes]:
    """Tar members of one sample (without the key prefix); ValueError names the bad file."""
    members: dict[str, bytes] = {}
    lengths, masked = {}, []
    for m, dim in dims.items():
        path = paths.get(m)
        if path is None:
            array = np.zeros((0, dim), dtype=dtype)
            masked.append(m)
        else:
            try:
                array = load_feature(path, dim, dtype)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{path}: {exc}") from None
        members[f"{m}.npy"] = npy_bytes(array)
        lengths[m] = int(array.shape[0])
    meta = {k: v for k, v in record.items() if k not in ("video", "audio")}
    meta["lengths"] = lengths
    meta["masked"] = masked
    members["cls"] = str(record["label_id"]).encode("ascii")
    members["json"] = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    transcript = (record.get("extra") or {}).get("transcript")
    if isinstance(transcript, str) and transcript:
        members["txt"] = transcript.encode("utf-8")
    return members


def write_feature_shard(job: FeatureJob) -> dict:
    """Write one shard, skipped when done. Into a folder: a temporary name, renamed when
    complete; into s3:// or gs://: written in a local scratch folder and uploaded when
    complete. The stats (the done marker) come last, as in `write_shard`."""
    store = Store.at(job.out)
    stats_name = f"{job.name}.json"
    stats = finished_stats(store, stats_name)
    if stats is not None:
        stats["skipped"] = True
        return stats
    started = time.time()
    scratch = None if store.local else local_scratch()
    folder = scratch or job.out
    tar_path = os.path.join(folder, f"{job.name}.tar")
    tmp_path = os.path.join(folder, f".{job.name}.tar.tmp-{os.getpid()}")
    failures, classes, samples = [], Counter(), 0
    try:
        with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for record, paths in job.records:
                try:
                    members = feature_members(record, paths, job.dims, job.dtype)
                except ValueError as exc:
                    failures.append({"key": record["key"], "path": str(exc).split(": ")[0],
                                     "stage": "features", "error": str(exc)})
                    continue
                for suffix, data in members.items():
                    add_member(tar, f"{record['key']}.{suffix}", data)
                samples += 1
                classes[str(record["label_id"])] += 1
        os.replace(tmp_path, tar_path)
        size = os.path.getsize(tar_path)
        if scratch is not None:
            store.put_file(tar_path, f"{job.name}.tar")
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    finally:
        if scratch is not None:
            remove_scratch(scratch)
    stats = {"shard": f"{job.name}.tar", "split": job.split, "samples": samples,
             "bytes": size, "classes": dict(sorted(classes.items())),
             "failures": failures, "seconds": round(time.time() - started, 3)}
    store.write_json(stats_name, stats)
    return stats


# --- the whole import -----------------------------------------------------------------------


def plan(records: list[Record], found: dict[str, dict[str, str]], dims: dict[str, int],
         *, keep_missing: bool) -> tuple[list[tuple[Record, dict]], list[dict]]:
    """(record, {modality: path or None}) to write, and one `missing` entry per clip that
    lacks a modality (dropped unless `keep_missing`; a clip with none at all is dropped)."""
    items, missing = [], []
    for r in records:
        paths = {m: found[m].get(r.key) for m in dims}
        absent = [m for m, p in paths.items() if p is None]
        if absent:
            kept = keep_missing and len(absent) < len(dims)
            missing.append({"key": r.key, "split": r.split, "missing": absent,
                            "kept": kept})
            if not kept:
                continue
        items.append((r, paths))
    return items, missing


def import_features(records: list[Record], folders: dict[str, str], out: str, *,
                    classes: list[str], dataset: str | None = None, keep_missing: bool = False,
                    dtype: str = "float16", shard_size: int = 1000, workers: int = 0,
                    executor: str = "local", ray_address: str | None = None, seed: int = 0,
                    overwrite: bool = False, progress: bool = False) -> ImportSummary:
    """Pack `folders` ({modality: DIR of {clip}.npy}) into shards under `out`."""
    from .executors import run_jobs

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    if not folders:
        raise UserError("give at least one --feature MODALITY=DIR")
    validate(records, classes, source="manifest", require_media=False)  # nothing is decoded
    found, dims, unreadable = {}, {}, []
    for m, folder in folders.items():
        files = scan_folder(folder)
        matched = match_files(records, files)
        if not matched:
            names = ", ".join(sorted(files)[:3]) or "no .npy files at all"
            keys = ", ".join(r.key for r in records[:3])
            raise UserError(f"{folder}: no {m} feature file matches a clip of the manifest "
                            f"(files: {names}; manifest keys: {keys}, ...)")
        dims[m], bad = feature_dim(m, folder, matched)
        bad_keys = {b["key"] for b in bad}
        found[m] = {k: p for k, p in matched.items() if k not in bad_keys}
        unreadable.extend(bad)
    broken = {b["key"] for b in unreadable}
    items, missing = plan([r for r in records if r.key not in broken], found, dims,
                          keep_missing=keep_missing)
    if not items:
        raise UserError("no clip has all its features; pass --keep-missing to keep clips with "
                        "some modalities masked")
    args = {"features": {m: os.path.abspath(f) for m, f in folders.items()}, "dims": dims,
            "dtype": dtype, "keep_missing": keep_missing, "shard_size": shard_size,
            "seed": seed, "samples": len(items)}
    prepare_shard_dir(out, build_fingerprint([r for r, _ in items], args), args, overwrite)
    jobs = []
    for split in SPLITS:
        members = [(r.to_dict(), paths) for r, paths in items if r.split == split]
        random.Random(f"{seed}:{split}").shuffle(members)
        for i in range(0, len(members), shard_size):
            jobs.append(FeatureJob(split, i // shard_size, members[i:i + shard_size], out, dims,
                                   dtype))
    started = time.time()
    stats = run_jobs(write_feature_shard, jobs, executor=executor, workers=workers,
                     ray_address=ray_address, progress=progress)
    failures = unreadable + [f for job in jobs for f in stats[job.name]["failures"]]
    store = Store.at(out)
    for name, lines in (("failures.jsonl", failures), ("missing.jsonl", missing)):
        store.write_bytes(name, "".join(json.dumps(line, ensure_ascii=False) + "\n"
                                        for line in lines).encode("utf-8"))
    absent = Counter(m for entry in missing for m in entry["missing"])
    features = {m: {"dim": dims[m], "dtype": dtype, "member": f"{m}.npy",
                    "clips": len(found[m]), "missing": absent[m]} for m in dims}
    modalities = list(dims)
    if "text" not in dims and any((r.extra or {}).get("transcript") for r, _ in items):
        modalities.append("text")  # raw transcripts, read by the built-in byte encoder
    meta = {"dataset": dataset, "classes": list(classes), "modalities": modalities,
            "features": features, "keep_missing": keep_missing,
            "preset": {"name": "features"}, "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": args}
    index = make_index(out, jobs, stats, meta)
    index["failures"] = len(failures)
    index["missing"] = len(missing)
    store.write_json("index.json", index)  # last: a reader never sees a half-built set
    skipped = sum(bool(stats[j.name].get("skipped")) for j in jobs)
    return ImportSummary(out=out, index=index, failures=failures, missing=missing,
                         shards_written=len(jobs) - skipped, shards_skipped=skipped,
                         seconds=time.time() - started)
