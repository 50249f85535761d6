"""The manifest: one JSON record per clip, the common currency between adapters and shards.

Every dataset adapter produces `Record`s; build-shards, extract-frames and extract-audio
consume them. Splits are deterministic (official lists, else a hash of a group id).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from .errors import UserError

SPLITS = ("train", "val", "test")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass
class Record:
    key: str
    label: str
    label_id: int
    split: str
    video: str | None = None
    audio: str | None = None
    start: float | None = None
    end: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {k: v for k, v in data.items() if v is not None and v != {}}

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        known = {"key", "label", "label_id", "split", "video", "audio", "start", "end", "extra"}
        unknown = set(data) - known
        record = cls(**{k: v for k, v in data.items() if k in known})
        if unknown:  # keep unknown fields rather than dropping a user's data
            record.extra = {**record.extra, **{k: data[k] for k in sorted(unknown)}}
        return record


def safe_key(text: str) -> str:
    """A key WebDataset can use: `[A-Za-z0-9_-]` only (dots would split the sample)."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return key or "clip"


def hash_fraction(group: str, salt: str = "avbalance") -> float:
    """A stable number in [0, 1) for a group id; the same on every machine and Python run."""
    digest = hashlib.sha1(f"{salt}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hash_split(group: str, val: float = 0.1, test: float = 0.1, salt: str = "avbalance") -> str:
    """Deterministic split for a group (e.g. CREMA-D actor), so one group never spans splits."""
    x = hash_fraction(group, salt)
    if x < test:
        return "test"
    if x < test + val:
        return "val"
    return "train"


def validate(records: list[Record], classes: list[str] | None = None, source: str = "manifest",
             *, require_media: bool = True) -> None:
    """Raise UserError on the first problem a shard writer or trainer would trip over.

    `require_media=False`: records may have no video/audio path (a feature-only manifest:
    key, label, label_id, split), for steps that decode nothing (import-features)."""
    if not records:
        raise UserError(f"{source}: no records (empty manifest)")
    seen: set[str] = set()
    for i, r in enumerate(records, 1):
        where = f"{source}: record {i} (key {r.key!r})"
        if not isinstance(r.key, str) or not KEY_PATTERN.match(r.key):
            raise UserError(f"{where}: key must use only letters, digits, '_' and '-' "
                            "(dots split WebDataset samples)")
        if r.key in seen:
            raise UserError(f"{where}: duplicate key")
        seen.add(r.key)
        if r.split not in SPLITS:
            raise UserError(f"{where}: split {r.split!r} is not one of {', '.join(SPLITS)}")
        if classes is not None:
            if r.label not in classes:
                raise UserError(f"{where}: label {r.label!r} is not in the class list")
            if classes.index(r.label) != r.label_id:
                raise UserError(f"{where}: label_id {r.label_id} does not match label "
                                f"{r.label!r} (expected {classes.index(r.label)})")
        if require_media and r.video is None and r.audio is None and "features" not in r.extra:
            raise UserError(f"{where}: neither video nor audio path")
        if r.start is not None and r.end is not None and r.end <= r.start:
            raise UserError(f"{where}: segment end {r.end} is not after start {r.start}")


def write_manifest(records: Iterable[Record], path: str | os.PathLike, classes=None,
                   dataset: str | None = None) -> int:
    """Write JSONL atomically. A first line `{"_meta": ...}` keeps the class list and dataset."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        if classes is not None or dataset is not None:
            meta = {"dataset": dataset, "classes": list(classes) if classes else None}
            fh.write(json.dumps({"_meta": meta}, ensure_ascii=False) + "\n")
        for r in records:
            fh.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


@dataclass
class Manifest:
    records: list[Record]
    classes: list[str]
    dataset: str | None = None

    def by_split(self) -> dict[str, list[Record]]:
        out: dict[str, list[Record]] = {s: [] for s in SPLITS}
        for r in self.records:
            out[r.split].append(r)
        return out

    def counts(self) -> dict[str, Counter]:
        return {s: Counter(r.label for r in rs) for s, rs in self.by_split().items()}


def iter_records(path: str | os.PathLike) -> Iterator[dict]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"manifest {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def read_manifest(path: str | os.PathLike, validate_records: bool = True, *,
                  require_media: bool = True) -> Manifest:
    """Read a JSONL manifest; the class list comes from its `_meta` line or the labels."""
    path = os.fspath(path)
    records: list[Record] = []
    classes: list[str] | None = None
    dataset = None
    for i, data in enumerate(iter_records(path), 1):
        if "_meta" in data:
            classes = data["_meta"].get("classes")
            dataset = data["_meta"].get("dataset")
            continue
        missing = [k for k in ("key", "label", "label_id", "split") if k not in data]
        if missing:
            raise UserError(f"{path}: record {i} lacks {', '.join(missing)}")
        records.append(Record.from_dict(data))
    if classes is None:
        by_id = {r.label_id: r.label for r in records}
        classes = [by_id.get(i, f"class_{i}") for i in range(max(by_id, default=-1) + 1)]
    base = os.path.dirname(os.path.abspath(path))
    for r in records:  # relative media paths are relative to the manifest's folder
        if r.video and not os.path.isabs(r.video):
            r.video = os.path.normpath(os.path.join(base, r.video))
        if r.audio and not os.path.isabs(r.audio):
            r.audio = os.path.normpath(os.path.join(base, r.audio))
    if validate_records:
        validate(records, classes, source=path, require_media=require_media)
    return Manifest(records=records, classes=classes, dataset=dataset)


# --- split files (reproduce a paper's exact split) -----------------------------------------

_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                  "validation": "val", "dev": "val", "test": "test", "testing": "test"}
_HEADER_WORDS = {"clip", "name", "id", "key", "path", "file", "filename", "video", "video_id",
                 "ytid", "youtube_id", "sample"}


def clip_id(text: str) -> str:
    """The clip id a list refers to: the file name without folders and extension."""
    base = os.path.basename(text.strip().replace("\\", "/"))
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in {".mp4", ".flv", ".avi", ".mkv", ".webm", ".mov", ".wav",
                                   ".mp3", ".jpg", ".npy"} else base


def _split_from_name(path: str) -> str | None:
    tokens = re.split(r"[^a-z]+", os.path.basename(path).lower())
    found = {_SPLIT_ALIASES[t] for t in tokens if t in _SPLIT_ALIASES}
    return found.pop() if len(found) == 1 else None


def read_split_files(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """Map clip id -> split from one or more list files.

    Each file is CSV; the first field of a row is the clip (a name or a path; folders and the
    extension are dropped). The split is a field of the row that names one (train/val/test),
    else the file's name (train.csv, my_test.txt, ...). OGM-GE's CREMA-D `train.csv` /
    `test.csv` (rows `clip,label`) therefore work as they are. A first row whose first field
    is a header word (clip, name, id, ...) is skipped.
    """
    import csv

    mapping: dict[str, str] = {}
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise UserError(f"split file {path} does not exist")
        default = _split_from_name(path)
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = [row for row in csv.reader(fh) if row and any(f.strip() for f in row)]
        if rows and rows[0][0].strip().lower() in _HEADER_WORDS:
            rows = rows[1:]
        if not rows:
            raise UserError(f"split file {path} lists no clips")
        for lineno, row in enumerate(rows, 1):
            named = [_SPLIT_ALIASES[f.strip().lower()] for f in row[1:]
                     if f.strip().lower() in _SPLIT_ALIASES]
            split = named[0] if named else default
            if split is None:
                raise UserError(f"split file {path}: cannot tell which split row {lineno} "
                                "belongs to; name the file train*/val*/test* or add a split "
                                "column (train, val or test)")
            clip = clip_id(row[0])
            if mapping.get(clip, split) != split:
                raise UserError(f"split file {path}: clip {clip!r} is already listed in "
                                f"split {mapping[clip]!r}")
            mapping[clip] = split
    return mapping


def carve_val(records: list[Record], fraction: float, group_of=None,
              salt: str = "avbalance-val") -> int:
    """Move a deterministic `fraction` of train groups to val; returns how many records moved.

    Groups (CREMA-D actor, YouTube id, ...) move as a whole, so a speaker or a video never
    spans train and val. Used when a dataset's official split has no val.
    """
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"val fraction must be in [0, 1), got {fraction}")
    group_of = group_of or (lambda r: str(r.extra.get("group", r.key)))
    moved = 0
    for r in records:
        if r.split == "train" and hash_fraction(group_of(r), salt) < fraction:
            r.split = "val"
            moved += 1
    return moved
