"""The generated tables of README.md and docs/*.md match what the code does today."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

pytest_plugins = ["tests.peft_survey"]  # the `peft_survey` fixture

ROOT = Path(__file__).resolve().parent.parent


def _tables() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fastkeys_docs_tables", ROOT / "docs" / "tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    return tables


# One test per table: the PEFT survey (about a minute) and the loaders' table go to different
# xdist workers instead of one worker running every table in a row. The PEFT table is rendered from
# the session's survey (tests/peft_survey.py), which the PEFT ground truth reads too.
TABLES = [(page, name) for page, names in _tables().PAGES.items() for name in names]


@pytest.mark.torch  # docs/tables.py surveys PEFT on real models
@pytest.mark.parametrize(("page", "name"), TABLES, ids=[f"{page.name}:{name}" for page, name in TABLES])
def test_generated_tables_are_current(page: Path, name: str, request: pytest.FixtureRequest) -> None:
    text = page.read_text(encoding="utf-8")
    surveyed = request.getfixturevalue("peft_survey") if name == "peft" else None
    rendered = _tables().render(text, (name,), page.name, surveyed)
    assert rendered == text, f"{page.name} is out of date: run `make docs`"


def test_a_page_without_its_markers_is_refused() -> None:
    tables = _tables()
    with pytest.raises(SystemExit, match=r"^differences.md has no <!-- peft:start -->"):
        tables.render("<!-- differences:start --><!-- differences:end -->", ("peft",), "differences.md")


def test_readme_shows_the_front_door_first() -> None:
    """CI runs the README's test command: the first commands the README shows are the front door."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.split()[0:2] for line in readme.splitlines() if line.startswith("make ")]
    assert commands[:2] == [["make", "demo"], ["make", "test"]]


def test_the_user_page_is_short_and_its_links_resolve() -> None:
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) < 250
