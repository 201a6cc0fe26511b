"""The `fastkeys` command line: `fastkeys demo`."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence

from . import IMPLEMENTATION, filter_missing, scenarios


def _best_of(runs: int, work: Callable[[], object]) -> float:
    """The fastest of `runs` timings of `work`, in seconds, with the collector paused."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        if enabled:
            gc.enable()


def _show(keys: Sequence[str], limit: int = 4) -> None:
    for key in keys[:limit]:
        print(f"    {key}")
    if len(keys) > limit:
        print(f"    ... and {len(keys) - limit:,} more")


def demo(layers: int = 32, serving_adapters: int = 900) -> None:
    """The seed scenario, then the timing of one load on a serving-sized model."""
    adapters = ["default", "default_1", "default_10", "foo"]
    print(f"fastkeys demo (implementation: {IMPLEMENTATION})")
    print(
        f"A Llama-like model: {layers} layers, LoRA on q,k,v,o,gate,up,down; "
        f"adapters loaded: {', '.join(adapters)}"
    )
    model = scenarios.model_keys(layers, adapters)
    checkpoint = set(scenarios.adapter_keys(layers, "default"))
    # Resizing the embeddings means they are re-created, so the loader reports them as well.
    missing = [key for key in model if key not in checkpoint]
    print(f"\nLoading adapter 'default' ({len(checkpoint)} tensors) after resizing the embeddings:")
    print(f"  load_state_dict(strict=False) reports {len(missing):,} missing keys, e.g.")
    _show(missing)
    peft_kept = scenarios.peft_substring_filter(missing, "default", "lora_")
    print(
        f"  PEFT's substring filter keeps {len(peft_kept):,}: "
        "it takes 'default_1' and 'default_10' for 'default'"
    )
    _show(peft_kept, 2)
    kept = filter_missing(missing, "default", "lora")
    print(f"  fastkeys.filter_missing keeps {len(kept)}: nothing is wrong with this load")

    lost = f"base_model.model.model.layers.{layers // 4}.mlp.up_proj.lora_B.default.weight"
    kept = filter_missing([*missing, lost], "default", "lora")
    print(f"\nThe checkpoint lost one tensor. fastkeys.filter_missing keeps {len(kept)}:")
    _show(kept)
    assert kept == [lost]

    names = [f"adapter_{i}" for i in range(serving_adapters)]
    serving = scenarios.model_keys(80, names)
    target = names[len(names) // 2]
    print(
        f"\nServing: a Llama-70B-shaped model (80 layers) holding {serving_adapters} adapters; "
        f"loading '{target}', {len(serving):,} missing keys. Best of 5:"
    )
    from . import _pure

    contenders: list[tuple[str, Callable[[], object]]] = []
    try:
        from . import _native
    except ImportError:
        print("  (the compiled extension is not built: `make build`)")
    else:
        native = _native.KeyMatcher(["lora_"], [target], [], [], [])
        contenders.append(("fastkeys (rust)", lambda: native.filter(serving)))
    pure = _pure.KeyMatcher(["lora_"], [target], [], [], [])
    contenders.append(("fastkeys (pure Python)", lambda: pure.filter(serving)))
    contenders.append(
        ("PEFT's substring loop", lambda: scenarios.peft_substring_filter(serving, target, "lora_"))
    )
    contenders.append(("[k for k in keys] (floor)", lambda: [k for k in serving]))
    timings = [(label, _best_of(5, work)) for label, work in contenders]
    reference = timings[0][1]
    for label, seconds in timings:
        print(
            f"  {label:<27} {seconds * 1e3:8.2f} ms  {seconds * 1e9 / len(serving):6.1f} ns/key"
            f"  {seconds / reference:5.2f}x"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastkeys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="the seed scenario and a timing, on synthetic keys")
    demo_parser.add_argument("--layers", type=int, default=32, help="layers of the seed model (default 32)")
    demo_parser.add_argument(
        "--adapters", type=int, default=900, help="adapters in the serving timing (default 900)"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.layers, args.adapters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
