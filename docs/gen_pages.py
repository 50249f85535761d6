"""Pages generated at build time from the code (mkdocs-gen-files runs this on every build).

Each page is one function returning its markdown, or None while it has nothing to show; PAGES
maps the page's path in the site to that function. A page listed here also needs its line in
mkdocs.yml's `nav`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mkdocs_gen_files

from avtrain.balance import METHODS
from avtrain.balance.describe import describe, readme_table
from avtrain.recipes import load_recipe, recipe_names


def _cell(text: str) -> str:
    """Text safe inside one cell of a markdown table."""
    return " ".join(text.split()).replace("|", "\\|")


def recipes_page() -> str:
    """Every recipe of the registry, as `avtrain recipes NAME` prints it (Recipe.describe)."""
    lines = ["# Recipes", "",
             "A recipe is a paper's whole training protocol under one name: "
             "`avtrain fit --recipe NAME`. This page is generated from the recipe registry "
             "(`avtrain/recipes/*.yaml`); `avtrain recipes NAME` prints the same text.", "",
             "| recipe | summary |", "|---|---|"]
    recipes = [load_recipe(name) for name in recipe_names()]
    lines += [f"| [`{r.name}`](#{r.name}) | {_cell(r.summary)} |" for r in recipes]
    for recipe in recipes:
        lines += ["", f"## {recipe.name} {{#{recipe.name}}}", "", "```text", recipe.describe(),
                  "```"]
    return "\n".join(lines) + "\n"


def _demoted(markdown: str) -> str:
    """One level deeper headings (a method's page becomes a section), code fences untouched."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if not fenced and re.match(r"#{1,5} ", line) else line)
    return "\n".join(out)


def methods_page() -> str:
    """Every balancing method of the registry, as `avtrain methods NAME` prints it."""
    methods = {name: cls for name, cls in METHODS.items() if cls.origin is None}
    lines = ["# Methods", "",
             "Generated from each method's module (`avtrain/balance/`): its declared options, "
             "its metadata and its docstring; `avtrain methods NAME` prints the same text.", "",
             readme_table(methods)]
    for name in methods:
        lines += ["", _demoted(describe(name))]
    return "\n".join(lines) + "\n"


PAGES: dict[str, Callable[[], str | None]] = {
    "recipes.md": recipes_page,
    "methods.md": methods_page,
}

for path, make in PAGES.items():
    text = make()
    if text is not None:
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
