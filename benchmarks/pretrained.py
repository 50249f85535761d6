"""Does balancing still help once an encoder is pretrained? (OGM-GE_CVPR2022 issue #15.)

On the calibrated synth regime (`avtrain recipes synth-imbalanced`) the jointly trained visual
encoder is under-trained: its linear probe is ~10 points below the same encoder trained alone.
This script runs the same methods twice, 3 seeds each, under that recipe:

  scratch      every encoder from random weights (the regime as benched);
  pretrained   the visual encoder starts from a `visual only` run's best checkpoint
               (`--pretrained visual=.../best.pt`: pretrained on the same task and train split,
               the strongest case for "pretraining removes the imbalance"), then fine-tuned.

Then one table: fused test accuracy and the visual probe per method and start, and each method's
paired difference with `none` (same seed) and its 95 % interval, in both starts.

    .venv/bin/python benchmarks/pretrained.py --shards build/synth-imbalanced/shards \
        --out benchmarks/bench-pretrained --methods none,ogm_ge,olm,amco,mla

Every stage resumes (the benches skip finished runs; the pretraining run is kept). Paths in the
written table are relative to the output folder.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from avtrain.intervals import t975  # noqa: E402

RECIPE = "synth-imbalanced"
METRICS = (("acc", "fused acc"), ("probe_visual", "probe visual"))


def avtrain(*args: str) -> None:
    """One avtrain command in a child process (its own progress lines go to our stdout)."""
    cmd = [sys.executable, "-c", "from cli import avtrain; avtrain(prog_name='avtrain')", *args]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run(cmd, check=True, env=env)


def pretrain(shards: str, out: str) -> str:
    """The `visual only` run whose encoder the pretrained start loads (seed 0)."""
    run = os.path.join(out, "visual-only")
    best = os.path.join(run, "best.pt")
    if not os.path.exists(best):
        avtrain("fit", "--recipe", RECIPE, "--shards", shards, "--modalities", "visual",
                "--seed", "0", "--run-dir", run, "--no-progress")
    return best


def per_seed(bench: str) -> dict[str, dict[int, dict[str, float]]]:
    """row -> seed -> metric -> value, from a bench folder's runs.csv."""
    rows: dict[str, dict[int, dict[str, float]]] = {}
    with open(os.path.join(bench, "runs.csv"), newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.setdefault(r["row"], {})[int(r["seed"])] = {
                k: float(r[k]) for k, _ in METRICS if r.get(k) not in (None, "")}
    return rows


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def paired_with_none(rows, method: str, key: str) -> str:
    """Mean of (method - none) over the seeds both have, with its 95 % t interval."""
    if method == "none" or "none" not in rows:
        return "–"
    diffs = [rows[method][s][key] - rows["none"][s][key]
             for s in sorted(rows[method]) if s in rows["none"]
             and key in rows[method][s] and key in rows["none"][s]]
    if len(diffs) < 2:
        return "–"
    mean = statistics.fmean(diffs)
    half = t975(len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
    return f"{mean:+.3f} ({mean - half:+.3f} … {mean + half:+.3f})"


def table(scratch: dict, pretrained: dict, methods: list[str]) -> list[str]:
    lines = []
    for key, label in METRICS:
        lines += [f"### {label}", "",
                  "| method | scratch | pretrained visual | Δ none, scratch (95 %) | "
                  "Δ none, pretrained (95 %) |",
                  "|---|---|---|---|---|"]
        for m in methods:
            cells = [mean_std([v[key] for v in start.get(m, {}).values() if key in v])
                     for start in (scratch, pretrained)]
            cells += [paired_with_none(start, m, key) for start in (scratch, pretrained)]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="the synth-imbalanced shard folder")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "bench-pretrained"))
    ap.add_argument("--methods", default="none,ogm_ge,olm,amco,mla")
    ap.add_argument("--seeds", default="3")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if "none" not in methods:
        methods.insert(0, "none")
    os.makedirs(args.out, exist_ok=True)
    best = pretrain(args.shards, args.out)
    common = ["--recipe", RECIPE, "--shards", args.shards, "--methods", ",".join(methods),
              "--seeds", args.seeds, "--no-references", "--no-progress"]
    avtrain("bench", *common, "-o", os.path.join(args.out, "scratch"))
    avtrain("bench", *common, "-o", os.path.join(args.out, "pretrained"),
            "--pretrained", f"visual={best}")
    scratch = per_seed(os.path.join(args.out, "scratch"))
    pretrained = per_seed(os.path.join(args.out, "pretrained"))
    text = "\n".join([
        f"# Balancing with a pretrained visual encoder ({args.date})", "",
        f"Recipe `{RECIPE}`, seeds {args.seeds}; pretrained start: "
        f"`{os.path.relpath(best, args.out)}` (a `visual only` run, seed 0, same train split). "
        "Test metrics of each run's best-validation epoch, mean ± std over seeds; Δ none: the "
        "paired difference with `none` on the same seed, mean and 95 % t interval. Per-run "
        "numbers: `scratch/` and `pretrained/` (bench folders).", "",
        *table(scratch, pretrained, methods)])
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
