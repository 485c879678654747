"""The layers hold: no import cycle among our modules, and pipeline/ does not reach up into stages/.

Every import counts, module-level or inside a function: a cycle hidden behind a function-level
import is still a cycle (it only fails later, and only on some call orders).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("pipeline", "stages")
# Modules that dispatch stages; every other pipeline/ module may import only the stage table.
STAGE_DISPATCHERS = {"pipeline.app", "pipeline.runner"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` loads (`a.b.func` -> `a.b`), None for a third-party one."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (every import statement, at any depth)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the submodule when there is one, else a name of pkg.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan), as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def _path_within(graph: dict[str, set[str]], group: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected group, for the failure message."""
    members = set(group)
    start = group[0]
    trail, seen = [start], {start}
    while True:
        nxt = min(w for w in graph[trail[-1]] if w in members)
        if nxt in seen:
            return [*trail[trail.index(nxt):], nxt]
        trail.append(nxt)
        seen.add(nxt)


def test_the_graph_sees_function_level_and_submodule_imports():
    """The walker itself: an import inside a function and a from-import of a submodule are edges."""
    graph = import_graph()
    assert "pipeline.engines.openvino" in graph["pipeline.evaluation"]  # imported inside evaluate()
    assert "pipeline.engines.onnxruntime" in graph["stages.export"]  # `from pipeline.engines import onnxruntime`
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    cycles = [" -> ".join(_path_within(graph, g)) for g in find_cycles(graph)]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_pipeline_does_not_import_stage_modules():
    """pipeline/ is the lower layer: only the dispatchers import stage modules; the stage table is open to all."""
    graph = import_graph()
    leaks = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("pipeline")
                   and m not in STAGE_DISPATCHERS for t in targets if t.startswith("stages."))
    assert not leaks, "\n".join(leaks)
