"""What `avtrain methods` prints, and the docs' method pages: generated from each method's
module (its declared options, metadata and docstring), so the text lives once, next to the
code it describes."""

from __future__ import annotations

import inspect
import sys
import textwrap

from .base import Balancer


def _recipes_of(name: str) -> list[str]:
    from avtrain.recipes import load_recipe, recipe_names

    return [r for r in recipe_names() if load_recipe(r).settings.get("method") == name]


def method_line(cls: type[Balancer]) -> tuple[str, ...]:
    """(name, year, title, what it changes, checked against) for the one-line list."""
    year = str(cls.year) if cls.year else "-"
    code = cls.code.split(";")[0].split(" (")[0] if cls.code else "-"
    if cls.origin:
        code = f"plug-in: {cls.origin}"
    return cls.name, year, cls.title, cls.summary, code


def methods_table(methods: dict) -> str:
    rows = [("method", "year", "paper", "what it changes", "checked against")]
    rows += [method_line(cls) for cls in methods.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4]
                     for r in rows)


def _value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return ", ".join(map(str, v)) or "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def options_table(cls: type[Balancer]) -> list[str]:
    prefix = cls.prefix()
    lines = ["| flag | option | default | released | bench --tune | what it does |",
             "|---|---|---|---|---|---|"]
    for opt in cls.options:
        default = _value(opt.default) if opt.default is not None else opt.describe_default()
        released = _value(opt.released_value) if opt.released_value is not None \
            else default
        extra = []
        if opt.choices:
            extra.append("one of " + ", ".join(map(str, opt.choices)))
        if opt.minimum is not None or opt.maximum is not None:
            extra.append(opt.range_text())
        if opt.differs:
            extra.append("differs from released: " + opt.differs)
        note = f" ({'; '.join(extra)})" if extra else ""
        name = f"{opt.name} (shared)" if opt.shared else opt.name
        tuned = f"tuned over {opt.search.describe()}" if opt.search else "not tuned"
        lines.append(f"| `{opt.flag_name(prefix)}` | `{name}` | {default} | {released} | "
                     f"{tuned} | {opt.help}{note} |")
    return lines


def tuning_line(cls: type[Balancer]) -> str:
    """What `avtrain bench --tune` searches for this method, in one sentence."""
    searched = [f"`{o.name}` over {o.search.describe()}" for o in cls.options if o.search]
    if not searched:
        return ("`avtrain bench --tune` searches none of its own options (its tuned row is its "
                "default row, unless `--tune-space` names a setting).")
    return (f"`avtrain bench --tune` searches {', '.join(searched)} on val; "
            f"`--tune-space {cls.name}.NAME=LOW..HIGH` replaces a range.")


def describe(name_or_cls) -> str:
    """Everything about one method, as Markdown: paper, code, options with defaults and the
    released values, the signal it logs, what differs, its recipes, then its module's text."""
    from . import get_method

    cls = get_method(name_or_cls) if isinstance(name_or_cls, str) else name_or_cls
    out = [f"# {cls.name}: {cls.title}", ""]
    facts = [("Paper", cls.paper + (f" ({cls.year})" if cls.year else "")),
             ("What it changes", cls.summary),
             ("Checked against", cls.code),
             ("Plug-in from", cls.origin or ""),
             ("Needs", ", ".join(n for n, on in (
                 ("a held-out (val) batch every step", cls.needs_heldout),
                 ("trained per-modality heads", cls.trained_unimodal_heads)) if on))]
    out += [f"- **{k}**: {v}" for k, v in facts if v] + [""]
    out += ["## Options", ""]
    out += options_table(cls) + ["", tuning_line(cls)] if cls.options \
        else ["None: nothing to set or tune."]
    out += ["", "Set them as flags, in config.yaml under `method_options:` (short names), or "
            f"with `--method-option NAME=VALUE`; `avtrain bench --set {cls.name}.NAME=V`.", ""]
    out += ["## Signal", ""]
    if cls.signals:
        out += [f"`step_metrics` logs {', '.join(f'`{s}`' for s in cls.signals)} "
                "(metrics.jsonl, TensorBoard; drawn by `avtrain report`).", ""]
    else:
        out += ["It logs no signal of its own.", ""]
    out += ["## Differences", ""]
    out += [f"- {d}" for d in cls.differences] or ["None known."]
    recipes = [] if cls.origin else _recipes_of(cls.name)
    out += ["", "## Recipes", ""]
    out += [f"- `{r}` (`avtrain recipes {r}`)" for r in recipes] or ["None."]
    module = sys.modules.get(cls.__module__)
    text = inspect.getdoc(module) if module is not None else None
    if text:
        out += ["", "## Details (the module's docstring)", "", textwrap.dedent(text)]
    return "\n".join(out).rstrip() + "\n"


def readme_table(methods: dict) -> str:
    """The methods table of docs/balancing.md: one short line per method (tests/test_readme.py
    keeps the page equal to it; `avtrain methods NAME` has the rest)."""
    lines = ["| method | paper | what it changes | checked against |", "|---|---|---|---|"]
    for cls in methods.values():
        name, year, title, summary, code = method_line(cls)
        paper = title + (f", {year}" if year != "-" else "")
        lines.append(f"| `{name}` | {paper} | {summary} | {code} |")
    return "\n".join(lines)
