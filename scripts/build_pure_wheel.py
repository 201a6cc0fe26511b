"""Builds the pure-Python `py3-none-any` wheel of fastkeys from the same `python/` sources.

maturin builds only the compiled (abi3) wheel; this wheel is what pip installs where no compiled
one fits. It holds the package without the extension, so `fastkeys.IMPLEMENTATION` is "python".
Its metadata is read from pyproject.toml and its version from Cargo.toml, as maturin does, so
both wheels describe the same release.

    python scripts/build_pure_wheel.py [--out dist]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package (requirements/dev.txt)
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "fastkeys"
# Reproducible archives: every entry gets the same timestamp.
EPOCH = (2020, 1, 1, 0, 0, 0)


def _metadata(project: dict[str, object]) -> str:
    lines = [
        "Metadata-Version: 2.3",
        f"Name: {project['name']}",
        f"Version: {project['version']}",
        f"Summary: {project['description']}",
        f"Requires-Python: {project['requires-python']}",
        f"License: {project['license']['text']}",  # type: ignore[index]
    ]
    lines += [f"Keywords: {','.join(project.get('keywords', []))}"]  # type: ignore[arg-type]
    lines += [f"Classifier: {c}" for c in project.get("classifiers", [])]  # type: ignore[attr-defined]
    lines += [f"Project-URL: {k}, {v}" for k, v in project.get("urls", {}).items()]  # type: ignore[attr-defined]
    for extra, requirements in project.get("optional-dependencies", {}).items():  # type: ignore[attr-defined]
        lines.append(f"Provides-Extra: {extra}")
        lines += [f'Requires-Dist: {req}; extra == "{extra}"' for req in requirements]
    lines.append("Description-Content-Type: text/markdown")
    readme = (ROOT / str(project["readme"])).read_text(encoding="utf-8")
    return "\n".join(lines) + "\n\n" + readme


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build(out: Path) -> Path:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    # The version has one home, Cargo.toml, as for the compiled wheel (pyproject: dynamic).
    project["version"] = tomllib.loads((ROOT / "Cargo.toml").read_text(encoding="utf-8"))["package"][
        "version"
    ]
    name, version = project["name"], project["version"]
    dist_info = f"{name}-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted(PACKAGE.rglob("*")):
        relative = path.relative_to(PACKAGE.parent).as_posix()
        if path.is_dir() or "__pycache__" in relative or path.suffix in (".so", ".pyd", ".pyc"):
            continue
        files[relative] = path.read_bytes()
    files[f"{dist_info}/METADATA"] = _metadata(project).encode()
    files[f"{dist_info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: fastkeys scripts/build_pure_wheel.py\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n"
    )
    scripts = project.get("scripts", {})
    files[f"{dist_info}/entry_points.txt"] = (
        "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    ).encode()
    record = [_record_line(file, data) for file, data in files.items()] + [f"{dist_info}/RECORD,,"]
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    out.mkdir(parents=True, exist_ok=True)
    wheel = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file, data in files.items():
            info = zipfile.ZipInfo(file, date_time=EPOCH)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return wheel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "dist"), help="output directory (default dist/)")
    args = parser.parse_args()
    print(build(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
