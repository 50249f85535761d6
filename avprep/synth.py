"""A synthetic, deliberately imbalanced audio-visual dataset written as real video files.

Each class c has two cues:

- audio: a harmonic tone whose fundamental (and so the spacing of its harmonics) depends on the
  class, f0 = 180 + 70·c Hz, in white noise at `audio_snr` dB. Harmonic spacing is a texture,
  which survives a CNN's global average pooling, so audio is *easy* to learn.
- visual: a moving object whose colour (hue = c/K) and shape (disc, square, bar) depend on the
  class, over per-frame noise at `visual_snr` dB. Learnable, but harder and slower to learn.

Each cue is present only in a fraction of clips (`audio_reliability`, `visual_reliability`,
independently); otherwise that modality is noise alone. With the defaults (0.8 each) audio
alone can reach 0.8 + 0.2/K, video alone the same, and both together 1 - 0.04·(1 - 1/K)
(≈ 0.97 for K = 6): a model that uses both modalities clearly beats either alone. (A cue that
named a *wrong* class instead would make fusion useless: with equal reliabilities the best
fused guess is then no better than audio alone.) That is the situation OGM-GE and OLM exist
for: the audio branch converges first and starves the visual one, and the fused accuracy
stays near the audio-only ceiling.

The clips are H.264 + AAC mp4 files encoded by ffmpeg; a `manifest.jsonl` lists them.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import subprocess
import threading
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
from tqdm import tqdm

from .errors import UserError
from .ffmpeg_bin import find_ffmpeg
from .manifest import Record, hash_split, write_manifest
from .outputs import check_output_dir

SHAPES = ("disc", "square", "bar")


@dataclass
class SynthConfig:
    classes: int = 6
    per_class: int = 50
    seconds: float = 2.0
    size: int = 64
    fps: int = 10
    sample_rate: int = 16000
    audio_snr: float = 6.0
    visual_snr: float = 2.0
    audio_reliability: float = 0.8
    visual_reliability: float = 0.8
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def check(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise UserError("--val-fraction plus --test-fraction must leave clips for train")
        if self.classes < 2:
            raise UserError("--classes must be at least 2")
        if self.per_class < 1:
            raise UserError("--per-class must be at least 1")
        if self.seconds <= 0:
            raise UserError("--seconds must be positive")
        if self.size < 16 or self.size % 2:
            raise UserError("--size must be an even number of pixels, at least 16")
        for name in ("audio_reliability", "visual_reliability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1")


# Named sets of SynthConfig values (`avprep synth OUT --regime NAME`; explicit flags override).
# "imbalanced" is calibrated (benchmarks/RESULTS-regime.md) so that, under the protocol of the
# recipe synth-imbalanced, the baseline's jointly trained visual encoder probes >= 10 points
# below video trained alone, with a seed std <= 2 points, at a few seconds a run on 2 CPU cores.
REGIMES: dict[str, dict] = {
    "default": {},
    "imbalanced": {"per_class": 150, "size": 32, "audio_snr": 20.0, "visual_snr": 3.0,
                   "audio_reliability": 0.95, "visual_reliability": 0.9,
                   "val_fraction": 0.2, "test_fraction": 0.4},
}


def regime_config(name: str = "default", **overrides) -> SynthConfig:
    """SynthConfig of a named regime, with `overrides` (the flags the user typed) on top."""
    if name not in REGIMES:
        raise UserError(f"unknown regime {name!r}; choose one of: {', '.join(REGIMES)}")
    unknown = set(overrides) - set(SynthConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"not SynthConfig fields: {sorted(unknown)}")
    return SynthConfig(**{**REGIMES[name], **overrides})


def class_names(k: int) -> list[str]:
    return [f"class{c:02d}" for c in range(k)]


def audio_cue(c: int | None, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Harmonic tone of class c in white noise at `audio_snr` dB (noise alone when c is None);
    float32 in about [-1, 1]."""
    sr, n = config.sample_rate, int(round(config.seconds * config.sample_rate))
    if c is None:
        noise = rng.standard_normal(n)
        return (0.25 * noise / np.max(np.abs(noise))).astype(np.float32)
    t = np.arange(n) / sr
    f0 = 180.0 + 70.0 * c
    harmonics = [k * f0 for k in range(1, 9) if k * f0 < min(3800.0, sr / 2 - 200)]
    phase = rng.uniform(0, 2 * np.pi, size=len(harmonics))
    tone = sum(np.sin(2 * np.pi * f * t + p) / np.sqrt(k + 1)
               for k, (f, p) in enumerate(zip(harmonics, phase)))
    tone = tone / (np.std(tone) + 1e-9)
    noise = rng.standard_normal(n)
    mix = tone * 10 ** (config.audio_snr / 20) + noise
    return (0.25 * mix / np.max(np.abs(mix))).astype(np.float32)


def class_colour(c: int, k: int) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(c / k, 0.9, 1.0)) * 255.0


def shape_mask(c: int, size: int, cx: float, cy: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    shape = SHAPES[c % len(SHAPES)]
    if shape == "disc":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(xx - cx) <= radius * 0.85) & (np.abs(yy - cy) <= radius * 0.85)
    return (np.abs(xx - cx) <= radius * 1.4) & (np.abs(yy - cy) <= radius * 0.45)


def visual_cue(c: int | None, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Frames [T, H, W, 3] uint8: the class's coloured shape drifting over noise (noise alone
    when c is None)."""
    size, k = config.size, config.classes
    n_frames = max(1, int(round(config.seconds * config.fps)))
    radius = size * rng.uniform(0.12, 0.2)
    pos = rng.uniform(radius, size - radius, size=2)
    vel = rng.uniform(-1, 1, size=2) * size / (2.0 * n_frames)
    background = rng.uniform(60, 140, size=3)
    colour = class_colour(c if c is not None else 0, k)
    noise_std = 64.0
    amplitude = noise_std * 10 ** (config.visual_snr / 20)
    direction = colour - background
    direction = direction / (np.linalg.norm(direction) / np.sqrt(3) + 1e-9)
    frames = np.empty((n_frames, size, size, 3), np.uint8)
    for i in range(n_frames):
        frame = np.broadcast_to(background, (size, size, 3)).copy()
        if c is not None:
            mask = shape_mask(c, size, pos[0], pos[1], radius)
            frame[mask] += direction * amplitude / np.sqrt(3) * 1.7
        frame += rng.normal(0.0, noise_std, size=frame.shape)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
        pos = pos + vel
        for axis in range(2):  # bounce off the borders
            if not radius <= pos[axis] <= size - radius:
                vel[axis] = -vel[axis]
                pos[axis] = np.clip(pos[axis], radius, size - radius)
    return frames


def encode_mp4(path: str, frames: np.ndarray, audio: np.ndarray, fps: int, sample_rate: int
               ) -> None:
    """Encode frames + audio to H.264/AAC mp4 in one ffmpeg call, both streamed through pipes."""
    n, h, w, _ = frames.shape
    read_fd, write_fd = os.pipe()
    cmd = [find_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:0",
           "-f", "f32le", "-ar", str(sample_rate), "-ac", "1", "-i", f"pipe:{read_fd}",
           "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "96k", "-movflags", "+faststart", "-shortest", path]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(read_fd,))
    os.close(read_fd)

    def feed_audio():
        with os.fdopen(write_fd, "wb") as fh:
            try:
                fh.write(audio.astype(np.float32).tobytes())
            except BrokenPipeError:
                pass

    feeder = threading.Thread(target=feed_audio, daemon=True)
    feeder.start()
    try:
        proc.stdin.write(frames.tobytes())
        proc.stdin.close()
    except BrokenPipeError:
        pass
    err = proc.stderr.read().decode("utf-8", "replace")
    feeder.join()
    if proc.wait() != 0:
        raise RuntimeError(f"ffmpeg could not encode {path}: {err.strip()}")


def _make_clip(job: tuple[int, int, str, SynthConfig]) -> dict:
    index, label_id, path, config = job
    rng = np.random.default_rng([config.seed, index])

    def cue_class(reliability: float) -> int | None:
        return label_id if rng.random() < reliability else None

    a_class, v_class = cue_class(config.audio_reliability), cue_class(config.visual_reliability)
    audio = audio_cue(a_class, config, rng)
    frames = visual_cue(v_class, config, rng)
    tmp = path + ".part.mp4"
    encode_mp4(tmp, frames, audio, config.fps, config.sample_rate)
    os.replace(tmp, path)
    return {"audio_cue": a_class, "visual_cue": v_class}


@dataclass
class SynthSummary:
    out: str
    manifest: str
    config: SynthConfig
    counts: dict

    def describe(self) -> str:
        parts = ", ".join(f"{s} {n}" for s, n in self.counts.items())
        return (f"wrote {sum(self.counts.values())} clips ({parts}) of {self.config.classes} "
                f"classes to {self.out}\nmanifest: {self.manifest}")


def write_synth(out: str | os.PathLike, config: SynthConfig | None = None, workers: int = 0,
                overwrite: bool = False, progress: bool = False,
                regime: str | None = None) -> SynthSummary:
    """Write videos/{label}/{key}.mp4, manifest.jsonl and synth.json under `out` (`regime`: the
    name the config came from, recorded in synth.json)."""
    config = config or SynthConfig()
    config.check()
    out = os.fspath(out)
    check_output_dir(out)  # its missing parents are made with the videos' folders
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite to replace a synth dataset "
                            "there, or choose another folder")
        if not os.path.exists(os.path.join(out, "synth.json")):
            raise UserError(f"{out} is not empty and holds no synth dataset; refusing to "
                            "overwrite it")
        shutil.rmtree(os.path.join(out, "videos"), ignore_errors=True)
    names = class_names(config.classes)
    jobs, records = [], []
    for c, name in enumerate(names):
        os.makedirs(os.path.join(out, "videos", name), exist_ok=True)
        for i in range(config.per_class):
            key = f"{name}_{i:05d}"
            rel = os.path.join("videos", name, f"{key}.mp4")
            index = c * config.per_class + i
            jobs.append((index, c, os.path.join(out, rel), config))
            split = hash_split(key, config.val_fraction, config.test_fraction,
                               salt=f"synth{config.seed}")
            records.append(Record(key=key, label=name, label_id=c, split=split, video=rel))
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="synth", unit="clip", disable=not progress)
    cues = []
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(_make_clip, jobs, chunksize=4):
            cues.append(result)
            bar.update()
    bar.close()
    for record, cue in zip(records, cues):
        record.extra = cue
    manifest = os.path.join(out, "manifest.jsonl")
    write_manifest(records, manifest, classes=names, dataset="synth")
    counts = {s: sum(r.split == s for r in records) for s in ("train", "val", "test")}
    with open(os.path.join(out, "synth.json"), "w") as fh:
        json.dump({"regime": regime, "config": asdict(config), "classes": names, "counts": counts,
                   "cues": {name: {"audio_f0_hz": 180 + 70 * c,
                                   "visual_hue": round(c / config.classes, 4),
                                   "visual_shape": SHAPES[c % len(SHAPES)]}
                            for c, name in enumerate(names)}}, fh, indent=2)
    return SynthSummary(out=out, manifest=manifest, config=config, counts=counts)
