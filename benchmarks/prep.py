"""How fast is build-shards, measured against the floor and against the seed scripts?

Three pipelines on the same clips, timed side by side in one run (shared machines are noisy,
so only ratios measured together mean anything):

floor     one bare ffmpeg process per clip decoding to null with the same fps / scale / rgb24 /
          mono-resample filters build-shards asks for, at the same parallelism. Nothing can
          prepare a clip faster than decoding it once.
ours      `avprep.shards.build_shards` (Python API, the same call the CLI makes) writing real
          shards, at --workers 1 and at --workers N (all cores).
seed      the seed scripts' way, written here: OpenCV VideoCapture reading every frame and
          saving 1 fps JPEGs, a separate ffmpeg call extracting a WAV, then librosa load +
          STFT + pickle per clip, sequential (as the seed scripts run).

Two clip sets: `long` (10 s, 640x360 H.264/AAC, VGGSound-like, preset vggsound) and `short`
(2-3 s 480x360 FLV/MP3, CREMA-D-like, preset cremad). Then the peak RSS of one worker
converting a long clip (default 3 minutes) next to a 10 s clip: it must not grow with length.

    .venv/bin/python benchmarks/prep.py                      # 40 clips per set, prints ratios
    .venv/bin/python benchmarks/prep.py --clips 100 --long-seconds 600 \
        --results benchmarks/RESULTS-prep.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avprep.ffmpeg_bin import find_ffmpeg  # noqa: E402
from avprep.manifest import Record  # noqa: E402
from avprep.presets import get_preset  # noqa: E402
from avprep.shards import build_shards  # noqa: E402

TARGETS = {"floor": 1.3, "seed_per_core": 0.7, "efficiency": 0.7, "rss_mb": 500}


# --- media ---------------------------------------------------------------------------------


def _ffmpeg(*args: str) -> None:
    subprocess.run([find_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args],
                   check=True)


def make_long(path: str, seconds: float, tone: float) -> None:
    """VGGSound-like: 640x360 25 fps H.264 + stereo AAC at 44.1 kHz."""
    _ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=25:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=44100:duration={seconds}",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-ac", "2", "-shortest", path)


def make_short(path: str, seconds: float, tone: float) -> None:
    """CREMA-D-like: 480x360 30 fps FLV (Sorenson H.263) + MP3."""
    _ffmpeg("-f", "lavfi", "-i", f"testsrc2=size=480x360:rate=30:duration={seconds}",
            "-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate=44100:duration={seconds}",
            "-c:v", "flv", "-c:a", "libmp3lame", "-ac", "1", "-shortest", path)


def make_sets(work: str, clips: int, long_seconds: float, workers: int) -> dict[str, list[str]]:
    """Write (or reuse) the clip sets under `work`."""
    jobs = []
    sets: dict[str, list[str]] = {"long": [], "short": []}
    for i in range(clips):
        tone = 200 + 13 * i
        p = os.path.join(work, "long", f"clip{i:04d}.mp4")
        sets["long"].append(p)
        jobs.append((make_long, p, 10.0, tone))
        p = os.path.join(work, "short", f"clip{i:04d}.flv")
        sets["short"].append(p)
        jobs.append((make_short, p, 2.0 + (i % 3) * 0.5, tone))
    p = os.path.join(work, f"longclip-{int(long_seconds)}s.mp4")
    sets["longclip"] = [p]
    jobs.append((make_long, p, long_seconds, 330.0))
    for name in ("long", "short"):
        os.makedirs(os.path.join(work, name), exist_ok=True)
    todo = [j for j in jobs if not os.path.isfile(j[1])]
    if todo:
        print(f"writing {len(todo)} clips into {work} ...", flush=True)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda j: j[0](f"{j[1]}.tmp.{j[1].rsplit('.', 1)[1]}", *j[2:]) or
                          os.replace(f"{j[1]}.tmp.{j[1].rsplit('.', 1)[1]}", j[1]), todo))
    return sets


# --- the three pipelines ---------------------------------------------------------------------


def floor_cmd(path: str, preset) -> list[str]:
    """Decode once to null with the filters build-shards uses (fps, scale, rgb24, mono)."""
    vf = f"fps=fps={preset.fps}:round=up"
    if preset.frame_size:
        s = preset.frame_size
        vf += f",scale=w={s}:h={s}:force_original_aspect_ratio=increase"
    vf += ",format=rgb24"
    return [find_ffmpeg(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error",
            "-i", path, "-map", "0:v:0", "-vf", vf, "-f", "null", "-",
            "-map", "0:a:0", "-ac", "1", "-ar", str(preset.sample_rate), "-f", "null", "-"]


def run_floor(paths: list[str], preset, workers: int) -> float:
    def one(p):
        subprocess.run(floor_cmd(p, preset), check=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - start


def records_for(paths: list[str]) -> list[Record]:
    return [Record(key=f"c{i:05d}", label="x", label_id=0, split="train", video=p)
            for i, p in enumerate(paths)]


def run_ours(paths: list[str], preset, workers: int, scratch: str, shard_size: int) -> float:
    out = tempfile.mkdtemp(prefix="ours-", dir=scratch)
    start = time.perf_counter()
    summary = build_shards(records_for(paths), os.path.join(out, "s"), preset, classes=["x"],
                           dataset="bench", shard_size=shard_size, workers=workers)
    seconds = time.perf_counter() - start
    if summary.failures:
        raise SystemExit(f"build-shards failed on benchmark clips: {summary.failures[:2]}")
    shutil.rmtree(out)
    return seconds


def seed_one(path: str, preset, out: str) -> None:
    """The seed scripts' per-clip work (OGM-GE video_preprocessing.py + audio pickles)."""
    import cv2
    import librosa
    import numpy as np

    name = os.path.splitext(os.path.basename(path))[0]
    frame_dir = os.path.join(out, "frames", name)
    os.makedirs(frame_dir, exist_ok=True)
    cap = cv2.VideoCapture(path)
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    step = max(1, int(round(fps / preset.fps)))
    count = saved = 0
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if count % step == 0:
            cv2.imwrite(os.path.join(frame_dir, f"{saved:05d}.jpg"), frame)
            saved += 1
        count += 1
    cap.release()
    wav = os.path.join(out, f"{name}.wav")
    subprocess.run([find_ffmpeg(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
                    "-i", path, "-vn", "-ac", "1", "-ar", str(preset.sample_rate), wav],
                   check=True)
    samples, rate = librosa.load(wav, sr=preset.sample_rate)
    n = int(round((preset.clip_seconds or len(samples) / rate) * rate))
    if preset.fit == "tile":
        samples = np.tile(samples, math.ceil(n / max(1, len(samples))))[:n]
        samples = np.clip(samples, -1.0, 1.0)
    else:
        samples = np.pad(samples, (0, max(0, n - len(samples))))[:n]
    params = preset.spectrogram
    spec = np.log(np.abs(librosa.stft(samples, n_fft=params["n_fft"],
                                      hop_length=params["hop"])) + 1e-7)
    with open(os.path.join(out, f"{name}.pkl"), "wb") as fh:
        pickle.dump(spec, fh)


def run_seed(paths: list[str], preset, scratch: str) -> float:
    out = tempfile.mkdtemp(prefix="seed-", dir=scratch)
    start = time.perf_counter()
    for p in paths:
        seed_one(p, preset, out)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return seconds


def warm_librosa() -> None:
    """librosa's first STFT costs ~2 s (numba); the seed scripts pay it once, so do we here."""
    import librosa
    import numpy as np

    librosa.stft(np.zeros(4096, np.float32), n_fft=512, hop_length=256)
    with tempfile.NamedTemporaryFile(suffix=".wav") as fh:
        import soundfile

        soundfile.write(fh.name, np.zeros(1600, np.float32), 16000)
        librosa.load(fh.name, sr=22050)


# --- memory ----------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {root!r})
from avprep.manifest import Record
from avprep.presets import get_preset
from avprep.shards import convert_sample
import cv2, ffmpeg, numpy  # what a worker has loaded before its first clip
rec = Record(key="k", label="x", label_id=0, split="train", video={path!r})
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
members = convert_sample(rec, get_preset({preset!r}))
print(json.dumps({{"self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   "base_kb": base,
                   "ffmpeg_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
                   "frames": sum(name.endswith(".jpg") for name in members)}}))
"""


def peak_rss(path: str, preset: str) -> dict:
    """Peak RSS of one worker process converting one clip (and of its ffmpeg child)."""
    code = RSS_SCRIPT.format(root=ROOT, path=path, preset=preset)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    data["seconds"] = time.perf_counter() - start
    return data


# --- report ----------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", type=int, default=40, help="Clips per set.")
    ap.add_argument("--long-seconds", type=float, default=180.0,
                    help="Length of the clip used for peak RSS (the issue asks 600).")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="N for the all-cores runs.")
    ap.add_argument("--rounds", type=int, default=1, help="Repeat and take the median.")
    ap.add_argument("--work", help="Where clips are written/reused [a temporary folder].")
    ap.add_argument("--results", help="Write a markdown report here too.")
    args = ap.parse_args()
    n = max(1, args.workers)
    work = args.work or tempfile.mkdtemp(prefix="avprep-bench-")
    os.makedirs(work, exist_ok=True)
    sets = make_sets(work, args.clips, args.long_seconds, n)
    scratch = tempfile.mkdtemp(prefix="scratch-", dir=work)
    warm_librosa()
    load_before = os.getloadavg()

    rows = {}
    for name, preset_name in (("long", "vggsound"), ("short", "cremad")):
        paths, preset = sets[name], get_preset(preset_name)
        shard_size = max(1, math.ceil(len(paths) / (4 * n)))
        times: dict[str, list[float]] = {}
        for _ in range(args.rounds):  # interleaved, so drifting load hits every pipeline
            print(f"[{name}] floor x1", flush=True)
            times.setdefault("floor1", []).append(run_floor(paths, preset, 1))
            print(f"[{name}] build-shards x1", flush=True)
            times.setdefault("ours1", []).append(run_ours(paths, preset, 1, scratch, shard_size))
            print(f"[{name}] floor x{n}", flush=True)
            times.setdefault("floorN", []).append(run_floor(paths, preset, n))
            print(f"[{name}] build-shards x{n}", flush=True)
            times.setdefault("oursN", []).append(run_ours(paths, preset, n, scratch, shard_size))
            print(f"[{name}] seed-style (sequential)", flush=True)
            times.setdefault("seed", []).append(run_seed(paths, preset, scratch))
        t = {k: statistics.median(v) for k, v in times.items()}
        rows[name] = {"preset": preset_name, "clips": len(paths), **t,
                      "ours_vs_floor_1": t["ours1"] / t["floor1"],
                      "ours_vs_floor_N": t["oursN"] / t["floorN"],
                      "seed_vs_ours_1": t["seed"] / t["ours1"],
                      "seed_vs_ours_N": t["seed"] / t["oursN"],
                      "efficiency": t["ours1"] / (t["oursN"] * n),
                      "floor_efficiency": t["floor1"] / (t["floorN"] * n)}
    print("[memory] one worker on a 10 s clip and on the long clip", flush=True)
    rss_short = peak_rss(sets["long"][0], "vggsound")
    rss_long = peak_rss(sets["longclip"][0], "vggsound")
    load_after = os.getloadavg()
    shutil.rmtree(scratch, ignore_errors=True)

    lines = report(rows, rss_short, rss_long, args, n, load_before, load_after)
    print("\n".join(lines))
    if args.results:
        with open(args.results, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        print(f"wrote {args.results}")


def report(rows, rss_short, rss_long, args, n, load_before, load_after) -> list[str]:
    ok = {True: "yes", False: "**no**"}
    lines = [
        "# build-shards preparation benchmark",
        "",
        f"Date: {dt.date.today().isoformat()}. Machine: {machine()}.",
        f"Load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        "(other jobs slow every pipeline alike; only ratios measured in the same run are meaningful).",
        f"Command: `python benchmarks/prep.py --clips {args.clips} --long-seconds "
        f"{args.long_seconds:g} --workers {n} --rounds {args.rounds}`",
        "",
        "| set | clips | floor x1 s | ours x1 s | floor xN s | ours xN s | seed (seq.) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} ({r['preset']}) | {r['clips']} | {r['floor1']:.2f} | "
                     f"{r['ours1']:.2f} | {r['floorN']:.2f} | {r['oursN']:.2f} | "
                     f"{r['seed']:.2f} |")
    lines += [
        "",
        f"N = {n} workers. Ratios (target in brackets):",
        "",
        "| set | ours/floor x1 [<= 1.3] | ours/floor xN [<= 1.3] | seed/ours x1 | "
        f"seed/ours xN [>= {0.7 * n:.1f}] | efficiency ours [>= 0.7] | efficiency floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['ours_vs_floor_1']:.2f} ({ok[r['ours_vs_floor_1'] <= 1.3]}) | "
            f"{r['ours_vs_floor_N']:.2f} ({ok[r['ours_vs_floor_N'] <= 1.3]}) | "
            f"{r['seed_vs_ours_1']:.2f} | "
            f"{r['seed_vs_ours_N']:.2f} ({ok[r['seed_vs_ours_N'] >= 0.7 * n]}) | "
            f"{r['efficiency']:.2f} ({ok[r['efficiency'] >= 0.7]}) | "
            f"{r['floor_efficiency']:.2f} |")
    mb = 1024.0
    lines += [
        "",
        "Peak RSS of one worker process converting one clip (preset vggsound; ffmpeg is a "
        "separate child process):",
        "",
        "| clip | frames | worker RSS after imports MB | worker peak RSS MB | "
        "ffmpeg peak RSS MB | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("10 s", rss_short), (f"{args.long_seconds:g} s", rss_long)):
        lines.append(f"| {label} | {r['frames']} | {r['base_kb'] / mb:.0f} | "
                     f"{r['self_kb'] / mb:.0f} | {r['ffmpeg_kb'] / mb:.0f} | "
                     f"{r['seconds']:.1f} |")
    lines += [
        "",
        f"Worker peak RSS bounded [< {TARGETS['rss_mb']} MB]: "
        f"{ok[rss_long['self_kb'] / mb < TARGETS['rss_mb']]}; growth from 10 s to "
        f"{args.long_seconds:g} s: {(rss_long['self_kb'] - rss_short['self_kb']) / mb:+.0f} MB.",
    ]
    return lines


if __name__ == "__main__":
    main()
