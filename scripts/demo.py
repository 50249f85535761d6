"""`make demo`: the whole pipeline on the built-in imbalanced synthetic dataset.

synth videos -> build-shards -> fit (none, ogm_ge, olm and a visual-only reference) -> report.
Every step reuses what an earlier run of the demo already built, so a rerun (or a run that was
interrupted) only does what is missing. `--quick` is the smallest size, used by the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import asdict

from avprep.errors import MediaError, UserError

# FULL is the size the balancing benchmark (benchmarks/balance.py) was calibrated at: large
# enough for the baseline's visual under-training, and the methods' effect on it, to show.
FULL = {"per_class": 100, "epochs": 10, "image_size": 64, "batch_size": 32}
QUICK = {"per_class": 6, "epochs": 1, "image_size": 32, "batch_size": 8}
SETTINGS_FILE = "demo.json"
BARS = sys.stderr.isatty()  # progress bars on a terminal; a log file gets the [demo] lines only
BUILT = ("data", "shards", "runs", "report")  # what the demo writes under --out

RUNS = [  # (run name, settings): the three methods and the reference that shows the gap
    ("none", {"method": "none"}),
    ("ogm_ge", {"method": "ogm_ge", "alpha": 0.8}),
    # OLM's released summed CE goes with Adam at lr 1e-4 (10 demo epochs underfit: fused 0.51);
    # with the demo's SGD at lr 0.05 a sum is a 32x step that collapses the visual encoder, so
    # the demo's OLM averages its CE over the batch, like every other run here.
    ("olm", {"method": "olm", "olm_reduction": "mean"}),
    ("visual_only", {"method": "none", "modalities": ["visual"]}),
]


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def start_afresh_if_changed(out: str, settings: dict) -> None:
    """A rerun reuses what is built only when it was built with the same settings; otherwise
    (e.g. --quick after a full run, or a new synth default) the demo's folders are rebuilt."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            if json.load(fh) == settings:
                return
        say(f"the demo's settings changed since {out} was built; rebuilding it")
    else:
        foreign = [n for n in BUILT if os.path.exists(os.path.join(out, n))]
        if foreign:  # never delete what the demo did not write
            raise UserError(f"{out} already holds {', '.join(foreign)} that the demo did not "
                            "write; choose another --out (or run `make demo-clean`)")
    for name in BUILT:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(settings, fh, indent=2)


def make_data(out: str, config, workers: int) -> str:
    from avprep.synth import write_synth

    data = os.path.join(out, "data")
    if os.path.isfile(os.path.join(data, "manifest.jsonl")):
        say(f"reusing the synthetic videos in {data}")
        return data
    summary = write_synth(data, config, workers=workers, overwrite=True, progress=BARS)
    say(summary.describe().replace("\n", "; "))
    return data


def make_shards(data: str, out: str, workers: int) -> str:
    from avprep.manifest import read_manifest
    from avprep.presets import get_preset
    from avprep.shards import build_shards

    shards = os.path.join(out, "shards")
    manifest = read_manifest(os.path.join(data, "manifest.jsonl"))
    summary = build_shards(manifest.records, shards, get_preset("synth"),
                           classes=manifest.classes, dataset="synth", shard_size=64,
                           workers=workers, overwrite=True, progress=BARS)
    say(summary.describe().splitlines()[0])
    return shards


def train(shards: str, out: str, size: dict, workers: int) -> list[str]:
    from avtrain.loop import fit
    from avtrain.settings import make_config

    run_dirs = []
    for name, settings in RUNS:
        run_dir = os.path.join(out, "runs", name)
        run_dirs.append(run_dir)
        if os.path.isfile(os.path.join(run_dir, "summary.json")):
            say(f"reusing finished run {run_dir}")
            continue
        resume = run_dir if os.path.isfile(os.path.join(run_dir, "last.pt")) else None
        config = make_config({
            "shards": shards, "run_dir": run_dir, "model": "tiny", "fusion": "concat",
            "epochs": size["epochs"], "batch_size": size["batch_size"], "lr": 0.05,
            "image_size": size["image_size"], "workers": workers, "linear_probe": True,
            "log_every": 2, "progress": BARS, "seed": 0, **settings,
        })
        say(f"training {name} ({'resuming' if resume else 'new'}) -> {run_dir}")
        summary = fit(config, resume=resume, overwrite=resume is None)  # the demo owns its runs
        say(f"{name}: test acc {(summary.get('test') or {}).get('acc', float('nan')):.3f} "
            f"(best val epoch {summary['best_epoch']}, {summary['wall_time']:.0f} s)")
    return run_dirs


def _cell(row: dict, key: str, width: int) -> str:
    value = row.get(key)
    return f"{value:>{width}.3f}" if isinstance(value, float) else f"{'–':>{width}}"


def results_table(rows: list[dict]) -> str:
    header = f"{'run':<12} {'test acc':>8} {'acc_audio':>9} {'acc_visual':>10} " \
             f"{'probe_visual':>12} {'wall s':>7}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(f"{row['run']:<12} {_cell(row, 'test_acc', 8)} "
                     f"{_cell(row, 'test_acc_audio', 9)} {_cell(row, 'test_acc_visual', 10)} "
                     f"{_cell(row, 'probe_visual', 12)} {_cell(row, 'wall_time', 7)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for everything the demo writes")
    parser.add_argument("--quick", action="store_true", help="smallest size (for tests)")
    parser.add_argument("--workers", type=int, default=0, help="0 = all cores")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    workers = args.workers or os.cpu_count() or 1
    started = time.time()
    from avprep.synth import SynthConfig

    synth = SynthConfig(classes=6, per_class=size["per_class"], seconds=2.0, size=64)
    try:
        start_afresh_if_changed(args.out, {"size": size, "synth": asdict(synth)})
        data = make_data(args.out, synth, workers)
        shards = make_shards(data, args.out, workers)
        run_dirs = train(shards, args.out, size, min(workers, 2))
        from avtrain.report import write_report

        report = write_report(run_dirs, os.path.join(args.out, "report"))
    except (UserError, MediaError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    say(f"finished in {time.time() - started:.0f} s")
    print()
    print(results_table(report["rows"]))
    print()
    say(f"videos:  {data}")
    say(f"shards:  {shards}   (try: avprep inspect {shards})")
    say(f"runs:    {os.path.join(args.out, 'runs')}")
    say(f"report:  {report['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
