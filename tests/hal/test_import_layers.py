"""The package's imports run one way: ``v4hal.hal`` imports nothing above it, no module of v4hal sits in an
import circle, and only the application layer (``v4hal.apps``) imports the application layer (every import
statement counts, at module level or inside a function)."""
from __future__ import annotations

import ast
from pathlib import Path

import v4hal

ROOT = Path(v4hal.__file__).parent
#: the parts whose modules must not import each other in a loop
LAYERED = ("hal", "ops", "cases", "backends/reference", "backends/triton", "backends/cuda", "backends/ascend")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    """module -> the v4hal modules it imports (``from P import name`` of a submodule counts as the
    submodule; of anything else as ``P`` itself)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_hal_imports_nothing_above_it():
    graph = _graph()
    above = {m: sorted(t for t in ts if not t.startswith("v4hal.hal"))
             for m, ts in graph.items() if m.startswith("v4hal.hal")}
    assert not {m: ts for m, ts in above.items() if ts}, above


def test_no_import_circle_in_the_op_layer():
    prefixes = tuple("v4hal." + part.replace("/", ".") for part in LAYERED)
    bad = [sorted(c) for c in _circles(_graph()) if any(m == p or m.startswith(p + ".") for m in c for p in prefixes)]
    assert not bad, bad


def test_no_import_circle_in_the_package():
    """No two modules of v4hal import each other in a loop, anywhere in the package (a package's
    ``__init__`` counts as the package)."""
    assert not [sorted(c) for c in _circles(_graph())], [sorted(c) for c in _circles(_graph())]


def test_library_modules_never_import_the_application_layer():
    """Only ``v4hal.apps`` (the command-line runners) imports ``v4hal.apps``."""
    graph = _graph()
    bad = {m: sorted(t for t in ts if t == "v4hal.apps" or t.startswith("v4hal.apps."))
           for m, ts in graph.items() if not (m == "v4hal.apps" or m.startswith("v4hal.apps."))}
    assert not {m: ts for m, ts in bad.items() if ts}, bad


def test_graph_sees_imports_inside_functions():
    """An import inside a function is an edge of the graph as much as one at module level."""
    graph = _graph()
    assert "v4hal.apps.serve" in graph["v4hal.apps.run"]           # imported inside `check_args` / `main`
    assert "v4hal.model.checkpoint" in graph["v4hal.model.model"]  # imported inside `from_pretrained`
