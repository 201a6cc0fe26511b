"""`make bench`: the benchmark suite, its JSON, and the plot in docs/bench.png.

    python -m benches.run [--quick | --full] [--rounds N] [--json FILE]

Prints the table and the targets. `--full` (what `make bench` runs) also writes
benches/results.json and docs/bench.png (ns per key against the number of keys, for every
contender of the scale scenario), which docs/benchmarks.md shows.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benches import suite

ROOT = Path(__file__).resolve().parent.parent


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = [r for r in report["results"] if r["scenario"] == "scale"]
    if not scale:
        return
    figure, axes = plt.subplots(figsize=(8, 5))
    for label in scale[0]["ns_per_key"]:
        axes.plot(
            [r["keys"] for r in scale],
            [r["ns_per_key"][label] for r in scale],
            marker="o",
            label=label,
            linewidth=2.5 if label.startswith("fastkeys (rust)") else 1.5,
        )
    machine = report["machine"]
    axes.set_xscale("log")
    axes.set_xlabel("missing keys (serving shape: 80 layers x adapters)")
    axes.set_ylabel("ns per key (median)")
    axes.set_ylim(bottom=0)
    axes.set_title(f"Filtering one adapter's keys - {machine['cpu']}, {machine['cores']} cores")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.run", description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one round: check that contenders agree"
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="also the scale curve (10k-5M keys), headers on 256 shards; writes results.json and the plot",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    report = suite.run(
        quick=args.quick, full=args.full, rounds=args.rounds, log=lambda s: print(f"... {s}", file=sys.stderr)
    )
    print(suite.format_report(report))
    text = json.dumps(report, indent=2) + "\n"
    if args.json:
        Path(args.json).write_text(text)
    if args.full:
        (ROOT / "benches" / "results.json").write_text(text)
        plot(report, ROOT / "docs" / "bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
