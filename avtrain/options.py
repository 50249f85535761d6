"""A balancing method's options, declared next to its code.

Each `Balancer` subclass lists its options in `options`, a tuple of `Option`:

    options = (Option("gamma", float, 1.5, "factor on every encoder gradient", minimum=0,
                      exclusive_minimum=True),)

From that one declaration come the `avtrain fit` flag (`--mmpareto-gamma`, from the method's
`option_prefix`), its check before training, its line in `avtrain methods NAME`, the
`method_options` mapping of `config.yaml` (`method_options: {gamma: 2.0}`) and the value the
balancer reads (`self.options["gamma"]`). `released` is the value in the authors' released code;
a default that differs from it must say why (`differs`), and the contract tests hold every
method to that.

**Shared window options.** `alpha`, `modulation_start` and `modulation_end` are the settings many
methods read with their own meanings and defaults (OGM's α, OPM's λ, the modulation window).
They stay top-level settings (`--alpha`, `--modulation-start`, `--modulation-end`) so one bench
or recipe line can set them for every method; a method declares the ones it reads with
`shared=True` (and its own default). Given to a method that does not read them, they are
ignored with one Warning line, never an error. Every other option belongs to the methods that
declare it: given with another method, it is one `Error:` line.

**Tuning ranges.** `search=Search(low, high, log=True)` (or `Search(choices=(...))`) is the
range `avtrain bench --tune` searches for the option: the method's own hyper-parameters, tuned
on val under one budget for every method. It must lie inside the option's bounds and choices;
an option without `search` keeps its value while tuning.

This module imports nothing from the rest of avtrain at import time, so the configuration,
the CLI and the methods can all read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from avprep.errors import UserError

SHARED = ("alpha", "modulation_start", "modulation_end")


class _Same:
    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()  # `released` when the released value is the default


@dataclasses.dataclass(frozen=True)
class Search:
    """A tuning range: `low`..`high` (integers for an int option; on a log scale with `log`,
    as learning rates and α are searched), or a tuple of `choices`."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.choices:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        return f"{self.low:g}..{self.high:g}" + (" (log)" if self.log else "")

    def check(self, opt_type: type, where: str, coerce=None) -> None:
        """Well formed, and every value it can draw passes `coerce` (the option's checks)."""
        if self.choices:
            if self.low is not None or self.high is not None or self.log:
                raise UserError(f"{where}: a search gives choices or low..high, not both")
            values = list(self.choices)
        else:
            if opt_type not in (float, int):
                raise UserError(f"{where}: a low..high search needs a float or int option; "
                                "give choices")
            if self.low is None or self.high is None:
                raise UserError(f"{where}: a search needs low and high (or choices)")
            try:
                low, high = float(self.low), float(self.high)
            except (TypeError, ValueError):
                raise UserError(f"{where}: low and high must be numbers") from None
            if not (low == low and high == high) or not low < high:
                raise UserError(f"{where}: the range {self.low}..{self.high} is empty (low must "
                                "be below high)")
            if self.log and low <= 0:
                raise UserError(f"{where}: a log-scale range must start above 0, got {low:g}")
            if opt_type is int and not (low.is_integer() and high.is_integer()):
                raise UserError(f"{where}: an integer option's range needs whole numbers")
            values = [int(low), int(high)] if opt_type is int else [low, high]
        if coerce is not None:
            for value in values:
                coerce(value, where)


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method. `default` None means "computed at run time"; `none_means` says
    how (e.g. "steps per epoch // 10")."""

    name: str  # key in method_options (short: "gamma")
    type: type  # float, int, str, bool or list (a repeatable flag of strings)
    default: Any
    help: str  # one line: what it does
    released: Any = SAME  # the authors' released value; SAME: the default
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    differs: str = ""  # why the default is not the released value (required when it is not)
    none_means: str = ""  # what a None default resolves to at run time
    shared: bool = False  # alpha / modulation_start / modulation_end: a top-level setting
    setting: str | None = None  # the flat setting name when not PREFIX_NAME (OGM's `modulate`)
    flag: str | None = None  # the CLI flag when not --SETTING-NAME (e.g. --teacher)
    metavar: str | None = None
    search: Search | None = None  # the range `avtrain bench --tune` searches (None: kept)

    @property
    def released_value(self) -> Any:
        return self.default if self.released is SAME else self.released

    def key(self, prefix: str | None) -> str:
        """The flat setting name (`mmpareto_gamma`): the flag's spelling with underscores, and
        the top-level name config.yaml files used before method_options."""
        if self.setting:
            return self.setting
        if self.shared or not prefix:
            return self.name
        return f"{prefix}_{self.name}"

    def flag_name(self, prefix: str | None) -> str:
        return self.flag or "--" + self.key(prefix).replace("_", "-")

    def range_text(self) -> str:
        """"in [0, 1]", "above 0", "0 or more", "at least 1", "at most 5"."""
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            return (f"in {'(' if self.exclusive_minimum else '['}{lo:g}, {hi:g}"
                    f"{')' if self.exclusive_maximum else ']'}")
        if lo is not None:
            if self.exclusive_minimum:
                return f"above {lo:g}"
            return f"at least {lo:g}" if self.type is int else f"{lo:g} or more"
        if hi is not None:
            return f"below {hi:g}" if self.exclusive_maximum else f"at most {hi:g}"
        return "valid"

    def describe_default(self) -> str:
        if self.default is None:
            return self.none_means or "off"
        if isinstance(self.default, list):
            return ", ".join(map(str, self.default)) or "none"
        return str(self.default)

    def coerce(self, value: Any, where: str) -> Any:
        """The value as this option's type, checked; one line naming `where` otherwise."""
        if value is None:
            return None
        try:
            if self.type is bool:
                if isinstance(value, str):
                    lowered = value.strip().lower()
                    if lowered not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    value = lowered in ("1", "true", "yes", "on")
                value = bool(value)
            elif self.type is list:
                if isinstance(value, dict):  # a YAML mapping of KEY=VALUE items (m: RUN)
                    value = [f"{k}={v}" for k, v in value.items()]
                value = [value] if isinstance(value, str) else [str(v) for v in value]
            elif self.type is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError(value)
                value = int(value)
            elif self.type is float:
                value = float(value)
                if value != value:  # NaN passes every range check
                    raise UserError(f"{where} must be a finite number, got nan")
            else:  # a YAML list given to a text option (G-Blending's weights): comma-joined
                value = ",".join(map(str, value)) if isinstance(value, (list, tuple)) \
                    else str(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} expects {self.type.__name__}, got {value!r}") from None
        if self.choices and value not in self.choices:
            raise UserError(f"{where} must be one of {', '.join(map(str, self.choices))}, "
                            f"got {value!r}")
        low = self.minimum is not None and (value < self.minimum or (
            self.exclusive_minimum and value == self.minimum))
        high = self.maximum is not None and (value > self.maximum or (
            self.exclusive_maximum and value == self.maximum))
        if low or high:
            raise UserError(f"{where} must be {self.range_text()}, got {value}")
        return value


def check_declaration(method: str, options: tuple, prefix: str | None) -> None:
    """A method's declared options are well formed: unique names, a known type, a default of
    that type inside its choices and bounds, a reason when it is not the released value. The
    registry runs this for every method and plug-in, so a broken declaration is one line."""
    seen = set()
    for opt in options:
        where = f"option {getattr(opt, 'name', opt)!r}"
        if not isinstance(opt, Option):
            raise UserError(f"{where} is not an avtrain.balance.Option")
        if not opt.name.isidentifier():
            raise UserError(f"{where}: the name must be a Python identifier")
        if opt.name in seen:
            raise UserError(f"{where} is declared twice")
        seen.add(opt.name)
        if opt.shared != (opt.name in SHARED):
            raise UserError(f"{where}: only {', '.join(SHARED)} are shared options, and they "
                            "must be declared shared=True")
        if opt.type not in (float, int, str, bool, list):
            raise UserError(f"{where}: type must be float, int, str, bool or list")
        if not opt.help:
            raise UserError(f"{where} has no help line")
        if opt.default is not None:
            opt.coerce(opt.default, f"{where}: its default")
        if opt.search is not None:
            if not isinstance(opt.search, Search):
                raise UserError(f"{where}: search must be an avtrain.options.Search")
            opt.search.check(opt.type, f"{where}: its search range", opt.coerce)
        if opt.released is not SAME and opt.released != opt.default and not opt.differs:
            raise UserError(f"{where}: the default {opt.default!r} is not the released value "
                            f"{opt.released!r}; say why in `differs`")
        if not opt.shared and opt.key(prefix) in _run_settings():
            raise UserError(f"{where}: {opt.flag_name(prefix)} collides with a setting of "
                            "every run; choose another name or option_prefix")


def _run_settings() -> set[str]:
    from .config import FIELDS  # at call time: config.py never imports the methods

    return set(FIELDS)


def resolve_options(method, config: dict):
    """The values `method` (a Balancer class) runs with, as a namespace: `method_options`
    (short names) first, then the flat spelling (`mmpareto_gamma`; shared options live there),
    then the declared default; each checked against its declaration."""
    from types import SimpleNamespace

    given = dict(config.get("method_options") or {})
    prefix = method.prefix()
    values = {}
    for opt in method.options:
        key = opt.key(prefix)
        if not opt.shared and opt.name in given:
            value = given.pop(opt.name)
        elif config.get(key) not in (None, []):
            value = config[key]
        else:
            value = opt.default
        values[opt.name] = opt.coerce(value, opt.flag_name(prefix))
    for name in given:
        raise UserError(unknown_option(method, name))
    return SimpleNamespace(**values)


def unknown_option(method, name: str) -> str:
    own = [o.name for o in method.options if not o.shared]
    return (f"--method {method.name} has no option {name!r}; "
            + (f"its options: {', '.join(own)}" if own else "it has none")
            + f" (avtrain methods {method.name})")
