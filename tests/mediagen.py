"""Make small real media files with ffmpeg for tests (lavfi test sources and sine tones)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

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


def make_cremad_flv(path, seconds: float = 2.5, tone: float = 440.0) -> Path:
    """Like CREMA-D's VideoFlash: FLV1 video 480x360 at 30 fps with MP3 audio."""
    return make_video(path, seconds=seconds, size=(480, 360), fps=30, vcodec="flv",
                      acodec="libmp3lame", pix_fmt="yuv420p", tone=tone)


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
