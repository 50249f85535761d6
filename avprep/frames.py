"""extract-frames and extract-audio: the seed scripts' outputs, made in parallel and resumably.

Frames: `OUT/{key}/{index:05d}.jpg` (index 0 is t = 0), or with `fmt="h5"` one HDF5 file per
split, `OUT/{split}.h5`, holding one variable-length uint8 dataset per clip (one JPEG per
element, the key as the dataset name, attributes fps/source/label/split/n_frames).
Audio: `OUT/{key}.wav`, mono 16-bit PCM at the requested rate.

The frame rule is the released extraction's (OGM-GE / OLM `data/*/video_preprocessing.py`:
cv2 reads every frame and keeps those whose index is a multiple of int(native fps)): at 1 fps
frame i is decoded frame i * int(native fps), counted from the stream's first frame, so a stream
that starts late (CREMA-D's FLV: 25 ms) still gives its first frame as index 0. A clip of D
seconds at an integer native rate gives `expected_frames(D, fps)` = ceil(D * fps) frames (2.5 s
at 1 fps: 3 frames, t = 0, 1, 2; 1.4 s at 1 fps: 2 frames, t = 0, 1); see `media.decode_clip`.

Resumable and atomic per clip: a clip is written under OUT/.partial/ and renamed into place
when complete, so an interrupted run never leaves a half clip under its final name and a rerun
skips what is done. A clip that cannot be decoded is recorded in OUT/frames-failures.jsonl (or
OUT/audio-failures.jsonl) and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from .errors import MediaError, UserError
from .manifest import Record
from .outputs import make_output_dir

PARTIAL = ".partial"
STAGING = ".staging"
FRAME_SETTINGS = "extract-frames.json"
AUDIO_SETTINGS = "extract-audio.json"
FRAME_FAILURES = "frames-failures.jsonl"
AUDIO_FAILURES = "audio-failures.jsonl"


def expected_frames(duration: float, fps: float) -> int:
    """Frames sampled from a video stream lasting `duration` seconds: one at each t = i / fps
    with t < duration (the 1e-6 absorbs float error in duration * fps)."""
    return max(1, math.ceil(duration * fps - 1e-6))


@dataclass
class ExtractSummary:
    out: str
    total: int = 0
    done: int = 0  # written by this run
    skipped: int = 0  # already complete from an earlier run
    failures: list[dict] = field(default_factory=list)
    frames: int = 0
    face_ratio: float | None = None  # mean over clips written this run (faces only)
    failures_file: str = "failures.jsonl"

    @property
    def failed(self) -> int:
        return len(self.failures)

    def describe(self) -> str:
        text = (f"{self.done} clips written, {self.skipped} already done, {self.failed} failed "
                f"(of {self.total}) in {self.out}")
        if self.frames:
            text += f"; {self.frames} frames"
        if self.face_ratio is not None:
            text += f"; faces found in {self.face_ratio:.0%} of frames"
        if self.failures:
            text += f"\nfailures: {os.path.join(self.out, self.failures_file)}"
        return text


# --- shared run machinery --------------------------------------------------------------------


def _prepare_out(out: str, settings_name: str, settings: dict, overwrite: bool) -> None:
    """Create OUT, check an earlier run used the same settings, clear stale partial clips."""
    make_output_dir(out)  # with its missing parents
    path = os.path.join(out, settings_name)
    ours = {FRAME_SETTINGS, AUDIO_SETTINGS}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            previous = json.load(fh)
        if previous != settings and not overwrite:
            changed = ", ".join(f"{k} {previous.get(k)!r} -> {v!r}" for k, v in settings.items()
                                if previous.get(k) != v)
            raise UserError(f"{out} was extracted with other settings ({changed}); pass "
                            "--overwrite to redo it, or choose another folder")
    elif not ours & set(os.listdir(out)) and [n for n in os.listdir(out) if n != PARTIAL]:
        raise UserError(f"{out} is not empty and holds no extract-frames/extract-audio output; "
                        "choose an empty or new folder")
    shutil.rmtree(os.path.join(out, PARTIAL), ignore_errors=True)
    os.makedirs(os.path.join(out, PARTIAL))
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(settings, fh, indent=2)
    os.replace(tmp, path)


def _run_jobs(fn, jobs: list[tuple], workers: int, progress: bool, desc: str):
    """Yield fn(job) results as they finish, in a process pool (or inline for 1 worker)."""
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc=desc, unit="clip", disable=not progress)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    yield future.result()
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    finally:
        bar.close()


def _failure(record: Record, exc: BaseException) -> dict:
    stage = getattr(exc, "stage", "error")
    return {"key": record.key, "source": record.video or record.audio, "stage": stage,
            "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__}


def _write_failures(out: str, failures: list[dict], name: str) -> None:
    """This run's failures (one JSON line each: key, source, stage, error); retried next run."""
    path = os.path.join(out, name)
    if not failures:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(f"{path}.tmp", "w", encoding="utf-8") as fh:
        for f in sorted(failures, key=lambda f: f["key"]):
            fh.write(json.dumps(f, ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)


def _finish_partial(out: str) -> None:
    try:
        os.rmdir(os.path.join(out, PARTIAL))
    except OSError:
        pass


# --- frames ----------------------------------------------------------------------------------


def _frames_job(job: tuple) -> dict:
    """Decode one clip's frames into OUT/.partial/{key}/ and rename it to `final`."""
    import cv2

    from .media import decode_clip

    record, partial, final, s = job
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    cropper = None
    if s["faces"]:
        from .faces import FaceCropper

        cropper = FaceCropper(size=s["face_size"])
    found = 0
    params = [cv2.IMWRITE_JPEG_QUALITY, int(s["quality"])]

    def save(i: int, rgb: np.ndarray) -> None:
        nonlocal found
        if cropper is not None:
            rgb, ok = cropper.crop(rgb)
            found += ok
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
        if not ok:
            raise MediaError(f"frame {i}: JPEG encoding failed", stage="encode")
        with open(os.path.join(partial, f"{i:05d}.jpg"), "wb") as fh:
            fh.write(buf.tobytes())

    try:
        if not record.video:
            raise MediaError("record has no video file", stage="no_video")
        clip = decode_clip(record.video, fps=s["fps"], short_side=s["size"] or None,
                           sample_rate=None, start=record.start, end=record.end, on_frame=save)
    except Exception as exc:  # one clip failing must not stop the run
        shutil.rmtree(partial, ignore_errors=True)
        return {"key": record.key, "ok": False, "failure": _failure(record, exc)}
    if os.path.isdir(final):
        shutil.rmtree(final)  # --overwrite: replace the old clip
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.rename(partial, final)
    result = {"key": record.key, "ok": True, "n_frames": clip.n_frames, "split": record.split,
              "label": record.label, "source": record.video, "fps": s["fps"]}
    if cropper is not None:
        result["face_ratio"] = found / clip.n_frames if clip.n_frames else 0.0
    return result


def _h5_keys(path: str) -> set[str]:
    import h5py

    if not os.path.isfile(path):
        return set()
    try:
        with h5py.File(path, "r") as f:
            return set(f.keys())
    except OSError as exc:
        raise UserError(f"{path} is not a readable HDF5 file ({exc}); move it away and rerun") from None


def _pack_h5(out: str, split: str, staged: dict[str, dict], settings: dict) -> None:
    """Write OUT/{split}.h5 from the old file plus newly staged clips, atomically."""
    import h5py

    path = os.path.join(out, f"{split}.h5")
    tmp = os.path.join(out, PARTIAL, f"{split}.h5")
    vlen = h5py.vlen_dtype(np.uint8)
    with h5py.File(tmp, "w") as dst:
        for k, v in settings.items():
            dst.attrs[k] = v
        if os.path.isfile(path):
            with h5py.File(path, "r") as src:
                for key in sorted(src.keys()):
                    if key not in staged:
                        src.copy(src[key], dst, name=key)
        for key in sorted(staged):
            info = staged[key]
            folder = os.path.join(out, STAGING, key)
            names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
            dset = dst.create_dataset(key, (len(names),), dtype=vlen)
            for i, name in enumerate(names):
                with open(os.path.join(folder, name), "rb") as fh:
                    dset[i] = np.frombuffer(fh.read(), np.uint8)
            for attr in ("fps", "source", "label", "split", "face_ratio"):
                if info.get(attr) is not None:
                    dset.attrs[attr] = info[attr]
            dset.attrs["n_frames"] = len(names)
    os.replace(tmp, path)
    for key in staged:
        shutil.rmtree(os.path.join(out, STAGING, key), ignore_errors=True)


def read_h5_clip(path: str | os.PathLike, key: str) -> list[bytes]:
    """The JPEG bytes of one clip from an `extract-frames --format h5` file."""
    import h5py

    with h5py.File(os.fspath(path), "r") as f:
        if key not in f:
            raise UserError(f"{path}: no clip {key!r}")
        return [bytes(a.tobytes()) for a in f[key][()]]


def _load_index(path: str) -> dict[str, dict]:
    entries: dict[str, dict] = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run
                entries[item["key"]] = item
    return entries


def extract_frames(records: Iterable[Record], out: str | os.PathLike, *, fps: float = 1.0,
                   size: int = 256, fmt: str = "jpg", quality: int = 90, faces: bool = False,
                   face_size: int = 112, workers: int = 0, progress: bool = False,
                   overwrite: bool = False) -> ExtractSummary:
    """Extract JPEG frames of every record (see the module docstring for layout and rules)."""
    out = os.fspath(out)
    records = list(records)
    if fmt not in ("jpg", "h5"):
        raise UserError(f"--format must be jpg or h5, got {fmt!r}")
    if fps <= 0:
        raise UserError(f"--fps must be positive, got {fps}")
    if size < 0 or not 1 <= quality <= 100:
        raise UserError("--size must be >= 0 and --quality between 1 and 100")
    if faces:
        from .faces import cascade_path

        cascade_path()  # fail once, early, when opencv has no cascade
    fps, size, quality = float(fps), int(size), int(quality)
    settings = {"kind": "frames", "fps": fps, "size": size, "format": fmt, "quality": quality,
                "faces": faces, "face_size": face_size if faces else None}
    _prepare_out(out, FRAME_SETTINGS, settings, overwrite)
    index_path = os.path.join(out, "frames.jsonl")
    index = {} if overwrite else _load_index(index_path)
    summary = ExtractSummary(out=out, total=len(records), failures_file=FRAME_FAILURES)
    done_h5: dict[str, set[str]] = {}
    jobs = []
    for r in records:
        if fmt == "jpg":
            final = os.path.join(out, r.key)
            complete = os.path.isdir(final)
        else:
            final = os.path.join(out, STAGING, r.key)
            if r.split not in done_h5:
                done_h5[r.split] = set() if overwrite else _h5_keys(
                    os.path.join(out, f"{r.split}.h5"))
            complete = os.path.isdir(final) or r.key in done_h5[r.split]
        if complete and not overwrite:
            summary.skipped += 1
            if r.key not in index and fmt == "jpg":  # finished by a run that was then killed
                index[r.key] = {"key": r.key, "ok": True, "split": r.split, "label": r.label,
                                "source": r.video, "fps": fps,
                                "n_frames": len(os.listdir(final))}
            continue
        jobs.append((r, os.path.join(out, PARTIAL, r.key), final, settings))
    ratios = []
    with open(index_path, "a", encoding="utf-8") as log:
        for result in _run_jobs(_frames_job, jobs, workers, progress, "frames"):
            if not result["ok"]:
                summary.failures.append(result["failure"])
                continue
            summary.done += 1
            summary.frames += result["n_frames"]
            if "face_ratio" in result:
                ratios.append(result["face_ratio"])
            index[result["key"]] = result
            log.write(json.dumps(result, ensure_ascii=False) + "\n")
            log.flush()
    if fmt == "h5":
        staging = os.path.join(out, STAGING)
        by_split: dict[str, dict[str, dict]] = {}
        for r in records:
            if os.path.isdir(os.path.join(staging, r.key)):
                by_split.setdefault(r.split, {})[r.key] = index.get(r.key, {"split": r.split})
        for split, staged in sorted(by_split.items()):
            _pack_h5(out, split, staged, settings | {"faces": int(faces),
                                                     "face_size": face_size if faces else 0})
        if os.path.isdir(staging) and not os.listdir(staging):
            os.rmdir(staging)
    order = {r.key: i for i, r in enumerate(records)}
    with open(f"{index_path}.tmp", "w", encoding="utf-8") as fh:
        for key in sorted(index, key=lambda k: (order.get(k, len(order)), k)):
            fh.write(json.dumps(index[key], ensure_ascii=False) + "\n")
    os.replace(f"{index_path}.tmp", index_path)
    _write_failures(out, summary.failures, summary.failures_file)
    _finish_partial(out)
    if ratios:
        summary.face_ratio = float(np.mean(ratios))
    return summary


# --- audio -----------------------------------------------------------------------------------


def _audio_job(job: tuple) -> dict:
    import soundfile

    from .media import decode_clip

    record, partial, final, sample_rate = job
    try:
        # the samples `ffmpeg -acodec pcm_s16le -ar SR -ac 1` writes, as the released
        # mp4_to_wav.py scripts do (a stereo source mixed to (L + R) / 2)
        if record.audio:
            clip = decode_clip(None, audio=record.audio, frames=False, sample_rate=sample_rate,
                               start=record.start, end=record.end, mono_mix="s16")
        elif record.video:
            clip = decode_clip(record.video, frames=False, sample_rate=sample_rate,
                               start=record.start, end=record.end, mono_mix="s16")
        else:
            raise MediaError("record has neither a video nor an audio file", stage="open")
        wave = np.round(clip.audio * 32768.0).astype(np.int16)  # exact: int16 / 32768 decoded
        soundfile.write(partial, wave, sample_rate, subtype="PCM_16", format="WAV")
        os.replace(partial, final)
    except Exception as exc:  # one clip failing must not stop the run
        if os.path.exists(partial):
            os.remove(partial)
        return {"key": record.key, "ok": False, "failure": _failure(record, exc)}
    return {"key": record.key, "ok": True, "samples": int(wave.size)}


def extract_audio(records: Iterable[Record], out: str | os.PathLike, *,
                  sample_rate: int = 16000, workers: int = 0, progress: bool = False,
                  overwrite: bool = False) -> ExtractSummary:
    """Write `OUT/{key}.wav` (mono, 16-bit) for every record; the separate audio file of a
    record (CREMA-D's AudioWAV) is used when it has one, else the video's audio stream."""
    out = os.fspath(out)
    records = list(records)
    if sample_rate <= 0:
        raise UserError(f"--sr must be positive, got {sample_rate}")
    _prepare_out(out, AUDIO_SETTINGS, {"kind": "audio", "sample_rate": sample_rate}, overwrite)
    summary = ExtractSummary(out=out, total=len(records), failures_file=AUDIO_FAILURES)
    jobs = []
    for r in records:
        final = os.path.join(out, f"{r.key}.wav")
        if os.path.isfile(final) and not overwrite:
            summary.skipped += 1
            continue
        jobs.append((r, os.path.join(out, PARTIAL, f"{r.key}.wav"), final, sample_rate))
    for result in _run_jobs(_audio_job, jobs, workers, progress, "audio"):
        if result["ok"]:
            summary.done += 1
        else:
            summary.failures.append(result["failure"])
    _write_failures(out, summary.failures, summary.failures_file)
    _finish_partial(out)
    return summary
