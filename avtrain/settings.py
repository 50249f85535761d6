"""A run's settings: layers merged into a `TrainConfig` and checked against what they name.

    config = make_config({"shards": "OUT", "run_dir": "RUN", "method": "ogm_ge"})

The check needs the balancing-method registry (is the method known, which options it declares,
does it read a held-out stream), and the methods read the configuration, so it cannot live in
avtrain.config without a circle: config.py is the dataclass and the checks that need nothing
else; this module looks the method up, maps its options and runs the checks.

A method's options arrive in three spellings, all mapped to `method_options` (short names):
`method_options: {gamma: 2.0}` (config.yaml since 0.3), the flat name `mmpareto_gamma` (the CLI
flag `--mmpareto-gamma`, bench `--set`, and config.yaml files written before method_options,
which get one Warning line) and a repeated `--method-option gamma=2.0`. Rules:

- an option of another method than the chosen one is one `Error:` line naming its method;
- a file written before method_options lists every method's options at their defaults; those
  of other methods are dropped when they hold their old default (None or the declared one);
- the shared window options (`alpha`, `modulation_start`, `modulation_end`) are top-level
  settings any layer may give; a method that does not read them ignores them with one Warning.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from avprep.errors import UserError

from .balance import METHODS, get_method, load_method_module
from .config import FIELDS, TrainConfig, check, load_yaml, merge
from .options import SHARED, resolve_options
from .recipes import load_recipe
from .rundir import resume_dir


def _say(line: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def flat_options() -> dict[str, list]:
    """Flat setting name -> [(method class, Option)] over every registered method."""
    index: dict[str, list] = {}
    for cls in METHODS.values():
        for opt in cls.options:
            if not opt.shared:
                index.setdefault(opt.key(cls.prefix()), []).append((cls, opt))
    return index


def _chosen(layers) -> tuple[str, str | None]:
    method, module = "none", None
    for layer in layers:
        layer = layer or {}
        method = layer.get("method") or method
        module = layer.get("method_module") or module
    return method, module


def method_layer(layer: dict, method, source: str = "", old_file: bool = False,
                 quiet: bool = False) -> dict:
    """One layer with its method options moved into `method_options` (see the module rules).
    `old_file`: a YAML file, where a flat spelling is old (one Warning) and other methods'
    options at their defaults are dropped."""
    index = flat_options()
    where = f"{source}: " if source else ""
    out: dict = {}
    options = dict(layer.get("method_options") or {})
    old = []
    for key, value in (layer or {}).items():
        name = str(key).replace("-", "_")
        if name == "method_options":
            continue
        if name in FIELDS:
            out[name] = value
            continue
        owners = index.get(name)
        if not owners:
            raise UserError(f"{where}unknown setting {key!r}")
        mine = [opt for cls, opt in owners if cls is method]
        if mine:
            old.append(name)
            if value not in (None, []):
                options[mine[0].name] = value
            continue
        if old_file and (value in (None, []) or any(value == opt.default for _, opt in owners)):
            continue
        flag = owners[0][1].flag_name(owners[0][0].prefix())
        whose = ", ".join(dict.fromkeys(cls.name for cls, _ in owners))
        raise UserError(f"{where}{flag} is an option of --method {whose}, not of "
                        f"--method {method.name}; drop it or change the method")
    if old_file and old and not quiet:
        _say(f"Warning: {source}: {', '.join(old)} is the spelling before method_options; read "
             f"as --method {method.name}'s options (write `method_options: {{"
             f"{', '.join(f'{k}: ...' for k in options)}}}`)")
    if options:
        out["method_options"] = options
    return out


def make_config(*layers: dict, sources: list | None = None) -> TrainConfig:
    """Merge layers of settings left to right (later wins) over the defaults, then check.
    `sources`: per layer, the YAML file it came from (None: flags or code)."""
    sources = list(sources or [None] * len(layers))
    name, module = _chosen(layers)
    if module:
        load_method_module(module)
    method = get_method(name)
    layers = [method_layer(layer or {}, method, source or "", old_file=bool(source))
              for layer, source in zip(layers, sources)]
    config = merge(*layers)
    if module and os.path.isfile(module):  # a file: found again from any folder (resume, Ray)
        config.method_module = os.path.abspath(module)
    check(config, method)
    config.pretrained = {m: s if s in ("timm", "torchvision") else os.path.abspath(s)
                         for m, s in config.pretrained.items()}  # found again from any folder
    values = resolve_options(method, config.to_dict())  # bad values, unknown names: one line
    config.method_options = {k: getattr(values, k) for k in config.method_options}
    read = {o.name for o in method.options if o.shared}
    unread = [s for s in SHARED if getattr(config, s) is not None and s not in read]
    if unread:
        _say(f"Warning: --method {method.name} does not read "
             f"{', '.join('--' + s.replace('_', '-') for s in unread)} (ignored)")
    return config


def comparable(config: dict) -> dict:
    """A run's settings (saved by any version) in today's form with every option of its method
    at the value it ran with, so two runs compare equal exactly when they train alike."""
    if not config:
        return {}
    if config.get("method_module"):
        load_method_module(config["method_module"])
    out = method_layer(config, get_method(config.get("method") or "none"), "saved settings",
                       old_file=True, quiet=True)
    out["method_options"] = resolved_options(out)
    return out


def resolved_options(config: dict) -> dict:
    """Every option of the config's method with the value it runs with (declared defaults
    filled in): what two runs are compared by."""
    method = get_method(config.get("method") or "none")
    return vars(resolve_options(method, {k: v for k, v in config.items()
                                         if k in FIELDS}))


def cli_config(overrides: dict, config_file: str | None = None,
               resume: str | None = None) -> TrainConfig:
    """Merge for `avtrain fit`: the recipe's settings, then RUN/config.yaml when resuming, then
    --config, then the flags the user actually typed (`overrides` holds only those)."""
    layers, sources = [], []
    if resume:
        run = resume_dir(resume)
        saved = os.path.join(run, "config.yaml")
        if os.path.isfile(saved):
            # a run recorded before `sampling` existed streamed with replacement: resume it so
            layers.append({"sampling": "resample", **load_yaml(saved, known_only=False)})
            sources.append(saved)
        layers.append({"run_dir": run})
        sources.append(None)
    if config_file:
        layers.append(load_yaml(config_file, known_only=False))
        sources.append(config_file)
    layers.append(overrides)
    sources.append(None)
    recipe = next((layer["recipe"] for layer in reversed(layers) if layer.get("recipe")), None)
    if recipe:
        layers.insert(0, {**load_recipe(recipe).settings, "recipe": recipe})
        sources.insert(0, None)
    return make_config(*layers, sources=sources)


# settings that change how a run looks, never what it computes: not compared on a rerun
COSMETIC = ("progress", "tensorboard")


def differences(old: dict, new: dict, skip=()) -> list[str]:
    """Settings that differ. A setting missing from `old` (a bench or run made before the
    setting existed, e.g. another method's new option) counts as its default, which is what
    that run behaved as, so upgrading avbalance does not invalidate finished runs."""
    old, new = comparable(old), comparable(new)
    keys = [k for k in dict.fromkeys([*old, *new]) if k not in skip]

    def before(k):
        if k in old or k not in FIELDS:
            return old.get(k)
        field = FIELDS[k]
        if field.default_factory is not dataclasses.MISSING:  # a list setting: []
            return field.default_factory()
        return None if field.default is dataclasses.MISSING else field.default

    return [f"{k} {before(k)!r} -> {new.get(k)!r}" for k in keys if before(k) != new.get(k)]
