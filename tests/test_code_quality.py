"""ruff (lint and format) and mypy are part of the test run."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the dev extra: pip install -e '.[dev]'")
    return path


@pytest.mark.parametrize(
    "args",
    [["check", "."], ["format", "--check", "."]],
    ids=["lint", "format"],
)
def test_ruff(args: list[str]) -> None:
    result = subprocess.run([_tool("ruff"), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    result = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _sizes() -> dict[str, int]:
    """Lines of every function and class in the package, docstrings excluded."""
    sizes = {}
    for path in sorted((ROOT / "lightning_manifold_mixup").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = node.body[0]
                has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                start = node.body[1] if has_doc and len(node.body) > 1 else first
                end = node.end_lineno or start.lineno
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                sizes[f"{path.name}:{kind} {node.name}"] = end - start.lineno + 1
    return sizes


def test_no_function_over_50_lines_and_no_class_over_300() -> None:
    sizes = _sizes()
    assert sizes["callback.py:class ManifoldMixupCallback"] > 100  # the measure sees real code
    too_long = {n: s for n, s in sizes.items() if s > (300 if ":class " in n else 50)}
    assert too_long == {}
