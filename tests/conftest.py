"""The suite runs twice (`make test`): FASTKEYS_IMPLEMENTATION=rust, then =python."""

from __future__ import annotations

import os

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
