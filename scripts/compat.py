"""`make test-compat`: the filter ground truth on every supported (PEFT, transformers) pair.

Each pair runs in its own interpreter: the venv's Python with an overlay in front of its
site-packages (`pip install --no-deps --target`, cached under .venv/compat/; torch, safetensors
and the rest are the venv's own). The tests (tests/integrations/test_peft_versions.py with FASTKEYS_COMPAT=1:
filter_missing on every method the PEFT has, complete and one tensor short, through `load_adapter`
and `from_pretrained`; fastkeys.peft's loaders) run under both implementations; so do
fastkeys.diffusers.load_adapters' differential tests (tests/integrations/loader/test_diffusers_loop.py)
on each older diffusers of `DIFFUSERS`, with the venv's PEFT and transformers. The script prints a
table and exits non-zero when a run fails.

    python scripts/compat.py                       every pair, both implementations
    python scripts/compat.py --pairs 0.17.1 --implementations rust   one pair, one engine
    python scripts/compat.py --slice               the oldest pair and diffusers, the default cases (cheap)
    python scripts/compat.py --slice --fetch       only download the slice's overlays
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".venv" / "compat"
TESTS = ["tests/integrations/test_peft_versions.py"]

# transformers 4.57.6 wants huggingface_hub < 1; these are the newest that fit it.
TRANSFORMERS_457 = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.2"]
# (PEFT, transformers): PEFT 0.17 imports transformers' HybridCache, which 5.x removed, so it
# pairs with 4.x only; "venv" is the pinned transformers of requirements/peft.txt.
PAIRS: list[tuple[str, str]] = [
    ("0.17.1", "4.57.6"),
    ("0.18.1", "4.57.6"),
    ("0.18.1", "venv"),
    ("0.19.1", "venv"),
    ("0.20.0", "venv"),
    ("0.21.2", "4.57.6"),
]


def overlay(name: str, requirements: list[str]) -> Path:
    """The cached `pip install --target` of `requirements`, installed on first use."""
    directory = CACHE / name
    done = directory / ".complete"
    if done.exists():
        return directory
    print(f"installing {' '.join(requirements)} into {directory}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "-q", "--no-deps",
         "--upgrade", "--target", str(directory), *requirements],
        check=True,
    )  # fmt: skip
    done.write_text(" ".join(requirements) + "\n")
    return directory


# diffusers releases fastkeys.diffusers.load_adapters is verified on besides the venv's (0.42.1)
DIFFUSERS = ["0.39.0"]
DIFFUSERS_TESTS = ["tests/integrations/loader/test_diffusers_loop.py"]


class Row(NamedTuple):
    """One configuration: PEFT, transformers and diffusers ("venv": the venv's own) and its tests."""

    peft: str
    transformers: str
    diffusers: str
    tests: list[str]


def rows_of(pairs: list[tuple[str, str]], diffusers: list[str]) -> list[Row]:
    return [Row(peft, transformers, "venv", TESTS) for peft, transformers in pairs] + [
        Row("venv", "venv", version, DIFFUSERS_TESTS) for version in diffusers
    ]


def overlays(row: Row) -> list[Path]:
    found = [] if row.peft == "venv" else [overlay(f"peft-{row.peft}", [f"peft=={row.peft}"])]
    if row.transformers != "venv":
        found.append(overlay(f"transformers-{row.transformers}", TRANSFORMERS_457))
    if row.diffusers != "venv":
        found.append(overlay(f"diffusers-{row.diffusers}", [f"diffusers=={row.diffusers}"]))
    return found


def run(row: Row, implementation: str, every: bool) -> dict[str, object]:
    """One pytest run; its counts from the junit report."""
    report = CACHE / f"report-{row.peft}-{row.transformers}-{row.diffusers}-{implementation}.xml"
    path = [str(ROOT / "python"), *(str(each) for each in overlays(row))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([*path, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "FASTKEYS_IMPLEMENTATION": implementation,
        "FASTKEYS_COMPAT": "1" if every else "",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *row.tests],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - started
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    if report.exists():
        top = ElementTree.parse(report).getroot()
        suite = top.find("testsuite") if top.tag == "testsuites" else top
        assert suite is not None
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts = {"passed": total - failed - skipped, "failed": failed, "skipped": skipped}
    versions = next((line for line in done.stdout.splitlines() if line.startswith("versions:")), "")
    if done.returncode not in (0, 1) or (done.returncode == 1 and not counts["failed"]):
        counts["failed"] = max(1, int(counts["failed"]))  # pytest itself failed (collection, usage)
    return {**counts, "rc": done.returncode, "seconds": seconds, "output": done.stdout + done.stderr,
            "versions": versions}  # fmt: skip


def label(version: str, package: str) -> str:
    from importlib import metadata

    return f"{metadata.version(package)} (venv)" if version == "venv" else version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", nargs="*", help="PEFT versions to run (default: every pair)")
    parser.add_argument("--implementations", nargs="*", default=["rust", "python"])
    parser.add_argument(
        "--slice", action="store_true", help="the oldest pair and the default cases only (for `make test`)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's pytest output")
    parser.add_argument(
        "--fetch", action="store_true", help="only install the overlays (needs no torch; `make test`)"
    )
    args = parser.parse_args(argv)
    pairs = [pair for pair in PAIRS if not args.pairs or pair[0] in args.pairs]
    if args.slice:
        pairs = pairs[:1]
    configurations = rows_of(pairs, DIFFUSERS if not args.pairs else [])
    if args.fetch:
        for row in configurations:
            overlays(row)
        return 0
    rows = []
    failed = False
    for row in configurations:
        for implementation in args.implementations:
            result = run(row, implementation, every=not args.slice)
            names = (
                label(row.peft, "peft"),
                label(row.transformers, "transformers"),
                label(row.diffusers, "diffusers"),
            )
            rows.append((*names, implementation, result))
            failed |= bool(result["failed"])
            status = "ok" if not result["failed"] else "FAILED"
            print(
                f"peft {names[0]:7s} transformers {names[1]:14s} diffusers {names[2]:14s} "
                f"{implementation:6s} {status:6s} passed {result['passed']:3d} failed {result['failed']:3d} "
                f"skipped {result['skipped']:3d} ({result['seconds']:.0f} s)",
                flush=True,
            )
            if result["failed"] or args.verbose:
                print(str(result["output"])[-6000:], flush=True)
    print()
    print("| PEFT | transformers | diffusers | engine | passed | failed | skipped (method absent) |")
    print("|---|---|---|---|---|---|---|")
    for peft, transformers, diffusers, implementation, result in rows:
        print(
            f"| {peft} | {transformers} | {diffusers} | {implementation} | {result['passed']} "
            f"| {result['failed']} | {result['skipped']} |"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
