"""The package's shape, checked from source: layered imports without cycles, Ray's private API in one place,
no test plumbing on the production path (docs/architecture.md describes the layers)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

VISCY = Path(__file__).resolve().parents[1] / "viscy"

# Lower layers never import higher ones; a package may import its own layer (no cycles, checked below).
LAYERS: dict[str, int] = {
    "viscy": 0,
    "viscy.errors": 0,
    "viscy.config": 1,
    "viscy.console": 2,
    "viscy.ray_utils": 3,
    "viscy.data": 4,
    "viscy.models": 4,
    "viscy.segment": 4,
    "viscy.train": 5,
    "viscy.predict": 5,
    "viscy.evaluate": 6,
    "viscy.tune": 6,
    "viscy.serve": 7,
    "viscy.api": 8,
    "viscy.cli": 9,
    "viscy.demo": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(VISCY.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The layered unit a module belongs to: ``viscy.<package or module>``."""
    return ".".join(module.split(".")[:2])


def _imports() -> dict[str, set[str]]:
    """Every viscy module -> the viscy modules it imports at run time (module level or inside functions)."""
    out: dict[str, set[str]] = {}
    for path in VISCY.rglob("*.py"):
        name = _module_name(path)
        targets: set[str] = set()
        tree = ast.parse(path.read_text())
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: not an import at run time
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "viscy":
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.split(".")[0] == "viscy"}
        out[name] = targets - {name}
    return out


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in _imports()}
    assert units <= set(LAYERS), f"give these a layer in LAYERS and docs/architecture.md: {units - set(LAYERS)}"


def test_no_module_imports_a_higher_layer() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if LAYERS[_unit(target)] > LAYERS[_unit(module)]
    )
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles_between_units() -> None:
    graph: dict[str, set[str]] = {}
    for module, targets in _imports().items():
        graph.setdefault(_unit(module), set()).update(_unit(t) for t in targets if _unit(t) != _unit(module))
    seen: set[str] = set()

    def visit(unit: str, path: list[str]) -> None:
        if unit in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(unit) :] + [unit]))
        if unit in seen:
            return
        for target in sorted(graph.get(unit, ())):
            visit(target, path + [unit])
        seen.add(unit)

    for unit in sorted(graph):
        visit(unit, [])


def test_ray_private_api_only_in_ray_utils() -> None:
    private = re.compile(r"\bray\.(_private|_common|_raylet)\b|\bray\.[\w.]*\._internal\b")
    hits = [
        f"{path.relative_to(VISCY.parent)}:{n}: {line.strip()}"
        for path in VISCY.rglob("*.py")
        if path.name != "ray_utils.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not hits, "Ray's private API belongs in viscy/ray_utils.py (with a test):\n" + "\n".join(hits)


def test_no_test_plumbing_in_production_code() -> None:
    pattern = re.compile(r"VISCY_TEST|\bimport tests\b|\bfrom tests\b|\bpytest\b|\bTINY_KWARGS\b")
    hits = [
        f"{path.relative_to(VISCY.parent)}:{n}: {line.strip()}"
        for path in VISCY.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, "test-only code in viscy/ (move it under tests/):\n" + "\n".join(hits)


def test_no_import_cycles_between_modules() -> None:
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def strong(module: str) -> None:  # Tarjan's strongly connected components
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in graph:
                continue
            if target not in index:
                strong(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            strong(module)
    assert not cycles, "modules importing each other (move the shared part down): " + str(cycles)
