"""The layer rules, checked on the source: what may import what, no cycles, modules of a size one
can read. Imports inside functions count: a deferred import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attribution", "prune")
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of ours that ``name`` imports, at module level or inside a function."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # the longest prefix that is one of our modules
            parts = target.split(".")
            for cut in range(len(parts), 0, -1):
                candidate = ".".join(parts[:cut])
                if candidate in MODULES:
                    if candidate != name:
                        found.add(candidate)
                    break
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _offenders(importers: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name == importers or name.startswith(importers + ".")
        for target in targets
        if any(target == f or target.startswith(f + ".") for f in forbidden)
    )


def test_the_graph_sees_deferred_imports():
    # prune.pipeline.stages.report imports prune.report inside its run method
    assert "prune.report" in GRAPH["prune.pipeline.stages.report"]
    assert "attribution.core.errors" in GRAPH["attribution.scores"]


def test_the_foundation_imports_neither_attribution_proper_nor_prune():
    proper = tuple(m for m in sorted(MODULES) if m.startswith("attribution.") and not m.startswith("attribution.core"))
    assert _offenders("attribution.core", (*proper, "prune")) == []


def test_attribution_never_imports_prune():
    assert _offenders("attribution", ("prune",)) == []


def test_the_library_never_imports_the_cli():
    library = [m for m in MODULES if not (m.startswith("prune.commands") or m == "prune.cli")]
    offenders = [
        f"{name} imports {target}"
        for name in library
        for target in GRAPH[name]
        if target == "prune.cli" or target.startswith("prune.commands")
    ]
    assert offenders == []


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(GRAPH[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_readable(name):
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"
