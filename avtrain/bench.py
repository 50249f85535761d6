"""`avtrain bench`: balancing methods × seeds under one protocol, with unimodal references.

    run_bench("shards/cremad", "bench/cremad", {"model": "tiny", "epochs": 10},
              methods=["none", "ogm_ge", "olm"], seeds=[0, 1, 2],
              sets={"ogm_ge": [("alpha", [0.1, 0.8])]})

Every (row, seed) is an ordinary `fit` run directory, BENCH/runs/{row}/seed{s}/, trained with
the same settings except the method, the seed and the row's own `--set` values. Rows: one per
method and combination of its `--set` values (a sweep), and `{modality} only` references
(`--modalities audio`, `--modalities visual`: method `none`) unless `references=False`.
A method taught by unimodal teachers (`unimodal_teacher`) gets the same seed's references as
its teachers unless `--teacher` is given; they are trained before it (Ray: submitted after).

Tuning (`tune=N`, avtrain.tune): each method's declared ranges searched on val in N trials
under BENCH/tune, after the default rows; then a "METHOD (tuned)" row of its chosen values.

Resumable: a run with summary.json is finished and skipped; one with last.pt is resumed; any
other is started afresh. BENCH/bench.json records the protocol (every setting but the
method, seed and modalities; the shards and weight files it names relative to BENCH, so a
moved folder still reports); a rerun with another protocol is refused unless `overwrite`,
which removes BENCH's runs and results first. Methods, seeds and `--set` values may change
between reruns: new rows and seeds are added, finished ones kept.

Executors: "local" trains the runs one after another in this process; "ray" submits one Ray
task per run (num_gpus=1 where the cluster has GPUs, else CPUs), each writing its run
directory exactly as a local run would (the folders must be on a filesystem every node sees).

Results: BENCH/results.md and BENCH/results.csv (mean ± std over seeds per row; a paired
comparison with `none`), BENCH/runs.csv (one line per run), and figures (probe accuracy per
epoch with --probe-every, logit norms per epoch) — `write_results` redraws them from the run
directories alone, which is what `avtrain report BENCH` does.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import yaml

from avprep.errors import UserError
from avprep.executors import ray_connect
from avprep.outputs import check_output_dir, make_output_dir

from .config import FIELDS, TrainConfig
from .intervals import t975
from .settings import COSMETIC, differences, make_config
from .tune import tuned_row

BENCH_FILE = "bench.json"
# per run (set by the bench) or cosmetic: never part of the protocol compared on rerun
PER_RUN = ("run_dir", "method", "seed", "modalities")
NOT_SETTABLE = ("shards", "run_dir", "method", "seed", "folds")  # via --set METHOD.KEY=...


@dataclass
class BenchRun:
    row: str  # the table row: "none", "ogm_ge alpha=0.1", "audio only"
    slug: str  # its folder under BENCH/runs
    seed: int
    config: dict  # the run's complete settings (TrainConfig fields)
    needs: tuple[str, ...] = ()  # run directories that must be finished first (its teachers)

    @property
    def run_dir(self) -> str:
        return self.config["run_dir"]


# --- parsing the user's choices --------------------------------------------------------------


def parse_methods(text: str | list[str]) -> list[str]:
    from .balance import all_methods, get_method

    names = text.split(",") if isinstance(text, str) else list(text)
    if [n.strip() for n in names] == ["all"]:  # every registered method, the baseline first
        names = ["none", *sorted(m for m in all_methods() if m != "none")]
    methods = []
    for name in (n.strip() for n in names):
        if name and name not in methods:
            get_method(name)  # an unknown method is one line naming the known ones
            methods.append(name)
    if not methods:
        raise UserError("--methods is empty; give a comma list, e.g. none,ogm_ge,olm")
    return methods


def parse_seeds(text: str | int | list[int]) -> list[int]:
    """"3" -> [0, 1, 2]; "0,4,7" -> [0, 4, 7]."""
    if isinstance(text, (list, tuple)):
        items = [str(s) for s in text]
    else:
        items = [s.strip() for s in str(text).split(",") if s.strip()]
    try:
        values = [int(s) for s in items]
    except ValueError:
        raise UserError(f"--seeds expects a count (3 = seeds 0,1,2) or a comma list of seeds "
                        f"(0,4,7), got {text!r}") from None
    if len(values) == 1 and "," not in str(text) and not isinstance(text, (list, tuple)):
        if values[0] < 1:
            raise UserError(f"--seeds must be at least 1, got {values[0]}")
        return list(range(values[0]))
    if not values:
        raise UserError("--seeds is empty; give a count (3) or a comma list (0,4,7)")
    if any(v < 0 for v in values):
        raise UserError(f"--seeds must be 0 or more, got {text!r}")
    return list(dict.fromkeys(values))


def parse_sets(items, methods: list[str]) -> dict[str, list[tuple[str, list]]]:
    """--set METHOD.KEY=V1,V2 (repeatable) -> {method: [(key, [v1, v2]), ...]}."""
    out: dict[str, list[tuple[str, list]]] = {}
    for item in items or ():
        target, eq, raw = str(item).partition("=")
        method, dot, key = target.strip().partition(".")
        key = key.strip().replace("-", "_")
        if not eq or not dot or not method or not key:
            raise UserError(f"--set expects METHOD.SETTING=VALUE[,VALUE...], got {item!r}")
        if method not in methods:
            raise UserError(f"--set {item!r}: method {method!r} is not in --methods "
                            f"({', '.join(methods)})")
        if key not in FIELDS:
            key = _option_key(method, key, item)
        if key in NOT_SETTABLE:
            raise UserError(f"--set {item!r}: {key!r} is the bench's to set, not a method's")
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not values:
            raise UserError(f"--set {item!r}: no value given")
        pairs = out.setdefault(method, [])
        if any(k == key for k, _ in pairs):
            raise UserError(f"--set gives {method}.{key} twice; list its values in one --set")
        pairs.append((key, values))
    return out


def _option_key(method: str, key: str, item: str) -> str:
    """A method's own option in --set, by its short name (gamma) or its flat one
    (mmpareto_gamma) -> the flat one, which labels the row and which make_config maps."""
    from .balance import get_method

    cls = get_method(method)
    for opt in cls.options:
        if key in (opt.name, opt.key(cls.prefix())):
            return opt.key(cls.prefix())
    own = ", ".join(o.name for o in cls.options) or "none"
    raise UserError(f"--set {item!r}: {key!r} is neither a setting nor an option of "
                    f"{method} (its options: {own})")


def method_flags_to_sets(base: dict, methods: list[str], sets: dict) -> None:
    """A method's own flag given to the bench (--mmpareto-gamma 2) applies to that method's
    rows, as --set mmpareto.gamma=2 would; one naming no method of --methods is one line."""
    from .settings import flat_options

    index = flat_options()
    for key in [k for k in base if k not in FIELDS]:
        owners = [cls.name for cls, _ in index.get(key, ()) if cls.name in methods]
        if key not in index:
            raise UserError(f"unknown setting {key!r}")
        if not owners:
            whose = ", ".join(dict.fromkeys(cls.name for cls, _ in index[key]))
            raise UserError(f"--{key.replace('_', '-')} is an option of --method {whose}, "
                            "which is not in --methods")
        value = base.pop(key)
        for method in owners:
            pairs = sets.setdefault(method, [])
            if not any(k == key for k, _ in pairs):
                pairs.append((key, [value]))


# --- the plan -------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def _is_url(path: str) -> bool:
    return "://" in path


def protocol(base: TrainConfig) -> dict:
    """The settings every run shares (what bench.json records and a rerun must repeat)."""
    return {k: v for k, v in base.to_dict().items() if k not in PER_RUN + COSMETIC}


def plan_runs(base: TrainConfig, out: str, methods: list[str], seeds: list[int],
              sets: dict | None = None, references: bool = True,
              teachers: dict | None = None, tuned: dict | None = None) -> list[BenchRun]:
    """Every run, seed-major (seed 0 of every row first: a bench stopped half-way already
    compares every row). `tuned`: {method: its chosen values}, a "METHOD (tuned)" row each,
    after the method's own rows."""
    from .balance import get_method

    sets = sets or {}
    rows: list[tuple[str, str, dict]] = []  # (row, slug, overrides)
    teachers = teachers or {}  # {teacher setting: value} given by the user (--teacher)
    taught = [m for m in methods if get_method(m).teacher_setting
              and get_method(m).teacher_setting not in teachers]
    refs = []
    if references and len(base.modalities) > 1:
        refs = [(f"{m} only", _slug(f"ref-{m}"), {"method": "none", "modalities": [m]})
                for m in base.modalities]
    if taught and not refs:
        raise UserError(f"--methods {taught[0]} takes its teachers from the bench's `X only` "
                        "references: drop --no-references or give --teacher MODALITY=RUN_DIR")
    if taught:
        rows += refs  # the teachers train first
    for method in methods:
        pairs = sets.get(method, [])
        keys = [k for k, _ in pairs]
        for combo in itertools.product(*[values for _, values in pairs]):
            changes = dict(zip(keys, combo))
            label = " ".join([method] + [f"{k}={v}" for k, v in changes.items()])
            slug = _slug("-".join([method] + [f"{k}{v}" for k, v in changes.items()]))
            setting = get_method(method).teacher_setting
            given = {setting: teachers[setting]} if setting in teachers else {}
            rows.append((label, slug, {"method": method, **given, **changes}))
        if method in (tuned or {}):
            setting = get_method(method).teacher_setting
            given = {setting: teachers[setting]} if setting in teachers else {}
            rows.append((tuned_row(method), _slug(f"{method}-tuned"),
                         {"method": method, **given, **tuned[method]}))
    if not taught:
        rows += refs
    runs = []
    for seed in seeds:
        for label, slug, changes in rows:
            run_dir = os.path.join(out, "runs", slug, f"seed{seed}")
            needs: dict[str, str] = {}
            if changes["method"] in taught:
                needs = {m: os.path.join(out, "runs", _slug(f"ref-{m}"), f"seed{seed}")
                         for m in base.modalities}
                changes = {**changes, get_method(changes["method"]).teacher_setting:
                           [f"{m}={d}" for m, d in needs.items()]}
            config = make_config(base.to_dict(), changes, {"seed": seed, "run_dir": run_dir})
            runs.append(BenchRun(label, slug, seed, config.to_dict(), tuple(needs.values())))
    return runs


def portable(path: str, out: str) -> str:
    """A local path as bench.json records it: relative to the bench folder, so the folder
    (with its shards beside it) reports and resumes wherever it is moved; URLs as given."""
    if not path or _is_url(path) or not os.path.isabs(path):
        return path
    return os.path.relpath(path, os.path.abspath(out))


def portable_protocol(settings: dict, out: str) -> dict:
    """The protocol with the data it names (the shards, `--pretrained` weight files) relative
    to the bench folder, as `portable` records paths. A `--method-module` file stays absolute:
    it is code, imported to compare settings, from wherever the bench is run."""
    from .models.encoders import PRETRAINED_LIBRARIES

    pretrained = settings.get("pretrained") or {}
    return {**settings, "shards": portable(settings.get("shards"), out),
            **({"pretrained": {m: w if w in PRETRAINED_LIBRARIES else portable(w, out)
                               for m, w in pretrained.items()}} if pretrained else {})}


def prepare_folder(out: str, settings: dict, runs: list[BenchRun], overwrite: bool) -> None:
    """Refuse a folder made with another protocol (or not by bench) unless `overwrite`; check
    that runs already there were trained with the settings they would get now."""
    check_output_dir(out)
    path = os.path.join(out, BENCH_FILE)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as fh:
                old = json.load(fh).get("protocol") or {}
            old = portable_protocol(old, out)  # older folders: absolute paths
        except (OSError, ValueError, AttributeError):
            raise UserError(f"{path}: not a readable bench.json; remove it or choose another "
                            "-o") from None
        changed = differences(old, settings, skip=COSMETIC)
        if changed and not overwrite:
            raise UserError(f"{out} was made with other settings ({'; '.join(changed[:4])}"
                            f"{'; ...' if len(changed) > 4 else ''}); rerun with those, or add "
                            "--overwrite to start it again (its runs are removed)")
        if overwrite:  # start again, as fit --overwrite: only what bench wrote is removed
            for name in ("runs", "results.md", "results.csv", "runs.csv", "tune", "tune.db",
                         "tune.json", "tune.png"):
                target = os.path.join(out, name)
                if os.path.isdir(target):
                    shutil.rmtree(target)
                elif os.path.exists(target):
                    os.remove(target)
    elif os.path.isdir(out) and os.listdir(out):
        raise UserError(f"{out} is not empty and holds no {BENCH_FILE} (not a bench folder); "
                        "choose another -o")
    if not overwrite:
        for run in runs:
            changed = _run_changed(run)
            if changed and run.row.endswith(" (tuned)"):  # tuned again: another best
                continue
            if changed:
                raise UserError(f"{run.run_dir} was trained with other settings "
                                f"({'; '.join(changed[:4])}); add --overwrite to start the "
                                "bench again")
    make_output_dir(out)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"protocol": settings}, fh, indent=2)
    os.replace(tmp, path)


def _run_changed(run: BenchRun) -> list[str]:
    """How a run directory's saved settings differ from the run's (its folder and the shards'
    path aside: the protocol holds the shards, and a moved bench keeps its runs)."""
    saved = os.path.join(run.run_dir, "config.yaml")
    if not os.path.isfile(saved):
        return []
    with open(saved, encoding="utf-8") as fh:
        old = yaml.safe_load(fh) or {}
    here = ("run_dir", "shards")
    return differences({k: v for k, v in old.items() if k not in here},
                       {k: v for k, v in run.config.items() if k not in here}, skip=COSMETIC)


def _retrain_changed_tuned(runs: list[BenchRun], say) -> None:
    """A tuned row whose chosen values changed (more trials found a better setting): its old
    runs are removed and trained again."""
    for run in runs:
        if run.row.endswith(" (tuned)") and _run_changed(run):
            say(f"{run.row} seed {run.seed}: the chosen values changed; trained again")
            shutil.rmtree(run.run_dir)


# --- running --------------------------------------------------------------------------------


def run_one(config: dict) -> dict:
    """Train, resume or skip one run; the same function locally and in a Ray task.
    Returns {"run_dir", "status": finished|resumed|trained, "seconds"}."""
    from .loop import fit

    run_dir = config["run_dir"]
    started = time.time()
    if os.path.isfile(os.path.join(run_dir, "summary.json")):
        return {"run_dir": run_dir, "status": "finished", "seconds": 0.0}
    carry_on = os.path.isfile(os.path.join(run_dir, "last.pt"))
    # a run with nothing to continue from is started afresh, whatever it holds
    fit(make_config(config), resume=run_dir if carry_on else None, overwrite=not carry_on)
    return {"run_dir": run_dir, "status": "resumed" if carry_on else "trained",
            "seconds": time.time() - started}


def _run_local(runs: list[BenchRun], say) -> None:
    for i, run in enumerate(runs, 1):
        result = run_one(run.config)
        say(_progress_line(i, len(runs), run, result))


def _progress_line(i: int, n: int, run: BenchRun, result: dict) -> str:
    if result["status"] == "finished":
        return f"[{i}/{n}] {run.row} seed {run.seed}: finished earlier, kept"
    acc = (_summary(run.run_dir).get("test") or {}).get("acc")
    acc_text = f", test acc {acc:.3f}" if isinstance(acc, float) else ""
    return (f"[{i}/{n}] {run.row} seed {run.seed}: {result['status']} in "
            f"{result['seconds']:.0f} s{acc_text}")


def _run_ray(runs: list[BenchRun], address: str | None, say) -> None:
    ray, started_here = ray_connect(address)
    try:
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) >= 1:
            task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(run_one)
        else:  # a CPU run: its loader workers plus the training process
            cpus = max(1, min(int(resources.get("CPU", 1)), 1 + int(runs[0].config["workers"])))
            task = ray.remote(num_cpus=cpus, max_retries=0)(run_one)
        finished = {d for run in runs for d in run.needs  # teachers finished earlier
                    if os.path.isfile(os.path.join(d, "summary.json"))}
        # submitted once their teachers finish
        waiting = [run for run in runs if not finished.issuperset(run.needs)]
        pending = {task.remote(run.config): run for run in runs if run not in waiting}
        done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    run = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        if isinstance(exc.cause, UserError):  # the same line as a local run
                            raise UserError(f"{run.run_dir}: {exc.cause}") from None
                        raise
                    done += 1
                    finished.add(run.run_dir)
                    say(_progress_line(done, len(runs), run, result))
                for run in [r for r in waiting if finished.issuperset(r.needs)]:
                    waiting.remove(run)
                    pending[task.remote(run.config)] = run
        except BaseException:
            for ref in pending:  # what was running keeps its last.pt: a rerun resumes it
                ray.cancel(ref, force=True)
            raise
    finally:
        if started_here:
            ray.shutdown()


def run_bench(shards: str, out: str, settings: dict | TrainConfig | None = None, *,
              methods="none,ogm_ge,olm", seeds=None, sets=None, references: bool = True,
              executor: str = "local", ray_address: str | None = None,
              overwrite: bool = False, tune: int | None = None, tune_epochs: int | None = None,
              tune_space=None, storage: str | None = None, say=print) -> dict:
    """Train (or resume, or skip) every run of the bench, then write its results; returns
    `write_results`'s answer. `settings`: fit settings shared by every run. `seeds`: default
    3, or 5 with `tune`. `tune`: trials per method (avtrain.tune), then a "METHOD (tuned)" row
    of each method's chosen values on the same seeds."""
    from .data import open_shards

    if executor not in ("local", "ray"):
        raise UserError(f"unknown executor {executor!r}; choose one of: local, ray")
    _check_tune_args(tune, tune_epochs, tune_space, storage)
    base = settings.to_dict() if isinstance(settings, TrainConfig) else dict(settings or {})
    if base.get("method_module"):  # a plug-in: its methods exist once its file is loaded
        from .balance import load_method_module

        load_method_module(base["method_module"])
    methods = parse_methods(methods)
    seeds = parse_seeds(seeds if seeds is not None else ("5" if tune else "3"))
    sets = dict(sets) if isinstance(sets, dict) else parse_sets(sets, methods)
    method_flags_to_sets(base, methods, sets)
    if base.get("recipe"):  # a paper's protocol under the given settings, as fit layers it
        from .recipes import load_recipe

        base = {**load_recipe(base["recipe"]).settings, **base}
    if not shards:
        raise UserError("Missing option '--shards' (the shard folder every run trains on)")
    shards = shards if _is_url(shards) else os.path.abspath(shards)
    open_shards(shards).require("train")  # a wrong folder is one line before anything is made
    out = os.path.abspath(out)
    base.update({"shards": shards, "run_dir": None, "method": "none", "seed": 0, "folds": None})
    from .balance import METHODS

    settings_of_teachers = {c.teacher_setting for c in METHODS.values() if c.teacher_setting}
    teachers = {k: base.pop(k) for k in settings_of_teachers if base.get(k)}  # taught rows only
    base.setdefault("linear_probe", True)  # the table's probe columns need it
    base.setdefault("progress", False)
    config = make_config(base)
    recorded = portable_protocol({**protocol(config), "shards": shards}, out)
    plan = None
    if tune:
        plan = _tune_plan(config, out, methods, tune, tune_epochs, tune_space, storage,
                          recorded, overwrite)
    runs = plan_runs(config, out, methods, seeds, sets, references, teachers)
    prepare_folder(out, recorded, runs, overwrite)
    _remember(out, runs)  # before training: a stopped bench can still be reported
    say(f"bench {out}: {len({r.row for r in runs})} rows x {len(seeds)} seeds = {len(runs)} "
        f"runs ({executor})")
    execute = (lambda rs: _run_ray(rs, ray_address, say)) if executor == "ray" else \
        (lambda rs: _run_local(rs, say))
    execute(runs)
    if plan is not None:
        fixed = {m: {k: v[0] for k, v in sets.get(m, []) if len(v) == 1} for m in methods}
        chosen = _run_tuning(plan, config, out, seeds, teachers, runs, executor, ray_address,
                             overwrite, say, fixed)
        chosen = {m: {**fixed[m], **values} for m, values in chosen.items()}
        runs = plan_runs(config, out, methods, seeds, sets, references, teachers, chosen)
        _retrain_changed_tuned(runs, say)
        _remember(out, runs, tuned=list(plan["spaces"]))
        tuned = [r for r in runs if r.row.endswith(" (tuned)")]
        if tuned:
            say(f"tuned rows: {len({r.row for r in tuned})} x {len(seeds)} seeds = "
                f"{len(tuned)} runs ({executor})")
            execute(tuned)
    return write_results(out)


def _check_tune_args(tune, tune_epochs, tune_space, storage) -> None:
    if tune is None:
        for given, flag in ((tune_epochs, "--tune-epochs"), (tune_space, "--tune-space"),
                            (storage, "--storage")):
            if given not in (None, (), []):
                raise UserError(f"{flag} is a setting of tuning: add --tune N (trials per "
                                "method)")
        return
    if isinstance(tune, bool) or not isinstance(tune, int) or tune < 1:
        raise UserError(f"--tune must be at least 1 (trials per method), got {tune!r}")
    if tune_epochs is not None and (isinstance(tune_epochs, bool)
                                    or not isinstance(tune_epochs, int) or tune_epochs < 1):
        raise UserError(f"--tune-epochs must be at least 1, got {tune_epochs!r}")


def _tune_plan(config: TrainConfig, out, methods, trials, epochs, space_items, storage,
               recorded, overwrite) -> dict:
    """Everything tuning needs, checked before anything is made: the spaces, and that a
    study already there searched the same space (a bad input loses nothing)."""
    from . import tune as T

    shared, own = T.parse_space(space_items, methods)
    spaces = T.method_spaces(methods, shared, own)
    epochs = epochs or config.epochs
    url = storage or T.default_storage(out)
    if storage or os.path.isfile(os.path.join(out, T.STUDY_FILE)):
        opened = T.open_storage(url)
        if not overwrite:
            T.check_studies(opened, spaces, epochs, recorded)
    return {"spaces": spaces, "trials": trials, "epochs": epochs, "url": url,
            "storage": storage, "recorded": recorded}


def _run_tuning(plan, config, out, seeds, teachers, runs, executor, ray_address, overwrite,
                say, fixed: dict) -> dict:
    """The studies' missing trials, then {method: chosen values}; BENCH/tune.json either way.
    `fixed`: a method's one-valued --set (or own flag) settings, which its trials keep."""
    from . import tune as T
    from .balance import get_method

    spaces = plan["spaces"]
    if overwrite and plan["storage"]:
        T.remove(out, plan["storage"], list(spaces))
    for method, space in spaces.items():
        if not space.dims:
            say(f"tune {method}: nothing to tune (no declared range, no --tune-space); its "
                "default row stands for it")
    extra = {m: dict(fixed.get(m) or {}) for m in spaces}
    for method in spaces:  # a taught method's trials learn from the first seed's references
        setting = get_method(method).teacher_setting
        if setting and spaces[method].dims:
            if setting in teachers:
                extra[method][setting] = teachers[setting]
            else:
                refs = [r for r in runs if r.row.endswith(" only") and r.seed == seeds[0]]
                extra[method][setting] = [f"{r.config['modalities'][0]}={r.run_dir}"
                                          for r in refs]
    storage = T.open_storage(plan["url"])
    studies = T.open_studies(storage, spaces, plan["trials"], plan["epochs"], plan["recorded"],
                             say)
    base = {**config.to_dict(), "linear_probe": False}
    try:
        T.tune(studies, base, out, plan["epochs"], plan["url"], executor, ray_address, say,
               extra)
    finally:
        T.export(out, T.described(spaces), studies, plan["trials"], plan["epochs"],
                 T.storage_label(plan["storage"]))
    return T.best_params(studies)


def _remember(out: str, runs: list[BenchRun], tuned: list[str] | None = None) -> None:
    """bench.json["last"]: the rows and runs of this command, which the results report, and
    the methods it tuned (BENCH/tune.json holds their trials)."""
    path = os.path.join(out, BENCH_FILE)
    with open(path, encoding="utf-8") as fh:
        saved = json.load(fh)
    saved["last"] = {"rows": list(dict.fromkeys(r.row for r in runs)),
                     "runs": [{"row": r.row, "slug": r.slug, "seed": r.seed,
                               "run_dir": os.path.relpath(r.run_dir, out)} for r in runs],
                     **({"tuned": tuned} if tuned else {})}
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(saved, fh, indent=2)
    os.replace(path + ".tmp", path)


# --- results --------------------------------------------------------------------------------


def _summary(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return {}


def _epochs(run_dir: str) -> list[dict]:
    records = []
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("kind") == "epoch":
                    records.append(record)
    except OSError:
        pass
    return records


def run_values(run_dir: str) -> dict:
    """The per-run numbers of the table, from the run's summary.json and metrics.jsonl."""
    s = _summary(run_dir)
    test = s.get("test") or {}
    values = {"acc": test.get("acc"), "macro_f1": test.get("macro_f1")}
    for m in s.get("modalities") or []:
        values[f"acc_{m}"] = test.get(f"acc_{m}")
    for name, probe in (s.get("linear_probe") or {}).items():
        if isinstance(probe, dict) and "test_acc" in probe:
            values[f"probe_{name}"] = probe["test_acc"]
    step_times = [e["step_time"] for e in _epochs(run_dir) if e.get("step_time")]
    values["step_time"] = statistics.median(step_times) if step_times else None
    values["wall_time"] = s.get("wall_time")
    return values


def mean_std(values: list) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None with one value)."""
    values = [v for v in values if isinstance(v, (int, float))]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def load_bench(out: str) -> tuple[dict, list[dict]]:
    """bench.json's protocol and the runs of the last bench command: [{row, slug, seed,
    run_dir (absolute)}]."""
    path = os.path.join(out, BENCH_FILE)
    if not os.path.isfile(path):
        raise UserError(f"{out}: no {BENCH_FILE} (not a bench folder made by avtrain bench)")
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        runs = [{**r, "run_dir": os.path.join(out, r["run_dir"])} for r in saved["last"]["runs"]]
        return saved.get("protocol") or {}, runs
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: unreadable, or the bench never got to its runs; rerun "
                        "avtrain bench") from None


def table(out: str) -> tuple[list[dict], dict]:
    """One dict per row: n, each metric's mean/std over seeds, gap closed, step-time ratio;
    and the per-run values {row: {seed: values}}."""
    _, runs = load_bench(out)
    per_run: dict[str, dict[int, dict]] = {}
    for r in runs:
        if os.path.isfile(os.path.join(r["run_dir"], "summary.json")):
            per_run.setdefault(r["row"], {})[r["seed"]] = run_values(r["run_dir"])
    rows = []
    for name in dict.fromkeys(r["row"] for r in runs):
        seeds = per_run.get(name, {})
        row = {"row": name, "n": len(seeds), "seeds": sorted(seeds)}
        keys = list(dict.fromkeys(k for v in seeds.values() for k in v))
        for key in keys:
            row[key], row[f"{key}_std"] = mean_std([v.get(key) for v in seeds.values()])
        rows.append(row)
    by_name = {r["row"]: r for r in rows}
    none = by_name.get("none")
    for row in rows:
        if none and none.get("step_time") and row.get("step_time"):
            row["step_time_ratio"] = row["step_time"] / none["step_time"]
        if row["row"].endswith(" only"):
            continue
        for key in [k for k in list(row) if k.startswith("probe_") and not k.endswith("_std")]:
            m = key[len("probe_"):]
            ref = by_name.get(f"{m} only", {}).get(key)
            base = none.get(key) if none else None
            if ref is not None and base is not None and row.get(key) is not None \
                    and ref - base > 1e-9:
                row[f"gap_closed_{m}"] = (row[key] - base) / (ref - base)
    return rows, per_run


def paired(per_run: dict, row: str, key: str) -> dict | None:
    """Per-seed differences row - none (same seed: same initialisation and data order)."""
    a, b = per_run.get(row, {}), per_run.get("none", {})
    diffs = [a[s][key] - b[s][key] for s in sorted(set(a) & set(b))
             if a[s].get(key) is not None and b[s].get(key) is not None]
    if not diffs:
        return None
    n, mean = len(diffs), statistics.mean(diffs)
    sd = statistics.stdev(diffs) if n > 1 else None
    half = t975(n - 1) * sd / math.sqrt(n) if sd is not None else None
    return {"n": n, "mean": mean, "sd": sd, "ci": half, "wins": sum(d > 0 for d in diffs),
            "losses": sum(d < 0 for d in diffs)}


def _cell(row: dict, key: str) -> str:
    value, sd = row.get(key), row.get(f"{key}_std")
    if value is None:
        return "–"
    return f"{value:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cols = [("acc", "fused acc"), ("macro_f1", "macro-F1")]
    cols += [(k, k.replace("acc_", "acc ")) for k in keys
             if k.startswith("acc_") and not k.endswith("_std")]
    cols += [(k, k.replace("probe_", "probe ")) for k in keys
             if k.startswith("probe_") and not k.endswith("_std")]
    cols += [(k, k.replace("gap_closed_", "gap closed ")) for k in keys
             if k.startswith("gap_closed_")]
    cols += [("step_time_ratio", "step time ÷ none"), ("wall_time", "wall s")]
    return [(k, label) for k, label in cols if any(r.get(k) is not None for r in rows)]


def write_results(out: str, target: str | None = None) -> dict:
    """results.md, results.csv, runs.csv and the figures, into `target` (default: BENCH),
    from the run directories alone: `avtrain report BENCH` redraws them at any time."""
    settings, runs = load_bench(out)
    rows, per_run = table(out)
    if not any(r["n"] for r in rows):
        raise UserError(f"{out}: no finished run yet; run avtrain bench to train them")
    cols = _columns(rows)
    target = target or out
    os.makedirs(target, exist_ok=True)
    figures = draw_figures(runs, target)
    record = _tune_record(out)
    tuning = None
    if record is not None:
        from . import tune as T

        tuning = T.section(record, T.draw(record, rows, per_run, target))
    with open(os.path.join(target, "results.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        extra = ["chosen", "trial_budget"] if record is not None else []
        writer.writerow(["row", "n_seeds"] + [h for k, _ in cols
                                              for h in (k, f"{k}_std")] + extra)
        for r in rows:
            writer.writerow([r["row"], r["n"]] + [r.get(x) for k, _ in cols
                                                  for x in (k, f"{k}_std")]
                            + (_tune_cells(record, r["row"]) if extra else []))
    keys = list(dict.fromkeys(k for seeds in per_run.values() for v in seeds.values()
                              for k in v))
    with open(os.path.join(target, "runs.csv"), "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["row", "seed", "run_dir"] + keys)
        for r in runs:
            values = per_run.get(r["row"], {}).get(r["seed"])
            if values is not None:
                writer.writerow([r["row"], r["seed"], os.path.relpath(r["run_dir"], out)]
                                + [values.get(k) for k in keys])
    with open(os.path.join(target, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown(settings, rows, per_run, cols, figures, tuning))
    names = [name for name, _ in figures] + (["tune.png"] if tuning and os.path.isfile(
        os.path.join(target, "tune.png")) else [])
    return {"results": os.path.join(target, "results.md"), "rows": rows,
            "figures": [os.path.join(target, name) for name in names]}


def _tune_record(out: str) -> dict | None:
    """BENCH/tune.json for the methods the last bench command tuned (None: it tuned none)."""
    from . import tune as T

    with open(os.path.join(out, BENCH_FILE), encoding="utf-8") as fh:
        tuned = (json.load(fh).get("last") or {}).get("tuned")
    record = T.refresh_record(out) if tuned else None
    if record is None:
        return None
    record["methods"] = {m: e for m, e in record["methods"].items() if m in tuned}
    return record


def _tune_cells(record: dict, row: str) -> list:
    """results.csv's chosen values and trial budget: on a tuned row, and on the default row
    of a method with nothing to tune (it stands for its tuned row)."""
    from . import tune as T

    for method, entry in record["methods"].items():
        if row == tuned_row(method) or (row == method and entry.get("nothing_to_tune")):
            return [T.chosen_text(entry), T.budget_text(record, entry)]
    return ["", ""]


def markdown(settings, rows, per_run, cols, figures, tuning=None) -> str:
    s = settings
    n_max = max(r["n"] for r in rows)
    lines = ["# Balancing benchmark", "",
             f"Shards `{s.get('shards')}`"
             + (" (relative to this folder)" if s.get("shards") and not _is_url(s["shards"])
                and not os.path.isabs(s["shards"]) else "") + f"; model `{s.get('model')}`, fusion `{s.get('fusion')}`, "
             f"{s.get('epochs')} epochs, batch {s.get('batch_size')}, {s.get('optimizer')} lr "
             f"{s.get('lr')}; every setting is in `bench.json` and each run's `config.yaml`.",
             "",
             *([f"**LEGACY protocol** (recipe `{s.get('recipe')}`): every run chose its best "
                "epoch on the test split, as the released OGM-GE code does; the test figures "
                "below are optimistic.", ""]
               if s.get("val_split") and s.get("val_split") == s.get("test_split") else []),
             "Test metrics of each run's best-validation epoch, mean ± sample std (ddof 1) over "
             "seeds (n = seeds finished). `probe X` is a linear classifier on the frozen X "
             "encoder of the best checkpoint (test accuracy); `gap closed X` = (probe X − none's) "
             "÷ (`X only`'s − none's): 0 is the baseline's imbalance, 1 is as good as the "
             "encoder trained alone (computed from the means; shown where none's gap is "
             "positive). `step time ÷ none` compares the median per-epoch train time per step "
             "(data loading included) of the runs in this bench: measured in these runs, on "
             "whatever else the machine was doing, not a side-by-side benchmark "
             "(`benchmarks/balance.py` measures that).", "",
             "| row | n | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [_cell(r, k) if k not in ("step_time_ratio",) else
                 (f"{r[k]:.2f}×" if r.get(k) is not None else "–") for k, _ in cols]
        cells = [f"{r[k]:.2f}" if k.startswith("gap_closed_") and r.get(k) is not None
                 else c for (k, _), c in zip(cols, cells)]
        lines.append(f"| {r['row']} | {r['n']} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += _paired_section(rows, per_run, n_max)
    lines += tuning or []
    if figures:
        lines += ["## The imbalance over training", ""]
        for name, caption in figures:
            lines += [caption, "", f"![{name}]({name})", ""]
    if not any(name == "probe_curves.png" for name, _ in figures):
        lines += ["(Run the bench with `--probe-every N` to draw each encoder's probe accuracy "
                  "over the epochs.)", ""]
    lines += ["## Runs", "", "One ordinary `avtrain fit` run directory per row and seed: "
              "`BENCH/runs/ROW/seedS/` (`config.yaml`, `metrics.jsonl`, `summary.json`, "
              "checkpoints); `runs.csv` holds each run's numbers.", ""]
    missing = [f"{r['row']} ({r['n']} of {n_max})" for r in rows if r["n"] < n_max]
    if missing:
        lines += ["Unfinished: " + ", ".join(missing) + " — rerun the same command.", ""]
    return "\n".join(lines)


def _paired_section(rows, per_run, n_max) -> list[str]:
    if "none" not in per_run:
        return ["(No `none` row: add it to --methods for the paired comparison, the gap closed "
                "and the step-time ratio.)", ""]
    metrics = ["acc", "macro_f1"] + sorted({k for r in rows for k in r
                                            if k.startswith("probe_") and not k.endswith("_std")})
    lines = ["## Paired comparison with `none`", "",
             "Difference row − none per seed (the same seed: same initialisation and data "
             "order), its mean, the 95 % interval of that mean (Student's t over the seeds) and "
             "how many seeds went each way.", "",
             "| row | metric | mean diff | 95 % interval | better / worse seeds |",
             "|---|---|---|---|---|"]
    for r in rows:
        if r["row"] in ("none",) or r["row"].endswith(" only"):
            continue
        for key in metrics:
            p = paired(per_run, r["row"], key)
            if p is None:
                continue
            ci = (f"{p['mean'] - p['ci']:+.3f} … {p['mean'] + p['ci']:+.3f}"
                  if p["ci"] is not None else "– (one seed)")
            lines.append(f"| {r['row']} | {key} | {p['mean']:+.3f} | {ci} | "
                         f"{p['wins']} / {p['losses']} of {p['n']} |")
    n = n_max
    sign_p = 2 * 0.5 ** n if n else 1.0
    t = t975(n - 1) if n > 1 else float("nan")
    lines += ["", f"How little {n} seed{'s' if n != 1 else ''} can show: "
              + (f"the 95 % interval's half-width is {t:.2f} × sd / √{n} = "
                 f"{t / math.sqrt(n):.2f} × the std of the per-seed differences, so only a "
                 "difference well beyond the seed-to-seed spread excludes zero; "
                 if n > 1 else "no spread can be estimated from one seed; ")
              + f"even if every seed goes the same way, a two-sided sign test gives p = "
                f"{sign_p:.3g}"
              + (" (it needs at least 6 seeds to reach p < 0.05)." if sign_p >= 0.05 else ".")
              + " Treat differences inside the interval as not shown.", ""]
    return lines


# --- figures --------------------------------------------------------------------------------


def _curves(runs: list[dict], pick) -> dict[str, dict[int, list[float]]]:
    """{row: {epoch: [value per seed]}} of `pick(epoch_record)` (None: absent)."""
    out: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        for record in _epochs(r["run_dir"]):
            value = pick(record)
            if isinstance(value, (int, float)):
                out.setdefault(r["row"], {}).setdefault(record["epoch"], []).append(value)
    return out


def draw_figures(runs: list[dict], out_dir: str) -> list[tuple[str, str]]:
    """probe_curves.png (OGM-GE's Figure 1) and logit_norms.png (OLM's figure): one panel per
    modality, a line per row (mean over seeds, band = min..max), references dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import METHOD_COLOURS, assign_colours

    rows = list(dict.fromkeys(r["row"] for r in runs))
    colours = assign_colours(rows, METHOD_COLOURS.get)
    modalities = list(dict.fromkeys(row[:-len(" only")] for row in rows if row.endswith(" only")))
    for r in runs:
        for record in _epochs(r["run_dir"])[:1]:
            modalities += [k for k in (record.get("logit_norm") or {})
                           if k != "fused" and k not in modalities]
    figures = []
    specs = [("probe_curves.png", "probe", "linear probe test acc (subset)",
              "Each encoder's linear-probe accuracy per epoch (`--probe-every`): jointly trained "
              "encoders (solid) against the encoder trained alone (`X only`, dashed black). The "
              "baseline's under-optimised encoder sits below its reference; a method that works "
              "lifts it."),
             ("logit_norms.png", "logit_norm", "mean ‖logits‖₂ (train)",
              "Mean L2 norm of each branch's logits per epoch (training batches): the dominant "
              "modality's logits grow faster (OLM's logit-norm figure).")]
    for name, key, ylabel, caption in specs:
        panels = modalities + (["fused"] if key == "logit_norm" else [])
        data = {m: _curves(runs, lambda rec, m=m, key=key: (rec.get(key) or {}).get(m))
                for m in panels}
        panels = [m for m in panels if data[m]]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels), 3.8),
                                 squeeze=False)
        for ax, m in zip(axes[0], panels):
            for row, epochs in data[m].items():
                xs = sorted(epochs)
                mean = [statistics.mean(epochs[x]) for x in xs]
                ref = row.endswith(" only")
                ax.plot([x + 1 for x in xs], mean, "--" if ref else "-", marker="o", ms=3,
                        color="black" if ref else colours[row], label=row)
                if any(len(epochs[x]) > 1 for x in xs):
                    ax.fill_between([x + 1 for x in xs], [min(epochs[x]) for x in xs],
                                    [max(epochs[x]) for x in xs], alpha=0.15,
                                    color="black" if ref else colours[row])
            ax.set(title=m, xlabel="epoch", ylabel=ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        figures.append((name, caption))
    return figures


def is_bench(path: str) -> bool:
    return os.path.isfile(os.path.join(path, BENCH_FILE))
