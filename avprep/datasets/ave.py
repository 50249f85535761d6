"""AVE: AVE/{video_id}.mp4 + `&`-separated Annotations.txt / trainSet.txt / valSet.txt / testSet.txt.

Each line is `Category&VideoID&Quality&StartTime&EndTime`; the first line may be a header. A
video can carry several events, so the key is `{video_id}_{start}_{end}` and the event
segment becomes the record's start/end.
"""

from __future__ import annotations

import os

from ..errors import UserError
from ..manifest import Record, hash_split, safe_key
from .base import Options, Scan, find_file, index_videos, require_dir

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
EXPECTED = "an AVE root with Annotations.txt (or trainSet.txt, valSet.txt, testSet.txt) and AVE/"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_lines(path: str) -> list[tuple[int, str, str, float, float]]:
    """(line number, category, video id, start, end) for each event line of one AVE file."""
    rows = []
    header_seen = False
    with open(path, encoding="utf-8-sig") as fh:
        lines = fh.read().splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split("&")]
        if len(fields) != 5:
            raise UserError(f"{path}:{lineno}: expected Category&VideoID&Quality&StartTime&"
                            f"EndTime (5 fields separated by '&'), got {line.strip()[:80]!r}")
        category, video_id, _quality, start, end = fields
        s, e = _number(start), _number(end)
        if s is None or e is None:
            if not rows and not header_seen:
                header_seen = True
                continue  # the header line
            raise UserError(f"{path}:{lineno}: StartTime/EndTime must be numbers, got "
                            f"{start!r} and {end!r}")
        if e <= s:
            raise UserError(f"{path}:{lineno}: EndTime {e:g} is not after StartTime {s:g}")
        rows.append((lineno, category, video_id, s, e))
    if not rows:
        raise UserError(f"{path}: no event lines (expected Category&VideoID&Quality&StartTime&"
                        "EndTime)")
    return rows


def label_sources(root: str, dataset: str) -> tuple[str, list[tuple[str | None, str]], dict]:
    """(root, [(split or None, label file)], videos by id): the official split files where the
    release has them, else Annotations.txt alone (split by hash later)."""
    root = require_dir(root, dataset, EXPECTED)
    files = {split: find_file(root, (name,)) for split, name in SPLIT_FILES.items()}
    annotations = find_file(root, ("Annotations.txt",))
    if not any(files.values()) and annotations is None:
        raise UserError(f"{root}: no AVE label files; expected {EXPECTED}")
    if any(files.values()):
        sources = [(split, path) for split, path in files.items() if path]
    else:
        sources = [(None, annotations)]
    return root, sources, index_videos(root)


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root, sources, videos = label_sources(root, "ave")
    result = Scan(dataset="ave", root=root)
    seen: dict[tuple, str] = {}
    keys: set[str] = set()
    duplicates = 0
    listed: set[str] = set()
    for split, path in sources:
        for lineno, category, video_id, start, end in parse_lines(path):
            identity = (category, video_id, start, end)
            if identity in seen:
                duplicates += 1
                continue
            key = base = safe_key(f"{video_id}_{start:g}_{end:g}")
            n = 2
            while key in keys:  # same segment, another category: keep both, distinct keys
                key, n = f"{base}_{n}", n + 1
            keys.add(key)
            seen[identity] = key
            listed.add(video_id)
            record = Record(
                key=key, label=category, label_id=-1,
                split=split or hash_split(video_id, options.val_fraction,
                                          options.test_fraction, salt="ave-video"),
                video=videos.get(video_id), start=start, end=end,
                extra={"clip": video_id, "video_id": video_id,
                       "source": f"{os.path.relpath(path, root)}:{lineno}"},
            )
            (result.records if record.video else result.missing).append(record)
    if duplicates:
        result.notes.append(f"{duplicates} repeated annotation lines counted once")
    result.unlisted = sorted(p for stem, p in videos.items() if stem not in listed)
    return result
