"""`make bench-scale`: 1,000 LoRA adapters in one model with `fastkeys.peft.load_adapters`, against
building the same modules with plain torch, with the memory they hold and give back.

    python -m benches.scale [--adapters 1000] [--peft-path-at 300] [--quick]

The model is the issue's (benches/adapters.py): a Llama shape with 32 layers and hidden size 64,
LoRA r=4 on q, k, v, o, gate, up, down (224 targets, 448 tensors per adapter). Adapter n goes into
the model through `load_adapters`; beside each load, in the same round, the same adapter is built
with plain torch, the floor of what any loader that keeps PEFT's module tree pays: the file read
(`safetensors.torch.load_file`), then per target two `nn.Linear(bias=False)` holding copies of the
loaded matrices (the cheaper of torch's constructor and `skip_init`, measured per round), an
`nn.Identity` and three `ModuleDict` inserts. The plain modules are dropped after each round, so the
model's memory is the loader's alone.

At `--peft-path-at` adapters one load goes through PEFT's loader (`torch_device="cpu"` routes it
there), beside PEFT's own `load_adapter` of the same adapter (fastkeys' work around PEFT's loader:
its tax), and the next fast load is timed against the fast loads before it.

Memory (Linux: resident set size after `gc.collect()` and glibc's `malloc_trim`): the model before
the adapters, after all of them (against the base model's tensors plus the adapters'), and after
`delete_adapters` of all but the first (what comes back). Two child processes load 30 adapters each,
one with PEFT's loop and one with fastkeys, for the per-adapter memory of each.

Writes benches/scale.json and docs/scale.png (not with --quick) and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benches.adapters import MODULES, base_model, machine, profile_top, progress, pyplot, save_adapters, timed

ROOT = Path(__file__).resolve().parent.parent
# rounds of the PEFT-path load beside PEFT's own, alternating: PEFT's load alone varies by a third
# between rounds at 300 adapters
ROUNDS = 6


def resident_bytes() -> int | None:
    """The process's resident set after a full collection and glibc returning freed memory (None
    off Linux)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, AttributeError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(tensors: Any) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class PlainTorch:
    """The same adapter's modules built with plain torch, into three `ModuleDict`s per target."""

    def __init__(self, file: Path) -> None:
        from safetensors.torch import load_file
        from torch import nn

        keys = sorted(load_file(str(file)))
        self.targets = sorted({key.split(".lora_")[0] for key in keys})
        self.dicts = [(nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()) for _ in self.targets]

    def build(self, file: Path, name: str, skip_init: bool) -> None:
        import torch
        from safetensors.torch import load_file
        from torch import nn

        tensors = load_file(str(file))
        for target, (a_dict, b_dict, dropout) in zip(self.targets, self.dicts, strict=True):
            for container, key in ((a_dict, "lora_A"), (b_dict, "lora_B")):
                weight = tensors[f"{target}.{key}.weight"]
                out_features, in_features = weight.shape
                if skip_init:
                    layer = torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)  # type: ignore[no-untyped-call]
                else:
                    layer = nn.Linear(in_features, out_features, bias=False)
                with torch.no_grad():
                    layer.weight.copy_(weight)
                container[name] = layer
            dropout[name] = nn.Identity()

    def clear(self) -> None:
        for dicts in self.dicts:
            for container in dicts:
                container.clear()


def run(adapters: int, layers: int, peft_path_at: int, scratch: Path, children: int = 30) -> dict[str, Any]:
    import peft

    import fastkeys.peft

    warnings.simplefilter("ignore")
    paths = save_adapters(scratch, layers, 8)
    files = [path / "adapter_model.safetensors" for path in paths]
    plain = PlainTorch(files[0])

    def path(index: int) -> Path:
        return paths[index % len(paths)]

    def fast_load(name: str, index: int, profile: cProfile.Profile | None = None) -> float:
        call = functools.partial(fastkeys.peft.load_adapters, model, {name: path(index)}, progress=False)
        seconds, results = timed(
            call if profile is None else functools.partial(profile.runcall, call), collect=False
        )
        if results[name].loader != "fastkeys":
            raise SystemExit(f"{name} went to PEFT's loader: {results[name].reason}")
        return seconds

    # warm-up: imports and caches of both contenders, in a model of their own
    warm = peft.PeftModel.from_pretrained(base_model(layers), path(0), "a0")
    fastkeys.peft.load_adapters(warm, {"a1": path(1)}, progress=False)
    plain.build(files[1], "a1", skip_init=True)
    plain.build(files[1], "a1", skip_init=False)
    plain.clear()
    del warm

    before_model = resident_bytes()
    model = peft.PeftModel.from_pretrained(base_model(layers), path(0), "a0")
    base = tensor_bytes(model.state_dict().values())
    with_first = resident_bytes()
    per_adapter_bytes = tensor_bytes(
        p for n, p in model.named_parameters() if ".a0." in n or n.endswith(".a0")
    )
    seconds: dict[str, list[float]] = {"fastkeys": [], "plain_torch": []}
    resident: list[tuple[int, int | None]] = []
    peft_path: dict[str, Any] = {}
    profile = cProfile.Profile()
    for index in range(1, adapters):
        name = f"a{index}"
        seconds["fastkeys"].append(fast_load(name, index, profile if index == adapters - 1 else None))
        plain_times = []
        for skip_init in (True, False):
            elapsed, _ = timed(plain.build, files[index % len(files)], name, skip_init, collect=False)
            plain_times.append(elapsed)
            plain.clear()
        seconds["plain_torch"].append(min(plain_times))
        if index == peft_path_at:
            peft_path = through_peft(model, path(index + 1), index)
            peft_path["next_fast_load_s"] = fast_load(f"a{index}-after", index + 1)
            fastkeys.peft.delete_adapters(model, [f"a{index}-after"])
            peft_path["fast_loads_before_s"] = statistics.median(seconds["fastkeys"][-20:])
        if index % 50 == 0 or index == adapters - 1:
            resident.append((index + 1, resident_bytes()))
        progress(
            f"{index}/{adapters - 1}: fastkeys {seconds['fastkeys'][-1] * 1e3:6.1f} ms, "
            f"plain torch {seconds['plain_torch'][-1] * 1e3:6.1f} ms",
        )
    print(file=sys.stderr)
    loaded = resident_bytes()
    expected = base + (adapters - 1) * per_adapter_bytes

    names = [name for name in model.peft_config if name != "a0"]
    probe = weakref.ref(next(p for n, p in model.named_parameters() if f".{names[-1]}." in n))
    delete_s, _ = timed(fastkeys.peft.delete_adapters, model, names)
    after_delete = resident_bytes()
    for index, name in enumerate(names, start=1):  # the same adapters again: is the memory reused?
        fastkeys.peft.load_adapters(model, {name: path(index)}, progress=False)
    reloaded = resident_bytes()
    if probe() is not None:
        raise SystemExit("a deleted adapter's weight is still referenced after delete_adapters")
    ratios = [ours / floor for ours, floor in zip(seconds["fastkeys"], seconds["plain_torch"], strict=True)]
    last = slice(max(0, len(ratios) - 300), None)
    memory: dict[str, Any] = {
        "base_and_first_adapter_bytes": base,
        "adapter_tensor_bytes": per_adapter_bytes,
        "resident_before_model": before_model,
        "resident_with_first_adapter": with_first,
        "resident_loaded": loaded,
        "resident_after_delete": after_delete,
        "resident_reloaded": reloaded,
        "resident_by_adapters": resident,
    }
    if None not in (before_model, loaded, after_delete, reloaded):
        held = loaded - before_model  # type: ignore[operator]
        memory["held_over_tensors"] = held / expected
        memory["given_back"] = (loaded - after_delete) / (loaded - with_first)  # type: ignore[operator]
        memory["reloaded_over_loaded"] = (reloaded - with_first) / (loaded - with_first)  # type: ignore[operator]
    return {
        "machine": machine(),
        "shape": {"layers": layers, "hidden": 64, "rank": 4, "modules": MODULES, "tensors": layers * 14},
        "adapters": adapters,
        "seconds": seconds,
        "total_s": {label: sum(values) for label, values in seconds.items()},
        "median_load_s": {label: statistics.median(values[last]) for label, values in seconds.items()},
        "over_plain_torch": statistics.median(ratios[last]),
        "fastkeys_last_over_first": statistics.median(seconds["fastkeys"][-20:])
        / statistics.median(seconds["fastkeys"][:20]),
        "peft_path": peft_path,
        "delete_all_but_one_s": delete_s,
        "memory": memory,
        "memory_per_adapter": {
            loader: child_memory(loader, layers, children) for loader in ("peft", "fastkeys")
        },
        "profile_last_load": profile_top(profile, 20),
    }


def through_peft(model: Any, path: Path, held: int) -> dict[str, Any]:
    """One adapter through PEFT's loader by way of fastkeys (its checks, snapshot and verdict around
    PEFT's `load_adapter`) and by PEFT's own call, alternating, each deleted again."""
    import fastkeys.peft

    times: dict[str, list[float]] = {"fastkeys_peft_path": [], "peft": [], "fastkeys_own": []}
    inside: list[float] = []  # PEFT's load_adapter, timed inside fastkeys' call
    real = type(model).load_adapter

    def timed_inside(*args: Any, **kwargs: Any) -> Any:
        elapsed, returned = timed(lambda: real(model, *args, **kwargs), collect=False)
        inside.append(elapsed)
        return returned

    def through_fastkeys() -> Any:
        model.load_adapter = timed_inside  # the instance's, for this call only
        try:
            return fastkeys.peft.load_adapter(model, path, "through", torch_device="cpu")
        finally:
            del model.load_adapter

    for round_ in range(ROUNDS):
        calls: list[tuple[str, Callable[[], Any]]] = [
            ("fastkeys_peft_path", through_fastkeys),
            ("peft", lambda: model.load_adapter(path, "through")),
        ]
        for label, call in calls if round_ % 2 == 0 else reversed(calls):
            elapsed, result = timed(call)
            if label == "fastkeys_peft_path":
                if result.loader != "peft" or len(inside) != 1:
                    raise SystemExit(f"torch_device did not route the load to PEFT: {result}")
                times["fastkeys_own"].append(elapsed - inside.pop())
            times[label].append(elapsed)
            fastkeys.peft.delete_adapters(model, ["through"])
    medians = {label: statistics.median(values) for label, values in times.items()}
    return {
        "adapters_held": held,
        "seconds": times,
        "tax": medians["fastkeys_peft_path"] / medians["peft"] - 1,
        "own_over_peft": medians["fastkeys_own"] / medians["peft"],
    }


def child_memory(loader: str, layers: int, count: int) -> dict[str, Any] | None:
    """Resident bytes per adapter over `count` adapters loaded by `loader` in a fresh process."""
    command = [sys.executable, "-m", "benches.scale", "--child-memory", loader, "--layers", str(layers)]
    command += ["--adapters", str(count)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {loader} memory child failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def memory_child(loader: str, layers: int, count: int) -> dict[str, Any] | None:
    import peft

    import fastkeys.peft

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-scale-child-") as scratch:
        paths = save_adapters(Path(scratch), layers, 8)
        model = peft.PeftModel.from_pretrained(base_model(layers), paths[0], "a0")
        start = resident_bytes()
        for index in range(1, count):
            if loader == "peft":
                model.load_adapter(paths[index % len(paths)], f"a{index}")
            else:
                fastkeys.peft.load_adapters(model, {f"a{index}": paths[index % len(paths)]}, progress=False)
        end = resident_bytes()
        tensors = tensor_bytes(p for n, p in model.named_parameters() if ".a1." in n)
    if start is None or end is None:
        return None
    return {
        "adapters": count - 1,
        "resident_per_adapter": (end - start) / (count - 1),
        "tensor_bytes": tensors,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    figure, (times, memory) = plt.subplots(1, 2, figsize=(12, 5))
    labels = {
        "fastkeys": "fastkeys.peft.load_adapters",
        "plain_torch": "plain torch (read + build the modules)",
    }
    for label, values in report["seconds"].items():
        times.plot(range(1, len(values) + 1), [v * 1e3 for v in values], label=labels[label], linewidth=1)
    peft_path = report["peft_path"]
    if peft_path:
        times.scatter(
            [peft_path["adapters_held"] + 1],
            [peft_path["next_fast_load_s"] * 1e3],
            color="red",
            zorder=3,
            label="the fast load after a PEFT-path load",
        )
    times.set_xlabel("adapters already in the model")
    times.set_ylabel("time to load one more adapter (ms, log)")
    times.set_yscale("log")
    times.set_title(
        f"{report['adapters']} adapters: fastkeys / plain torch = {report['over_plain_torch']:.2f}x"
    )
    times.grid(True, alpha=0.3)
    times.legend()
    mem = report["memory"]
    points = [(count, value) for count, value in mem["resident_by_adapters"] if value is not None]
    if points and mem["resident_before_model"] is not None:
        start = mem["resident_before_model"]
        memory.plot(
            [c for c, _ in points],
            [(v - start) / 2**20 for _, v in points],
            label="resident (model)",
            linewidth=2,
        )
        memory.plot(
            [c for c, _ in points],
            [
                (mem["base_and_first_adapter_bytes"] + (c - 1) * mem["adapter_tensor_bytes"]) / 2**20
                for c, _ in points
            ],
            label="base model + adapters' tensors",
            linewidth=2,
        )
        memory.set_xlabel("adapters in the model")
        memory.set_ylabel("MiB")
        memory.set_title(
            f"memory: {mem['held_over_tensors']:.2f}x the tensors; {mem['given_back']:.0%} back on delete"
        )
        memory.grid(True, alpha=0.3)
        memory.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def summary(report: dict[str, Any]) -> str:
    median, memory, through = report["median_load_s"], report["memory"], report["peft_path"]
    lines = [
        f"{report['adapters']} adapters in {report['total_s']['fastkeys']:.1f} s; a load: fastkeys "
        f"{median['fastkeys'] * 1e3:.1f} ms, plain torch {median['plain_torch'] * 1e3:.1f} ms "
        f"({report['over_plain_torch']:.2f}x, target <= 0.4x); "
        f"last / first: {report['fastkeys_last_over_first']:.2f}",
        f"at {through['adapters_held']} adapters: the PEFT-path load's tax {through['tax']:+.0%} "
        f"(fastkeys' own time outside PEFT's call: {through['own_over_peft']:.1%} of PEFT's load); "
        f"the next fast load {through['next_fast_load_s'] * 1e3:.1f} ms against "
        f"{through['fast_loads_before_s'] * 1e3:.1f} ms "
        f"({through['next_fast_load_s'] / through['fast_loads_before_s']:.2f}x, target <= 2x)",
    ]
    if "held_over_tensors" in memory:
        lines.append(
            f"memory: {memory['held_over_tensors']:.2f}x the base model and the adapters' tensors "
            f"(target <= 1.3x); delete_adapters of all but one ({report['delete_all_but_one_s']:.2f} s) "
            f"gave back {memory['given_back']:.0%}; loaded again they hold "
            f"{memory['reloaded_over_loaded']:.2f}x the first time's memory; "
            f"per adapter: {report['memory_per_adapter']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=1000, help="adapters in all (default 1000)")
    parser.add_argument("--layers", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument(
        "--peft-path-at", type=int, default=300, help="adapters held at the PEFT-path load (300)"
    )
    parser.add_argument("--child-memory", choices=["peft", "fastkeys"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 12 adapters, 4 layers, no files written"
    )
    args = parser.parse_args(argv)
    if args.child_memory:
        print(json.dumps(memory_child(args.child_memory, args.layers, args.adapters)))
        return 0
    adapters, layers, peft_path_at = (
        (12, 4, 6) if args.quick else (args.adapters, args.layers, args.peft_path_at)
    )
    if not 1 <= peft_path_at < adapters - 1:
        parser.error("--peft-path-at: between 1 and the adapters minus 2")
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-scale-") as scratch:
        report = run(adapters, layers, peft_path_at, Path(scratch), 4 if args.quick else 30)
    print(summary(report))
    if not args.quick:
        (ROOT / "benches" / "scale.json").write_text(json.dumps(report, indent=1) + "\n")
        plot(report, ROOT / "docs" / "scale.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
