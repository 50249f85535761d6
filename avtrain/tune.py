"""`avtrain bench --tune N`: every method's own hyper-parameters tuned on val, one budget for all.

    run_bench("shards/synth", "bench/synth", {"model": "tiny", "epochs": 10},
              methods="none,ogm_ge,mmpareto", tune=12, tune_epochs=5,
              tune_space=["lr=0.001..0.1:log"])

For each method, one Optuna study (named after the method) searches the ranges the method
declares on its options (`Option(..., search=Search(...))`) plus the settings named with
`--tune-space` (`lr=0.001..0.1:log`, `weight_decay=0,0.0001,0.001`, `ogm_ge.alpha=0.1..2` to
override a declared range). Every method gets the same number of trials and epochs. A method with
nothing to search has no study: its default row is its tuned row ("nothing to tune").

A trial is an ordinary `fit` run directory, BENCH/tune/METHOD/trialNNN, trained with seed
`TUNE_SEED` (no seed of the table, so the tuned rows are not tested on the initialisation they
were chosen on) for `tune_epochs` epochs, and selected on val only: it has no test split
(`test_split: ''`), so no trial ever reads the test split. It reports its val accuracy after
every epoch; the median pruner stops it when it falls below the median of earlier trials at that
epoch. The sampler is TPE with a fixed seed (constant liar, so trials running side by side on
Ray do not draw the same point).

Ask-and-tell: the bench process asks the study for a trial, an executor trains it (in this
process, or as a Ray task that loads the study from its storage and reports to it), and the
bench process tells the study the trial's best val accuracy, or that it was pruned.

Resumable: the studies live in BENCH/tune.db (SQLite) unless `storage` (an RDB URL, e.g.
postgresql://user@host/db, which every Ray node can reach: a cluster needs one; SQLite on a
shared filesystem only suits one machine). A rerun counts the finished (complete or pruned)
trials and asks only for the rest; a trial left running by a killed bench is marked failed at
the restart and a new trial takes its place. One bench command drives a study at a time.

BENCH/tune.json records the budget, each method's space, trials and chosen values; the results
(`avtrain.bench.write_results`) read it, so a bench folder reports on any machine.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from dataclasses import dataclass, field

import yaml

from avprep.errors import UserError

from .config import FIELDS
from .options import Search

TUNE_SEED = 1000  # the seed every trial trains with: no seed of the table
SAMPLER_SEED = 0
STUDY_FILE = "tune.db"
TUNE_FILE = "tune.json"
TUNE_DIR = "tune"
NO_TEST = ""  # a trial's test split: none (fit evaluates no test split a shard set lacks)
PRUNER = {"n_startup_trials": 2, "n_warmup_steps": 1}  # pruning from the 2nd epoch on
TPE_STARTUP = 5  # TPE's first trials are drawn at random
# settings a trial cannot search: the bench sets them, or they change what is compared
FIXED = ("shards", "run_dir", "method", "seed", "folds", "epochs", "modalities", "val_split",
         "test_split", "recipe", "method_module", "method_options", "linear_probe",
         "probe_every", "shapley", "progress", "tensorboard", "device", "config")


@dataclass
class Space:
    """One method's search: {flat setting: Search} and where each range came from."""

    method: str
    dims: dict[str, Search] = field(default_factory=dict)
    kinds: dict[str, type] = field(default_factory=dict)  # float, int (or the choices' own)
    origin: dict[str, str] = field(default_factory=dict)  # "declared" or "--tune-space"

    def describe(self) -> dict[str, str]:
        return {k: s.describe() for k, s in self.dims.items()}


# --- the user's choices ----------------------------------------------------------------------


def tuned_row(method: str) -> str:
    """The bench row of a method's tuned values."""
    return f"{method} (tuned)"


def _field_type(key: str) -> type:
    text = str(FIELDS[key].type)
    if "float" in text:
        return float
    if "int" in text and "bool" not in text:
        return int
    return str


def _check_setting(key: str, where: str):
    """A checker of one value of a shared setting, as make_config checks it."""
    from .settings import make_config

    def check(value, _where):
        make_config({"shards": "S", "run_dir": "R", key: value}, sources=[where])
        return value

    return check


def _parse_range(raw: str, item: str, kind: type) -> Search:
    raw = raw.strip()
    if ".." in raw:
        body, colon, scale = raw.partition(":")
        if colon and scale.strip() != "log":
            raise UserError(f"--tune-space {item!r}: the only scale is :log, got :{scale}")
        low, _, high = body.partition("..")
        try:
            values = [float(low), float(high)]
        except ValueError:
            raise UserError(f"--tune-space {item!r}: LOW..HIGH must be numbers") from None
        if kind is int and all(v.is_integer() for v in values):
            values = [int(v) for v in values]
        return Search(values[0], values[1], log=bool(colon))
    choices = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
    if len(choices) < 2:
        raise UserError(f"--tune-space {item!r}: give a range LOW..HIGH[:log] or two or more "
                        "choices a,b,c")
    if any(isinstance(c, (list, dict)) or c is None for c in choices):
        raise UserError(f"--tune-space {item!r}: choices must be plain values")
    return Search(choices=tuple(choices))


def parse_space(items, methods: list[str]) -> tuple[dict, dict]:
    """--tune-space KEY=LOW..HIGH[:log] | KEY=a,b,c (repeatable) -> (shared {key: Search},
    per method {method: {flat key: Search}}). KEY: a setting of every run (lr, weight_decay),
    or METHOD.OPTION (a method's own option; overrides its declared range)."""
    from .balance import get_method
    from .settings import flat_options

    shared: dict[str, tuple[Search, type]] = {}
    own: dict[str, dict[str, tuple[Search, type]]] = {}
    for item in items or ():
        target, eq, raw = str(item).partition("=")
        target = target.strip().replace("-", "_")
        if not eq or not target or not raw.strip():
            raise UserError(f"--tune-space expects KEY=LOW..HIGH[:log] or KEY=a,b,c, got "
                            f"{item!r}")
        method, dot, key = target.rpartition(".")
        if not dot:  # a flat option name (mmpareto_gamma) belongs to its method
            owners = [cls.name for cls, _ in flat_options().get(key, ()) if cls.name in methods]
            if key not in FIELDS and len(owners) == 1:
                method = owners[0]
        if method:
            if method not in methods:
                raise UserError(f"--tune-space {item!r}: method {method!r} is not in --methods "
                                f"({', '.join(methods)})")
            cls = get_method(method)
            match = [o for o in cls.options if key in (o.name, o.key(cls.prefix()))]
            if not match:
                names = ", ".join(o.name for o in cls.options) or "none"
                raise UserError(f"--tune-space {item!r}: {method} has no option {key!r} (its "
                                f"options: {names})")
            opt = match[0]
            search = _parse_range(raw, item, opt.type)
            search.check(opt.type, f"--tune-space {item!r}", opt.coerce)
            kind = opt.type
            own.setdefault(method, {})[opt.key(cls.prefix())] = (search, kind)
            continue
        if key in FIXED:
            raise UserError(f"--tune-space {item!r}: {key!r} is the bench's to set"
                            + (" (--tune-epochs sets the trials' epochs)"
                               if key == "epochs" else ""))
        if key not in FIELDS:
            raise UserError(f"--tune-space {item!r}: {key!r} is not a setting (lr, "
                            "weight_decay, ...) nor METHOD.OPTION of a method in --methods")
        kind = _field_type(key)
        search = _parse_range(raw, item, kind)
        if not search.choices and kind not in (int, float):
            raise UserError(f"--tune-space {item!r}: {key!r} is not a number; give choices "
                            "a,b,c")
        search.check(kind if not search.choices else str, f"--tune-space {item!r}",
                     _check_setting(key, f"--tune-space {item}"))
        if key in shared:
            raise UserError(f"--tune-space gives {key} twice")
        shared[key] = (search, kind)
    return shared, own


def method_spaces(methods: list[str], shared: dict, own: dict) -> dict[str, Space]:
    """Each method's search: its declared ranges, then the shared settings, then the
    METHOD.OPTION ranges given (which replace a declared one)."""
    from .balance import get_method

    spaces = {}
    for method in methods:
        cls = get_method(method)
        space = Space(method)
        for opt in cls.options:
            if opt.search is not None:
                key = opt.key(cls.prefix())
                space.dims[key], space.kinds[key] = opt.search, opt.type
                space.origin[key] = "declared"
        for source in (shared, own.get(method, {})):
            for key, (search, kind) in source.items():
                space.dims[key], space.kinds[key] = search, kind
                space.origin[key] = "--tune-space"
        spaces[method] = space
    return spaces


# --- the studies -----------------------------------------------------------------------------


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("--tune needs Optuna: pip install optuna") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def default_storage(out: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(out, STUDY_FILE))


def open_storage(url: str):
    """An RDB storage, or one Error line naming the URL and why it cannot be used."""
    optuna = _optuna()
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:  # a bad URL, a missing driver, nothing listening, no such file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--storage {_masked(url)}: cannot open it ({first}); give an RDB URL "
                        "such as sqlite:///tune.db or postgresql://user@host/db") from None


def _masked(url: str) -> str:
    """The URL without its password."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, creds = head.partition("://")
    return f"{scheme}://{creds.split(':')[0]}:***@{tail}" if ":" in creds else url


def make_pruner():
    return _optuna().pruners.MedianPruner(**PRUNER)


def _sampler(method: str):
    optuna = _optuna()
    return optuna.samplers.TPESampler(seed=SAMPLER_SEED + zlib.crc32(method.encode()) % 1000,
                                      n_startup_trials=TPE_STARTUP, constant_liar=True)


def _setup(space: Space, epochs: int, settings: dict) -> dict:
    """What a study is tied to: its space, the trials' epochs, the bench's protocol."""
    return {"space": space.describe(), "epochs": epochs,
            "protocol": {k: v for k, v in settings.items() if k != "shards"}}


def check_studies(storage, spaces: dict[str, Space], epochs: int, settings: dict) -> None:
    """A study already there must have been made with the same space, epochs and protocol;
    another is refused (nothing in it changes)."""
    from .settings import COSMETIC, differences

    names = {s.study_name for s in storage.get_all_studies()}
    for method, space in spaces.items():
        if not space.dims or method not in names:
            continue
        attrs = storage.get_study_user_attrs(storage.get_study_id_from_name(method))
        old = attrs.get("setup") or {}
        want = _setup(space, epochs, settings)
        if old.get("space") != want["space"]:
            raise UserError(f"the study of {method} searched {_text(old.get('space'))}, this "
                            f"command searches {_text(want['space'])}: rerun with the same "
                            "ranges (--tune-space), or --overwrite to tune again")
        if old.get("epochs") != epochs:
            raise UserError(f"the study of {method} trained its trials for {old.get('epochs')} "
                            f"epochs, this command for {epochs}: rerun with --tune-epochs "
                            f"{old.get('epochs')}, or --overwrite to tune again")
        changed = differences(old.get("protocol") or {}, want["protocol"], skip=COSMETIC)
        if changed:
            raise UserError(f"the study of {method} was made for other settings "
                            f"({'; '.join(changed[:3])}): another bench's study; use another "
                            "--storage, or --overwrite to tune again")


def _text(space) -> str:
    return ", ".join(f"{k} {v}" for k, v in (space or {}).items()) or "nothing"


def _suggest(trial, key: str, search: Search, kind: type):
    if search.choices:
        return trial.suggest_categorical(key, list(search.choices))
    if kind is int:
        return trial.suggest_int(key, int(search.low), int(search.high), log=search.log)
    return trial.suggest_float(key, float(search.low), float(search.high), log=search.log)


@dataclass
class Study:
    method: str
    space: Space
    study: object
    trials: int  # the budget
    asked: int = 0

    def finished(self) -> int:
        from optuna.trial import TrialState

        return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in self.study.get_trials(deepcopy=False))

    def remaining(self) -> int:
        return self.trials - self.finished() - self.asked


def open_studies(storage, spaces: dict[str, Space], trials: int, epochs: int,
                 settings: dict, say) -> list[Study]:
    """One study per method with something to search; trials a killed bench left running
    are marked failed (new trials take their place)."""
    optuna = _optuna()
    from optuna.trial import TrialState

    studies = []
    for method, space in spaces.items():
        if not space.dims:
            continue
        study = optuna.create_study(study_name=method, storage=storage, direction="maximize",
                                    sampler=_sampler(method), pruner=make_pruner(),
                                    load_if_exists=True)
        if "setup" not in study.user_attrs:
            study.set_user_attr("setup", _setup(space, epochs, settings))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(t.number, state=TrialState.FAIL)
            say(f"tune {method}: trial {t.number} was stopped before it finished; marked failed")
        studies.append(Study(method, space, study, trials))
    return studies


# --- one trial (in this process or a Ray task) -----------------------------------------------


def run_trial(config: dict, storage_url: str, study_name: str, number: int) -> dict:
    """Train one trial's run directory, reporting val accuracy per epoch to its study and
    stopping when the pruner says so -> {"value", "pruned", "epochs"}."""
    optuna = _optuna()
    from .loop import fit
    from .settings import make_config

    storage = open_storage(storage_url)
    study = optuna.load_study(study_name=study_name, storage=storage, pruner=make_pruner())
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study_name), number)
    trial = optuna.trial.Trial(study, trial_id)
    seen = []

    def report(epoch: int, record: dict) -> bool:
        seen.append(epoch)
        trial.report(float(record["val"]["acc"]), epoch)
        return trial.should_prune()

    summary = fit(make_config(config), overwrite=True, on_epoch=report)
    return {"value": (summary.get("val") or {}).get("acc"),
            "pruned": "stopped_after_epoch" in summary, "epochs": len(seen)}


def trial_config(base: dict, out: str, method: str, number: int, params: dict, epochs: int,
                 extra: dict | None = None) -> dict:
    from .settings import make_config

    run_dir = os.path.join(out, TUNE_DIR, method, f"trial{number:03d}")
    return make_config(base, {"method": method, **(extra or {}), **params},
                       {"seed": TUNE_SEED, "run_dir": run_dir, "epochs": epochs,
                        "test_split": NO_TEST, "linear_probe": False, "probe_every": None,
                        "shapley": False, "tensorboard": False, "progress": False}).to_dict()


def tune(studies: list[Study], base: dict, out: str, epochs: int, storage_url: str,
         executor: str, ray_address: str | None, say, extra: dict | None = None) -> None:
    """Run every study's missing trials: locally one after another, or as Ray tasks."""
    from optuna.trial import TrialState

    extra = extra or {}

    def ask(s: Study):
        trial = s.study.ask({k: _distribution(v, s.space.kinds[k])
                             for k, v in s.space.dims.items()})
        s.asked += 1
        config = trial_config(base, out, s.method, trial.number, trial.params, epochs,
                              extra.get(s.method))
        return trial, config

    def tell(s: Study, trial, result: dict | None, error: BaseException | None = None):
        s.asked -= 1
        if error is not None or result is None or result.get("value") is None:
            s.study.tell(trial, state=TrialState.FAIL)
            say(f"tune {s.method}: trial {trial.number} failed")
            return
        if result["pruned"]:
            s.study.tell(trial, state=TrialState.PRUNED)
            state = f"pruned after {result['epochs']} epochs"
        else:
            s.study.tell(trial, result["value"])
            state = f"val acc {result['value']:.3f}"
        params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        say(f"tune {s.method}: trial {trial.number} ({s.finished()}/{s.trials}) {params}: "
            f"{state}")

    def next_study():
        open_ = [s for s in studies if s.remaining() > 0]
        return min(open_, key=lambda s: s.finished() + s.asked) if open_ else None

    if executor == "ray":
        _tune_ray(next_study, ask, tell, base, storage_url, ray_address)
        return
    while (s := next_study()) is not None:
        trial, config = ask(s)
        try:
            result = run_trial(config, storage_url, s.method, trial.number)
        except BaseException as exc:  # Ctrl-C, or a trial that cannot train: marked failed
            tell(s, trial, None, exc)
            raise
        tell(s, trial, result)


def _tune_ray(next_study, ask, tell, base, storage_url, ray_address) -> None:
    from avprep.executors import ray_connect

    ray, started_here = ray_connect(ray_address)
    try:
        resources = ray.cluster_resources()
        if resources.get("GPU", 0) >= 1:
            task = ray.remote(num_gpus=1, num_cpus=1, max_retries=0)(run_trial)
            slots = int(resources["GPU"])
        else:
            cpus = max(1, min(int(resources.get("CPU", 1)), 1 + int(base.get("workers") or 0)))
            task = ray.remote(num_cpus=cpus, max_retries=0)(run_trial)
            slots = max(1, int(resources.get("CPU", 1)) // cpus)
        pending = {}
        try:
            while True:
                while len(pending) < slots and (s := next_study()) is not None:
                    trial, config = ask(s)
                    ref = task.remote(config, storage_url, s.method, trial.number)
                    pending[ref] = (s, trial)
                if not pending:
                    break
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    s, trial = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        tell(s, trial, None, exc)
                        if isinstance(exc.cause, UserError):
                            raise UserError(f"tune {s.method}: {exc.cause}") from None
                        raise
                    tell(s, trial, result)
        except BaseException:
            for ref, (s, trial) in pending.items():  # marked failed: a rerun replaces them
                ray.cancel(ref, force=True)
                tell(s, trial, None, KeyboardInterrupt())
            raise
    finally:
        if started_here:
            ray.shutdown()


def _distribution(search: Search, kind: type):
    optuna = _optuna()
    d = optuna.distributions
    if search.choices:
        return d.CategoricalDistribution(list(search.choices))
    if kind is int:
        return d.IntDistribution(int(search.low), int(search.high), log=search.log)
    return d.FloatDistribution(float(search.low), float(search.high), log=search.log)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def best_params(studies: list[Study]) -> dict[str, dict]:
    """{method: the params of its best complete trial}."""
    out = {}
    for s in studies:
        try:
            out[s.method] = dict(s.study.best_trial.params)
        except ValueError:  # no complete trial
            raise UserError(f"tune {s.method}: no trial finished; rerun the bench") from None
    return out


# --- the record the results read -------------------------------------------------------------


def export(out: str, described: dict, studies: list[Study], trials: int, epochs: int,
           storage: str) -> dict:
    """BENCH/tune.json: the budget, each method's space, trials and choice (paths relative
    to BENCH), so the results need neither the study's storage nor Optuna. `described`:
    {method: {"space": {key: "0.1..2 (log)"}, "origin": {key: "declared"}}}; `storage`: how
    the results name the study's storage."""
    by_method = {s.method: s for s in studies}
    methods = {}
    for method, info in described.items():
        s = by_method.get(method)
        entry = {"space": info["space"], "origin": info["origin"], "trials": []}
        if not info["space"]:
            entry["nothing_to_tune"] = True
            methods[method] = entry
            continue
        for t in s.study.get_trials(deepcopy=False) if s else ():
            run_dir = os.path.join(TUNE_DIR, method, f"trial{t.number:03d}")
            entry["trials"].append({
                "number": t.number, "state": t.state.name, "value": t.value,
                "params": t.params,
                "val_acc": [t.intermediate_values[k] for k in sorted(t.intermediate_values)],
                "run_dir": run_dir if os.path.isdir(os.path.join(out, run_dir)) else None})
        done = [t for t in entry["trials"] if t["state"] == "COMPLETE"]
        if done:
            best = max(done, key=lambda t: (t["value"], -t["number"]))
            entry["best"] = {"number": best["number"], "value": best["value"],
                             "params": best["params"]}
        methods[method] = entry
    record = {"trials": trials, "epochs": epochs, "seed": TUNE_SEED,
              "sampler": f"TPE (seeded, first {TPE_STARTUP} trials random, constant liar)",
              "pruner": f"median (after {PRUNER['n_startup_trials']} complete trials, from "
                        f"epoch {PRUNER['n_warmup_steps'] + 1})",
              "storage": storage, "methods": methods}
    path = os.path.join(out, TUNE_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=2)
    os.replace(path + ".tmp", path)
    return record


def described(spaces: dict[str, Space]) -> dict:
    return {m: {"space": s.describe(), "origin": dict(s.origin)} for m, s in spaces.items()}


def storage_label(storage: str | None) -> str:
    return f"`{STUDY_FILE}` (SQLite)" if storage is None else "the --storage database"


def load_record(out: str) -> dict | None:
    try:
        with open(os.path.join(out, TUNE_FILE), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def remove(out: str, storage_url: str | None, methods: list[str]) -> None:
    """--overwrite: the bench's tuning goes too (its folder's files; a --storage study of
    these methods is deleted)."""
    for name in (TUNE_DIR, TUNE_FILE, STUDY_FILE, "tune.png"):
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    if storage_url:
        optuna = _optuna()
        storage = open_storage(storage_url)
        names = {s.study_name for s in storage.get_all_studies()}
        for method in methods:
            if method in names:
                optuna.delete_study(study_name=method, storage=storage)


# --- results ---------------------------------------------------------------------------------


def refresh_record(out: str) -> dict | None:
    """tune.json, its trials re-read from BENCH/tune.db when the folder holds it (the study
    is the truth: a bench stopped mid-tuning still reports what finished)."""
    record = load_record(out)
    if record is None or not os.path.isfile(os.path.join(out, STUDY_FILE)):
        return record
    try:
        optuna = _optuna()
        storage = open_storage(default_storage(out))
        names = {s.study_name for s in storage.get_all_studies()}
        studies = [Study(m, Space(m), optuna.load_study(study_name=m, storage=storage),
                         record["trials"]) for m in record["methods"] if m in names]
    except UserError:
        return record
    return export(out, {m: {"space": e.get("space") or {}, "origin": e.get("origin") or {}}
                        for m, e in record["methods"].items()},
                  studies, record["trials"], record["epochs"], record["storage"])


def _counts(entry: dict) -> dict:
    states = [t["state"] for t in entry.get("trials") or ()]
    return {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}


def chosen_text(entry: dict) -> str:
    if entry.get("nothing_to_tune"):
        return "nothing to tune"
    best = entry.get("best")
    if not best:
        return "no trial finished"
    return " ".join(f"{k}={_short(v)}" for k, v in best["params"].items())


def budget_text(record: dict, entry: dict) -> str:
    if entry.get("nothing_to_tune"):
        return "–"
    c = _counts(entry)
    return (f"{record['trials']} × {record['epochs']} epochs ({c['COMPLETE']} complete, "
            f"{c['PRUNED']} pruned, {c['FAIL']} failed)")


def section(record: dict, figure: str | None) -> list[str]:
    """The results' "Tuning on val" part."""
    lines = ["## Tuning on val", "",
             f"Each method's own declared ranges (and the settings given with `--tune-space`) "
             f"searched by Optuna under one budget: {record['trials']} trials × "
             f"{record['epochs']} epochs per method, every trial trained with seed "
             f"{record['seed']} (no seed of the table) and scored by its best val accuracy; a "
             "trial has no test split (`test_split: ''`), so tuning never reads the test split. "
             f"Sampler: {record['sampler']}; pruner: {record['pruner']}. The `METHOD (tuned)` "
             "row trains the chosen values on the bench's seeds and is tested once, like every "
             "row. Trials: `tune/METHOD/trialNNN/` (ordinary run directories); the study: "
             f"{record['storage']}; every trial in `tune.json`.", "",
             "| method | searched | chosen | best val acc (trial) | trials |",
             "|---|---|---|---|---|"]
    for method, entry in record["methods"].items():
        space = ", ".join(f"{k} {v}" for k, v in (entry.get("space") or {}).items()) or "–"
        best = entry.get("best")
        val = f"{best['value']:.3f} (#{best['number']})" if best else "–"
        chosen = chosen_text(entry)
        if entry.get("nothing_to_tune"):
            chosen += " (its default row stands for it)"
        lines.append(f"| {method} | {space} | {chosen} | {val} | "
                     f"{budget_text(record, entry)} |")
    lines.append("")
    if figure:
        lines += ["Left: each trial's best val accuracy in the order tried (× pruned: its last "
                  "reported epoch; line: the best so far). Right: test accuracy of the default "
                  "and the tuned row, mean and 95 % interval over the seeds (Student's t).", "",
                  f"![{figure}]({figure})", ""]
    return lines


def draw(record: dict, rows: list[dict], per_run: dict, out_dir: str) -> str | None:
    """tune.png: each method's search, and its default vs tuned test intervals."""
    import math
    import statistics

    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .intervals import t975
    from .report import METHOD_COLOURS, assign_colours

    methods = list(record["methods"])
    if not any(e.get("trials") for e in record["methods"].values()):
        return None
    colours = assign_colours(methods, METHOD_COLOURS.get)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, max(3.8, 0.45 * len(methods) + 1.5)))
    for m in methods:
        trials = record["methods"][m].get("trials") or []
        xs, ys, best, run = [], [], [], -1.0
        for t in trials:
            value = t["value"] if t["state"] == "COMPLETE" else \
                (t["val_acc"][-1] if t["val_acc"] else None)
            if value is None:
                continue
            xs.append(t["number"])
            ys.append(value)
            if t["state"] == "COMPLETE":
                run = max(run, value)
            best.append(run if run >= 0 else None)
            left.scatter([t["number"]], [value], color=colours[m], s=18,
                         marker="o" if t["state"] == "COMPLETE" else "x")
        if xs:
            left.plot(xs, best, "-", color=colours[m], label=m, lw=1.2, drawstyle="steps-post")
    left.set(xlabel="trial", ylabel="val acc (best epoch)", title="search")
    left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    by_row = {r["row"]: r for r in rows}

    def interval(row):
        values = [v.get("acc") for v in per_run.get(row, {}).values()
                  if v.get("acc") is not None]
        if not values:
            return None, None
        mean = statistics.mean(values)
        if len(values) < 2:
            return mean, 0.0
        return mean, t975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))

    labels = []
    for i, m in enumerate(methods):
        labels.append(m)
        for dy, row, style in ((-0.15, m, "o"), (0.15, tuned_row(m), "s")):
            if row not in by_row:
                continue
            mean, half = interval(row)
            if mean is None:
                continue
            right.errorbar([mean], [i + dy], xerr=[[half], [half]], fmt=style,
                           color=colours[m], mfc="white" if row == m else colours[m],
                           capsize=3)
    right.set_yticks(range(len(labels)), labels)
    right.invert_yaxis()
    right.set(xlabel="test acc (95 % interval)", title="default ○ vs tuned ■")
    right.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    name = "tune.png"
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name
