"""VGGSound: header-less vggsound.csv (`ytid,start_seconds,label,split`) + clips on disk.

Labels contain commas, so the file is parsed as real CSV. Clips are `{ytid}_{start:06d}.mp4`
(or unpadded) anywhere under the root; a full-length `{ytid}.mp4` is used with the window
start..start+10 s. Listed clips that are missing locally are counted, not fatal.

Class ids follow the released loaders (OGM-GE dataset/VGGSoundDataset.py, OLM
datasets/vggsound_dataset.py): classes in the order their first train row appears in the CSV.
The released loaders count only rows whose clip they found on disk, so their order depends on
the copy; ours counts every listed train row, so it is the same on every copy (labels seen only
in test rows follow, in the same way).
"""

from __future__ import annotations

import csv
import os

from ..errors import UserError
from ..manifest import Record, safe_key
from .base import Options, Scan, index_videos, require_dir

SPLITS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}
EXPECTED = "a VGGSound root with vggsound.csv and the clips"
CLIP_SECONDS = 10.0


def parse_csv(path: str) -> list[tuple[int, str, int, str, str]]:
    """(line, ytid, start, label, split) rows; a header row, if any, is skipped."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not any(f.strip() for f in row):
                continue
            if len(row) != 4:
                raise UserError(f"{path}:{lineno}: expected 4 CSV fields ytid,start_seconds,"
                                f"label,split (quote labels that contain commas), got {len(row)}")
            ytid, start, label, split = (f.strip() for f in row)
            try:
                start_s = int(float(start))
            except ValueError:
                if lineno == 1:
                    continue  # a header line
                raise UserError(f"{path}:{lineno}: start_seconds must be a number, got "
                                f"{start!r}") from None
            if split.lower() not in SPLITS:
                raise UserError(f"{path}:{lineno}: split must be train or test, got {split!r}")
            rows.append((lineno, ytid, start_s, label, SPLITS[split.lower()]))
    if not rows:
        raise UserError(f"{path}: no clips listed (expected rows ytid,start_seconds,label,split)")
    return rows


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "vggsound", EXPECTED)
    path = options.csv or os.path.join(root, "vggsound.csv")
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; expected {EXPECTED} (or pass --csv)")
    videos = index_videos(root)
    result = Scan(dataset="vggsound", root=root)
    used: set[str] = set()
    keys: set[str] = set()
    repeated = 0
    rows = parse_csv(path)
    first_seen = {}  # label -> (not a train row, line of first appearance)
    for lineno, _ytid, _start, label, split in rows:
        first_seen.setdefault(label, (split != "train", lineno))
        if split == "train" and first_seen[label][0]:
            first_seen[label] = (False, lineno)
    result.classes = sorted(first_seen, key=first_seen.get)
    for lineno, ytid, start, label, split in rows:
        clip = f"{ytid}_{start:06d}"
        key = safe_key(clip)
        if key in keys:
            repeated += 1
            continue
        keys.add(key)
        record = Record(key=key, label=label, label_id=-1, split=split,
                        extra={"clip": clip, "ytid": ytid, "start_seconds": start,
                               "source": f"{os.path.basename(path)}:{lineno}"})
        for name in (clip, f"{ytid}_{start}"):
            if name in videos:
                record.video = videos[name]
                used.add(name)
                break
        else:
            if ytid in videos:  # the whole video: take the 10 s window
                record.video = videos[ytid]
                record.start, record.end = float(start), float(start) + CLIP_SECONDS
                used.add(ytid)
        (result.records if record.video else result.missing).append(record)
    if repeated:
        result.notes.append(f"{repeated} repeated CSV rows counted once")
    result.unlisted = sorted(p for stem, p in videos.items() if stem not in used)
    return result
