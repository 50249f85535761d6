"""k-fold cross-validation over the training data (`avtrain fit --folds 5`), as the OLM paper
evaluates MER-MULTI: k runs, each validating on one fold and training on the others, reported
as mean ± std over the folds.

    summary = cross_validate(config)          # config.folds = 5, config.run_dir = RUN
    summary["val"]["acc"]                     # {"mean": ..., "std": ..., "values": [...]}

The pool is the shard set's `train` and `val` splits (val was carved from train; `test` stays
the test). A sample's fold is its manifest's `extra.fold` when there is one and k matches it
(MER-MULTI records carry the original 5 folds), else a hash of its key, so folds never
depend on shard order or on the number of processes. The pool is repacked once into one
tar per fold under RUN/folds/ (member bytes copied, nothing decoded); each fold's shard set,
RUN/folds/fold{i}/, is an ordinary shard folder of hard links (symlinks across file
systems): train = the other folds, val = fold i, test = the original test shards. So every
fold is a plain `fit` with its own run directory RUN/fold{i}/, and a fold already finished
(its summary.json exists) is not trained again, which makes the whole protocol resumable.

For each fold the metrics are those of its best epoch (chosen on its held-out fold), on the
held-out fold (`val`) and on test; RUN/cv.json and RUN/cv.md hold the per-fold values and
their mean ± std (population std, ddof 0, over folds).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from collections import Counter, defaultdict

import numpy as np

from avprep.errors import UserError
from avprep.manifest import hash_fraction
from avprep.shards import add_member, write_json_atomic
from avprep.storage import is_remote

from .config import TrainConfig, require_run_paths, to_yaml
from .data import open_shards

POOL = ("train", "val")
DONE = "folds.json"


def fold_of(key: str, meta: dict, k: int) -> int:
    """The manifest's fold when it has one for k folds, else a hash of the key."""
    fold = (meta.get("extra") or {}).get("fold")
    if isinstance(fold, int) and k == 5 and 0 <= fold < k:
        return fold
    return min(k - 1, int(hash_fraction(key, "avbalance-cv") * k))


def _samples(tar_path: str):
    """(key, [(suffix, bytes), ...]) per sample of a shard, in tar order."""
    with tarfile.open(tar_path, "r") as tar:
        key, members = None, []
        for info in tar:
            if not info.isfile():
                continue
            name = os.path.basename(info.name)
            this, _, suffix = name.partition(".")
            if this != key and members:
                yield key, members
                members = []
            key = this
            members.append((suffix, tar.extractfile(info).read()))
        if members:
            yield key, members


def _link(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.link(src, dst)
    except OSError:
        try:
            os.symlink(os.path.abspath(src), dst)
        except OSError:
            shutil.copyfile(src, dst)


def make_folds(shards_path: str, k: int, out: str) -> list[str]:
    """Write the k fold shard sets under `out` (skipped when `out` already holds them for
    this shard set and k); returns the fold folders."""
    if k < 2:
        raise UserError(f"--folds must be at least 2, got {k}")
    shards = open_shards(shards_path)
    done_path = os.path.join(out, DONE)
    source = {"shards": os.path.abspath(shards_path), "k": k,
              "created": shards.index.get("created")}
    if os.path.isfile(done_path):
        with open(done_path, encoding="utf-8") as fh:
            done = json.load(fh)
        if done.get("source") == source:
            return [os.path.join(out, f"fold{i}") for i in range(k)]
        raise UserError(f"{out} holds folds of another shard set or k; remove it or choose "
                        "another --run-dir")
    pool_urls = [u for split in POOL if split in shards.splits for u in shards.urls(split)]
    if not pool_urls:
        raise UserError(f"{shards_path}: no train or val samples to cross-validate")
    os.makedirs(out, exist_ok=True)
    counts = [Counter() for _ in range(k)]
    tmp = [os.path.join(out, f".part{i}.tar.tmp") for i in range(k)]
    tars = [tarfile.open(p, "w", format=tarfile.USTAR_FORMAT) for p in tmp]
    try:
        for url in pool_urls:
            for key, members in _samples(url):
                parts = dict(members)
                meta = json.loads(parts["json"]) if "json" in parts else {}
                fold = fold_of(key, meta, k)
                for suffix, data in members:
                    add_member(tars[fold], f"{key}.{suffix}", data)
                label = parts.get("cls", b"-1").decode("ascii").strip()
                counts[fold][label] += 1
    finally:
        for tar in tars:
            tar.close()
    empty = [i for i in range(k) if not counts[i]]
    if empty:
        for p in tmp:
            os.remove(p)
        total = sum(sum(c.values()) for c in counts)
        raise UserError(f"{shards_path}: {total} train+val samples leave fold {empty[0]} empty; "
                        f"use fewer --folds")
    parts = []
    for i in range(k):
        final = os.path.join(out, f"part{i}.tar")
        os.replace(tmp[i], final)
        parts.append(final)
    folders = [_fold_set(shards, parts, counts, i, out) for i in range(k)]
    write_json_atomic(done_path, {"source": source, "counts": [dict(c) for c in counts]})
    return folders


def _fold_set(shards, parts: list[str], counts: list[Counter], i: int, out: str) -> str:
    folder = os.path.join(out, f"fold{i}")
    os.makedirs(folder, exist_ok=True)
    n = shards.num_classes
    splits: dict[str, dict] = {}

    def add(split: str, src: str, name: str, classes: dict) -> None:
        _link(src, os.path.join(folder, name))
        entry = splits.setdefault(split, {"samples": 0, "shards": [], "class_counts": [0] * n})
        samples = sum(classes.values())
        entry["samples"] += samples
        entry["shards"].append({"url": name, "samples": samples, "classes": classes})
        for label, count in classes.items():
            if 0 <= int(label) < n:
                entry["class_counts"][int(label)] += count

    for j, part in enumerate(parts):
        split = "val" if j == i else "train"
        add(split, part, f"{split}-fold{j}.tar", dict(sorted(counts[j].items())))
    for entry in shards.splits.get("test", {}).get("shards", []):
        if entry.get("samples", 1):
            add("test", os.path.join(shards.root, entry["url"]), os.path.basename(entry["url"]),
                dict(entry.get("classes") or {}))
    index = {**shards.index, "splits": splits,
             "cv": {"k": len(parts), "fold": i, "source": os.path.abspath(shards.root)}}
    write_json_atomic(os.path.join(folder, "index.json"), index)
    return folder


def summarize_folds(results: list[dict]) -> dict:
    """{split: {metric: {"mean", "std", "values"}}} over the folds' best-epoch metrics."""
    out: dict[str, dict] = {}
    for split in ("val", "test"):
        values: dict[str, list[float]] = defaultdict(list)
        for r in results:
            for name, value in (r.get(split) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and (
                        name.startswith(("acc", "macro_f1", "weighted_f1", "loss"))):
                    values[name].append(float(value))
        if values:
            out[split] = {name: {"mean": float(np.mean(v)), "std": float(np.std(v)),
                                 "values": v} for name, v in values.items()
                          if len(v) == len(results)}
    return out


def markdown(summary: dict) -> str:
    """The cross-validation table: one row per metric, mean ± std per split."""
    lines = [f"# {summary['k']}-fold cross-validation", "",
             f"{summary['k']} folds over train+val; metrics of each fold's best epoch "
             "(chosen on its held-out fold).", "", "| metric | held-out fold | test |",
             "|---|---|---|"]
    stats = summary["stats"]
    names = sorted(set(stats.get("val", {})) | set(stats.get("test", {})),
                   key=lambda n: (n != "acc", n))
    for name in names:
        cells = []
        for split in ("val", "test"):
            s = stats.get(split, {}).get(name)
            cells.append(f"{s['mean']:.4f} ± {s['std']:.4f}" if s else "-")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def _wait_for(path: str, timeout: float = 24 * 3600) -> None:
    """Other ranks under torchrun wait for rank 0 to write the folds."""
    start = time.time()
    while not os.path.isfile(path):
        if time.time() - start > timeout:
            raise UserError(f"gave up waiting for {path}")
        time.sleep(2.0)


def cross_validate(config: TrainConfig, *, resume: bool = True) -> dict:
    """Train `config.folds` runs (RUN/fold{i}) and write RUN/cv.json and RUN/cv.md."""
    from .loop import check_recipe_shards, fit

    k = int(config.folds or 0)
    if k < 2:
        raise UserError(f"--folds must be at least 2, got {config.folds}")
    require_run_paths(config)
    if is_remote(config.shards):
        raise UserError(f"--folds needs a local shard set: each fold is a folder of links to "
                        f"its tars, which {config.shards} cannot hold; copy the shard set to "
                        "a local folder (e.g. `aws s3 sync`, `gsutil rsync`) and pass that")
    check_recipe_shards(config)  # on the shards given: the folds are cut from them
    run = config.run_dir
    data_dir = os.path.join(run, "folds")
    if os.environ.get("RANK", "0") == "0":
        os.makedirs(run, exist_ok=True)
        with open(os.path.join(run, "config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(to_yaml(config))
        folders = make_folds(config.shards, k, data_dir)
    else:
        _wait_for(os.path.join(data_dir, DONE))
        folders = [os.path.join(data_dir, f"fold{i}") for i in range(k)]
    results = []
    for i, folder in enumerate(folders):
        fold_run = os.path.join(run, f"fold{i}")
        summary_path = os.path.join(fold_run, "summary.json")
        if resume and os.path.isfile(summary_path):
            with open(summary_path, encoding="utf-8") as fh:
                result = json.load(fh)
        else:
            part = config.replace(shards=folder, run_dir=fold_run, folds=None, recipe=None,
                                  val_split="val", test_split="test")
            last = os.path.join(fold_run, "last.pt")
            carry_on = resume and os.path.isfile(last)
            # a fold with nothing to continue from is started afresh, whatever it holds
            result = fit(part, resume=fold_run if carry_on else None, overwrite=not carry_on)
        results.append({"fold": i, "best_epoch": result.get("best_epoch"),
                        "val": result.get("val"), "test": result.get("test")})
    summary = {"k": k, "run_dir": run, "recipe": config.recipe, "protocol": "folds",
               "method": config.method, "model": config.model,
               "modalities": list(config.modalities), "folds": results,
               "stats": summarize_folds(results)}
    if os.environ.get("RANK", "0") == "0":
        write_json_atomic(os.path.join(run, "cv.json"), summary)
        with open(os.path.join(run, "cv.md"), "w", encoding="utf-8") as fh:
            fh.write(markdown(summary))
    return summary
