"""Loading many adapters of each family the fast path covers besides plain LoRA (LoRA with
`modules_to_save=["lm_head"]`, LoRA with trainable tokens, LoHa, LoKr, IA3, HRA, OFT), PEFT's
`load_adapter` loop against `fastkeys.peft.load_adapters`, in one run; for the families named
`transformers_*` (LoRA, LoHa), transformers' own loop (`model.load_adapter(path, adapter_name=...)`
on the LlamaForCausalLM itself) against `fastkeys.transformers.load_adapters`; and for the families
named `diffusers_*`, diffusers' own loop (`model.load_lora_adapter(path, adapter_name=...)`) on an
SD3 transformer of the same depth and width against `fastkeys.diffusers.load_adapters`: LoRA files
as diffusers' `save_lora_adapter` writes them (`diffusers_lora`), and the same files without their
`lora_adapter_metadata` (`diffusers_lora_bare`: diffusers reads the config off the tensors, a list
of every targeted module, which PEFT condenses on each load), as older trainers wrote them.

    python -m benches.methods [--adapters 16] [--layers 16] [--methods loha,lokr,ia3,hra,oft] [--quick]

The model is benches/adapters.py's Llama shape (hidden size 64) with 16 layers; every method
targets q, k, v, o, gate, up and down (LoHa, LoKr and HRA r=4; IA3 with down as its feedforward
module; OFT with blocks of 16). The SD3 transformer (hidden size 64, 4 heads) has LoRA r=4 on
its eight attention projections per layer.
Per method, both models start from the same first adapter (`PeftModel.from_pretrained`); then each
further adapter goes into PEFT's model and into fastkeys' model in turn (interleaved, so a busy
machine slows both alike), and each load's wall time is recorded. At the end the two models must be
identical (state_dict bitwise, requires_grad, training flags) and every fastkeys load must have
taken the fast path, or the run fails. A cProfile of one more fastkeys load, after the comparison,
says where its time goes.

Writes benches/methods.json (not with --quick) and prints a summary.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benches.adapters import MODULES, assert_identical, base_model, machine, progress, save_adapters, timed

ROOT = Path(__file__).resolve().parent.parent


def configs() -> dict[str, Callable[[], Any]]:
    import peft

    return {
        # the seed scenario's adapters: LoRA with lm_head saved whole (modules_to_save)
        "lora_lm_head": lambda: peft.LoraConfig(r=4, target_modules=MODULES, modules_to_save=["lm_head"]),
        # ... and with new-token deltas (trainable_token_indices on the input embeddings)
        "lora_tokens": lambda: peft.LoraConfig(
            r=4, target_modules=MODULES, trainable_token_indices=[1, 2, 3]
        ),
        "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=MODULES),
        "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=MODULES),
        "ia3": lambda: peft.IA3Config(target_modules=MODULES, feedforward_modules=["down_proj"]),
        "hra": lambda: peft.HRAConfig(r=4, target_modules=MODULES),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=MODULES),
        "transformers_lora": lambda: peft.LoraConfig(r=4, target_modules=MODULES),
        "transformers_loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=MODULES),
        "diffusers_lora": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=SD3_MODULES),
        "diffusers_lora_bare": lambda: peft.LoraConfig(r=4, lora_alpha=4, target_modules=SD3_MODULES),
    }


SD3_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
SD3_FILE = "pytorch_lora_weights.safetensors"


def sd3_model(layers: int) -> Any:
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(  # type: ignore[no-untyped-call]
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )


def save_sd3_adapters(directory: Path, layers: int, count: int, config: Any, bare: bool) -> list[Path]:
    """`count` distinct LoRA files for `sd3_model(layers)` (seeded values), as diffusers'
    `save_lora_adapter` writes them; `bare`: without their `lora_adapter_metadata`."""
    import torch
    from safetensors.torch import load_file, save_file

    model = sd3_model(layers)
    model.add_adapter(config)
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if ".lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        path = directory / f"adapter{index}"
        model.save_lora_adapter(path, weight_name=SD3_FILE)
        if bare:
            save_file(load_file(path / SD3_FILE), path / SD3_FILE, metadata={"format": "pt"})
        paths.append(path)
    return paths


class _Loop:
    """One library's loop and fastkeys' for a family: the first load and each later one."""

    def __init__(self, method: str) -> None:
        import peft
        import transformers

        import fastkeys.diffusers
        import fastkeys.peft
        import fastkeys.transformers

        self.first: Callable[[Any, Path], Any]
        self.reference: Callable[[Any, Path, str], Any]
        self.ours: Callable[..., dict[str, Any]]
        self.base: Callable[[int], Any] = base_model
        self.save: Callable[[Path, int, int, Any], list[Path]] = save_adapters
        self.library = method.split("_")[0] if method.startswith(("transformers_", "diffusers_")) else "peft"
        if self.library == "diffusers":
            import diffusers

            diffusers.utils.logging.set_verbosity_error()  # its per-load warning about other adapters
            bare = method == "diffusers_lora_bare"
            self.base = sd3_model
            self.save = lambda directory, layers, count, config: save_sd3_adapters(
                directory, layers, count, config, bare
            )

            def load(model: Any, path: Path, name: str) -> Any:
                return model.load_lora_adapter(
                    str(path), adapter_name=name, prefix=None, weight_name=SD3_FILE
                )

            self.first = lambda model, path: (load(model, path, "a0"), model)[1]
            self.reference = load
            self.ours = functools.partial(fastkeys.diffusers.load_adapters, prefix=None)
        elif self.library == "transformers":
            # the LOAD REPORT transformers logs on every load (other adapters' tensors as MISSING)
            # is not printed, nor its progress bar: its loop is timed without them
            transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
            transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
            self.first = lambda model, path: (model.load_adapter(str(path), adapter_name="a0"), model)[1]
            self.reference = lambda model, path, name: model.load_adapter(str(path), adapter_name=name)
            self.ours = fastkeys.transformers.load_adapters
        else:
            self.first = lambda model, path: peft.PeftModel.from_pretrained(model, path, "a0")
            self.reference = lambda model, path, name: model.load_adapter(path, name)
            self.ours = fastkeys.peft.load_adapters


def _profiled(profile: cProfile.Profile, function: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        profile.enable()
        try:
            return function(*args, **kwargs)
        finally:
            profile.disable()

    return call


def run_method(method: str, adapters: int, layers: int, scratch: Path) -> dict[str, Any]:
    loop = _Loop(method)
    paths = loop.save(scratch / method, layers, min(adapters + 1, 8), configs()[method]())

    def path(index: int) -> Path:
        return paths[index % len(paths)]

    reference = loop.first(loop.base(layers), path(0))
    ours = loop.first(loop.base(layers), path(0))
    per_adapter: dict[str, list[float]] = {"peft": [], "fastkeys": []}  # "peft": the library's loop
    loaders: dict[str, int] = {}
    reasons: set[str] = set()
    profile = cProfile.Profile()
    for index in range(1, adapters + 1):
        name = f"a{index}"
        seconds, _result = timed(loop.reference, reference, path(index), name)
        per_adapter["peft"].append(seconds)
        seconds, results = timed(loop.ours, ours, {name: path(index)}, progress=False)
        per_adapter["fastkeys"].append(seconds)
        loaders[results[name].loader] = loaders.get(results[name].loader, 0) + 1
        if results[name].reason:
            reasons.add(results[name].reason)
        progress(
            f"{method}: {index}/{adapters} loaded: {loop.library} {per_adapter['peft'][-1] * 1e3:8.1f} ms, "
            f"fastkeys {seconds * 1e3:6.1f} ms",
        )
    print(file=sys.stderr)
    assert_identical(reference, ours)
    if loaders != {"fastkeys": adapters}:
        raise SystemExit(f"{method}: not every load took the fast path: {loaders} {sorted(reasons)}")
    # one more load, profiled, after the comparison (its time is not in the totals)
    _profiled(profile, loop.ours)(ours, {"profiled": path(adapters + 1)}, progress=False)
    stats = pstats.Stats(profile)
    top = sorted(stats.stats.items(), key=lambda item: -item[1][3])  # type: ignore[attr-defined]
    where = [
        {"function": f"{Path(key[0]).name}:{key[1]}({key[2]})", "cumulative_s": round(row[3], 5)}
        for key, row in top[:15]
    ]
    peft_total, ours_total = sum(per_adapter["peft"]), sum(per_adapter["fastkeys"])
    tensors = sum(1 for key in ours.state_dict() if key.endswith(".a0") or ".a0." in key)
    return {
        "loop": loop.library,
        "tensors_per_adapter": tensors,
        "per_adapter_s": per_adapter,
        "loaders": loaders,
        "total_s": {"peft": peft_total, "fastkeys": ours_total},
        "speedup_total": peft_total / ours_total,
        # the first 16 loads of the same run: the figure at 16 adapters
        "speedup_first_16": sum(per_adapter["peft"][:16]) / sum(per_adapter["fastkeys"][:16]),
        "median_s": {name: statistics.median(times) for name, times in per_adapter.items()},
        "profile_last_load": where,
    }


def run(methods: list[str], adapters: int, layers: int, scratch: Path) -> dict[str, Any]:
    import warnings

    warnings.simplefilter("ignore")
    report: dict[str, Any] = {
        "machine": machine(),
        "shape": {"layers": layers, "hidden": 64, "modules": MODULES},
        "adapters_after_the_first": adapters,
        "methods": {},
    }
    for method in methods:
        report["methods"][method] = run_method(method, adapters, layers, scratch)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=16, help="adapters after the first (default 16)")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (default 16)")
    parser.add_argument("--methods", default=",".join(configs()), help="comma-separated (default all)")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 4 adapters, 4 layers, no files written"
    )
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(configs()))
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    adapters, layers = (4, 4) if args.quick else (args.adapters, args.layers)
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-methods-") as scratch:
        report = run(methods, adapters, layers, Path(scratch))
    for method, result in report["methods"].items():
        totals = result["total_s"]
        print(
            f"{method}: {adapters} adapters after the first, {layers} layers, "
            f"{result['tensors_per_adapter']} tensors each: {result['loop']} {totals['peft']:.2f} s, "
            f"fastkeys {totals['fastkeys']:.2f} s ({result['speedup_total']:.1f}x less; "
            f"{result['speedup_first_16']:.1f}x over the first 16); "
            f"median load {result['loop']} {result['median_s']['peft'] * 1e3:.0f} ms, "
            f"fastkeys {result['median_s']['fastkeys'] * 1e3:.0f} ms"
        )
    print(f"load average at the end: {report['machine']['load_average_at_end']}")
    if not args.quick:
        path = ROOT / "benches" / "methods.json"
        if path.exists():  # a run of some families keeps the others' results
            kept = json.loads(path.read_text())
            if kept.get("adapters_after_the_first") == adapters:
                report["methods"] = {**kept["methods"], **report["methods"]}
        path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
