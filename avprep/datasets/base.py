"""What every dataset adapter shares: its options, its result, and small file-listing helpers.

An adapter turns a dataset root (raw layout + label files) into a `Scan`: records for clips
found on disk, records for clips a list names but that are missing, and files on disk no
list mentions. Label ids, split files, val carving, seed-extracted data and validation are
applied afterwards by `avprep.datasets.load_dataset`, the same way for every dataset.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from ..errors import UserError
from ..manifest import SPLITS, Manifest, Record

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".flv", ".mov", ".m4v", ".mpg", ".mpeg")


@dataclass
class Options:
    """Options every adapter understands (adapters ignore the ones that do not apply)."""

    split_file: tuple[str, ...] = ()  # list files reproducing a paper's split
    val_fraction: float = 0.1  # val carved from train when the split has none
    test_fraction: float = 0.1  # test share of a hash split (datasets without official test)
    classes_file: str | None = None  # pin the class list (one per line or comma-separated)
    frames_dir: str | None = None  # seed-extracted frames: {frames_dir}/{clip}/*.jpg
    audio_dir: str | None = None  # seed-extracted audio: {audio_dir}/{clip}.wav
    csv: str | None = None  # VGGSound: path of vggsound.csv when not ROOT/vggsound.csv
    trust_pickle: bool = False  # MER: allow reading the official pickled label-6way.npz

    def __post_init__(self):
        if isinstance(self.split_file, (str, os.PathLike)):
            self.split_file = (os.fspath(self.split_file),)
        self.split_file = tuple(os.fspath(p) for p in self.split_file or ())
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {value}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise UserError("--val-fraction plus --test-fraction must leave some clips for train")
        for flag, path in [*(("--split-file", p) for p in self.split_file),
                           ("--classes-file", self.classes_file), ("--csv", self.csv)]:
            if path is not None and not os.path.isfile(path):
                raise UserError(f"{flag} {path}: no such file")


@dataclass
class Scan:
    """An adapter's view of a dataset root, before the common post-processing."""

    dataset: str
    root: str
    records: list[Record] = field(default_factory=list)  # clips found on disk
    missing: list[Record] = field(default_factory=list)  # listed, not found (video is None)
    unlisted: list[str] = field(default_factory=list)  # media files no list mentions
    classes: list[str] | None = None  # when the adapter knows them (synth manifest)
    notes: list[str] = field(default_factory=list)  # e.g. "2 duplicated lines ignored"
    dropped_by_split_file: int = 0

    @property
    def manifest(self) -> Manifest:
        return Manifest(records=self.records, classes=list(self.classes or []),
                        dataset=self.dataset)

    def describe(self, max_classes: int = 40) -> str:
        """A human summary: clips per split and class, missing and unlisted files."""
        lines = [f"{self.dataset}: {len(self.records)} clips of {len(self.classes or [])} "
                 f"classes from {self.root}"]
        for split in SPLITS:
            counts = Counter(r.label for r in self.records if r.split == split)
            total = sum(counts.values())
            if not total:
                lines.append(f"  {split:>5}: 0")
                continue
            if len(self.classes or []) <= max_classes:
                detail = ", ".join(f"{c} {counts.get(c, 0)}" for c in self.classes)
            else:
                low, high = min(counts.values()), max(counts.values())
                detail = f"{len(counts)} classes, {low}-{high} clips each"
            lines.append(f"  {split:>5}: {total} ({detail})")
        lines.append(f"  listed but missing on disk: {len(self.missing)}")
        lines.append(f"  files on disk not in any list: {len(self.unlisted)}")
        if self.dropped_by_split_file:
            lines.append(f"  clips left out by the split file(s): {self.dropped_by_split_file}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def require_dir(root: str, dataset: str, expected: str) -> str:
    root = os.path.abspath(os.fspath(root))
    if not os.path.exists(root):
        raise UserError(f"{dataset} root {root} does not exist (expected {expected})")
    if not os.path.isdir(root):
        raise UserError(f"{dataset} root {root} is a file, not a folder (expected {expected})")
    return root


def is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def index_videos(root: str, max_depth: int = 4) -> dict[str, str]:
    """Stem -> path of every video file under `root` (first found wins; hidden dirs skipped)."""
    found: dict[str, str] = {}
    base_depth = root.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if dirpath.count(os.sep) - base_depth >= max_depth:
            dirnames[:] = []
        for name in sorted(filenames):
            if is_video(name):
                found.setdefault(os.path.splitext(name)[0], os.path.join(dirpath, name))
    return found


def find_file(root: str, names: tuple[str, ...]) -> str | None:
    """The first of `names` in root or in one of its direct sub-folders."""
    for name in names:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    for sub in sorted(os.listdir(root)):
        for name in names:
            candidate = os.path.join(root, sub, name)
            if os.path.isfile(candidate):
                return candidate
    return None


def read_class_file(path: str) -> list[str]:
    """Class names, one per line, or a single comma-separated line (OGM-GE's class.txt)."""
    if not os.path.isfile(path):
        raise UserError(f"class list {path} does not exist")
    with open(path, encoding="utf-8-sig") as fh:
        lines = [ln.strip() for ln in fh if ln.strip()]
    if len(lines) == 1 and "," in lines[0]:
        lines = [c.strip() for c in lines[0].split(",") if c.strip()]
    if not lines:
        raise UserError(f"class list {path} is empty")
    if len(set(lines)) != len(lines):
        raise UserError(f"class list {path} names a class twice")
    return lines
