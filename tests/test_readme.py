"""README's generated tables match what the code does today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_tables_are_current() -> None:
    spec = importlib.util.spec_from_file_location("fastkeys_docs_tables", ROOT / "docs" / "tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tables.render(readme) == readme, "README.md tables are out of date: run `make docs`"


def test_readme_quickstart_shows_the_front_door_first() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1]
    commands = [line.split()[0:2] for line in quickstart.splitlines() if line.startswith("make ")]
    assert commands[:2] == [["make", "demo"], ["make", "test"]]
