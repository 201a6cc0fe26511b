"""`make test` runs the suite under FASTKEYS_IMPLEMENTATION=rust, then the engine-facing part of it
(the torch-free tests and the torch modules or tests marked `engine`, but not the tests marked
`both_engines`, which call both engines side by side in-process) under =python; each run on
pytest-xdist workers (`make test WORKERS=0` runs in-process)."""

from __future__ import annotations

import ast
import importlib.util
import os
import types
from pathlib import Path

import pytest

import fastkeys

# `make fuzz` raises the example counts of the hypothesis tests (FASTKEYS_FUZZ_EXAMPLES).
FUZZ_EXAMPLES = int(os.environ.get("FASTKEYS_FUZZ_EXAMPLES", "0"))


def examples(default: int) -> int:
    return FUZZ_EXAMPLES or default


def pytest_report_header() -> str:
    return f"fastkeys implementation: {fastkeys.IMPLEMENTATION}"


def pytest_configure(config: pytest.Config) -> None:
    wanted = os.environ.get("FASTKEYS_IMPLEMENTATION")
    if wanted and wanted != fastkeys.IMPLEMENTATION:
        raise pytest.UsageError(
            f"FASTKEYS_IMPLEMENTATION={wanted} but fastkeys runs {fastkeys.IMPLEMENTATION}"
        )


# Libraries whose import makes a test module part of the torch suite: `-m "not torch"` is the
# torch-free run (`make check`), and the Python engine runs only the torch modules marked `engine`.
_TORCH_LIBRARIES = {"torch", "peft", "transformers", "diffusers", "accelerate"}


def _uses_torch(module: types.ModuleType) -> bool:
    for value in vars(module).values():
        name = value.__name__ if isinstance(value, types.ModuleType) else getattr(value, "__module__", None)
        if isinstance(name, str) and (name.split(".")[0] in _TORCH_LIBRARIES or name == "safetensors.torch"):
            return True
    return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    seen: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        if module.__name__ not in seen:
            seen[module.__name__] = _uses_torch(module)
        if seen[module.__name__]:
            item.add_marker(pytest.mark.torch)


# Where the torch libraries are not installed (`make check` with only requirements/dev.txt), the
# torch-free run (`-m "not torch"`, exactly) does not import the modules that need a missing one:
# which libraries a module needs is read from its imports (and those of the tests' and fixtures'
# own modules it imports), since importing it is what fails. Any other run skips nothing here: the
# marker above deselects, and a module that fails to import fails the run.
_ROOT = Path(__file__).resolve().parents[1]
# fastkeys' own modules that import torch and PEFT when imported (layer 4's loader).
_LOADER = "fastkeys.integrations.loader"
_MISSING = {name for name in _TORCH_LIBRARIES if importlib.util.find_spec(name) is None}


def _imports(body: list[ast.stmt]) -> list[tuple[str, int]]:
    """(module, relative level) of the module-level imports, inside `if` and `try` blocks too."""
    found: list[tuple[str, int]] = []
    for node in body:
        if isinstance(node, ast.Import):
            found += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found += [(node.module or "", node.level)]
        elif isinstance(node, (ast.If, ast.Try)):
            found += _imports([*node.body, *node.orelse, *getattr(node, "finalbody", [])])
    return found


def _source(name: str, level: int, importer: Path) -> Path | None:
    """The checkout's file for an import of a test or fixture module, else None."""
    base = importer.parent if level else _ROOT
    for _ in range(max(level - 1, 0)):
        base = base.parent
    candidate = base.joinpath(*name.split(".")) if name else base
    for path in (candidate.with_suffix(".py"), candidate / "__init__.py"):
        if path.is_file() and not {_ROOT / "tests", _ROOT / "fixtures"}.isdisjoint(path.resolve().parents):
            return path
    return None


def _libraries(path: Path, seen: dict[Path, frozenset[str]]) -> frozenset[str]:
    """The torch libraries that importing the module at `path` imports."""
    if path not in seen:
        seen[path] = frozenset()  # an import cycle adds nothing
        found: set[str] = set()
        for name, level in _imports(ast.parse(path.read_text(encoding="utf-8")).body):
            top = name.split(".")[0]
            if not level and top in _TORCH_LIBRARIES:
                found.add(top)
            elif not level and name.startswith(_LOADER):
                found |= {"torch", "peft"}
            elif not level and name == "safetensors.torch":
                found.add("torch")
            local = _source(name, level, path)
            if local is not None:
                found |= _libraries(local, seen)
        seen[path] = frozenset(found)
    return seen[path]


_SCANNED: dict[Path, frozenset[str]] = {}


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    torch_free = " ".join(str(config.getoption("markexpr") or "").split()) == "not torch"
    module = collection_path.suffix == ".py" and collection_path.name.startswith("test_")
    if _MISSING and torch_free and module:
        return bool(_libraries(collection_path.resolve(), _SCANNED) & _MISSING) or None
    return None
