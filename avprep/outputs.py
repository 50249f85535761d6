"""Local output folders of every command that writes one (build-shards, import-features,
extract-frames, extract-audio, synth, manifest, fit's --run-dir, bench, report).

Missing parents are created, as `mkdir -p` does, so the commands the docs show work as written
in an empty folder (`avprep build-shards ... -o shards/cremad`). What cannot become a folder is
refused before any work, with one line: a path that is a file, or lies under a file, or whose
nearest existing folder cannot be written. Remote prefixes (s3://, gs://) are left to the store.
"""

from __future__ import annotations

import os

from .errors import UserError


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse a local output folder that cannot be made, without creating anything."""
    path = os.fspath(path)
    if "://" in path:
        return
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"{path} exists and is not a folder")
        return
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"cannot create the folder {path}: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"cannot create the folder {path}: {ancestor} is not writable")


def make_output_dir(path: str | os.PathLike) -> None:
    """`check_output_dir`, then create the folder and its missing parents."""
    check_output_dir(path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # e.g. a parent made a file meanwhile, or a read-only file system
        raise UserError(f"cannot create the folder {os.fspath(path)}: "
                        f"{err.strerror or err}") from None
