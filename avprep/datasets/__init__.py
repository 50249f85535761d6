"""Dataset adapters: raw layout + label files -> manifest records, one module per dataset.

    from avprep.datasets import load_dataset, dataset_defaults
    manifest = load_dataset("cremad", "/data/CREMA-D")           # Manifest(records, classes)
    dataset_defaults("cremad")["ogm_ge_alpha"]                    # 0.8

Class lists, default presets and recommended balancing settings live in
`manifests/{name}.yaml`, not in code. Every adapter returns a `Scan`; the steps every dataset
shares (label ids, `--split-file`, carving val from train, seed-extracted frames/audio,
validation) are applied here.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from functools import cache
from importlib import resources

import yaml

from ..errors import UserError
from ..manifest import Manifest, Record, carve_val, read_split_files, validate
from .base import Options, Scan, read_class_file

ADAPTERS = ("cremad", "ave", "ave_olm", "vggsound", "kinetics_sounds", "mer", "folder", "synth")
ALIASES = {"crema-d": "cremad", "crema_d": "cremad", "ks": "kinetics_sounds",
           "kinetics-sounds": "kinetics_sounds", "mer2023": "mer", "mer-multi": "mer",
           "vgg": "vggsound", "ave-olm": "ave_olm"}

__all__ = ["ADAPTERS", "Options", "Scan", "available", "dataset_defaults", "get_adapter",
           "load_dataset", "scan_dataset"]


# options only one adapter reads: given for another dataset they would be silently ignored
ONLY_FOR = {"csv": "vggsound", "trust_pickle": "mer"}


def available() -> list[str]:
    return list(ADAPTERS)


def _canonical(name: str) -> str:
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in ADAPTERS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(ADAPTERS)}")
    return key


def get_adapter(name: str) -> Callable[[str, dict, Options], Scan]:
    """The adapter's `scan(root, defaults, options) -> Scan` function."""
    module = importlib.import_module(f"{__name__}.{_canonical(name)}")
    return module.scan


@cache
def _load_yaml(name: str) -> dict:
    try:
        text = (resources.files("manifests") / f"{name}.yaml").read_text(encoding="utf-8")
    except FileNotFoundError:  # pragma: no cover - shipped as package data
        raise UserError(f"manifests/{name}.yaml is missing from this installation") from None
    data = yaml.safe_load(text) or {}
    data.setdefault("name", name)
    return data


def dataset_defaults(name: str) -> dict:
    """The dataset's YAML: classes (or None when derived from the data), preset, ogm_ge_alpha,
    alpha_note, layout, splits, group. A fresh copy each call."""
    import copy

    return copy.deepcopy(_load_yaml(_canonical(name)))


def _index_dirs(root: str, depth: int = 2) -> dict[str, str]:
    """Name -> path of folders up to `depth` levels under root (seed frame folders)."""
    found: dict[str, str] = {}
    level = [root]
    for _ in range(depth):
        nxt = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.is_dir() and not e.name.startswith("."):
                    found.setdefault(e.name, e.path)
                    nxt.append(e.path)
        level = nxt
    return found


def _index_wavs(root: str, depth: int = 3) -> dict[str, str]:
    found: dict[str, str] = {}
    base = root.rstrip(os.sep).count(os.sep)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if dirpath.count(os.sep) - base >= depth:
            dirnames[:] = []
        for name in sorted(filenames):
            if name.lower().endswith(".wav"):
                found.setdefault(os.path.splitext(name)[0], os.path.join(dirpath, name))
    return found


def _apply_seed_data(scan: Scan, options: Options) -> None:
    """Point records at frames/WAVs the seed scripts already extracted (no decoding again).

    Frames: `{frames_dir}/{clip}/` (also one level deeper, e.g. split or class folders) is
    recorded as `extra["frames_dir"]`; audio: `{audio_dir}/{clip}.wav` becomes `audio`.
    A listed clip whose video is missing but whose frames exist is kept.
    """
    if options.frames_dir is None and options.audio_dir is None:
        return
    frames, wavs = {}, {}
    for path, label in ((options.frames_dir, "--frames-dir"), (options.audio_dir, "--audio-dir")):
        if path is not None and not os.path.isdir(path):
            raise UserError(f"{label} {path} is not a folder")
    if options.frames_dir:
        frames = _index_dirs(os.path.abspath(options.frames_dir))
    if options.audio_dir:
        wavs = _index_wavs(os.path.abspath(options.audio_dir))

    def attach(r: Record) -> None:
        clip = str(r.extra.get("clip", r.key))
        if clip in frames and any(n.lower().endswith((".jpg", ".jpeg", ".png"))
                                  for n in os.listdir(frames[clip])):
            r.extra["frames_dir"] = frames[clip]
        if clip in wavs:
            r.audio = wavs[clip]

    for r in scan.records:
        attach(r)
    still_missing = []
    for r in scan.missing:
        attach(r)
        (scan.records if "frames_dir" in r.extra else still_missing).append(r)
    scan.missing = still_missing


def _apply_split_file(scan: Scan, options: Options) -> None:
    mapping = read_split_files(options.split_file)
    listed = set(mapping)
    kept = []
    for r in scan.records:
        clip = str(r.extra.get("clip", r.key))
        if clip in mapping:
            r.split = mapping[clip]
            kept.append(r)
        else:
            scan.unlisted.append(r.video or r.audio or clip)
            scan.dropped_by_split_file += 1
    found = {str(r.extra.get("clip", r.key)) for r in kept}
    known = {str(r.extra.get("clip", r.key)): r for r in scan.missing}
    scan.missing = [r for r in scan.missing if str(r.extra.get("clip", r.key)) in listed]
    for clip in sorted(listed - found - set(known)):
        # the split file names a clip the dataset does not have at all
        scan.missing.append(Record(key=clip, label="", label_id=-1, split=mapping[clip],
                                   extra={"clip": clip, "reason": "named by the split file"}))
    for r in scan.missing:
        clip = str(r.extra.get("clip", r.key))
        if clip in mapping:
            r.split = mapping[clip]
    scan.records = kept


def _resolve_classes(scan: Scan, defaults: dict, options: Options) -> list[str]:
    if options.classes_file:
        return read_class_file(options.classes_file)
    if scan.classes:
        return list(scan.classes)
    if defaults.get("classes"):
        return [str(c) for c in defaults["classes"]]
    labels = {r.label for r in scan.records + scan.missing if r.label}
    if not labels:
        raise UserError(f"{scan.dataset}: no labelled clips found under {scan.root}")
    return sorted(labels)


def scan_dataset(name: str, root: str | os.PathLike, **options) -> Scan:
    """Like `load_dataset`, but keeps what the summary needs (missing, unlisted, notes)."""
    name = _canonical(name)
    try:
        opts = Options(**options)
    except TypeError as exc:
        raise UserError(f"{name}: {exc}".replace("__init__() ", "")) from None
    for option, owner in ONLY_FOR.items():
        if getattr(opts, option) and name != owner:
            raise UserError(f"--{option.replace('_', '-')} is read by the {owner} adapter only, "
                            f"not by {name}")
    defaults = dataset_defaults(name)
    scan = get_adapter(name)(os.fspath(root), defaults, opts)
    _apply_seed_data(scan, opts)
    if opts.split_file:
        _apply_split_file(scan, opts)
    classes = _resolve_classes(scan, defaults, opts)
    index = {c: i for i, c in enumerate(classes)}
    for r in scan.records + scan.missing:
        if not r.label and r.label_id < 0:
            continue  # a clip only a split file names: its label is unknown
        if r.label not in index:
            where = r.extra.get("source", scan.root)
            shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
            raise UserError(f"{where}: label {r.label!r} (clip {r.extra.get('clip', r.key)}) "
                            f"is not in the {name} class list ({shown})")
        r.label_id = index[r.label]
    scan.classes = classes
    if not any(r.split == "val" for r in scan.records):
        group = defaults.get("group", "clip")
        carve_val(scan.records, opts.val_fraction,
                  lambda r: str(r.extra.get(group, r.extra.get("clip", r.key))))
    scan.records.sort(key=lambda r: r.key)
    if not scan.records:
        raise UserError(f"{name}: found no clips under {scan.root}"
                        + (f" ({len(scan.missing)} listed clips are missing)"
                           if scan.missing else ""))
    validate(scan.records, classes, source=f"{name} dataset at {scan.root}")
    return scan


def load_dataset(name: str, root: str | os.PathLike, **options) -> Manifest:
    """Records of a dataset root as a `Manifest(records, classes, dataset)`.

    `options` are the fields of `avprep.datasets.base.Options` (split_file, val_fraction,
    test_fraction, classes_file, frames_dir, audio_dir, csv, trust_pickle). Raises UserError
    for an unknown dataset, a wrong root, malformed label files, or labels outside the class
    list; missing clips are not an error (see `scan_dataset` for the counts).
    """
    return scan_dataset(name, root, **options).manifest
