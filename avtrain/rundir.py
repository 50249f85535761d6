"""The run directory: what a run writes there, a new run refused on an old one, resume.

    RUN/config.yaml  metrics.jsonl  tb/  last.pt  best.pt  summary.json

A new run never lands silently on an old one (`check_run_dir`; --overwrite clears it),
`--resume RUN` needs RUN/last.pt (`resume_dir`), and a resumed run's metrics.jsonl loses what
the interrupted session wrote after its checkpoint (`trim_log`), so it reads as one
uninterrupted run. Files are replaced atomically (`write_text`).
"""

from __future__ import annotations

import json
import os
import shutil

from avprep.errors import UserError

RUN_FILES = ("metrics.jsonl", "summary.json", "last.pt", "best.pt", "config.yaml", "tb")


def check_run_dir(run_dir: str, *, resume: str | None, overwrite: bool) -> list[str]:
    """A new run never lands silently on an old one: that would append to its metrics.jsonl and
    replace its checkpoints. Returns what `overwrite` will remove."""
    if resume or not os.path.isdir(run_dir):
        return []
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(run_dir, name))]
    if not overwrite and any(name != "config.yaml" for name in found):
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}); continue it with "
                        f"--resume {run_dir}, or start it again with --overwrite")
    return found


def clear_run_dir(run_dir: str, names: list[str]) -> None:
    for name in names:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


def resume_dir(resume: str) -> str:
    """The run directory of `--resume RUN` (RUN or RUN/last.pt), checked to hold last.pt."""
    run = os.path.dirname(resume) if resume.endswith(".pt") else resume
    if not os.path.isfile(os.path.join(run, "last.pt")):
        raise UserError(f"nothing to resume: {os.path.join(run, 'last.pt')} not found")
    return run


def write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def trim_log(run_dir: str, epoch: int, step: int) -> None:
    """On resume: drop records written after the checkpoint (the interrupted epoch's steps),
    so metrics.jsonl reads as if the run had never stopped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("kind") == "step" and rec.get("step", 0) > step:
                continue
            if rec.get("kind") in ("epoch", "interrupted") and rec.get("epoch", 0) > epoch:
                continue
            if rec.get("kind") in ("interrupted", "summary"):
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    write_text(path, "".join(kept))
