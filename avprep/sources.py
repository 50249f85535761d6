"""What a command reads, named one way everywhere: `--dataset NAME --root DIR` (the dataset as
it ships, read by its adapter) or `--manifest FILE` (records already written).

    loaded = read_source(dataset="cremad", root="/data/CREMA-D", split_file=["train.csv"])
    loaded = read_source(manifest="cremad.jsonl")

Dataset options (split files, class list, seed-extracted frames, ...) shape how a root is read;
a manifest already fixed all of that, so giving them with `--manifest` is refused rather than
silently ignored. `legacy_source` maps the older positional spellings onto this one.
"""

from __future__ import annotations

import os

from .errors import UserError
from .manifest import Manifest, read_manifest


def given_options(options: dict) -> dict:
    """The dataset options a user actually set (None, empty and False mean 'not given')."""
    return {k: v for k, v in options.items() if v not in (None, (), [], False)}


def read_source(manifest: str | None = None, dataset: str | None = None,
                root: str | None = None, *, require_media: bool = True,
                **dataset_options) -> Manifest:
    """Records of a manifest file, or of a dataset root read by the `dataset` adapter.

    `require_media=False` accepts records without video/audio paths (feature-only manifests,
    for import-features)."""
    options = given_options(dataset_options)
    if manifest:
        if root:
            raise UserError("give either --manifest or --dataset/--root, not both")
        if options:
            flag = "--" + next(iter(options)).replace("_", "-")
            raise UserError(f"{flag} applies when reading a dataset root (--dataset/--root); "
                            f"the manifest {manifest} already fixes splits, classes and paths")
        if not os.path.isfile(manifest):
            raise UserError(f"manifest not found: {manifest}")
        loaded = read_manifest(manifest, require_media=require_media)
        if dataset:
            loaded.dataset = dataset
        return loaded
    if dataset and root:
        from .datasets import load_dataset

        return load_dataset(dataset, root, **options)
    if root:
        raise UserError(f"--root {root} needs --dataset NAME to say how to read it")
    raise UserError("say what to read: --dataset NAME --root DIR, or --manifest FILE")


def legacy_source(source: str, dataset: str | None) -> tuple[str | None, str | None]:
    """(manifest, root) for the old positional SOURCE of extract-frames/extract-audio: a
    manifest file, a dataset root (with --dataset), or a folder holding manifest.jsonl."""
    if os.path.isfile(source):
        return source, None
    if os.path.isdir(source):
        if dataset:
            return None, source
        hint = os.path.join(source, "manifest.jsonl")
        if os.path.isfile(hint):
            return hint, None
        raise UserError(f"{source} is a folder: pass --dataset NAME --root {source} to read it "
                        "as a dataset root, or --manifest FILE")
    raise UserError(f"{source} does not exist (expected a manifest .jsonl or a dataset root)")


def split_file_args(split_files) -> dict:
    """What index.json records of the split lists a build read (name and SHA-256), so a recipe
    can tell shards of a paper's split from shards of the default one. Empty when none."""
    import hashlib

    files = []
    for path in split_files or ():
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()
        files.append({"name": os.path.basename(path), "sha256": digest})
    return {"split_files": files} if files else {}
