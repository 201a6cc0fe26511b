"""`make bench-lifecycle`: switching and evicting adapters on a server that holds many, PEFT's
`set_adapter` / `delete_adapter` against `fastkeys.peft.set_adapter` / `delete_adapters`.

    python -m benches.lifecycle [--adapters 30,100,300] [--rounds 5] [--quick]

The model is the issue's (benches/adapters.py): a Llama shape with 32 layers and hidden size 64,
LoRA r=4 on q, k, v, o, gate, up, down (224 LoRA layers, 448 tensors per adapter). For each size N,
two models get the same N adapters (`fastkeys.peft.load_adapters`, whose end state is PEFT's loop's,
tests/integrations/loader/test_load_adapters.py; PEFT's own loop would take most of an hour
at 300). Then, round by round, the same operation runs on PEFT's model with PEFT's call and on
the other with fastkeys' (interleaved, the order alternating, so a busy machine slows both alike):

- `set_adapter`: switch to another adapter;
- `delete`: evict one inactive adapter (the oldest), reloaded untimed into both afterwards;
- `delete_active`: evict the active adapter (each layer then picks its new one, PEFT's warning);
- `replace`: evict the oldest inactive adapter and load a new one (PEFT's `delete_adapter` +
  `load_adapter` against `delete_adapters` + `fastkeys.peft.load_adapter`);
- `add_weighted`: a new adapter combining two (`add_weighted_adapter`, "cat"), deleted again untimed.

At the end of each size the two models must be identical (state_dict bitwise, requires_grad,
training flags, active adapters of the model, the tuner and every layer, adapter names), or the run
fails. A cProfile of fastkeys' set_adapter and delete at the largest size says where the time goes.

Writes benches/lifecycle.json and docs/lifecycle.png (not with --quick) and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benches.adapters import (
    MODULES,
    assert_identical,
    base_model,
    machine,
    profile_top,
    progress,
    pyplot,
    save_adapters,
    timed,
)

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ("set_adapter", "delete", "delete_active", "replace", "add_weighted")


def assert_same_bookkeeping(expected: Any, actual: Any) -> None:
    """What assert_identical does not see: the adapters and which are active where."""
    import peft

    def state(model: Any) -> Any:
        layers = [
            (name, module.active_adapter)
            for name, module in model.named_modules()
            if isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer)
        ]
        return list(model.peft_config), model.active_adapter, model.base_model.active_adapter, layers

    if state(expected) != state(actual):
        raise SystemExit("fastkeys' model has other adapters or active adapters than PEFT's")


def build(layers: int, paths: list[Path], count: int) -> Any:
    import peft

    import fastkeys.peft

    model = peft.PeftModel.from_pretrained(base_model(layers), paths[0], "a0")
    names = {f"a{index}": paths[index % len(paths)] for index in range(1, count)}
    results = fastkeys.peft.load_adapters(model, names, progress=False)
    refused = {name: result.reason for name, result in results.items() if result.loader != "fastkeys"}
    if refused:
        raise SystemExit(f"adapters loaded by PEFT's loader: {refused}")
    return model


def run_size(count: int, layers: int, rounds: int, paths: list[Path], profile: bool) -> dict[str, Any]:
    import fastkeys.peft

    reference = build(layers, paths, count)
    ours = build(layers, paths, count)
    times: dict[str, dict[str, list[float]]] = {op: {"peft": [], "fastkeys": []} for op in OPERATIONS}
    paths_taken: dict[str, int] = {}
    loaded = [f"a{index}" for index in range(count)]  # oldest first
    fresh = count  # the next new adapter's number

    def both(op: str, round_: int, peft_call: Callable[[], Any], our_call: Callable[[], Any]) -> None:
        calls = [("peft", peft_call), ("fastkeys", our_call)]
        for label, call in calls if round_ % 2 == 0 else reversed(calls):
            seconds, result = timed(call)
            times[op][label].append(seconds)
            taken = getattr(result, "path", getattr(result, "loader", None))
            if label == "fastkeys" and taken is not None:
                paths_taken[taken] = paths_taken.get(taken, 0) + 1

    def reload(name: str) -> None:
        for model in (reference, ours):
            fastkeys.peft.load_adapter(model, paths[int(name[1:]) % len(paths)], name)
        loaded.append(name)

    def oldest_inactive() -> str:
        active = set(reference.active_adapters)
        return next(name for name in loaded if name not in active)

    # warm-up: imports and caches of both calls
    reference.set_adapter(loaded[1])
    fastkeys.peft.set_adapter(ours, loaded[1])
    for round_ in range(rounds):
        target = loaded[(round_ * 7 + 2) % len(loaded)]
        if target in reference.active_adapters:
            target = loaded[(round_ * 7 + 3) % len(loaded)]
        both(
            "set_adapter",
            round_,
            lambda target=target: reference.set_adapter(target),  # type: ignore[misc]
            lambda target=target: fastkeys.peft.set_adapter(ours, target),  # type: ignore[misc]
        )
        victim = oldest_inactive()
        both(
            "delete",
            round_,
            lambda victim=victim: reference.delete_adapter(victim),  # type: ignore[misc]
            lambda victim=victim: fastkeys.peft.delete_adapters(ours, victim),  # type: ignore[misc]
        )
        loaded.remove(victim)
        reload(victim)
        (active,) = reference.active_adapters
        both(
            "delete_active",
            round_,
            lambda active=active: reference.delete_adapter(active),  # type: ignore[misc]
            lambda active=active: fastkeys.peft.delete_adapters(ours, active),  # type: ignore[misc]
        )
        loaded.remove(active)
        reload(active)
        victim = oldest_inactive()
        name = f"a{fresh}"
        path = paths[fresh % len(paths)]
        fresh += 1

        def peft_replace(victim: str = victim, name: str = name, path: Path = path) -> None:
            reference.delete_adapter(victim)
            reference.load_adapter(path, name)

        def our_replace(victim: str = victim, name: str = name, path: Path = path) -> Any:
            fastkeys.peft.delete_adapters(ours, victim)
            return fastkeys.peft.load_adapter(ours, path, name)

        both("replace", round_, peft_replace, our_replace)
        loaded.remove(victim)
        loaded.append(name)
        pair = [loaded[0], loaded[-1]]
        both(
            "add_weighted",
            round_,
            lambda pair=pair: reference.add_weighted_adapter(pair, [0.5, 0.5], "mixed", "cat"),  # type: ignore[misc]
            lambda pair=pair: fastkeys.peft.add_weighted_adapter(ours, pair, [0.5, 0.5], "mixed", "cat"),  # type: ignore[misc]
        )
        for model in (reference, ours):
            fastkeys.peft.delete_adapters(model, ["mixed"])
        progress(
            f"{count} adapters: round {round_ + 1}/{rounds}: "
            + ", ".join(
                f"{op} {times[op]['peft'][-1] * 1e3:.0f}/{times[op]['fastkeys'][-1] * 1e3:.0f} ms"
                for op in OPERATIONS
            )
        )
    print(file=sys.stderr)
    assert_identical(reference, ours)
    assert_same_bookkeeping(reference, ours)

    where: dict[str, Any] = {}
    if profile:
        target = next(name for name in loaded if name not in ours.active_adapters)
        victim = next(name for name in loaded if name not in ours.active_adapters and name != target)
        profiled: list[tuple[str, Callable[[], Any]]] = [
            ("set_adapter", lambda: fastkeys.peft.set_adapter(ours, target)),
            ("delete", lambda: fastkeys.peft.delete_adapters(ours, victim)),
        ]
        for label, call in profiled:
            profiler = cProfile.Profile()
            profiler.enable()
            call()
            profiler.disable()
            where[label] = profile_top(profiler, 15)
    medians = {
        op: {label: statistics.median(values) for label, values in by_label.items()}
        for op, by_label in times.items()
    }
    return {
        "adapters": count,
        "times_s": times,
        "median_s": medians,
        "ratio": {op: medians[op]["peft"] / medians[op]["fastkeys"] for op in OPERATIONS},
        "fastkeys_paths": paths_taken,
        "profile": where,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    titles = {
        "set_adapter": "switch (set_adapter)",
        "delete": "evict an inactive adapter",
        "delete_active": "evict the active adapter",
        "replace": "replace: evict one, load one",
        "add_weighted": "add_weighted_adapter (cat)",
    }
    figure, axes = plt.subplots(1, len(OPERATIONS), figsize=(20, 4.5))
    sizes = [size["adapters"] for size in report["sizes"]]
    for ax, op in zip(axes, OPERATIONS, strict=True):
        for label, name in (("peft", "PEFT"), ("fastkeys", "fastkeys.peft")):
            ax.plot(sizes, [size["median_s"][op][label] * 1e3 for size in report["sizes"]], "o-", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("adapters held")
        ax.set_ylabel("median (ms, log)")
        ax.set_title(f"{titles[op]}: {report['sizes'][-1]['ratio'][op]:.0f}x at {sizes[-1]}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapters", default="30,100,300", help="adapters held, comma-separated (30,100,300)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of each operation per size (5)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 and 8 adapters, 4 layers, 2 rounds, no file"
    )
    args = parser.parse_args(argv)
    if args.quick:
        sizes, layers, rounds = [4, 8], 4, 2
    else:
        sizes, layers, rounds = [int(size) for size in args.adapters.split(",")], 32, args.rounds
    if min(sizes) < 4:
        parser.error("--adapters: at least 4 adapters per size")

    warnings.simplefilter("ignore")  # PEFT's warning when the active adapter is deleted, ...
    reports = []
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-lifecycle-") as scratch:
        paths = save_adapters(Path(scratch), layers, 8)
        for count in sizes:
            reports.append(run_size(count, layers, rounds, paths, profile=count == max(sizes)))
    report = {
        "machine": machine(),
        "shape": {"layers": layers, "hidden": 64, "rank": 4, "modules": MODULES, "lora_layers": layers * 7},
        "rounds": rounds,
        "sizes": reports,
    }
    print(f"{'adapters':>8}  " + "  ".join(f"{op + ' (PEFT / fastkeys)':>36}" for op in OPERATIONS))
    for size in reports:
        cells = []
        for op in OPERATIONS:
            median = size["median_s"][op]
            ratio = size["ratio"][op]
            cells.append(f"{median['peft'] * 1e3:10.1f} / {median['fastkeys'] * 1e3:7.1f} ms ({ratio:6.1f}x)")
        print(f"{size['adapters']:>8}  " + "  ".join(f"{cell:>36}" for cell in cells))
    print(f"fastkeys paths taken: {[size['fastkeys_paths'] for size in reports]}")
    if not args.quick:
        (ROOT / "benches" / "lifecycle.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, ROOT / "docs" / "lifecycle.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
