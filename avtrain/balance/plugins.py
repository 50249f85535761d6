"""Methods from outside avbalance: a user's file or module (`--method-module`) or an installed
package's entry points (group `avbalance.methods`), held to the same interface as the built-in
methods before anything trains.

    # my_method.py -- run with: avtrain fit --method-module my_method.py --method scaled ...
    from avtrain.balance import Balancer, Option

    class Scaled(Balancer):
        name = "scaled"
        options = (Option("scale", float, 2.0, "factor on the fused CE"),)

        def loss(self, logits, labels, *, epoch, step):
            return self.opt.scale * F.cross_entropy(logits["fused"].float(), labels)

A plug-in file is user code: it is imported only when `--method-module` (or `method_module` in a
config.yaml the user gave) names it, never found by scanning. Entry points are the standard way
an installed package announces plug-ins (pyproject: `[project.entry-points."avbalance.methods"]
scaled = "mypkg.scaled:Scaled"`, or a module holding Balancer subclasses).

What breaks the interface is one `Error:` line naming the plug-in and what is wrong: not a
Balancer subclass, no or a taken name, no hook overridden (it would train as `none`), a hook
that cannot be called as the loop calls it, a malformed or colliding option; at run time (loop.py
checks every step) a hook returning the wrong thing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys

import torch

from avprep.errors import UserError
from avtrain.options import Option, check_declaration

from .base import Balancer

# the hooks the loop calls, and how it calls them (arguments bound to check a signature)
HOOKS = {
    "train_step": ((None,), {}),
    "loss": (({}, None), {"epoch": 0, "step": 0}),
    "before_optimizer_step": (({}, None), {"epoch": 0, "step": 0}),
    "after_optimizer_step": ((), {}),
    "start_epoch": ((None,), {}),
    "end_epoch": ((0,), {}),
    "heldout": (({}, None), {}),
    "train_copies": ((), {}),
    "train_groups": ((), {}),
}
CLI_ONLY = {"config", "print_config", "resume", "overwrite", "method_option", "help"}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_loaded_modules: dict[str, list[str]] = {}
_entry_points_loaded = False


def describe(cls, origin: str | None) -> str:
    name = getattr(cls, "name", None) if isinstance(cls, type) else None
    what = f"method {name!r}" if isinstance(name, str) else f"{getattr(cls, '__name__', cls)!r}"
    return f"plug-in {what} ({origin})" if origin else what


def check_method(cls, origin: str | None, registry: dict) -> None:
    """Refuse, in one line, a method class that does not keep the interface."""
    who = describe(cls, origin)
    if not (isinstance(cls, type) and issubclass(cls, Balancer)):
        raise UserError(f"{who}: not a subclass of avtrain.balance.Balancer")
    name = cls.__dict__.get("name") if origin else cls.name
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(f"{who}: needs its own `name`, lower-case letters, digits and _ "
                        "(the --method it answers to)")
    taken = registry.get(name)
    if taken is not None and taken is not cls:
        where = f"({taken.origin})" if getattr(taken, "origin", None) else "of avbalance"
        raise UserError(f"{who}: the name {name!r} is taken by the method {where}; choose "
                        "another")
    if origin:
        overridden = [h for h in HOOKS if getattr(cls, h) is not getattr(Balancer, h)]
        if not overridden:
            raise UserError(f"{who}: overrides none of the hooks ({', '.join(HOOKS)}), so it "
                            "would train exactly as --method none")
        for hook in overridden:
            args, kwargs = HOOKS[hook]
            fn = getattr(cls, hook)
            if not callable(fn):
                raise UserError(f"{who}: {hook} is not a method")
            try:
                inspect.signature(fn).bind(None, *args, **kwargs)
            except TypeError:
                call = ", ".join(["self", *("x" for _ in args)] + [f"{k}=..." for k in kwargs])
                raise UserError(f"{who}: {hook}{inspect.signature(fn)} cannot be called as "
                                f"the loop calls it: {hook}({call})") from None
    prefix = cls.prefix()
    if not isinstance(cls.options, tuple):
        raise UserError(f"{who}: `options` must be a tuple of avtrain.balance.Option")
    try:
        check_declaration(name, cls.options, prefix)
    except UserError as exc:
        raise UserError(f"{who}: {exc}") from None
    for opt in cls.options:
        if opt.shared:
            continue
        key = opt.key(prefix)
        if key in CLI_ONLY:
            raise UserError(f"{who}: option {opt.name!r} would be the flag "
                            f"{opt.flag_name(prefix)}, which avtrain fit already has")
        for other in registry.values():
            if other is cls:
                continue
            for theirs in other.options:
                if theirs.key(other.prefix()) == key and theirs != opt:
                    raise UserError(f"{who}: option {opt.name!r} would be the flag "
                                    f"{opt.flag_name(prefix)}, which is --method "
                                    f"{other.name}'s; set option_prefix or rename it")


def _classes(module) -> list[type]:
    return [v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Balancer) and v is not Balancer
            and v.__module__ == module.__name__]


def load_module(spec: str, register, registry: dict) -> list[str]:
    """Import a plug-in file (path.py) or module (dotted name) once; register its methods."""
    spec = str(spec).strip()
    is_file = spec.endswith(".py") or os.sep in spec or os.path.isfile(spec)
    key = os.path.realpath(spec) if is_file else spec
    if key in _loaded_modules:
        return _loaded_modules[key]
    origin = spec
    try:
        if is_file:
            if not os.path.isfile(spec):
                raise UserError(f"--method-module {spec}: no such file")
            digest = hashlib.sha1(key.encode()).hexdigest()[:8]
            name = f"avbalance_plugin_{re.sub(r'[^A-Za-z0-9_]', '_', os.path.basename(spec)[:-3])}_{digest}"
            loader = importlib.util.spec_from_file_location(name, spec)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except UserError:
        raise
    except ModuleNotFoundError as exc:
        if is_file or exc.name != spec.split(".")[0] and exc.name != spec:
            raise UserError(f"--method-module {spec}: importing it failed: {exc}") from None
        raise UserError(f"--method-module {spec}: no such file or importable module") from None
    except Exception as exc:  # the user's code: whatever it raises is one line
        raise UserError(f"--method-module {spec}: importing it failed: "
                        f"{type(exc).__name__}: {exc}") from None
    classes = _classes(module)
    if not classes:
        raise UserError(f"--method-module {spec}: defines no subclass of "
                        "avtrain.balance.Balancer")
    names = [register(cls, origin).name for cls in classes]
    _loaded_modules[key] = names
    return names


def load_entry_points(group: str, register) -> None:
    """Register the methods installed packages announce (once per process). A package that
    fails to load or breaks the interface must not stop runs of every other method (its
    flags are built with everyone's): it is one Warning line, and one Error line only when
    its method is asked for (`broken_entry_point`)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        origin = f"entry point {ep.name} = {ep.value}"
        try:
            obj = ep.load()
        except Exception as exc:
            _broken_entry(ep.name, f"plug-in {origin}: loading failed: {type(exc).__name__}: "
                                   f"{exc}")
            continue
        try:
            for cls in _classes(obj) if inspect.ismodule(obj) else [obj]:
                register(cls, origin)
        except UserError as exc:
            _broken_entry(ep.name, str(exc))


_broken_entries: dict[str, str] = {}  # entry-point name -> what is wrong with it


def _broken_entry(name: str, message: str) -> None:
    _broken_entries[name] = message
    if os.environ.get("RANK", "0") == "0":
        print(f"Warning: {message} (its methods are not available)", file=sys.stderr,
              flush=True)


def broken_entry_point(method: str) -> str | None:
    """What is wrong with the installed plug-in announced under `method`'s name, else None."""
    return _broken_entries.get(method)


def broken_entry_points() -> list[str]:
    return sorted(_broken_entries)


def check_step_result(balancer, result) -> tuple:
    """A plug-in's train_step must return (0-d loss tensor, dict of logits with "fused")."""
    who = balancer.who()
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UserError(f"{who}: train_step returned {type(result).__name__}, not "
                        "(loss, logits)")
    loss, logits = result
    balancer.check_loss(loss, "train_step's loss")
    if not (isinstance(logits, dict) and isinstance(logits.get("fused"), torch.Tensor)):
        raise UserError(f"{who}: train_step's logits must be the forward's dict with a "
                        f"'fused' tensor, got {type(logits).__name__}")
    return result


def check_metrics(balancer, metrics) -> dict:
    if not isinstance(metrics, dict):
        raise UserError(f"{balancer.who()}: step_metrics() must return a dict of 0-d tensors or numbers,"
                        f" got {type(metrics).__name__}")
    return metrics


__all__ = ["Option", "check_method", "load_module", "load_entry_points", "broken_entry_point",
           "broken_entry_points", "check_step_result",
           "check_metrics", "HOOKS"]
