"""MkDocs hook: links written for GitHub, made right for the site.

The README is the site's front page (docs/index.md includes it) and the guides are docs/*.md;
both are written so that their links work on GitHub, relative to where each file lies in the
repository. In the site three kinds of link need another target:

- a link to a page of the site by its repository path: the README's `docs/training.md` is the
  site's `training.md`, a guide's `../README.md` is `index.md`;
- a link to the source a reference page is made from (`avtrain/balance/` -> the methods page,
  `avtrain/recipes/` -> the recipes page, `cli.py` -> the CLI reference): on GitHub the source,
  in the site its page;
- a link to any other file of the repository (benchmarks/RESULTS-*.md, avtrain/...): not a page
  here, so a broken link (an error under `mkdocs build --strict`), and a GitHub URL would tie
  the docs to one host and branch. It becomes its repository path in code
  (`[results](benchmarks/RESULTS-loader.md)` -> results (`benchmarks/RESULTS-loader.md`)), and
  an image the README shows is copied into the site so it still shows.

Links to pages, anchors and URLs are kept, and mkdocs validates them. Fenced and inline code are
never touched.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable

from mkdocs.structure.files import File

# an inline code span (kept as it is), or a link or image: whichever starts first
TOKEN = re.compile(r"(?P<code>(?P<ticks>`+).+?(?P=ticks))"
                   r"|(?P<bang>!?)\[(?P<text>(?:[^\[\]]|\[[^\[\]]*\])*)\]"
                   r"\(\s*<?(?P<target>[^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", re.S)
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _local_path(target: str, page_dir: str) -> str | None:
    """The repository path a link points to, or None for an anchor, URL or absolute path."""
    if target.startswith(("#", "/")) or SCHEME.match(target):
        return None
    return posixpath.normpath(posixpath.join(page_dir, target.split("#")[0]))


def _map_links(markdown: str, fn: Callable[[re.Match], str]) -> str:
    """`markdown` with every link outside fenced and inline code replaced by `fn(match)`."""

    def prose(text: str) -> str:
        return TOKEN.sub(lambda m: m[0] if m["code"] else fn(m), text)

    out, chunk, fence = [], [], None
    for line in markdown.splitlines(keepends=True):
        if fence is None:
            opened = FENCE.match(line)
            if opened:
                out.append(prose("".join(chunk)))
                chunk, fence = [], opened[1]
                out.append(line)
            else:
                chunk.append(line)
        else:
            out.append(line)
            closing = line.strip()
            if closing.startswith(fence) and not closing.strip(fence[0]):
                fence = None
    out.append(prose("".join(chunk)))
    return "".join(out)


# the pages made from a source of the repository, keyed by that source's path
SOURCES = {"avtrain/balance": "methods.md", "avtrain/recipes": "recipes.md", "cli.py": "cli.md"}


def site_path(repo_path: str, docs_dir: str = "docs") -> str | None:
    """The page of the site that a repository path is, or None: a file under `docs_dir`, the
    README (the front page) or a source of SOURCES."""
    if repo_path.startswith(docs_dir + "/"):
        return repo_path[len(docs_dir) + 1:]
    if repo_path == "README.md":
        return "index.md"
    return SOURCES.get(repo_path)


def rewrite_links(markdown: str, page_dir: str, in_site: Callable[[str], bool],
                  repo_dir: str | None = None, docs_dir: str = "docs") -> str:
    """`markdown` with each local link whose target (relative to `page_dir`) is not a file of
    the site, `in_site(path)` false, turned into a link to the page that target is (read
    relative to `repo_dir`, the page's folder in the repository, `page_dir` unless given; see
    site_path), or else into its repository path in code."""
    repo_dir = page_dir if repo_dir is None else repo_dir

    def link(match: re.Match) -> str:
        target = match["target"]
        path = _local_path(target, page_dir)
        if path is None or in_site(path):
            return match[0]
        repo = _local_path(target, repo_dir)
        anchor = target[len(target.split("#")[0]):]
        page = site_path(repo, docs_dir)
        if page is not None and in_site(page):
            new = posixpath.relpath(page, page_dir or ".") + anchor
            start, end = match.start("target") - match.start(), match.end("target") - match.start()
            return match[0][:start] + new + match[0][end:]
        shown = repo + anchor
        text = match["text"].strip()
        if not text or text.strip("`") in (target, shown):
            return f"`{shown}`"
        return f"{text} (`{shown}`)"

    return _map_links(markdown, link)


def image_paths(markdown: str) -> list[str]:
    """Repository paths of the images `markdown` shows (outside code)."""
    found = []

    def image(match: re.Match) -> str:
        path = _local_path(match["target"], "")
        if match["bang"] and path is not None:
            found.append(path)
        return match[0]

    _map_links(markdown, image)
    return found


def on_files(files, config):
    """Copy the images README.md shows into the site, at the same relative paths."""
    root = os.path.dirname(config.config_file_path)
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for path in image_paths(readme):
        if os.path.isfile(os.path.join(root, path)) and files.get_file_from_path(path) is None:
            files.append(File(path, src_dir=root, dest_dir=config.site_dir,
                              use_directory_urls=config.use_directory_urls))
    return files


def on_page_markdown(markdown, page, config, files):
    root = os.path.dirname(config.config_file_path)
    docs_dir = os.path.relpath(config.docs_dir, root).replace(os.sep, "/")
    page_dir = posixpath.dirname(page.file.src_uri)
    # the front page is README.md at the repository root; every other page is a file of docs/
    repo_dir = "" if page.file.src_uri == "index.md" else posixpath.join(docs_dir, page_dir)
    return rewrite_links(markdown, page_dir, lambda path: files.get_file_from_path(path)
                         is not None, repo_dir=repo_dir, docs_dir=docs_dir)
