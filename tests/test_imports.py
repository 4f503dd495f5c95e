"""Dependencies between epts modules point one way: no import cycles, and nothing imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "epts"

# Cycles that exist and are being removed; each entry is one strongly connected set of modules. Empty it as
# they go: the test fails both on a new cycle and on a listed one that no longer exists.
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, tuple[Path, bool]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph() -> dict[str, set[str]]:
    """Every epts module -> the epts modules it imports, at the top or inside a function."""
    modules = _modules()
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + [node.module] if node.module else base)
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        targets.add(f"{source}.{alias.name}")
                    # A submodule reading a name off its own package (`from . import __version__`) is no
                    # edge: the package runs before any submodule, and sets __version__ before its imports.
                    elif source in modules and not name.startswith(source + "."):
                        targets.add(source)
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected sets of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_relative_imports_of_submodules_and_packages():
    graph = import_graph()
    assert {"epts.api", "epts.report", "epts.zeroshot", "epts.distributed"} <= graph["epts.cli"]
    assert "epts.baselines.sparsegpt" in graph["epts.refit"] and "epts.importance" in graph["epts.baselines.wanda"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_no_library_module_imports_the_cli():
    importers = sorted(name for name, targets in import_graph().items() if "epts.cli" in targets)
    assert importers == ["epts.__main__"]


def test_no_import_cycles_but_the_known_ones():
    found = cycles(import_graph())
    assert [c for c in found if c not in KNOWN_CYCLES] == []
    assert [c for c in KNOWN_CYCLES if c not in found] == [], "a known cycle is gone: remove it from KNOWN_CYCLES"
