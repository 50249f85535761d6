"""Any folder of labelled videos: ROOT/{label}/*.mp4, or ROOT/{split}/{label}/*.mp4.

Without split folders the split is a hash of the clip's relative path. Files that are not
videos, and videos outside a class folder, are reported as unlisted.
"""

from __future__ import annotations

import os

from ..errors import UserError
from ..manifest import Record, hash_split, safe_key
from .base import Options, Scan, is_video, require_dir

SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val",
              "test": "test"}
EXPECTED = "a folder with one sub-folder of videos per class"


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _files_under(path: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def scan_tree(root: str, dataset: str, options: Options, expected: str = EXPECTED) -> Scan:
    """Records from class folders (optionally inside split folders); shared with KS."""
    top = _subdirs(root)
    split_layout = bool(top) and all(d.lower() in SPLIT_DIRS for d in top)
    result = Scan(dataset=dataset, root=root)
    result.unlisted.extend(os.path.join(root, e.name) for e in sorted(
        os.scandir(root), key=lambda e: e.name) if e.is_file() and is_video(e.name))
    keys: dict[str, int] = {}
    parents = [(os.path.join(root, d), SPLIT_DIRS[d.lower()]) for d in top] if split_layout \
        else [(root, None)]
    for parent, split in parents:
        for label in _subdirs(parent):
            for path in _files_under(os.path.join(parent, label)):
                if not is_video(os.path.basename(path)):
                    result.unlisted.append(path)
                    continue
                rel = os.path.relpath(path, root)
                stem = os.path.splitext(os.path.basename(path))[0]
                key = safe_key(os.path.splitext(rel)[0] if split is None else
                               f"{label}_{stem}")
                if key in keys:  # two names that sanitise to one key
                    keys[key] += 1
                    key = f"{key}_{keys[key]}"
                else:
                    keys[key] = 1
                result.records.append(Record(
                    key=key, label=label, label_id=-1,
                    split=split or hash_split(rel, options.val_fraction,
                                              options.test_fraction, salt=f"{dataset}-path"),
                    video=path, extra={"clip": stem}))
    if not result.records:
        raise UserError(f"{root}: no videos found; expected {expected}")
    return result


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "folder", EXPECTED)
    return scan_tree(root, "folder", options)
