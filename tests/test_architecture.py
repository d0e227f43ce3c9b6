"""The package's module graph: acyclic, layered as docs/design.md draws it, one concern each."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_manifold_mixup"
DESIGN = ROOT / "docs" / "design.md"

# What each module may import of the package (docs/design.md). The plain-torch layers first.
ALLOWED: dict[str, set[str]] = {
    "_lightning": set(),
    "draw": set(),
    "layers": set(),
    "layout": {"layers"},
    "policies": {"draw", "layout"},
    "nfm": {"draw", "policies"},
    "mixstyle": {"draw", "layout", "policies"},
    "patchup": {"draw", "policies"},
    "targets": {"draw", "policies"},
    "losses": {"targets"},
    "mixing": {"draw", "layout", "policies", "targets"},
    "config": {"_lightning", "draw", "mixstyle", "nfm", "patchup", "policies"},
    "schedule": {"_lightning", "config"},
    "stream": {"_lightning", "draw"},
    "record": {"_lightning"},
    "hooks": {"_lightning", "layout"},
    "hf": {"_lightning", "layers", "layout", "targets"},
    "mixin": {"_lightning", "losses", "targets"},
    "batch": {"_lightning", "draw", "hf", "layout", "mixin", "policies", "targets"},
    "pairing": {"_lightning", "policies"},
    "callback": {
        "_lightning",
        "batch",
        "config",
        "draw",
        "hf",
        "hooks",
        "layers",
        "layout",
        "mixin",
        "pairing",
        "policies",
        "record",
        "schedule",
        "stream",
        "targets",
    },
}
# Modules that must run without Lightning installed (the math, usable in any training loop).
PURE = {
    "draw",
    "layers",
    "layout",
    "policies",
    "nfm",
    "mixstyle",
    "patchup",
    "targets",
    "losses",
    "mixing",
}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level packages) imported anywhere in ``path``, function
    bodies included (a lazy import is still an edge of the graph)."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE.name:
                own.add(parts[1] if len(parts) > 1 else "__init__")
            else:
                other.add(parts[0])
    return own, other


def _graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p)[0] for p in PACKAGE.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_lazy_import_cycle() -> None:
    assert find_cycle({"hf": {"layers"}, "layers": {"layout"}, "layout": {"hf"}}) == [
        "hf",
        "layers",
        "layout",
        "hf",
    ]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_import_graph_has_no_cycle() -> None:
    assert find_cycle(_graph()) is None


def test_every_module_imports_only_what_the_design_allows() -> None:
    graph = _graph()
    assert set(graph) == set(ALLOWED), "a module was added or removed: update docs/design.md"
    extra = {m: sorted(deps - ALLOWED[m]) for m, deps in graph.items() if deps - ALLOWED[m]}
    assert extra == {}


@pytest.mark.parametrize("module", sorted(PURE))
def test_the_math_modules_import_no_lightning(module: str) -> None:
    _, other = _imports(PACKAGE / f"{module}.py")
    assert not other & {"lightning", "pytorch_lightning", "lightning_fabric"}


def _design_table() -> dict[str, tuple[str, set[str]]]:
    """docs/design.md's module table: module -> (what it owns, what it may import)."""
    rows = {}
    for line in DESIGN.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`\w+`", cells[0]):
            imports = set(re.findall(r"`(\w+)`", cells[2]))
            rows[cells[0].strip("`")] = (cells[1], imports)
    return rows


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_each_module_docstring_names_the_one_concern_it_owns(module: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / f"{module}.py").read_text())) or ""
    assert doc.startswith("Owns "), f"{module}.py: its docstring must start with 'Owns <concern>'"


def test_the_design_table_lists_each_module_with_its_concern_and_imports() -> None:
    table = _design_table()
    assert set(table) == set(ALLOWED), "docs/design.md's table must list exactly the modules"
    for module, (owns, imports) in table.items():
        assert owns, module
        assert imports == ALLOWED[module], module


def test_the_core_package_does_not_import_the_recipes() -> None:
    for path in PACKAGE.rglob("*.py"):
        _, other = _imports(path)
        assert "lightning_manifold_mixup_recipes" not in other, path.name
