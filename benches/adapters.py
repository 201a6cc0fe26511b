"""`make bench-adapters`: loading many LoRA adapters, PEFT's `load_adapter` loop against
`fastkeys.peft.load_adapters`, in one run.

    python -m benches.adapters [--adapters 100] [--quick]

The model is the issue's: a Llama shape with 32 layers and hidden size 64, LoRA r=4 on q, k, v, o,
gate, up, down (448 tensors per adapter). Both models start from the same first adapter
(`PeftModel.from_pretrained`); then adapter n goes into PEFT's model and into fastkeys' model in
turn (interleaved, so a busy machine slows both alike), and each load's wall time is recorded
against the number of adapters already loaded. At the end the two models must be identical
(state_dict bitwise, requires_grad, training flags), or the run fails. A third measurement is one
adapter into a fresh model (`PeftModel.from_pretrained` vs `fastkeys.peft.from_pretrained`, median
of rounds), and a cProfile of fastkeys' last load says where its time goes.

Writes benches/adapters.json and docs/adapters.png, and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(layers: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def save_adapters(directory: Path, layers: int, count: int, config: Any = None) -> list[Path]:
    """`count` distinct adapters of `config` (LoRA r=4 on MODULES when None; seeded values), saved
    as PEFT saves them."""
    import peft
    import torch

    paths = []
    config = config if config is not None else peft.LoraConfig(r=4, target_modules=MODULES)
    model = peft.get_peft_model(base_model(layers), config)
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        path = directory / f"adapter-{index}"
        model.save_pretrained(str(path))
        paths.append(path)
    return paths


def machine() -> dict[str, Any]:
    """What a benchmark report says of where it ran."""
    import peft
    import torch

    import fastkeys

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "implementation": fastkeys.IMPLEMENTATION,
        "peft": peft.__version__,
        "torch": torch.__version__,
    }


def timed(function: Any, *args: Any, collect: bool = True, **kwargs: Any) -> tuple[float, Any]:
    """Wall time of one call, with the garbage collector running as it does for users: collections
    a call sets off are part of its cost (the benchmarks before 2026-11-30, benches/adapters.json
    among them, paused it). `collect`: start from a collected heap (a full collection costs more
    as the model grows: at hundreds of adapters, more than the call measured)."""
    if collect:
        gc.collect()
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def progress(text: str) -> None:
    """One line of progress on stderr, over the previous one."""
    print(f"\r{text}", end="", file=sys.stderr, flush=True)


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def profile_top(profile: cProfile.Profile, count: int) -> list[dict[str, Any]]:
    """The `count` functions of a profile with the most cumulative time."""
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda item: -item[1][3])  # type: ignore[attr-defined]
    return [
        {"function": f"{Path(key[0]).name}:{key[1]}({key[2]})", "cumulative_s": round(row[3], 5)}
        for key, row in top[:count]
    ]


def assert_identical(expected: Any, actual: Any) -> None:
    import torch

    want, got = expected.state_dict(), actual.state_dict()
    if list(want) != list(got):
        raise SystemExit("fastkeys' model has other state_dict keys than PEFT's")
    for key, value in want.items():
        if value.dtype != got[key].dtype or not torch.equal(value, got[key]):
            raise SystemExit(f"fastkeys' model differs from PEFT's at {key}")
    flags = [(n, p.requires_grad) for n, p in expected.named_parameters()]
    if flags != [(n, p.requires_grad) for n, p in actual.named_parameters()]:
        raise SystemExit("fastkeys' model has other requires_grad flags than PEFT's")
    if [(n, m.training) for n, m in expected.named_modules()] != [
        (n, m.training) for n, m in actual.named_modules()
    ]:
        raise SystemExit("fastkeys' model has other training flags than PEFT's")


def run(adapters: int, layers: int, rounds: int, scratch: Path) -> dict[str, Any]:
    import warnings

    import peft

    import fastkeys
    import fastkeys.peft

    warnings.simplefilter("ignore")
    paths = save_adapters(scratch, layers, min(adapters, 8))

    def path(index: int) -> Path:
        return paths[index % len(paths)]

    # One adapter into a fresh model: the first thing every user does.
    fresh: dict[str, list[float]] = {"peft": [], "fastkeys": []}
    peft.PeftModel.from_pretrained(base_model(layers), path(0), "a0")  # warm-up: imports, caches
    fastkeys.peft.from_pretrained(base_model(layers), str(path(0)), "a0")
    for _ in range(rounds):
        seconds, _model = timed(peft.PeftModel.from_pretrained, base_model(layers), path(0), "a0")
        fresh["peft"].append(seconds)
        seconds, _model = timed(fastkeys.peft.from_pretrained, base_model(layers), str(path(0)), "a0")
        fresh["fastkeys"].append(seconds)

    reference = peft.PeftModel.from_pretrained(base_model(layers), path(0), "a0")
    ours = peft.PeftModel.from_pretrained(base_model(layers), path(0), "a0")
    per_adapter: dict[str, list[float]] = {"peft": [], "fastkeys": []}
    loaders: dict[str, int] = {}
    for index in range(1, adapters):
        name = f"a{index}"
        seconds, _result = timed(reference.load_adapter, path(index), name)
        per_adapter["peft"].append(seconds)
        if index == adapters - 1:
            profile = cProfile.Profile()
            profile.enable()
        seconds, results = timed(fastkeys.peft.load_adapters, ours, {name: path(index)}, progress=False)
        per_adapter["fastkeys"].append(seconds)
        loaders[results[name].loader] = loaders.get(results[name].loader, 0) + 1
        progress(
            f"{index}/{adapters - 1} loaded: PEFT {per_adapter['peft'][-1] * 1e3:8.1f} ms, "
            f"fastkeys {seconds * 1e3:6.1f} ms",
        )
    profile.disable()
    print(file=sys.stderr)
    assert_identical(reference, ours)

    stats = pstats.Stats(profile)
    total_profiled = sum(row[3] for key, row in stats.stats.items() if key[2] == "load_adapters")  # type: ignore[attr-defined]
    where = profile_top(profile, 25)
    peft_total = sum(per_adapter["peft"])
    ours_total = sum(per_adapter["fastkeys"])
    first_ours = statistics.median(per_adapter["fastkeys"][:3])
    last_ours = statistics.median(per_adapter["fastkeys"][-3:])
    return {
        "machine": machine(),
        "shape": {"layers": layers, "hidden": 64, "rank": 4, "modules": MODULES, "tensors": layers * 14},
        "adapters": adapters,
        "per_adapter_s": per_adapter,
        "loaders": loaders,
        "total_s": {"peft": peft_total, "fastkeys": ours_total},
        "speedup_total": peft_total / ours_total,
        "fastkeys_last_over_first": last_ours / first_ours,
        "fresh_model_s": {name: statistics.median(times) for name, times in fresh.items()},
        "fresh_model_ratio": statistics.median(fresh["fastkeys"]) / statistics.median(fresh["peft"]),
        "profile_last_load": {"total_s": total_profiled, "top": where},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 5))
    for label, times in report["per_adapter_s"].items():
        name = "PEFT load_adapter loop" if label == "peft" else "fastkeys.peft.load_adapters"
        axes.plot(range(1, len(times) + 1), [t * 1e3 for t in times], label=name, linewidth=2)
    axes.set_yscale("log")
    axes.set_xlabel("adapters already in the model")
    axes.set_ylabel("time to load one more adapter (ms, log)")
    shape = report["shape"]
    axes.set_title(
        f"LoRA r={shape['rank']} on {len(shape['modules'])} modules x {shape['layers']} layers "
        f"({shape['tensors']} tensors per adapter): total {report['speedup_total']:.0f}x less"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=100, help="adapters to load in all (default 100)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 6 adapters, 4 layers, no files written"
    )
    args = parser.parse_args(argv)
    adapters, layers, rounds = (6, 4, 1) if args.quick else (args.adapters, 32, 5)
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-adapters-") as scratch:
        report = run(adapters, layers, rounds, Path(scratch))
    totals = report["total_s"]
    print(
        f"{adapters} adapters: PEFT {totals['peft']:.2f} s, fastkeys {totals['fastkeys']:.2f} s "
        f"({report['speedup_total']:.1f}x less); "
        f"fastkeys' last load / first: {report['fastkeys_last_over_first']:.2f}; "
        f"into a fresh model: fastkeys/PEFT = {report['fresh_model_ratio']:.2f}; loaders: {report['loaders']}"
    )
    if not args.quick:
        (ROOT / "benches" / "adapters.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, ROOT / "docs" / "adapters.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
