"""The suite runs twice (`make test`): FASTKEYS_IMPLEMENTATION=rust, then =python."""

from __future__ import annotations

import os

import pytest

import fastkeys


def pytest_report_header() -> str:
    return f"fastkeys implementation: {fastkeys.IMPLEMENTATION}"


def pytest_configure(config: pytest.Config) -> None:
    wanted = os.environ.get("FASTKEYS_IMPLEMENTATION")
    if wanted and wanted != fastkeys.IMPLEMENTATION:
        raise pytest.UsageError(
            f"FASTKEYS_IMPLEMENTATION={wanted} but fastkeys runs {fastkeys.IMPLEMENTATION}"
        )
