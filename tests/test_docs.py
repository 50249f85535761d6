"""The documentation site builds with `mkdocs build --strict` (any warning fails it) and its pages
hold what the code and the README say: the README as the front page, the CLI reference from the
click groups, the API from the docstrings, one section per recipe of the registry."""

from __future__ import annotations

import html
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
pytest.importorskip("material", reason="the docs extra: pip install -e '.[docs]'")


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--config-file", str(project / "mkdocs.yml"), "--site-dir", str(site)],
                          cwd=project, env=env, capture_output=True, text=True, timeout=300)


def text_of(page: str) -> str:
    """The words of an HTML page, tags removed."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def squash(text: str) -> str:
    """Text without whitespace and markdown marks, so wrapped and rendered text compare."""
    return re.sub(r"[\s`*]", "", text)


def section(page: str, anchor: str) -> str:
    """The HTML from the heading with id `anchor` to the next heading of the same or a higher
    level."""
    start = re.search(rf'<h([1-6])[^>]*id="{re.escape(anchor)}"', page)
    assert start, f"no heading #{anchor}"
    end = re.compile(rf"<h[1-{start[1]}][ >]").search(page, start.end())
    return page[start.start():end.start() if end else len(page)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = build(ROOT, out)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def read(site: Path, page: str) -> str:
    return (site / page / "index.html" if page else site / "index.html").read_text("utf-8")


def test_front_page_is_the_readme(site):
    readme = (ROOT / "README.md").read_text("utf-8")
    title = next(line[2:].strip() for line in readme.splitlines() if line.startswith("# "))
    page = read(site, "")
    assert f">{html.escape(title)}<" in re.sub(r'<a class="headerlink".*?</a>', "", page)
    # the "Two commands" section, its commands included, as the README has it
    two = re.search(r"^## Two commands\n(.*?)^## ", readme, re.S | re.M)[1]
    commands = re.search(r"```sh\n(.*?)```", two, re.S)[1]
    rendered = text_of(section(page, "two-commands"))
    assert "Two commands" in rendered
    assert commands.strip() in rendered
    assert squash(two.strip().splitlines()[-1]) in squash(rendered)


def test_cli_reference_comes_from_the_click_groups(site):
    import cli

    page = read(site, "cli")
    assert 'id="avprep-build-shards"' in page
    assert squash(cli.avprep.commands["build-shards"].help.split("\n\n")[0]) in squash(
        text_of(section(page, "avprep-build-shards")))
    fit = text_of(section(page, "avtrain-fit"))
    method = next(p for p in cli.avtrain.commands["fit"].params if p.name == "method")
    assert "--method" in fit and squash(method.help) in squash(fit)
    for group in (cli.avprep, cli.avtrain):  # every command has its section
        for name in group.commands:
            assert f'id="{group.name}-{name}"' in page


def test_api_page_holds_the_docstrings(site):
    from avtrain.balance import base
    from avtrain.loop import fit
    from avtrain.settings import make_config

    page = squash(text_of(read(site, "api")))
    assert squash(inspect.getdoc(base).split("\n\n")[0]) in page
    methods = [name for name, fn in vars(base.Balancer).items()
               if callable(fn) and not name.startswith("_") and inspect.getdoc(fn)]
    assert "train_step" in methods
    for name in methods:
        doc = inspect.getdoc(getattr(base.Balancer, name))
        assert squash(doc.split("\n\n")[0]) in page, name
    for fn in (fit, make_config):
        assert squash(inspect.getdoc(fn).split("\n\n")[0]) in page


def test_recipes_page_lists_every_recipe(site):
    from avtrain.recipes import load_recipe, recipe_names

    page = read(site, "recipes")
    names = recipe_names()
    assert names
    for name in names:
        body = text_of(section(page, name))
        assert load_recipe(name).describe().splitlines()[0] in body
        assert "settings:" in body


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_links_to_repository_files_become_plain_paths():
    hooks = load_hooks()
    markdown = ("See [the results](benchmarks/RESULTS-loader.md#top), [`avtrain/loop.py`]"
                "(avtrain/loop.py), [recipes](recipes.md), [up](#two-commands), "
                "[web](https://example.org/x.md), ![fig](benchmarks/fig.png) and "
                "`[kept](code.md)`.\n\n```sh\n[also kept](code.md)\n```\n")
    out = hooks.rewrite_links(markdown, "", lambda path: path in {"recipes.md",
                                                                  "benchmarks/fig.png"})
    assert out == ("See the results (`benchmarks/RESULTS-loader.md#top`), `avtrain/loop.py`, "
                   "[recipes](recipes.md), [up](#two-commands), [web](https://example.org/x.md), "
                   "![fig](benchmarks/fig.png) and `[kept](code.md)`.\n\n"
                   "```sh\n[also kept](code.md)\n```\n")
    assert hooks.rewrite_links("[a](../x.md)", "sub", lambda path: path == "x.md") == "[a](../x.md)"
    assert hooks.image_paths(markdown) == ["benchmarks/fig.png"]


def copy_project(tmp_path: Path, readme_tail: str) -> Path:
    """mkdocs.yml and docs/ beside a README that is this one plus `readme_tail`."""
    tmp_path.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    readme = (ROOT / "README.md").read_text("utf-8")
    (tmp_path / "README.md").write_text(readme + "\n" + readme_tail, "utf-8")
    return tmp_path


def test_readme_links_in_the_built_site(tmp_path):
    project = copy_project(tmp_path / "ok", "See [the loader results](benchmarks/RESULTS.md), "
                           "![a figure](benchmarks/fig.png) and [the top](#two-commands).\n")
    (project / "benchmarks").mkdir()
    png = b"\x89PNG\r\n\x1a\n"
    (project / "benchmarks" / "fig.png").write_bytes(png)
    result = build(project, tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "index.html").read_text("utf-8")
    assert "See the loader results (<code>benchmarks/RESULTS.md</code>)" in page
    assert '<img alt="a figure" src="benchmarks/fig.png"' in page
    assert (tmp_path / "site" / "benchmarks" / "fig.png").read_bytes() == png
    # a link to a heading the README does not have is an error, not a dead link
    project = copy_project(tmp_path / "bad", "[gone](#no-such-section)\n")
    result = build(project, tmp_path / "site-bad")
    assert result.returncode != 0
    assert "'#no-such-section'" in result.stdout + result.stderr


def test_methods_page_is_generated_from_the_modules(site):
    """One section per built-in method, with its declared options' flags and its module's
    docstring, as `avtrain methods NAME` prints it."""
    import inspect
    import sys

    from avtrain.balance import METHODS

    page = read(site, "methods")
    for name, cls in METHODS.items():
        if cls.origin is not None:
            continue
        anchor = re.search(rf'<h2 id="([^"]*)">{re.escape(name)}:', page)
        assert anchor, f"no section for {name}"
        body = text_of(section(page, anchor[1]))
        for opt in cls.options:
            assert text_of(opt.flag_name(cls.prefix())) in body, (name, opt.name)
        first = (inspect.getdoc(sys.modules[cls.__module__]) or "").splitlines()[0]
        assert text_of(first)[:40] in body, name
