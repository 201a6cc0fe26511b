"""One engine contract (`fastkeys.engine.contract.Engine`), two implementations, typed for users.

stubtest (`make lint`, part of `make test`) checks the compiled module against `_native.pyi`;
mypy checks both modules against the Protocol (`_engine` declares its choice an `Engine`, and so
does this file); the tests here check the fallback's run-time signatures against the stub, and
what mypy tells a user about the public API."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import fastkeys
from fastkeys.engine import pure as _pure
from fastkeys.engine.contract import Engine

PACKAGE = Path(fastkeys.__file__).parent

# Checked by mypy --strict: the fallback module satisfies the Protocol.
FALLBACK: Engine = _pure


# Both engines side by side, in-process: the same test under FASTKEYS_IMPLEMENTATION=python would
# repeat it (`make test-python` deselects it).
pytestmark = pytest.mark.both_engines


def _stub_signatures() -> dict[str, list[str]]:
    """`name` or `Class.method` -> parameter names, as the stub declares them."""
    tree = ast.parse((PACKAGE / "_native.pyi").read_text(encoding="utf-8"))
    found: dict[str, list[str]] = {}

    def record(function: ast.FunctionDef, owner: str = "") -> None:
        arguments = function.args
        names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
        found[f"{owner}{function.name}"] = names

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            record(node)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    record(item, f"{node.name}.")
    return found


def _fallback_signatures() -> dict[str, list[str]]:
    found = {
        name: list(inspect.signature(getattr(_pure, name)).parameters)
        for name in ("read_headers", "read_values")
    }
    for owner in (_pure.KeyMatcher, _pure.Regex):
        for name, member in vars(owner).items():
            if name == "__init__" and "__new__" not in vars(owner):
                # A plain class builds in `__init__`; read it as the stub's `__new__(cls, ...)`.
                parameters = list(inspect.signature(member).parameters)
                found[f"{owner.__name__}.__new__"] = ["cls", *parameters[1:]]
            elif not name.startswith("_") or name == "__new__":
                function = member.__func__ if isinstance(member, staticmethod) else member
                if callable(function):
                    found[f"{owner.__name__}.{name}"] = list(inspect.signature(function).parameters)
    return found


def test_the_fallback_has_the_stubs_signatures() -> None:
    stub = _stub_signatures()
    assert {"KeyMatcher.__new__", "KeyMatcher.filter", "read_headers"} <= set(stub)
    assert _fallback_signatures() == stub


def test_both_modules_export_the_same_names() -> None:
    tree = ast.parse((PACKAGE / "_native.pyi").read_text(encoding="utf-8"))
    exported = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__all__"
    )
    assert ast.literal_eval(exported) == _pure.__all__


USER_CODE = """
from fastkeys import KeyMatcher, filter_missing, insert_adapter_name
matcher = KeyMatcher(["lora_"], ["default"])
reveal_type(matcher.filter(["a"]))
reveal_type(matcher.group(["a"]))
reveal_type(matcher.insert_adapter_name(["a"], "x"))
reveal_type(filter_missing(["a"], "default"))
reveal_type(insert_adapter_name(["a"], "x"))
matcher.filter(3)
"""


def test_mypy_gives_users_real_types(tmp_path: Path) -> None:
    """What a user's `mypy --strict` sees: no Any from the public API, and a wrong argument is
    an error."""
    pytest.importorskip("mypy")
    program = tmp_path / "user.py"
    program.write_text(USER_CODE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--no-error-summary", str(program)],
        capture_output=True, text=True, check=False, cwd=tmp_path,
    )  # fmt: skip
    revealed = [
        line.split("Revealed type is ", 1)[1] for line in done.stdout.splitlines() if "Revealed" in line
    ]
    assert revealed == [
        '"list[str]"',
        '"dict[str, list[str]]"',
        '"list[str]"',
        '"list[str]"',
        '"list[str]"',
    ], done.stdout
    errors = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and '"filter" of "KeyMatcher" has incompatible type "int"' in errors[0], (
        done.stdout
    )
