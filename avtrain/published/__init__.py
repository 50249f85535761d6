"""Published numbers shipped with the package, and a bench put beside them.

    from avtrain.published import available, load_table, compare
    available()                          # {"balancebenchmark": "BalanceBenchmark (...)", ...}
    load_table("balancebenchmark").rows  # [{"method": "OGM", "dataset": "cremad", "acc": 67.76, ...}]
    compare("bench/cremad", "balancebenchmark")   # writes bench/cremad/published-balancebenchmark.md

Each NAME.csv here is one source's table, percent figures as published, one row per (method,
dataset) with the column `ours` naming the bench row it matches (a registry method, or
"audio only" / "visual only"), the protocol it was measured under (optimizer, lr,
weight_decay, scheduler, epochs, batch_size, selection, seeds; empty: not published) and
its source (repository @ commit : file, or the thread). Its `# key: value` header lines say
where the table comes from and under which protocol; docs/results.md ("Published numbers")
says what was checked against what.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from importlib import resources

from avprep.errors import UserError

COLUMNS = ("method", "dataset", "acc", "macro_f1", "ours", "optimizer", "lr", "weight_decay",
           "scheduler", "epochs", "batch_size", "selection", "seeds", "source", "note")
PROTOCOL = ("optimizer", "lr", "weight_decay", "scheduler", "epochs", "batch_size", "selection")
# dataset spellings a bench may carry (avprep.datasets' names and aliases) -> the tables' names
DATASET_ALIASES = {"ks": "kinetics_sounds", "kinetics-sounds": "kinetics_sounds",
                   "kineticsounds": "kinetics_sounds", "crema-d": "cremad", "crema_d": "cremad",
                   "vgg": "vggsound", "ave_olm": "ave", "ave-olm": "ave"}


@dataclass
class Table:
    name: str
    header: dict  # the file's "# key: value" lines: title, source, protocol, ...
    rows: list[dict] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(dict.fromkeys(r["dataset"] for r in self.rows))

    @property
    def balancemm(self) -> bool:
        """Measured with BalanceMM's re-implementations (not the authors' code)."""
        return self.name == "balancebenchmark"


def _files() -> dict[str, object]:
    here = resources.files(__name__)
    return {p.name[:-4]: p for p in here.iterdir() if p.name.endswith(".csv")}


def available() -> dict[str, str]:
    """{NAME: title} of every table shipped."""
    return {name: load_table(name).header.get("title", "") for name in sorted(_files())}


def _number(text: str):
    text = (text or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def load_table(name: str) -> Table:
    """A shipped table by NAME, or one Error line listing the names there are."""
    files = _files()
    if name not in files:
        raise UserError(f"no published table {name!r}; available: {', '.join(sorted(files))}")
    text = files[name].read_text(encoding="utf-8")
    header, body = {}, []
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            header[key.strip()] = value.strip()
        elif line.strip():
            body.append(line)
    rows = []
    for raw in csv.DictReader(body):
        row = {k: (raw.get(k) or "").strip() for k in COLUMNS}
        for k in ("acc", "macro_f1", "lr", "weight_decay", "epochs", "batch_size"):
            row[k] = _number(row[k])
        rows.append(row)
    return Table(name, header, rows)


def _dataset_key(text: str) -> str:
    key = str(text).strip().lower()
    return DATASET_ALIASES.get(key, key)


# --- the bench side ------------------------------------------------------------------------


def bench_dataset(bench: str, protocol: dict, runs: list[dict]) -> str | None:
    """The dataset the bench ran on: its runs' summary.json, else its shards' index.json."""
    for r in runs:
        try:
            with open(os.path.join(r["run_dir"], "summary.json"), encoding="utf-8") as fh:
                name = json.load(fh).get("dataset")
        except (OSError, ValueError):
            continue
        if name:
            return name
    shards = protocol.get("shards")
    if shards and "://" not in shards:
        try:
            with open(os.path.join(shards, "index.json"), encoding="utf-8") as fh:
                return json.load(fh).get("dataset")
        except (OSError, ValueError):
            pass
    return None


def our_protocol(protocol: dict) -> dict:
    """The bench's recorded settings in the tables' terms (PROTOCOL keys)."""
    steps = protocol.get("lr_step")
    scheduler = protocol.get("scheduler")
    if scheduler == "step":
        epochs = protocol.get("epochs")
        step = steps if steps else (max(1, round(0.7 * epochs)) if epochs else None)
        scheduler = f"step {step}/{protocol.get('lr_gamma', 0.1)}" if step else "step"
    legacy = protocol.get("val_split") and protocol.get("val_split") == protocol.get("test_split")
    return {"optimizer": protocol.get("optimizer"), "lr": protocol.get("lr"),
            "weight_decay": protocol.get("weight_decay"), "scheduler": scheduler,
            "epochs": protocol.get("epochs"),
            "batch_size": protocol.get("global_batch_size") or protocol.get("batch_size"),
            "selection": "best_on_test" if legacy else "best_on_val"}


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1)
    return str(a).strip().lower() == str(b).strip().lower()


def protocol_differences(ours: dict, row: dict) -> list[str]:
    """"KEY: ours X, published Y" for each setting the published row states and ours differs."""
    out = []
    for key in PROTOCOL:
        theirs = row.get(key)
        if theirs in (None, ""):
            continue
        if key == "scheduler" and str(theirs).strip() == "step" \
                and str(ours.get(key) or "").startswith("step"):
            continue  # they publish the kind only
        if not _same(ours.get(key), theirs):
            out.append(f"{key}: ours {ours.get(key)}, published {theirs}")
    return out


def method_differences(method: str, balancemm: bool) -> list[str]:
    """The method's own `differences` that bear on this table: BalanceMM's re-implementation
    for BalanceBenchmark's rows, the authors' code otherwise ("Both:" always)."""
    from avtrain.balance import METHODS

    cls = METHODS.get(method)
    if cls is None:
        return []
    keep = ("BalanceMM:", "Both:") if balancemm else ("Authors' code:", "Both:")
    return [d for d in getattr(cls, "differences", ()) if d.startswith(keep)]


# --- the comparison ------------------------------------------------------------------------


def _fmt(value, sd=None) -> str:
    if value is None:
        return "–"
    return f"{value:.2f}" + (f" ± {sd:.2f}" if sd is not None else "")


def _delta(value) -> str:
    return "–" if value is None else f"{value:+.2f}"


def _matches(bench_row: str, ours: str) -> bool:
    """A bench row measures `ours`: the row itself, its tuned row or one of its sweep rows."""
    return bench_row == ours or bench_row.startswith(ours + " ")


def comparison(bench: str, spec: str) -> dict:
    """Ours beside the published table NAME (spec "NAME" or "NAME:DATASET"): rows, protocol
    differences; raises UserError (one line) for an unknown name or a dataset not covered."""
    from avtrain.bench import load_bench, table

    name, _, asked = spec.partition(":")
    published = load_table(name.strip())
    protocol, runs = load_bench(bench)
    found = bench_dataset(bench, protocol, runs)
    dataset = _dataset_key(asked or found or "")
    covered = published.datasets
    if dataset not in covered:
        what = f"dataset {asked!r}" if asked else (f"this bench's dataset {found!r}" if found
                                                   else "this bench (no dataset recorded)")
        raise UserError(f"{name} has no figures for {what}; it covers: {', '.join(covered)} "
                        f"(choose one with --published {name}:DATASET)")
    rows, _ = table(bench)
    if not any(r["n"] for r in rows):
        raise UserError(f"{bench}: no finished run yet; run avtrain bench to train them")
    ours_protocol = our_protocol(protocol)
    lines = []
    for pub in (r for r in published.rows if r["dataset"] == dataset):
        mine = [r for r in rows if pub["ours"] and r["n"] and _matches(r["row"], pub["ours"])]
        for r in mine or [None]:
            line = {"published_method": pub["method"], "ours": pub["ours"],
                    "row": r["row"] if r else None, "n": r["n"] if r else 0,
                    "published_acc": pub["acc"], "published_f1": pub["macro_f1"],
                    "note": pub["note"], "source": pub["source"],
                    "protocol": protocol_differences(ours_protocol, pub)}
            for key, col in (("acc", "acc"), ("f1", "macro_f1")):
                value = r.get(col) if r else None
                sd = r.get(f"{col}_std") if r else None
                line[f"ours_{key}"] = value * 100 if value is not None else None
                line[f"ours_{key}_std"] = sd * 100 if sd is not None else None
                theirs = line[f"published_{key}"]
                line[f"delta_{key}"] = (line[f"ours_{key}"] - theirs
                                        if line[f"ours_{key}"] is not None and theirs is not None
                                        else None)
            lines.append(line)
    return {"name": published.name, "dataset": dataset, "table": published,
            "protocol": ours_protocol, "lines": lines,
            "seeds": sorted({s for r in rows for s in r.get("seeds", [])})}


def markdown(result: dict) -> str:
    table: Table = result["table"]
    lines = result["lines"]
    out = [f"# Ours beside {table.header.get('title', table.name)}", "",
           f"Dataset: `{result['dataset']}`. Source: {table.header.get('source', '?')}.", "",
           f"Their protocol: {table.header.get('protocol', '?')}.", "",
           "Ours: test accuracy and macro-F1 in %, mean ± std over the bench's seeds "
           f"({', '.join(map(str, result['seeds'])) or '–'}); Δ = ours − published. "
           "A published row with no bench row here shows –.", "",
           "| published | ours (bench row) | seeds | ours acc | published acc | Δ acc "
           "| ours F1 | published F1 | Δ F1 |",
           "|---|---|---|---|---|---|---|---|---|"]
    for li in lines:
        row = li["row"] or (li["ours"] or "–") + " (not run)"
        out.append(f"| {li['published_method']} | {row}"
                   f" | {li['n'] or '–'} | {_fmt(li['ours_acc'], li['ours_acc_std'])}"
                   f" | {_fmt(li['published_acc'])} | {_delta(li['delta_acc'])}"
                   f" | {_fmt(li['ours_f1'], li['ours_f1_std'])} | {_fmt(li['published_f1'])}"
                   f" | {_delta(li['delta_f1'])} |")
    out += ["", "## Protocol differences that can explain a gap", ""]
    groups: dict[tuple, list[str]] = {}
    for li in lines:
        groups.setdefault(tuple(li["protocol"]), []).append(li["published_method"])
    for diffs, methods in groups.items():
        who = "every row" if len(groups) == 1 else ", ".join(dict.fromkeys(methods))
        out.append(f"- {who}: " + ("; ".join(diffs) if diffs else
                                   "no difference in the settings the source states"))
    out.append(f"- seeds: ours {len(result['seeds'])} "
               f"({', '.join(map(str, result['seeds']))}), published one run each "
               "(a single run's figure, not a mean)")
    out.append("- encoders, input frames, spectrograms and the data split are the bench's own "
               "(see its bench.json); the published runs use the full datasets")
    out += ["", "## Method differences (the source's notes and each method's declared "
            "`differences`, for the methods this bench ran)", ""]
    seen = set()
    for li in lines:
        key = (li["published_method"], li["ours"])
        if key in seen or not li["row"]:  # only the methods this bench ran
            continue
        seen.add(key)
        notes = ([li["note"]] if li["note"] else []) + method_differences(li["ours"],
                                                                          table.balancemm)
        if notes:
            out.append(f"- **{li['published_method']}** (`{li['ours'] or '–'}`): "
                       + " · ".join(notes))
    return "\n".join(out) + "\n"


def compare(bench: str, spec: str, target: str | None = None) -> dict:
    """Write TARGET/published-NAME.md (default: the bench folder) and return its path and
    the rows."""
    result = comparison(bench, spec)
    target = target or bench
    os.makedirs(target, exist_ok=True)
    path = os.path.join(target, f"published-{result['name']}.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(markdown(result))
    return {**result, "path": path}
