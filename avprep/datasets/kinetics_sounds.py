"""Kinetics-Sounds: class folders ({split}/{label}/*.mp4 or {label}/*.mp4) or split lists.

Split lists (`my_train.txt`, `my_val.txt`, `my_test.txt`, as OGM-GE's KS loader reads them)
have rows `{clip},{...},{class}` where the last field is a class index (names from
`classes.txt` / `class.txt` next to the lists, or --classes-file) or a class name.
"""

from __future__ import annotations

import csv
import os

from ..errors import UserError
from ..manifest import Record, clip_id, safe_key
from .base import Options, Scan, find_file, index_videos, read_class_file, require_dir
from .folder import scan_tree

LISTS = {"train": ("my_train.txt", "train.txt", "train.csv"),
         "val": ("my_val.txt", "my_valid.txt", "val.txt", "val.csv"),
         "test": ("my_test.txt", "test.txt", "test.csv")}
EXPECTED = ("class folders ROOT/{split}/{label}/*.mp4 or ROOT/{label}/*.mp4, or clips with "
            "split lists my_train.txt / my_test.txt")


def _class_names(root: str, options: Options) -> list[str] | None:
    if options.classes_file:
        return read_class_file(options.classes_file)
    found = find_file(root, ("classes.txt", "class.txt"))
    return read_class_file(found) if found else None


def _read_list(path: str, classes: list[str] | None) -> list[tuple[int, str, str]]:
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2:
                raise UserError(f"{path}:{lineno}: expected {{clip}},...,{{class}} (at least "
                                f"2 comma-separated fields), got {','.join(row)[:80]!r}")
            clip, label = clip_id(row[0]), row[-1].strip()
            if label.lstrip("-").isdigit():
                if classes is None:
                    raise UserError(f"{path}:{lineno}: the list gives class indexes; put the "
                                    "class names in classes.txt next to it or pass "
                                    "--classes-file")
                index = int(label)
                if not 0 <= index < len(classes):
                    raise UserError(f"{path}:{lineno}: class index {index} is outside the "
                                    f"{len(classes)} classes")
                label = classes[index]
            rows.append((lineno, clip, label))
    if not rows:
        raise UserError(f"{path}: empty split list (expected rows {{clip}},...,{{class}})")
    return rows


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "kinetics_sounds", EXPECTED)
    lists = {split: find_file(root, names) for split, names in LISTS.items()}
    lists = {s: p for s, p in lists.items() if p}
    if not lists:
        return scan_tree(root, "kinetics_sounds", options, EXPECTED)
    classes = _class_names(root, options)
    videos = index_videos(root)
    result = Scan(dataset="kinetics_sounds", root=root, classes=classes)
    keys: set[str] = set()
    for split, path in lists.items():
        for lineno, clip, label in _read_list(path, classes):
            key = safe_key(clip)
            if key in keys:
                result.notes.append(f"{os.path.basename(path)}:{lineno}: clip {clip} listed "
                                    "again, ignored")
                continue
            keys.add(key)
            record = Record(key=key, label=label, label_id=-1, split=split,
                            video=videos.get(clip),
                            extra={"clip": clip, "source": f"{os.path.basename(path)}:{lineno}"})
            (result.records if record.video else result.missing).append(record)
    listed = {str(r.extra["clip"]) for r in result.records}
    result.unlisted = sorted(p for stem, p in videos.items() if stem not in listed)
    return result
