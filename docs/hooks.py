"""MkDocs hook: README.md's links to repository files, made safe for the site.

The README is the site's front page (docs/index.md includes it) and links to files of the
repository (benchmarks/RESULTS-*.md, avtrain/...) that are not pages here. Left alone, each is a
broken link, an error under `mkdocs build --strict`; a GitHub URL would tie the docs to one host
and branch. So a link whose target is not a file of the site becomes its plain path in code
(`[results](benchmarks/RESULTS-loader.md)` -> results (`benchmarks/RESULTS-loader.md`)), and an
image the README shows is copied into the site so it still shows. Links to pages, anchors and
URLs are kept, and mkdocs validates them. Fenced and inline code are never touched.
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


def rewrite_links(markdown: str, page_dir: str, in_site: Callable[[str], bool]) -> str:
    """`markdown` with each local link whose target (relative to `page_dir`) is not a file of
    the site, `in_site(path)` false, turned into its plain path in code."""

    def link(match: re.Match) -> str:
        target = match["target"]
        path = _local_path(target, page_dir)
        if path is None or in_site(path):
            return match[0]
        text = match["text"].strip()
        if not text or text.strip("`") == target:
            return f"`{target}`"
        return f"{text} (`{target}`)"

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
    page_dir = posixpath.dirname(page.file.src_uri)
    return rewrite_links(markdown, page_dir, lambda path: files.get_file_from_path(path)
                         is not None)
