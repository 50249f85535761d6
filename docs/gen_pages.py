"""Pages generated at build time from the code (mkdocs-gen-files runs this on every build).

Each page is one function returning its markdown, or None while it has nothing to show; PAGES
maps the page's path in the site to that function. A page listed here also needs its line in
mkdocs.yml's `nav`.
"""

from __future__ import annotations

from collections.abc import Callable

import mkdocs_gen_files

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


def methods_page() -> str | None:
    """The balancing methods, one section each.

    To be written from `avtrain.balance.METHODS` and `avtrain.balance.describe(name)` (markdown)
    once they exist; then add `- Methods: methods.md` to mkdocs.yml's nav. None: no page yet.
    """
    return None


PAGES: dict[str, Callable[[], str | None]] = {
    "recipes.md": recipes_page,
    "methods.md": methods_page,
}

for path, make in PAGES.items():
    text = make()
    if text is not None:
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
