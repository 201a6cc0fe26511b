"""Each artifact of `make wheels`, installed into a fresh virtual environment.

Run by `make test-wheels` (part of `make test`) after `make wheels` has filled dist/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
PROBE = (
    "import fastkeys, json;"
    "print(json.dumps([fastkeys.IMPLEMENTATION,"
    " fastkeys.filter_missing(['m.lora_A.foo.weight', 'm.lora_A.foobar.weight', 'base.weight'], 'foo'),"
    " fastkeys.insert_adapter_name(['m.lora_A.weight'], 'x')]))"
)
EXPECTED = [["m.lora_A.foo.weight"], ["m.lora_A.x.weight"]]


def _artifact(pattern: str) -> Path:
    found = sorted(DIST.glob(pattern))
    if not found:
        pytest.fail(f"no {pattern} in dist/: run `make wheels` first")
    return found[-1]


def _environment(tmp_path: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(tmp_path / "env")
    return tmp_path / "env" / "bin" / "python"


def _run(python: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([str(python), *args], capture_output=True, text=True, check=False, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _probe(python: Path) -> list[object]:
    import json

    env = {k: v for k, v in os.environ.items() if k != "FASTKEYS_IMPLEMENTATION"}
    return json.loads(_run(python, "-c", PROBE, env=env).strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_the_compiled_wheel_runs_rust(tmp_path: Path) -> None:
    python = _environment(tmp_path)
    _run(python, "-m", "pip", "install", "-q", "--no-index", str(_artifact("*-abi3-*.whl")))
    assert _probe(python) == ["rust", *EXPECTED]
    assert _run(python.parent / "fastkeys", "--help").startswith("usage: fastkeys")


def test_the_pure_wheel_runs_python_without_cargo(tmp_path: Path) -> None:
    python = _environment(tmp_path)
    path = os.environ["PATH"].split(os.pathsep)
    no_cargo = {**os.environ, "PATH": os.pathsep.join(p for p in path if not shutil.which("cargo", path=p))}
    _run(
        python, "-m", "pip", "install", "-q", "--no-index", str(_artifact("*-py3-none-any.whl")), env=no_cargo
    )
    assert _probe(python) == ["python", *EXPECTED]
    version = _run(python, "-c", "import fastkeys; print(fastkeys.__version__)").strip()
    assert version == _artifact("*-py3-none-any.whl").name.split("-")[1]
    # The demo's timer needs nothing beyond the package.
    demo = _run(python.parent / "fastkeys", "demo", "--layers", "2", "--adapters", "3")
    assert "implementation: python" in demo and "fastkeys.filter_missing" in demo
    done = subprocess.run(
        [str(python), "-c", "import fastkeys"],
        capture_output=True, text=True, check=False,
        env={**os.environ, "FASTKEYS_IMPLEMENTATION": "rust"},
    )  # fmt: skip
    assert done.returncode != 0 and "FASTKEYS_IMPLEMENTATION=rust" in done.stderr


def test_pip_picks_the_pure_wheel_where_no_compiled_one_fits(tmp_path: Path) -> None:
    chosen = {}
    compiled = _artifact("*-abi3-*.whl").name.rsplit("-", 1)[-1].removesuffix(".whl").split(".")[0]
    for platform_tag in (compiled, "win_amd64"):
        target = tmp_path / platform_tag
        _run(
            Path(sys.executable), "-m", "pip", "download", "-q", "--no-index", "--find-links", str(DIST),
            "--only-binary=:all:", "--platform", platform_tag, "--python-version", "3.12",
            "--dest", str(target), "fastkeys",
        )  # fmt: skip
        chosen[platform_tag] = [p.name for p in target.iterdir()]
    assert chosen["win_amd64"] == [_artifact("*-py3-none-any.whl").name]
    assert chosen[compiled] == [_artifact("*-abi3-*.whl").name]


def test_the_sdist_builds_with_cargo(tmp_path: Path) -> None:
    python = _environment(tmp_path)
    _run(python, "-m", "pip", "install", "-q", "--no-binary", "fastkeys", str(_artifact("*.tar.gz")))
    assert _probe(python) == ["rust", *EXPECTED]
