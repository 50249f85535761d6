"""Make small real media files with ffmpeg for tests (lavfi test sources and sine tones)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from avprep.ffmpeg_bin import find_ffmpeg


def ffmpeg(*args: str) -> None:
    cmd = [find_ffmpeg(), "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True)


def make_video(path, seconds: float = 2.0, size=(160, 120), fps: int = 25, audio: bool = True,
               tone: float = 440.0, audio_rate: int = 44100, channels: int = 1,
               vcodec: str = "libx264", acodec: str = "aac", pix_fmt: str = "yuv420p",
               pattern: str = "testsrc") -> Path:
    """A clip with a moving test pattern and (optionally) a sine tone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    args = ["-f", "lavfi", "-i", f"{pattern}=size={w}x{h}:rate={fps}:duration={seconds}"]
    if audio:
        args += ["-f", "lavfi", "-i",
                 f"sine=frequency={tone}:sample_rate={audio_rate}:duration={seconds}"]
    args += ["-map", "0:v"]
    if audio:
        args += ["-map", "1:a", "-c:a", acodec, "-ac", str(channels)]
    args += ["-c:v", vcodec, "-pix_fmt", pix_fmt]
    if vcodec == "libx264":
        args += ["-preset", "ultrafast"]
    args += ["-t", str(seconds), str(path)]
    ffmpeg(*args)
    return path


def make_wav(path, seconds: float = 2.0, tone: float = 440.0, rate: int = 16000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ffmpeg("-f", "lavfi", "-i", f"sine=frequency={tone}:sample_rate={rate}:duration={seconds}",
           "-c:a", "pcm_s16le", str(path))
    return path


def make_rich_wav(path, seconds: float = 1.3, rate: int = 16000) -> Path:
    """A 16-bit mono WAV with content across the whole band (tones at 440, 3150 and 7400 Hz and
    noise), so resamplers and STFT padding that differ show it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tones = "0.3*sin(2*PI*440*t)+0.2*sin(2*PI*3150*t)+0.1*sin(2*PI*7400*t)"
    ffmpeg("-f", "lavfi", "-i", f"aevalsrc={tones}:s={rate}:d={seconds}",
           "-f", "lavfi", "-i", f"anoisesrc=color=white:amplitude=0.05:seed=7:r={rate}:d={seconds}",
           "-filter_complex", "[0:a][1:a]amix=inputs=2:normalize=0", "-c:a", "pcm_s16le",
           str(path))
    return path


def make_stereo_video(path, seconds: float = 2.0, size=(64, 48), fps: int = 10,
                      audio_rate: int = 44100, left: float = 0.6, right: float = 0.45) -> Path:
    """A clip whose two channels differ (440 Hz left, 1250 and 6000 Hz right, peaks `left` and
    `right`), AAC-encoded as the stereo MP4s of AVE, VGGSound and Kinetics-Sounds are."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = (f"{left}*sin(2*PI*440*t)|"
                f"{right}*(0.7*sin(2*PI*1250*t)+0.3*sin(2*PI*6000*t))")
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={size[0]}x{size[1]}:rate={fps}:duration={seconds}",
           "-f", "lavfi", "-i", f"aevalsrc={channels}:s={audio_rate}:d={seconds}",
           "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-ac", "2", "-c:v", "libx264",
           "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-t", str(seconds), str(path))
    return path


def make_cremad_flv(path, seconds: float = 2.5, tone: float = 440.0) -> Path:
    """Like CREMA-D's VideoFlash: FLV1 video 480x360 at 30 fps with MP3 audio."""
    return make_video(path, seconds=seconds, size=(480, 360), fps=30, vcodec="flv",
                      acodec="libmp3lame", pix_fmt="yuv420p", tone=tone)


def make_frame_counter(path, seconds: float = 3.5, fps: str | int = 30, size=(160, 120),
                       vcodec: str = "libx264", acodec: str = "aac") -> Path:
    """A clip whose every frame shows its own index n (flat grey, luma 16 + 2n), with a tone, so
    a test can tell exactly which decoded frame a sampled frame is. `vcodec="flv"` with
    `acodec="libmp3lame"` in a .flv gives what CREMA-D ships: a video stream starting at 25 ms."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    quality = ["-q:v", "2"] if vcodec == "flv" else ["-preset", "ultrafast", "-qp", "0"]
    ffmpeg("-f", "lavfi", "-i", f"nullsrc=size={w}x{h}:rate={fps}:duration={seconds},"
           "format=yuv420p,geq=lum='16+2*N':cb=128:cr=128",
           "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}",
           "-map", "0:v", "-map", "1:a", "-c:v", vcodec, *quality, "-pix_fmt", "yuv420p",
           "-c:a", acodec, "-t", str(seconds), str(path))
    return path


def video_start(path) -> float:
    """The video stream's start time as ffmpeg reports it (0 when it reports none)."""
    proc = subprocess.run([find_ffmpeg(), "-hide_banner", "-nostdin", "-i", str(path)],
                          capture_output=True, text=True)
    line = next(ln for ln in proc.stderr.splitlines() if ": Video: " in ln)
    m = re.search(r"start (-?[\d.]+)", line)
    return float(m.group(1)) if m else 0.0


def released_frames(path) -> tuple[list[np.ndarray], list[int]]:
    """Every decoded frame (RGB) and the indexes the released extraction keeps at 1 fps.

    Written from OGM-GE_CVPR2022 / OLM data/CREMAD/video_preprocessing.py,
    `videoReader.video2frame_update` with frame_kept_per_second=1: cv2 reads frames in order
    while count < CAP_PROP_FRAME_COUNT and saves those with count % int(CAP_PROP_FPS) == 0."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    fps = int(cap.get(cv2.CAP_PROP_FPS))
    total = cap.get(cv2.CAP_PROP_FRAME_COUNT)
    frames, kept = [], []
    while len(frames) < total:
        ok, image = cap.read()
        if not ok:
            break
        if len(frames) % fps == 0:
            kept.append(len(frames))
        frames.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    cap.release()
    return frames, kept


def which_frames(picked, every: list[np.ndarray]) -> list[int]:
    """For each picked frame of a frame counter (any size, JPEG or raw), the index of the decoded
    frame with the nearest mean: counter frames are flat, 2 luma levels apart."""
    means = np.array([f.mean() for f in every])
    return [int(np.argmin(np.abs(means - np.asarray(f, np.float32).mean()))) for f in picked]


def truncate(src, dst, fraction: float = 0.4) -> Path:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def astronaut_path() -> Path:
    """A real face that ships inside the scikit-image wheel (dev extra)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        pytest.skip("scikit-image (dev extra) ships the astronaut portrait")
    return Path(spec.submodule_search_locations[0]) / "data" / "astronaut.png"
