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


def validate(records: list[Record], classes: list[str] | None = None, source: str = "manifest"
             ) -> None:
    """Raise UserError on the first problem a shard writer or trainer would trip over."""
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
        if r.video is None and r.audio is None and "features" not in r.extra:
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


def read_manifest(path: str | os.PathLike, validate_records: bool = True) -> Manifest:
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
        validate(records, classes, source=path)
    return Manifest(records=records, classes=classes, dataset=dataset)
