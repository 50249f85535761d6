"""MER-MULTI (MER 2023): video/{name}.mp4|.avi + train-label.csv or label-6way.npz.

The label CSV has a header `name,discrete,valence`. The official `label-6way.npz` stores
pickled dicts ({name: {"emo": ..., "val": ...}} per `*_corpus` key); unpickling runs code, so
it is read only with `trust_pickle=True` (--trust-pickle). Each record carries `extra.fold`
(0-4) for the original 5-fold cross-validation; the fixed split is a hash of the name.
"""

from __future__ import annotations

import csv
import os
import zipfile

import numpy as np

from ..errors import UserError
from ..manifest import Record, hash_fraction, hash_split, safe_key
from .base import Options, Scan, find_file, index_videos, require_dir

EXPECTED = "a MER 2023 root with video/ and train-label.csv (or label-6way.npz)"
LABEL_CSVS = ("train-label.csv", "train_label.csv", "label-6way.csv")
TEST_CSVS = ("test-label.csv", "test1-label.csv", "test_label.csv")
TRANSCRIPT_CSVS = ("transcription.csv", "transcriptions.csv", "transcript.csv")


def read_label_csv(path: str) -> list[tuple[str, str, float | None, str]]:
    """(name, emotion, valence, where) rows of a MER label CSV with a header line."""
    rows = []
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "name" not in header or "discrete" not in header:
            raise UserError(f"{path}: expected a header line name,discrete,valence, got "
                            f"{','.join(header)[:80]!r}")
        i_name, i_emo = header.index("name"), header.index("discrete")
        i_val = header.index("valence") if "valence" in header else None
        for lineno, row in enumerate(reader, 2):
            if not row or not any(f.strip() for f in row):
                continue
            if len(row) < len(header):
                raise UserError(f"{path}:{lineno}: expected {len(header)} fields "
                                f"({','.join(header)}), got {len(row)}")
            valence = None
            if i_val is not None and row[i_val].strip():
                try:
                    valence = float(row[i_val])
                except ValueError:
                    raise UserError(f"{path}:{lineno}: valence must be a number, got "
                                    f"{row[i_val]!r}") from None
            rows.append((row[i_name].strip(), row[i_emo].strip(), valence,
                         f"{os.path.basename(path)}:{lineno}"))
    if not rows:
        raise UserError(f"{path}: no labelled clips")
    return rows


def read_label_npz(path: str, trust_pickle: bool, classes: list[str]
                   ) -> dict[str, list[tuple[str, str, float | None, str]]]:
    """Corpus name ('train', 'test1', ...) -> rows, from the official label-6way.npz."""
    try:
        data = np.load(path, allow_pickle=trust_pickle)
        corpora = {}
        for key in data.files:
            if not key.endswith("_corpus"):
                continue
            value = data[key]
            corpora[key[: -len("_corpus")]] = value.item() if value.dtype == object else value
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise UserError(f"{path} stores pickled Python objects, which can run code when "
                            "loaded; pass --trust-pickle if it is the official MER 2023 file, "
                            "or use train-label.csv") from None
        raise UserError(f"{path}: not a readable label-6way.npz ({exc})") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"{path}: not a readable .npz file ({exc})") from None
    if not corpora:
        raise UserError(f"{path}: expected train_corpus (and optional test*_corpus) arrays")
    out = {}
    for corpus, table in corpora.items():
        if not isinstance(table, dict):
            raise UserError(f"{path}: {corpus}_corpus is not a name -> label mapping")
        rows = []
        for name, item in sorted(table.items()):
            emo = item.get("emo") if isinstance(item, dict) else item
            if isinstance(emo, (int, np.integer)) and 0 <= int(emo) < len(classes):
                emo = classes[int(emo)]
            val = item.get("val") if isinstance(item, dict) else None
            rows.append((str(name), str(emo), None if val is None else float(val),
                         f"{os.path.basename(path)}:{corpus}_corpus"))
        out[corpus] = rows
    return out


def _transcripts(root: str) -> dict[str, str]:
    path = find_file(root, TRANSCRIPT_CSVS)
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip().lower() for h in next(reader, [])]
        if "name" not in header or len(header) < 2:
            raise UserError(f"{path}: expected a header line name,sentence (or name,chinese,"
                            "english)")
        i_name = header.index("name")
        prefer = [h for h in ("english", "sentence", "text", "chinese") if h in header]
        i_text = header.index(prefer[0]) if prefer else (1 if i_name == 0 else 0)
        return {row[i_name].strip(): row[i_text].strip() for row in reader
                if len(row) > max(i_name, i_text)}


def scan(root: str, defaults: dict, options: Options) -> Scan:
    root = require_dir(root, "mer", EXPECTED)
    classes = [str(c) for c in defaults["classes"]]
    label_csv = find_file(root, LABEL_CSVS)
    npz = find_file(root, ("label-6way.npz",))
    if label_csv:
        corpora = {"train": read_label_csv(label_csv)}
        test_csv = find_file(root, TEST_CSVS)
        if test_csv:
            corpora["test"] = read_label_csv(test_csv)
    elif npz:
        corpora = read_label_npz(npz, options.trust_pickle, classes)
    else:
        raise UserError(f"{root}: no train-label.csv or label-6way.npz; expected {EXPECTED}")
    has_test = any(c != "train" for c in corpora)
    videos = index_videos(root)
    texts = _transcripts(root)
    result = Scan(dataset="mer", root=root)
    seen: set[str] = set()
    for corpus, rows in corpora.items():
        for name, emotion, valence, where in rows:
            key = safe_key(name)
            if key in seen:
                result.notes.append(f"{where}: {name} labelled twice, first label kept")
                continue
            seen.add(key)
            if corpus == "train":
                split = hash_split(name, options.val_fraction,
                                   0.0 if has_test else options.test_fraction, salt="mer-name")
            else:
                split = "test"
            extra = {"clip": name, "corpus": corpus, "source": where,
                     "fold": int(hash_fraction(name, "mer-fold") * 5)}
            if valence is not None:
                extra["valence"] = valence
            if name in texts:
                extra["transcript"] = texts[name]
            record = Record(key=key, label=emotion.lower(), label_id=-1, split=split,
                            video=videos.get(name), extra=extra)
            (result.records if record.video else result.missing).append(record)
    listed = {str(r.extra["clip"]) for r in result.records + result.missing}
    unknown = sorted(set(texts) - listed)
    if unknown:  # a transcript naming no labelled clip: said, not fatal, nothing else lost
        result.notes.append(f"{find_file(root, TRANSCRIPT_CSVS)}: {len(unknown)} transcript(s) "
                            f"name clips without a label, ignored (e.g. "
                            f"{', '.join(unknown[:3])})")
    result.unlisted = sorted(p for stem, p in videos.items() if stem not in listed)
    return result
