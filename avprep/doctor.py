"""Environment report for `avprep doctor`."""

from __future__ import annotations

import os
import platform

from . import __version__
from .errors import UserError
from .ffmpeg_bin import ffmpeg_version, find_ffmpeg, find_ffprobe


def collect() -> dict[str, str]:
    info: dict[str, str] = {"avbalance": __version__, "python": platform.python_version()}
    try:
        binary = find_ffmpeg()
        info["ffmpeg"] = f"{binary} (version {ffmpeg_version(binary)})"
    except UserError as exc:
        info["ffmpeg"] = f"MISSING: {exc}"
    info["ffprobe"] = find_ffprobe() or "not found (not needed: avprep probes with ffmpeg)"
    info["cpu cores"] = str(os.cpu_count())
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["cuda"] = f"{torch.version.cuda}: {', '.join(names)}"
        else:
            info["cuda"] = "no GPU visible (training runs on the CPU)"
    except ImportError:
        info["torch"] = "not installed"
    for module in ("torchvision", "webdataset", "librosa", "cv2", "ray"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[module] = "not installed"
    return info
