"""The synthetic dataset written by `avprep synth ROOT`: its manifest.jsonl is the truth."""

from __future__ import annotations

import os

from ..errors import UserError
from ..manifest import read_manifest
from .base import Options, Scan, require_dir

EXPECTED = "a folder written by `avprep synth` (with manifest.jsonl)"


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "synth", EXPECTED)
    path = os.path.join(root, "manifest.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{root}: no manifest.jsonl; expected {EXPECTED}")
    manifest = read_manifest(path)
    result = Scan(dataset="synth", root=root, classes=manifest.classes)
    listed = set()
    for r in manifest.records:
        r.extra.setdefault("clip", r.key)
        r.label_id = -1  # reassigned from the class list with every other dataset
        present = r.video is not None and os.path.isfile(r.video)
        if present:
            listed.add(os.path.abspath(r.video))
        (result.records if present else result.missing).append(r)
        if not present:
            r.video = None
    videos = os.path.join(root, "videos")
    if os.path.isdir(videos):
        for dirpath, _dirs, files in os.walk(videos):
            result.unlisted.extend(sorted(
                os.path.join(dirpath, f) for f in files
                if f.endswith(".mp4") and os.path.abspath(os.path.join(dirpath, f)) not in listed))
    return result
