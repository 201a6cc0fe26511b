"""`make test` runs the suite under FASTKEYS_IMPLEMENTATION=rust, then the engine-facing part of it
(the torch-free tests and the torch modules or tests marked `engine`) under =python; each run on
pytest-xdist workers (`make test WORKERS=0` runs in-process)."""

from __future__ import annotations

import os
import types

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
