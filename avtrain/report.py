"""Compare training runs: PNG plots and a markdown `report.md`.

Reads only what `fit` leaves in a run directory (`metrics.jsonl`, `summary.json`), so it
works on runs from other machines too. Each method keeps one colour across every figure.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from avprep.errors import UserError
from avprep.outputs import make_output_dir

METHOD_COLOURS = {"none": "#555555", "ogm": "#1f77b4", "ogm_ge": "#2ca02c", "olm": "#d62728",
                  "olm_com": "#9467bd"}
EXTRA_COLOURS = ["#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
MODALITY_COLOURS = {"audio": "#ff7f0e", "visual": "#1f77b4", "text": "#8c564b",
                    "fused": "#7f7f7f"}
STEP_BOOKKEEPING = {"kind", "epoch", "step", "loss", "lr", "time"}


@dataclass
class Run:
    path: str
    name: str
    summary: dict
    steps: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.summary.get("method", "?")

    @property
    def dataset(self) -> str | None:
        return self.summary.get("dataset")

    @property
    def modalities(self) -> list[str]:
        return list(self.summary.get("modalities") or [])


def load_run(path: str) -> Run:
    """A finished run directory, or UserError saying why it is not one."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a folder")
    summary_path = os.path.join(path, "summary.json")
    metrics_path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        raise UserError(f"{path}: no metrics.jsonl (not an avtrain run directory)")
    if not os.path.isfile(summary_path):
        raise UserError(f"{path}: no summary.json (the run has not finished)")
    try:
        with open(summary_path, encoding="utf-8") as fh:
            summary = json.load(fh)
    except ValueError as exc:
        raise UserError(f"{summary_path}: not valid JSON ({exc})") from None
    run = Run(path=path, name=os.path.basename(os.path.normpath(path)), summary=summary)
    with open(metrics_path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash; the rest is still useful
            if record.get("kind") == "step":
                run.steps.append(record)
            elif record.get("kind") == "epoch":
                run.epochs.append(record)
    return run


def expand_cross_validation(paths: list[str]) -> list[str]:
    """A `--folds k` run directory (RUN/cv.json, RUN/fold0..) stands for its fold runs."""
    expanded = []
    for path in paths:
        folds = sorted((name for name in (os.listdir(path) if os.path.isdir(path) else [])
                        if name.startswith("fold") and name[4:].isdigit()),
                       key=lambda name: int(name[4:]))
        if folds and not os.path.isfile(os.path.join(path, "metrics.jsonl")):
            expanded += [os.path.join(path, name) for name in folds]
        else:
            expanded.append(path)
    return expanded


def collect_runs(paths: list[str]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Load every run that can be compared with the first good one; the rest are skipped
    with a reason (not a run, unfinished, another dataset)."""
    runs: list[Run] = []
    skipped: list[tuple[str, str]] = []
    for path in expand_cross_validation(paths):
        try:
            run = load_run(path)
        except UserError as exc:
            skipped.append((path, str(exc).split(": ", 1)[-1]))
            continue
        if runs and run.dataset != runs[0].dataset:
            skipped.append((path, f"dataset {run.dataset!r} differs from {runs[0].dataset!r} "
                                  f"of {runs[0].name}"))
            continue
        runs.append(run)
    names = [r.name for r in runs]
    for run in runs:  # two runs named alike (a/seed0, b/seed0): use the parent too
        if names.count(run.name) > 1:
            parent = os.path.basename(os.path.dirname(os.path.normpath(run.path)))
            run.name = f"{parent}/{run.name}"
    return runs, skipped


def assign_colours(keys, preferred) -> dict[str, str]:
    """key -> colour: `preferred(key)` (a method's own colour) when no earlier key took it, else
    the next spare one; spares run through EXTRA_COLOURS then matplotlib's tab20 palettes and
    cycle, so any number of lines (a bench of 26 methods, default and tuned) gets a colour."""
    import itertools

    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = [to_hex(c) for name in ("tab20", "tab20b", "tab20c")
               for c in colormaps[name].colors]
    spare = itertools.cycle(EXTRA_COLOURS + [c for c in palette if c not in EXTRA_COLOURS])
    colours: dict[str, str] = {}
    for key in keys:
        colour = preferred(key)
        colours[key] = colour if colour and colour not in colours.values() else next(spare)
    return colours


def colours_for(runs: list[Run]) -> dict[str, str]:
    """A method keeps its colour; a second run of the same method (a unimodal reference, another
    seed) gets a spare one, so no two lines on a figure look alike."""
    method = {run.name: run.method for run in runs}
    return assign_colours([run.name for run in runs], lambda name: METHOD_COLOURS.get(method[name]))


def _metric(split_metrics: dict | None, key: str):
    return None if not split_metrics else split_metrics.get(key)


def final_rows(runs: list[Run]) -> list[dict]:
    """The numbers of the final table, straight from each run's summary.json."""
    rows = []
    for run in runs:
        s, test = run.summary, run.summary.get("test") or {}
        row = {"run": run.name, "method": run.method, "best_epoch": s.get("best_epoch"),
               "test_acc": test.get("acc"), "test_macro_f1": test.get("macro_f1"),
               "wall_time": s.get("wall_time")}
        for m in run.modalities:
            row[f"test_acc_{m}"] = test.get(f"acc_{m}")
        for m, probe in (s.get("linear_probe") or {}).items():
            if isinstance(probe, dict) and "test_acc" in probe:
                row[f"probe_{m}"] = probe["test_acc"]
        shapley = (s.get("shapley") or {}).get("test") or {}
        for m in run.modalities:  # each modality's Shapley share of the test accuracy
            if m in shapley:
                row[f"shapley_{m}"] = shapley[m]
        rows.append(row)
    if any(run.summary.get("protocol", "val") != "val" for run in runs):
        for row, run in zip(rows, runs):  # say how each best epoch was chosen
            protocol = run.summary.get("protocol", "val")
            row["protocol"] = "LEGACY: test-selected" if protocol == "legacy" else protocol
    return rows


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _plot_accuracy(runs, colours, key, out_dir, plt) -> str | None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for run in runs:
        for split, style in (("val", "-"), ("test", ":")):
            points = [(e["epoch"], _metric(e.get(split), key)) for e in run.epochs]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", ms=3, color=colours[run.name],
                        label=f"{run.name} ({split})")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    label = {"acc": "fused"}.get(key, key.replace("acc_", ""))
    ax.set(title=f"Accuracy: {label} logits", xlabel="epoch", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    name = f"accuracy_{label}.png"
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name


def _plot_loss(runs, colours, out_dir, plt) -> str | None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = False
    for run in runs:
        points = [(s["step"], s["loss"]) for s in run.steps if "loss" in s]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=colours[run.name], label=run.name, lw=1)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(title="Training loss", xlabel="step", ylabel="loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "train_loss.png"), dpi=110)
    plt.close(fig)
    return "train_loss.png"


def balancing_keys(run: Run) -> list[str]:
    """Step-record keys a balancing method logged (scores, ratio, coefficients, weights)."""
    keys: list[str] = []
    for record in run.steps:
        for key, value in record.items():
            if key not in STEP_BOOKKEEPING and isinstance(value, (int, float)) and key not in keys:
                keys.append(key)
    return keys


def _plot_balancing(runs, out_dir, plt) -> list[str]:
    """One figure per run that logged a balancing signal, one panel per kind of quantity."""
    names = []
    for run in runs:
        keys = balancing_keys(run)
        if not keys:
            continue
        groups: dict[str, list[str]] = {}
        for key in keys:  # "coef_audio", "coef_visual" -> panel "coef"
            groups.setdefault(key.rsplit("_", 1)[0] if "_" in key else key, []).append(key)
        fig, axes = plt.subplots(len(groups), 1, figsize=(6.4, 2.2 * len(groups)), sharex=True,
                                 squeeze=False)
        for ax, (group, members) in zip(axes[:, 0], groups.items()):
            for i, key in enumerate(members):
                points = [(s["step"], s[key]) for s in run.steps if key in s]
                xs, ys = zip(*points)
                colour = MODALITY_COLOURS.get(key.rsplit("_", 1)[-1],
                                              EXTRA_COLOURS[i % len(EXTRA_COLOURS)])
                ax.plot(xs, ys, lw=1, color=colour, label=key)
            ax.set_ylabel(group)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="best")
        axes[0, 0].set_title(f"Balancing signal: {run.name} ({run.method})")
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        name = f"balance_{run.name.replace('/', '_')}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def run_classes(run: Run) -> list[str] | None:
    """Class names from the shard set the run trained on, when it is still where it was."""
    try:
        import yaml

        with open(os.path.join(run.path, "config.yaml"), encoding="utf-8") as fh:
            shards = (yaml.safe_load(fh) or {}).get("shards")
        with open(os.path.join(shards, "index.json"), encoding="utf-8") as fh:
            return json.load(fh).get("classes")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def _plot_confusion(run: Run, classes: list[str] | None, out_dir, plt) -> str | None:
    cm = (run.summary.get("test") or {}).get("confusion")
    if not cm:
        return None
    import numpy as np

    cm = np.asarray(cm)
    labels = classes if classes and len(classes) == len(cm) else [str(i) for i in range(len(cm))]
    size = max(4.0, 0.45 * len(cm) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                color="white" if value > cm.max() / 2 else "black")
    ax.set_xticks(range(len(cm)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(cm)), labels, fontsize=7)
    ax.set(title=f"Confusion (test, best-val epoch): {run.name}", xlabel="predicted",
           ylabel="true")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "confusion_best.png"), dpi=110)
    plt.close(fig)
    return "confusion_best.png"


def write_report(run_dirs: list[str], out_dir: str, classes: list[str] | None = None) -> dict:
    """Write plots and `report.md` to `out_dir`; returns what was written and what skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, skipped = collect_runs(run_dirs)
    if not runs:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped) or "no runs given"
        raise UserError(f"nothing to report ({reasons})")
    make_output_dir(out_dir)
    colours = colours_for(runs)
    modalities = []
    for run in runs:
        modalities += [m for m in run.modalities if m not in modalities]
    figures = [_plot_accuracy(runs, colours, key, out_dir, plt)
               for key in ["acc"] + [f"acc_{m}" for m in modalities]]
    figures.append(_plot_loss(runs, colours, out_dir, plt))
    balance_figures = _plot_balancing(runs, out_dir, plt)
    rows = final_rows(runs)
    # the best run is chosen on val, as each run's best epoch is: never by its test score
    best = max(runs, key=lambda r: (r.summary.get("val") or {}).get("acc") or -1.0)
    confusion = _plot_confusion(best, classes or run_classes(best), out_dir, plt)

    lines = [f"# Run report ({runs[0].dataset or 'unknown dataset'})", "",
             f"{len(runs)} run(s). Test metrics are those of each run's best-validation epoch;",
             "`probe_*` is a linear classifier fitted on the frozen encoder's train features.",
             "", markdown_table(rows), ""]
    if any(row.get("protocol", "").startswith("LEGACY") for row in rows):
        lines += ["Runs marked LEGACY chose their best epoch on the test split, as the released "
                  "OGM-GE code does: their test accuracy is optimistic.", ""]
    for path in run_dirs:  # k-fold runs: their mean ± std as `fit --folds` wrote it
        cv_md = os.path.join(path, "cv.md")
        if os.path.isfile(cv_md):
            with open(cv_md, encoding="utf-8") as fh:
                lines += [f"## Cross-validation: `{path}`", "", fh.read().strip(), ""]
    if skipped:
        lines += ["## Skipped", ""] + [f"- `{p}`: {why}" for p, why in skipped] + [""]
    lines += ["## Accuracy and loss", ""]
    lines += [f"![{f}]({f})" for f in figures if f] + [""]
    silent = [r.name for r in runs if r.method not in ("none", "?") and not balancing_keys(r)]
    if balance_figures or silent:
        lines += ["## Balancing signal", ""] + [f"![{f}]({f})" for f in balance_figures] + [""]
        lines += [f"- `{name}` logged no step records (fewer steps than its `--log-every`)"
                  for name in silent] + ([""] if silent else [])
    if confusion:
        lines += [f"## Confusion matrix of the best run on val ({best.name}), test split", "",
                  f"![{confusion}]({confusion})", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return {"report": os.path.join(out_dir, "report.md"), "rows": rows, "skipped": skipped,
            "figures": [f for f in figures + balance_figures + [confusion] if f]}
