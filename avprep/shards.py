"""build-shards: manifest records -> sharded WebDataset tars of spectrograms and frames.

The flow is plan -> per-shard workers -> atomic tars -> per-shard stats -> index.json:

- `plan_shards` assigns samples to shards deterministically (a seeded shuffle of each split),
  so the same input and arguments always give the same shards — what makes resume safe;
- `write_shard` converts one shard: each clip decoded once (frames + audio in one ffmpeg
  pass), JPEG-encoded as frames stream in, the tar written under a temporary name and renamed
  when complete, then `{shard}.json` stats written last as the "done" marker;
- `build_shards` runs the jobs on an executor (local processes or Ray), skips shards that are
  done, and writes `failures.jsonl` and `index.json` at the end.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .errors import MediaError, UserError
from .manifest import SPLITS, Record, validate
from .outputs import make_output_dir
from .presets import Preset
from .storage import Store, local_scratch, remove_scratch

FORMAT = "avbalance-shards"
FORMAT_VERSION = 1
BUILD_FILE = "build.json"
MISSING_AUDIO = ("drop", "silence")
MIN_AUDIO_SECONDS = 0.05


@dataclass
class ShardJob:
    """One shard to write: its name and the records that go into it, in order."""

    split: str
    index: int
    records: list[Record]
    out: str
    preset: dict
    missing_audio: str = "drop"
    max_bytes: int | None = None  # cut the shard's tar into parts past this size

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"


@dataclass
class BuildSummary:
    out: str
    index: dict
    failures: list[dict]
    shards_written: int
    shards_skipped: int
    seconds: float
    by_stage: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        lines = [f"shards in {self.out}: {self.shards_written} written, "
                 f"{self.shards_skipped} already done ({self.seconds:.1f} s)"]
        for split, info in self.index["splits"].items():
            lines.append(f"  {split:>5}: {info['samples']} samples in {len(info['shards'])} "
                         "shard(s)")
        if self.failures:
            lines.append(f"  {len(self.failures)} sample(s) failed (see failures.jsonl):")
            for stage, count in self.by_stage.most_common(5):
                example = next(f["error"] for f in self.failures if f["stage"] == stage)
                lines.append(f"    {count} x {stage}: e.g. {example}")
        else:
            lines.append("  no failures")
        return "\n".join(lines)


def parse_size(text: str | int) -> int:
    """Bytes from `123`, `500K`, `500M`, `2G` (powers of 1024; a trailing B is allowed)."""
    value = str(text).strip().upper().removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(value[-1:], 1)
    number = value[:-1] if scale > 1 else value
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise UserError(f"not a size: {text!r} (examples: 500M, 2G, 1000000)") from None
    if size < 1:
        raise UserError(f"a size must be positive, got {text!r}")
    return size


# --- planning -------------------------------------------------------------------------------


def plan_shards(records: list[Record], out: str, preset: Preset, *, shard_size: int = 1000,
                seed: int = 0, missing_audio: str = "drop") -> list[ShardJob]:
    """Deterministic assignment: each split in manifest order after a seeded shuffle."""
    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    jobs = []
    for split in SPLITS:
        members = [r for r in records if r.split == split]
        random.Random(f"{seed}:{split}").shuffle(members)
        for i in range(0, len(members), shard_size):
            jobs.append(ShardJob(split, i // shard_size, members[i:i + shard_size], out,
                                 preset.to_dict(), missing_audio))
    return jobs


# --- one sample -----------------------------------------------------------------------------


def npy_bytes(array: np.ndarray) -> bytes:
    """Arrays travel inside tars as .npy bytes, which load without pickle."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, data = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise MediaError("JPEG encoding failed", stage="encode")
    return data.tobytes()


def _frames_from_folder(folder: str) -> list[bytes]:
    """Frames a seed script already extracted (Image-01-FPS/{clip}/*.jpg): used as they are."""
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".jpg", ".jpeg")))
    if not names:
        raise MediaError(f"{folder}: no JPEG frames", path=folder, stage="frames")
    frames = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as fh:
            frames.append(fh.read())
    return frames


def convert_sample(record: Record, preset: Preset, missing_audio: str = "drop",
                   face_cropper=None) -> dict[str, bytes]:
    """The tar members of one sample (without the key prefix); raises MediaError on failure."""
    from .media import decode_clip

    jpegs: list[bytes] = []
    faces_found = 0

    def on_frame(_i: int, rgb: np.ndarray) -> None:
        nonlocal faces_found
        if face_cropper is not None:
            rgb, found = face_cropper.crop(rgb)
            faces_found += bool(found)
        jpegs.append(_encode_jpeg(rgb, preset.jpeg_quality))

    frames_dir = (record.extra or {}).get("frames_dir")
    want_frames = record.video is not None and not frames_dir
    if record.video is None and record.audio is None and not frames_dir:
        raise MediaError(f"{record.key}: no video or audio path", stage="open")
    clip = decode_clip(
        record.video if want_frames else None,
        audio=record.audio if (record.audio or not want_frames) else None,
        fps=preset.fps, short_side=preset.frame_size or None,
        sample_rate=preset.decode_rate or preset.sample_rate, start=record.start, end=record.end,
        frames=want_frames, on_frame=on_frame, mono_mix=preset.mono_mix,
    ) if (record.video or record.audio) else None
    if frames_dir:
        jpegs = _frames_from_folder(frames_dir)
    source = record.video or record.audio or frames_dir
    meta = {**record.to_dict(), "fps": preset.fps, "n_frames": len(jpegs)}
    meta.pop("video", None)
    meta.pop("audio", None)
    meta["source"] = os.path.basename(source)
    if clip is not None:
        duration = (clip.audio_info or clip.info).duration if not want_frames else \
            clip.info.duration
        if record.start is not None or record.end is not None:  # a segment (AVE, VGGSound)
            begin = record.start or 0.0
            end = record.end if duration is None else min(record.end or duration, duration)
            duration = None if end is None else max(0.0, end - begin)
        meta["duration"] = None if duration is None else round(duration, 6)
    if clip is None or clip.audio is None:
        if missing_audio == "drop":
            raise MediaError(f"{source}: no audio stream", path=source, stage="no_audio")
        spec = preset.silent_spectrogram()
        meta["audio"] = "silence"
        meta["has_audio"] = False
    else:
        if clip.audio.size < MIN_AUDIO_SECONDS * (preset.decode_rate or preset.sample_rate):
            raise MediaError(f"{source}: audio shorter than {MIN_AUDIO_SECONDS} s", path=source,
                             stage="too_short")
        spec = preset.spectrogram_of(preset.resample_decoded(clip.audio))
        meta["audio"] = "decoded"
        meta["has_audio"] = True
    if not jpegs:
        raise MediaError(f"{source}: no frames", path=source, stage="no_video")
    if face_cropper is not None:
        meta["face_ratio"] = round(faces_found / len(jpegs), 4)
    members = {"spec.npy": npy_bytes(spec.astype(np.float16)),
               "cls": str(record.label_id).encode("ascii"),
               "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}
    for i, data in enumerate(jpegs):
        members[f"f{i:03d}.jpg"] = data
    transcript = (record.extra or {}).get("transcript")
    if isinstance(transcript, str) and transcript:
        members["txt"] = transcript.encode("utf-8")
    return members


# --- one shard ------------------------------------------------------------------------------


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add bytes with fixed metadata, so the same samples give byte-identical tars."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_json_atomic(path: str, data) -> None:
    """Written under a temporary name and renamed: a reader or a resumed build never sees half
    a file, which is what lets a stats file mark its shard as done."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def tar_parts(stats: dict) -> list[dict]:
    """The tars of one shard, `[{url, samples, bytes, classes}]`: one, or several when
    `--max-shard-bytes` cut it (stats written before parts existed have no "parts")."""
    if stats.get("parts"):
        return stats["parts"]
    return [{"url": stats["shard"], "samples": stats["samples"], "bytes": stats["bytes"],
             "classes": stats["classes"]}]


def finished_stats(store: Store, name: str) -> dict | None:
    """The stats of a shard that is done, or None when it must be (re)written: no stats, or
    stats whose tar is gone or has another size (a user deleted or damaged it). `name` is the
    stats file/object, `{shard}.json`, under the store's folder or prefix."""
    if store.size(name) is None:
        return None
    try:
        stats = json.loads(store.read_bytes(name))
        for part in tar_parts(stats):
            if store.size(part["url"]) != part["bytes"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, UserError):
        return None
    return stats


def _member_bytes(members: dict[str, bytes]) -> int:
    """Bytes the members take in a tar: a 512-byte header each, data padded to 512."""
    return sum(512 + -(-len(data) // 512) * 512 for data in members.values())


class _ShardTars:
    """Writes one shard's samples to `NAME.tar` — and, past `max_bytes`, on to `NAME-001.tar`,
    `NAME-002.tar`, ... — under temporary names; `commit()` renames them into place."""

    def __init__(self, out: str, name: str, max_bytes: int | None = None):
        self.out, self.name, self.max_bytes = out, name, max_bytes
        self.parts: list[dict] = []
        self.spans: dict[str, list] = {}  # tar -> [key, offset, length, suffixes] per sample
        self.tmps: list[str] = []
        self.tar: tarfile.TarFile | None = None
        self.size = 0

    def _next(self) -> None:
        if self.tar is not None:
            self.tar.close()
        n = len(self.parts)
        url = f"{self.name}.tar" if n == 0 else f"{self.name}-{n:03d}.tar"
        tmp = os.path.join(self.out, f".{url}.tmp-{os.getpid()}")
        self.tmps.append(tmp)
        # PAX, not USTAR: a key longer than ~90 characters (file names of folder datasets)
        # needs a long-name header; short names give the same bytes in both formats.
        self.tar = tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT)
        self.parts.append({"url": url, "samples": 0, "bytes": 0, "classes": Counter()})
        self.spans[url] = []
        self.size = 0

    def add(self, key: str, label_id: int, members: dict[str, bytes]) -> None:
        size = _member_bytes(members)
        if self.tar is None or (self.max_bytes and self.parts[-1]["samples"]
                                and self.size + size > self.max_bytes):
            self._next()
        start = self.tar.offset
        for suffix, data in members.items():
            add_member(self.tar, f"{key}.{suffix}", data)
        self.spans[self.parts[-1]["url"]].append(
            [key, start, self.tar.offset - start, " ".join(members)])
        self.size += size
        self.parts[-1]["samples"] += 1
        self.parts[-1]["classes"][str(label_id)] += 1

    def commit(self) -> list[dict]:
        if self.tar is None:
            self._next()  # every sample failed: an empty tar keeps the shard's name
        self.tar.close()
        for tmp, part in zip(self.tmps, self.parts):
            final = os.path.join(self.out, part["url"])
            os.replace(tmp, final)
            part["bytes"] = os.path.getsize(final)
            part["classes"] = {k: part["classes"][k] for k in sorted(part["classes"], key=int)}
        self.tmps = []
        return self.parts

    def discard(self) -> None:
        """Disk full, kill, ...: never leave a half tar around."""
        if self.tar is not None:
            try:
                self.tar.close()
            except OSError:
                pass
        for tmp in self.tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_shard(job: ShardJob) -> dict:
    """Convert one shard; returns its stats. Skips the work when the shard is already done.

    Into a folder: the tar is renamed into place when complete, then the stats are written.
    Into s3:// or gs://: the tar is written to a local scratch folder, uploaded when complete
    (an object exists only once its upload is), then the stats object — the done marker — is
    put; a kill at any moment leaves either no marker or a complete shard before it.
    """
    store = Store.at(job.out)
    stats_name = f"{job.name}.json"
    stats = finished_stats(store, stats_name)
    if stats is not None:
        stats["skipped"] = True
        return stats
    preset = Preset.from_dict(job.preset)
    cropper = None
    if preset.faces:
        from .faces import FaceCropper

        cropper = FaceCropper(size=preset.face_size)
    from .executors import report_sample

    started = time.time()
    failures = []
    scratch = None if store.local else local_scratch()
    try:
        parts, spans = _convert_records(job, preset, cropper, scratch or job.out, failures,
                                        report_sample)
        if scratch is not None:
            for part in parts:
                store.put_file(os.path.join(scratch, part["url"]), part["url"])
    finally:
        if scratch is not None:
            remove_scratch(scratch)
    classes = Counter()
    for part in parts:
        classes.update(part["classes"])
    stats = {"shard": parts[0]["url"], "split": job.split,
             "samples": sum(p["samples"] for p in parts),
             "bytes": sum(p["bytes"] for p in parts),
             "classes": {k: classes[k] for k in sorted(classes, key=int)},
             "parts": parts, "failures": failures, "seconds": round(time.time() - started, 3),
             # per tar, per sample: [key, byte offset, byte length, member suffixes], what the
             # exact-epoch loader (avtrain.sampling) reads a sample by without scanning the tar
             "spans": spans}
    store.write_json(stats_name, stats)
    return stats


def _convert_records(job: ShardJob, preset: Preset, cropper, folder: str, failures: list,
                     report_sample) -> tuple[list[dict], dict[str, list]]:
    """The shard's samples converted into complete tars under their final names in `folder`;
    the tars' parts and each tar's sample spans, failures appended to `failures`."""
    tars = _ShardTars(folder, job.name, job.max_bytes)
    try:
        for record in job.records:
            try:
                members = convert_sample(record, preset, job.missing_audio, cropper)
            except MediaError as exc:
                failures.append({"key": record.key, "path": exc.path or record.video,
                                 "stage": exc.stage, "error": str(exc)})
                report_sample(job.name, False)
                continue
            except Exception as exc:  # one odd clip must not lose the shard
                failures.append({"key": record.key, "path": record.video,
                                 "stage": "convert", "error": f"{type(exc).__name__}: {exc}"})
                report_sample(job.name, False)
                continue
            tars.add(record.key, record.label_id, members)
            report_sample(job.name, True)
        return tars.commit(), tars.spans
    except BaseException:
        tars.discard()
        raise


# --- the whole build ------------------------------------------------------------------------


def build_fingerprint(records: list[Record], args: dict) -> str:
    """What decides a shard set's bytes; a rerun against OUT with another one is refused."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode())
    for r in records:
        digest.update(json.dumps(r.to_dict(), sort_keys=True).encode())
    return digest.hexdigest()


def prepare_shard_dir(out: str, fingerprint: str, args: dict, overwrite: bool) -> None:
    """Make OUT ready for a (resumed) build without ever deleting what a build did not write."""
    store = Store.at(out)
    if not store.local:
        return _prepare_remote(store, fingerprint, args, overwrite)
    make_output_dir(out)  # with its missing parents
    if not os.access(out, os.W_OK):
        raise UserError(f"{out} is not writable")
    build_path = os.path.join(out, BUILD_FILE)
    ours = os.path.exists(build_path) or os.path.exists(os.path.join(out, "index.json"))
    if os.listdir(out) and not ours:
        raise UserError(f"{out} is not empty and holds no shard set; choose an empty folder")
    if os.path.exists(build_path):
        with open(build_path, encoding="utf-8") as fh:
            previous = json.load(fh)
        if previous.get("fingerprint") != fingerprint:
            if not overwrite:
                changed = sorted(k for k in args if previous.get("args", {}).get(k) != args[k])
                what = ", ".join(changed) if changed else "the manifest"
                raise UserError(f"{out} was built with other arguments (changed: {what}); "
                                "pass --overwrite to rebuild it, or choose another folder")
            remove_shard_set(out)
    elif ours and overwrite:
        remove_shard_set(out)
    for name in os.listdir(out):  # left by a killed run; its shard has no stats, so it is redone
        if ".tmp-" in name:
            os.remove(os.path.join(out, name))
    write_json_atomic(build_path, {"fingerprint": fingerprint, "args": args})


def _prepare_remote(store: Store, fingerprint: str, args: dict, overwrite: bool) -> None:
    """prepare_shard_dir for an s3:// or gs:// prefix (no temporary objects exist there: tars
    are uploaded only when complete)."""
    out = store.location
    if not store.writable:
        store.write_bytes(BUILD_FILE, b"")  # raises the one-line read-only error
    names = store.names()
    ours = BUILD_FILE in names or "index.json" in names
    if names and not ours:
        raise UserError(f"{out} is not empty and holds no shard set; choose an empty prefix")
    if BUILD_FILE in names:
        previous = store.read_json(BUILD_FILE)
        if previous.get("fingerprint") != fingerprint:
            if not overwrite:
                changed = sorted(k for k in args if previous.get("args", {}).get(k) != args[k])
                what = ", ".join(changed) if changed else "the manifest"
                raise UserError(f"{out} was built with other arguments (changed: {what}); "
                                "pass --overwrite to rebuild it, or choose another prefix")
            remove_shard_set(out)
    elif ours and overwrite:
        remove_shard_set(out)
    store.write_json(BUILD_FILE, {"fingerprint": fingerprint, "args": args})


def _is_build_file(name: str) -> bool:
    is_shard = name.split("-")[0] in SPLITS and name.endswith((".tar", ".json"))
    return is_shard or name in ("index.json", "failures.jsonl", BUILD_FILE) or ".tar.tmp-" in name


def remove_shard_set(out: str) -> None:
    """Delete the files a build writes (and nothing else)."""
    store = Store.at(out)
    if not store.local:
        for name in sorted(store.names()):
            if "/" not in name and _is_build_file(name):
                store.remove(name)
        return
    for name in os.listdir(out):
        if _is_build_file(name):
            os.remove(os.path.join(out, name))


def make_index(out: str, jobs: list[ShardJob], stats: dict[str, dict], meta: dict) -> dict:
    """index.json from the per-shard stats: the one file a reader needs to plan its epochs."""
    splits = {}
    num_classes = len(meta["classes"])
    for split in SPLITS:
        shards = [stats[j.name] for j in jobs if j.split == split]
        if not shards:
            continue
        class_counts = [0] * num_classes
        for s in shards:
            for label, n in s["classes"].items():
                class_counts[int(label)] += n
        splits[split] = {
            "samples": sum(s["samples"] for s in shards),
            "shards": [part for s in shards for part in tar_parts(s)],
            "class_counts": class_counts,
        }
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **meta,
            "num_classes": num_classes, "splits": splits,
            "failures": sum(len(s["failures"]) for s in stats.values())}


def build_shards(records: list[Record], out: str, preset: Preset, *, classes: list[str],
                 dataset: str | None = None, shard_size: int = 1000, workers: int = 0,
                 executor: str = "local", ray_address: str | None = None,
                 splits: list[str] | None = None, limit: int | None = None,
                 missing_audio: str = "drop", overwrite: bool = False, seed: int = 0,
                 progress: bool = False, extra_args: dict | None = None,
                 max_shard_bytes: int | None = None) -> BuildSummary:
    """Write (or finish writing) the shard set for `records` under `out`.

    `shard_size` samples per planned shard; `max_shard_bytes` also cuts a shard's tar into
    `-001`, `-002`, ... parts once it would pass that size (each part is listed in index.json
    as a shard). Rerunning with the same arguments finishes an interrupted build.
    """
    from .executors import run_jobs

    if missing_audio not in MISSING_AUDIO:
        raise UserError(f"--missing-audio must be one of {', '.join(MISSING_AUDIO)}")
    validate(records, classes, source="manifest")
    if splits:
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise UserError(f"unknown split(s) {', '.join(sorted(unknown))}; "
                            f"choose from {', '.join(SPLITS)}")
        records = [r for r in records if r.split in splits]
    if limit is not None:
        records = [r for split in SPLITS for r in [x for x in records if x.split == split][:limit]]
    if not records:
        raise UserError("no records left to convert (check --splits / --limit)")
    if max_shard_bytes is not None and max_shard_bytes < 1:
        raise UserError(f"--max-shard-bytes must be positive, got {max_shard_bytes}")
    args = {"preset": preset.build_args(), "shard_size": shard_size, "seed": seed,
            "missing_audio": missing_audio, "splits": splits, "limit": limit,
            "samples": len(records), **(extra_args or {})}
    if max_shard_bytes is not None:  # only when set: older shard sets keep resuming
        args["max_shard_bytes"] = max_shard_bytes
    prepare_shard_dir(out, build_fingerprint(records, args), args, overwrite)
    jobs = plan_shards(records, out, preset, shard_size=shard_size, seed=seed,
                       missing_audio=missing_audio)
    for job in jobs:
        job.max_bytes = max_shard_bytes
    started = time.time()
    try:
        stats = run_jobs(write_shard, jobs, executor=executor, workers=workers,
                         ray_address=ray_address, progress=progress)
    except OSError as exc:  # disk full, permissions, ...: finished shards stay done
        done = sum(finished_stats(Store.at(out), f"{j.name}.json") is not None for j in jobs)
        where = f"{exc.filename}: " if exc.filename else ""
        raise UserError(f"writing shards in {out} failed ({where}{exc.strerror or exc}); "
                        f"{done} of {len(jobs)} shards are complete and kept, rerun the same "
                        "command to finish") from None
    failures = [f for job in jobs for f in stats[job.name]["failures"]]
    store = Store.at(out)
    store.write_bytes("failures.jsonl", "".join(json.dumps(f, ensure_ascii=False) + "\n"
                                                for f in failures).encode("utf-8"))
    modalities = ["audio", "visual"]
    if any((r.extra or {}).get("transcript") for r in records):
        modalities.append("text")
    meta = {"dataset": dataset, "classes": list(classes), "modalities": modalities,
            "preset": preset.to_dict(), "tool_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "args": args}
    index = make_index(out, jobs, stats, meta)
    store.write_json("index.json", index)  # last: a reader never sees a half-built set
    skipped = sum(bool(stats[j.name].get("skipped")) for j in jobs)
    return BuildSummary(out=out, index=index, failures=failures,
                        shards_written=len(jobs) - skipped, shards_skipped=skipped,
                        seconds=time.time() - started,
                        by_stage=Counter(f["stage"] for f in failures))


def load_source(manifest: str | None = None, dataset: str | None = None,
                root: str | None = None, preset: str | None = None, **dataset_options):
    """(Manifest, Preset) from `--manifest FILE` or `--dataset NAME --root DIR`; the preset
    defaults to the dataset's YAML (or the manifest's dataset name)."""
    from .datasets import available, dataset_defaults
    from .presets import PRESETS, get_preset
    from .sources import read_source

    loaded = read_source(manifest, dataset, root, **dataset_options)
    name = dataset or loaded.dataset
    if preset is None:
        if name and name in available():
            preset = dataset_defaults(name).get("preset")
        elif name in PRESETS:
            preset = name
    if preset is None:
        raise UserError(f"no default preset for dataset {name!r}; pass --preset "
                        f"({', '.join(sorted(PRESETS))})")
    return loaded, get_preset(preset)
