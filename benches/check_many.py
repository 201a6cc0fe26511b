"""`fastkeys check` on many adapters against one base: what the user waits for, and where it goes.

    python -m benches.check_many [--adapters 1000] [--layers 32] [--rounds 3]

Writes a Llama-shaped base (32 layers, real module names, small widths: only headers matter for
the name and shape checks) and N LoRA adapters on q, k, v, o, gate, up and down (448 tensors
each) into a temporary directory, then times, interleaved round by round (median):

- the whole command, `fastkeys check BASE A1 ... AN` (and with `--values`) in a fresh process,
  under the Rust core and under the pure-Python fallback;
- in-process: `check_many(base, [all adapters])` against one `check_base` call per adapter, and
  against a loop over `safetensors.safe_open` that only collects every adapter's names and
  shapes (the floor for any Python tool that reads the headers; it checks nothing);
- with values: against `safetensors.torch.load_file` + torch's own zero and isfinite tests.

Then a profile of the in-process call says where the time goes. Results go to stdout (the
figures in docs/preflight.md come from here).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from benches import suite as bench
from fastkeys import IMPLEMENTATION, check_base, check_many, scan

MODULES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (16, 64),
    "self_attn.v_proj": (16, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}
RANK = 8


def write_base(directory: Path, layers: int) -> Path:
    directory.mkdir(parents=True)
    tensors: dict[str, np.ndarray[Any, Any]] = {"model.embed_tokens.weight": np.zeros((256, 64), np.float16)}
    for layer in range(layers):
        for module, shape in MODULES.items():
            tensors[f"model.layers.{layer}.{module}.weight"] = np.zeros(shape, np.float16)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.zeros(64, np.float16)
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def write_adapters(root: Path, count: int, layers: int, distinct: bool = False) -> list[str]:
    rng = np.random.default_rng(0)
    template = {}
    for layer in range(layers):
        for module, (out, inp) in MODULES.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            template[f"{key}.lora_A.weight"] = rng.standard_normal((RANK, inp)).astype(np.float16)
            template[f"{key}.lora_B.weight"] = rng.standard_normal((out, RANK)).astype(np.float16)
    config = {
        "peft_type": "LORA",
        "r": RANK,
        "target_modules": sorted(m.rsplit(".", 1)[1] for m in MODULES),
    }
    paths = []
    for i in range(count):
        directory = root / f"adapter-{i:04d}"
        directory.mkdir()
        tensors, adapter_config = template, config
        if distinct:  # each adapter on its own subset of layers: no two share names
            bits = (i * 2654435761 + 12345) % (1 << layers) or 1
            chosen = [layer for layer in range(layers) if bits >> layer & 1]
            tensors = {k: v for k, v in template.items() if int(k.split(".")[4]) in chosen}
            adapter_config = {**config, "layers_to_transform": chosen}
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
        paths.append(str(directory))
    return paths


def cli(implementation: str, base: str, adapters: list[str], *extra: str) -> int:
    env = {**os.environ, "FASTKEYS_IMPLEMENTATION": implementation}
    done = subprocess.run(
        [sys.executable, "-m", "fastkeys", "check", *extra, base, *adapters],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"fastkeys check failed ({done.returncode}): {done.stderr.decode()[-500:]}")
    return done.returncode


def safe_open_headers(adapters: list[str]) -> int:
    from safetensors import safe_open

    count = 0
    for adapter in adapters:
        with safe_open(os.path.join(adapter, "adapter_model.safetensors"), "np") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                handle.get_slice(name).get_shape()
                count += 1
    return count


def torch_values(adapters: list[str]) -> int:
    import torch
    from safetensors.torch import load_file

    flagged = 0
    for adapter in adapters:
        for tensor in load_file(os.path.join(adapter, "adapter_model.safetensors")).values():
            flagged += bool((tensor == 0).all()) + bool((~torch.isfinite(tensor)).any())
    return flagged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--distinct", action="store_true", help="every adapter on its own subset of layers (no two alike)"
    )
    parser.add_argument(
        "--rust-only", action="store_true", help="only the Rust contenders (no fallback, no torch loop)"
    )
    args = parser.parse_args()
    if IMPLEMENTATION != "rust":
        raise SystemExit("build the extension first (make build): the in-process figures are for it")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        base = str(write_base(root / "base", args.layers))
        adapters = write_adapters(root, args.adapters, args.layers, args.distinct)
        print(f"wrote {len(adapters)} adapters in {time.perf_counter() - start:.1f} s")
        size = sum(os.path.getsize(os.path.join(a, "adapter_model.safetensors")) for a in adapters)
        base_ckpt = scan(base)
        n = len(adapters)
        contenders: dict[str, Any] = {
            f"fastkeys check BASE <{n} adapters> (rust)": lambda: cli("rust", base, adapters),
            f"fastkeys check BASE <{n} adapters> (python)": lambda: cli("python", base, adapters),
            f"fastkeys check --values BASE <{n}> (rust)": lambda: cli("rust", base, adapters, "--values"),
            f"fastkeys check --values BASE <{n}> (python)": lambda: cli("python", base, adapters, "--values"),
            "in-process check_many(base, list) (rust)": lambda: check_many(base_ckpt, adapters),
            "in-process, one check_base call per adapter": lambda: [
                check_base(base_ckpt, a) for a in adapters
            ],
            "safe_open loop: names and shapes only": lambda: safe_open_headers(adapters),
            "in-process check_many(values=True) (rust)": lambda: check_many(base_ckpt, adapters, values=True),
            "load_file + torch zero/isfinite per tensor": lambda: torch_values(adapters),
        }
        if args.rust_only:
            contenders = {k: v for k, v in contenders.items() if "python" not in k and "torch" not in k}
        seconds, answers = bench._measure(contenders, args.rounds)
        assert all(check == [] for check in answers["in-process check_many(base, list) (rust)"])
        machine = bench._machine()
        print(
            f"\n{n} {'distinct ' if args.distinct else ''}LoRA adapters "
            f"(up to {len(MODULES) * 2 * args.layers} tensors each, "
            f"{size / 1e6:.0f} MB in all) against a {args.layers}-layer base; "
            f"{machine['cpu']}, {machine['cores']} cores, "
            f"Python {machine['python']}; median of {args.rounds} interleaved rounds\n"
        )
        reference = seconds["in-process check_many(base, list) (rust)"]
        for label, taken in seconds.items():
            print(
                f"  {label:<48} {taken:8.2f} s  {taken * 1e3 / n:7.2f} ms/adapter  {taken / reference:6.2f}x"
            )
        profile = cProfile.Profile()
        profile.enable()
        check_many(base_ckpt, adapters)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(8)
        print("\nwhere check_many(base, list) spends its time (cProfile, tottime):")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:3000])


if __name__ == "__main__":
    main()
