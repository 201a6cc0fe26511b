"""`make bench`: the full suite, its JSON, and the plot in docs/bench.png.

    python benches/run.py [--quick]

Writes benches/results.json and docs/bench.png (ns per key against the number of keys, for every
contender of the scale scenario), and prints the table that README.md shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fastkeys import bench

ROOT = Path(__file__).resolve().parent.parent


def plot(report: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = [r for r in report["results"] if r["scenario"] == "scale"]  # type: ignore[attr-defined,index]
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
    machine = report["machine"]  # type: ignore[index]
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


def main() -> int:
    quick = "--quick" in sys.argv
    report = bench.run(quick=quick, full=not quick, log=lambda s: print(f"... {s}", file=sys.stderr))
    print(bench.format_report(report))
    (ROOT / "benches" / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, ROOT / "docs" / "bench.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
