"""The package's import graph has no circle, and no balancing method imports the training loop.

A circle means a module cannot be understood (or imported) without the ones that import it:
it is how `balance -> gblending -> loop -> balance` grew. The graph is read from the source
with `ast`, every module of avprep/, avtrain/ and cli.py, counting every `import` statement
wherever it stands: at module level and inside functions, methods and `try` blocks. Lazy
imports count because they only move the circle from import time to call time: the modules
still need each other. Only imports of this project's own modules are edges; `from P import n`
is an edge to P.n when that is a module, else to P. A submodule's implicit import of its
parent packages is not an edge (every package would be a circle with its submodules).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_files() -> dict[str, Path]:
    """{dotted module name: file} of avprep, avtrain and cli."""
    files = {"cli": ROOT / "cli.py"}
    for package in ("avprep", "avtrain"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    return files


def import_edges(files: dict[str, Path]) -> dict[str, dict[str, int]]:
    """{importer: {imported module: line of its first import}} over the project's modules."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, files) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else _known(base, files)
                           for a in node.names]
            else:
                continue
            for target in targets:
                if target and target != name:
                    edges.setdefault(target, node.lineno)
    return graph


def _known(dotted: str, files: dict[str, Path]) -> str | None:
    """The longest prefix of `dotted` that is one of our modules (`import a.b.c` imports a.b.c,
    or a.b when c is a name), else None (an outside package)."""
    parts = dotted.split(".")
    while parts:
        if ".".join(parts) in files:
            return ".".join(parts)
        parts.pop()
    return None


def circles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def describe(component: list[str], graph: dict[str, dict[str, int]],
             files: dict[str, Path]) -> str:
    """Every import inside one circle, as `a -> b (a's file:line)`."""
    inside = set(component)
    lines = [f"circle of {len(component)} modules: {', '.join(component)}"]
    for a in component:
        for b, line in sorted(graph[a].items()):
            if b in inside:
                lines.append(f"  {a} -> {b}  ({files[a].relative_to(ROOT)}:{line})")
    return "\n".join(lines)


def test_the_walker_sees_module_level_and_lazy_imports():
    """The graph is not empty by mistake: edges known to exist are found, among them an import
    inside a function (cli's commands import lazily) and a relative one."""
    files = module_files()
    graph = import_edges(files)
    assert {"cli", "avprep.errors", "avtrain", "avtrain.loop", "avtrain.balance",
            "avtrain.balance.gblending"} <= set(files)
    assert "avtrain.loop" in graph["cli"]  # inside `def fit`
    assert "avtrain.balance" in graph["avtrain.loop"]  # `from .balance import ...`
    assert "avtrain.balance._dist" in graph["avtrain.balance.ogm"]  # `from . import _dist`
    assert "avtrain.distributed" in graph["avtrain.probe"]
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) \
        == [["a", "b", "c"]]


def test_no_import_circle():
    files = module_files()
    graph = import_edges(files)
    found = circles(graph)
    assert not found, "\n".join(describe(c, graph, files) for c in found)


def test_no_method_imports_the_training_loop():
    """A balancing method is driven by the loop through its interface; what it shares with the
    loop (optimizer, checkpoints) lives in modules both import."""
    files = module_files()
    graph = import_edges(files)
    offenders = [f"{files[name].relative_to(ROOT)}:{graph[name]['avtrain.loop']}"
                 for name in files
                 if name.startswith("avtrain.balance") and "avtrain.loop" in graph[name]]
    assert not offenders, f"avtrain.loop imported by {', '.join(offenders)}"
