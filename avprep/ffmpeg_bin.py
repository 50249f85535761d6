"""Which ffmpeg to run: `$FFMPEG_BINARY`, then `ffmpeg` on PATH, then imageio-ffmpeg's static build.

The static binary starts several times faster than distribution builds, which matters when one
process is started per short clip, but a user's own ffmpeg (CUDA decode, extra codecs) wins.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

from .errors import UserError


@functools.cache
def find_ffmpeg() -> str:
    env = os.environ.get("FFMPEG_BINARY")
    if env:
        path = shutil.which(env) or (env if os.path.isfile(env) else None)
        if not path:
            raise UserError(f"$FFMPEG_BINARY={env!r} does not name an executable ffmpeg")
        return path
    on_path = shutil.which("ffmpeg")
    if on_path:
        return on_path
    try:
        import imageio_ffmpeg
    except ImportError:
        imageio_ffmpeg = None
    if imageio_ffmpeg is not None:
        try:
            return imageio_ffmpeg.get_ffmpeg_exe()
        except RuntimeError:
            pass
    raise UserError(
        "ffmpeg not found: set $FFMPEG_BINARY, put ffmpeg on PATH, or `pip install imageio-ffmpeg`"
    )


def find_ffprobe() -> str | None:
    """ffprobe next to the chosen ffmpeg or on PATH; optional (we never require it)."""
    ffmpeg = find_ffmpeg()
    sibling = os.path.join(os.path.dirname(ffmpeg), "ffprobe")
    if os.path.basename(ffmpeg).startswith("ffmpeg") and os.access(sibling, os.X_OK):
        return sibling
    return shutil.which("ffprobe")


def ffmpeg_version(binary: str | None = None) -> str:
    out = subprocess.run(
        [binary or find_ffmpeg(), "-hide_banner", "-version"], capture_output=True, text=True
    ).stdout
    match = re.match(r"ffmpeg version (\S+)", out)
    return match.group(1) if match else out.splitlines()[0] if out else "unknown"
