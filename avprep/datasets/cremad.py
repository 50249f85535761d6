"""CREMA-D: VideoFlash/{actor}_{sentence}_{emotion}_{level}.flv + AudioWAV/{same}.wav.

The default split hashes the actor id, so a speaker never appears in two splits.
"""

from __future__ import annotations

import os
import re

from ..errors import UserError
from ..manifest import Record, hash_split
from .base import Options, Scan, require_dir

NAME = re.compile(r"^(?P<actor>\d{4})_(?P<sentence>[A-Z]{3})_(?P<emotion>[A-Z]{3})_"
                  r"(?P<level>[A-Z]{2})$")
VIDEO_DIRS = ("VideoFlash", "VideoMP4")
EXPECTED = "the CREMA-D root holding VideoFlash/ and AudioWAV/"


def _list(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    if not os.path.isdir(folder):
        return {}
    return {os.path.splitext(e.name)[0]: e.path for e in sorted(os.scandir(folder),
                                                                key=lambda e: e.name)
            if e.is_file() and e.name.lower().endswith(exts)}


def _check_root(root: str) -> None:
    if any(os.path.isdir(os.path.join(root, d)) for d in (*VIDEO_DIRS, "AudioWAV")):
        return
    base = os.path.basename(root.rstrip(os.sep))
    if base in (*VIDEO_DIRS, "AudioWAV") or _list(root, (".wav", ".flv", ".mp4")):
        raise UserError(f"{root} looks like the {base or 'media'} folder itself; pass "
                        f"{EXPECTED} (here probably {os.path.dirname(root)})")
    raise UserError(f"{root} is not a CREMA-D root: expected VideoFlash/ and AudioWAV/ inside it")


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "cremad", EXPECTED)
    _check_root(root)
    videos: dict[str, str] = {}
    for d in VIDEO_DIRS:
        for stem, path in _list(os.path.join(root, d), (".flv", ".mp4")).items():
            videos.setdefault(stem, path)
    wavs = _list(os.path.join(root, "AudioWAV"), (".wav",))
    result = Scan(dataset="cremad", root=root)
    for stem in sorted(set(videos) | set(wavs)):
        m = NAME.match(stem)
        if not m:
            result.unlisted.append(videos.get(stem) or wavs[stem])
            continue
        actor = m["actor"]
        record = Record(
            key=stem, label=m["emotion"], label_id=-1,
            split=hash_split(actor, options.val_fraction, options.test_fraction,
                             salt="cremad-actor"),
            video=videos.get(stem), audio=wavs.get(stem),
            extra={"clip": stem, "actor": actor, "sentence": m["sentence"],
                   "level": m["level"]},
        )
        (result.records if record.video else result.missing).append(record)
    if not result.records and not result.missing:
        raise UserError(f"{root}: no CREMA-D clips ({{actor}}_{{sentence}}_{{emotion}}_"
                        "{level}.flv / .wav) in VideoFlash/ or AudioWAV/")
    return result
