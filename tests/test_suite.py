"""The suite's own machinery: `make check` on a machine without torch collects no torch module."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from . import conftest

TESTS = Path(__file__).resolve().parent


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def _skips_itself(path: Path) -> bool:
    """Whether the module calls `pytest.importorskip` at module level (it skips cleanly anyway)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        value = node.value if isinstance(node, (ast.Expr, ast.Assign)) else None
        if value is not None and "importorskip" in ast.unparse(value):
            return True
    return False


def test_the_imports_read_without_torch_match_the_torch_marker() -> None:
    """Where torch is missing, conftest leaves out the modules it reads as needing torch from their
    imports; with torch installed, the marker marks the modules that hold torch's libraries after
    importing them. Each module must be read as needing torch exactly when the marker marks it (or
    skip itself at module level): one left out wrongly is a test lost, one kept wrongly fails
    collection on a machine without torch."""
    pytest.importorskip("peft")
    pytest.importorskip("diffusers")
    paths = sorted(
        path for path in TESTS.rglob("test_*.py") if "install" not in path.relative_to(TESTS).parts
    )
    read = {_module_name(path): bool(conftest._libraries(path, {})) for path in paths}
    marked = {
        _module_name(path): conftest._uses_torch(importlib.import_module(_module_name(path)))
        for path in paths
    }
    assert sum(read.values()) >= 8
    wrong = [
        name
        for name, path in zip(read, paths, strict=True)
        if read[name] != marked[name] and not (marked[name] and _skips_itself(path))
    ]
    assert wrong == []
