"""The package's layers (docs/design.md): imports run one way, down; no cycles, function-level
imports included; no module much over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastkeys

PACKAGE = Path(fastkeys.__file__).parent
CHECKOUT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = {
    "fastkeys._native": 0,
    "fastkeys.engine": 0,
    "fastkeys.rules": 1,
    "fastkeys.checkpoints": 2,
    "fastkeys.preflight": 3,
    "fastkeys.integrations": 4,
    "fastkeys.peft": 5,
    "fastkeys.transformers": 5,
    "fastkeys.diffusers": 5,
    "fastkeys.cli": 6,
    "fastkeys.__main__": 7,
    "fastkeys": 7,  # the package itself: public re-exports
}
MAX_LINES = 600


def _name(path: Path) -> str:
    parts = ["fastkeys", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[best]


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every fastkeys module `path` imports, at any depth of its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "fastkeys":
                continue
            for alias in node.names:
                # `from fastkeys.rules import records` imports the module fastkeys.rules.records
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "fastkeys")
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; the package imports by absolute names")
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_name(path): path for path in PACKAGE.rglob("*.py")}
    names = set(paths) | {"fastkeys._native"}
    return {
        name: {target for target in _imports(path, names) if target in paths and target != name}
        for name, path in paths.items()
    }


def test_imports_run_down_the_layers() -> None:
    upward = [
        f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
        for module, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            # a package's __init__ importing its own submodules is how packages re-export
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycles.append(
                    [*trail[trail.index(target) :], target] if target in trail else [module, target]
                )
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_over_600_lines() -> None:
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_other_source_file_much_over_600_lines() -> None:
    """The Rust core, the tests, fixtures, benchmarks and scripts: about 600 lines at most (a test
    module may run a few lines over rather than split one suite in two)."""
    if not (CHECKOUT / "Cargo.toml").is_file():
        pytest.skip("fastkeys is installed, not run from a checkout")
    folders = ["rust", "tests", "fixtures", "benches", "scripts", "docs"]
    long = {
        str(path.relative_to(CHECKOUT)): n
        for folder in folders
        for path in (CHECKOUT / folder).rglob("*")
        if path.suffix in (".py", ".rs")
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES + 20
    }
    assert long == {}
