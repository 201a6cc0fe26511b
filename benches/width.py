"""`make bench-width`: one LoRA adapter at a realistic width against the floor of reading it.

    python -m benches.width [--layers 2] [--rounds 5]

The shape is issue 18's: a Llama with hidden size 4096, intermediate 14336, 8 key-value heads, a
bf16 base, LoRA r=16 on q, k, v, o, gate, up, down. Measured in one run, medians of rounds:
- the floor: reading the adapter file (`safetensors.torch.load_file`) and copying every tensor into
  fp32 storage of its own (what PEFT's autocast leaves in the model);
- `fastkeys.peft.load_adapter` of the adapter into a model that holds a first one (then deleted
  again with `fastkeys.peft.delete_adapters`, outside the timing);
- PEFT's `load_adapter` of the same, likewise.

Then the memory: 24 more adapters loaded by each loader into its model, the resident memory they
take against their tensors' bytes (target: within 1.3x), and what `delete_adapters` gives back.

Writes benches/width.json and docs/width.png and prints the ratios to the floor (target: fastkeys
<= 2x).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benches.adapters import MODULES, machine, pyplot
from benches.scale import resident_bytes, tensor_bytes

ROOT = Path(__file__).resolve().parent.parent


def base_model(layers: int) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=64,
    )
    with torch.device("meta"):
        model: Any = LlamaForCausalLM(config)
    # values do not matter here: real storage, filled cheaply
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model.eval()


def run(layers: int, rounds: int, scratch: Path) -> dict[str, Any]:
    import warnings

    import peft
    import torch
    from safetensors.torch import load_file

    import fastkeys.peft

    warnings.simplefilter("ignore")
    config = peft.LoraConfig(r=16, target_modules=MODULES)
    trained = peft.get_peft_model(base_model(layers), config)
    paths = []
    for index in range(2):
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for parameter in trained.parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.01)
        trained.save_pretrained(str(scratch / f"adapter-{index}"))
        paths.append(scratch / f"adapter-{index}")
    del trained
    file = paths[1] / "adapter_model.safetensors"

    def floor() -> None:  # the tensors in fp32 storage of their own: one read, one copy with the cast
        for tensor in load_file(str(file)).values():
            tensor.to(torch.float32, copy=True)

    models = {
        "peft": peft.PeftModel.from_pretrained(base_model(layers), paths[0], "first"),
        "fastkeys": peft.PeftModel.from_pretrained(base_model(layers), paths[0], "first"),
    }

    def peft_load() -> None:
        models["peft"].load_adapter(paths[1], "second")

    def fastkeys_load() -> None:
        result = fastkeys.peft.load_adapter(models["fastkeys"], paths[1], "second")
        if result.loader != "fastkeys":
            raise SystemExit(f"the load went to PEFT: {result.reason}")

    seconds: dict[str, list[float]] = {"floor": [], "fastkeys": [], "peft": []}
    for _ in range(rounds):
        for label, call in (("floor", floor), ("fastkeys", fastkeys_load), ("peft", peft_load)):
            gc.collect()
            started = time.perf_counter()
            call()
            seconds[label].append(time.perf_counter() - started)
            if label != "floor":
                fastkeys.peft.delete_adapters(models[label], ["second"])
    medians = {label: statistics.median(times) for label, times in seconds.items()}
    held = {label: memory(label, model, paths[1], adapters=24) for label, model in models.items()}
    return {
        "machine": machine(),
        "shape": {"layers": layers, "hidden": 4096, "intermediate": 14336, "rank": 16, "modules": MODULES},
        "adapter_bytes": file.stat().st_size,
        "seconds": seconds,
        "median_s": medians,
        "fastkeys_over_floor": medians["fastkeys"] / medians["floor"],
        "peft_over_floor": medians["peft"] / medians["floor"],
        "memory": held,
    }


def memory(loader: str, model: Any, path: Path, adapters: int) -> dict[str, Any] | None:
    """The resident memory `adapters` more adapters take in `model` when `loader` loads them, against
    their tensors' bytes, and what `delete_adapters` gives back."""
    import fastkeys.peft

    names = [f"held-{index}" for index in range(adapters)]
    before = resident_bytes()
    for name in names:
        if loader == "peft":
            model.load_adapter(path, name)
        else:
            fastkeys.peft.load_adapter(model, path, name)
    loaded = resident_bytes()
    tensors = tensor_bytes(p for n, p in model.named_parameters() if any(f".{name}." in n for name in names))
    fastkeys.peft.delete_adapters(model, names)
    deleted = resident_bytes()
    if before is None or loaded is None or deleted is None:
        return None
    return {
        "adapters": adapters,
        "tensor_bytes": tensors,
        "held_over_tensors": (loaded - before) / tensors,
        "given_back": (loaded - deleted) / (loaded - before),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    labels = {
        "floor": "read + cast (floor)",
        "fastkeys": "fastkeys.peft.load_adapter",
        "peft": "PEFT load_adapter",
    }
    medians = report["median_s"]
    figure, axes = plt.subplots(figsize=(7, 4))
    bars = axes.barh(
        [labels[k] for k in labels], [medians[k] * 1e3 for k in labels], color=["grey", "C1", "C0"]
    )
    axes.bar_label(
        bars, [f"{medians[k] * 1e3:.1f} ms ({medians[k] / medians['floor']:.1f}x)" for k in labels]
    )
    axes.invert_yaxis()
    axes.set_xlabel("one adapter, median (ms)")
    shape = report["shape"]
    axes.set_title(
        f"LoRA r={shape['rank']}, hidden {shape['hidden']}, {shape['layers']} layers "
        f"({report['adapter_bytes'] / 2**20:.1f} MiB)"
    )
    axes.set_xlim(right=max(medians.values()) * 1e3 * 1.35)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fastkeys-bench-width-") as scratch:
        report = run(args.layers, args.rounds, Path(scratch))
    medians = report["median_s"]
    print(
        f"{args.layers} layers, {report['adapter_bytes'] / 2**20:.1f} MiB adapter: floor "
        f"{medians['floor'] * 1e3:.1f} ms, fastkeys {medians['fastkeys'] * 1e3:.1f} ms "
        f"({report['fastkeys_over_floor']:.1f}x the floor), PEFT {medians['peft'] * 1e3:.1f} ms "
        f"({report['peft_over_floor']:.1f}x)"
    )
    for loader, held in report["memory"].items():
        if held:
            print(
                f"{loader}: {held['adapters']} adapters hold {held['held_over_tensors']:.2f}x their tensors' "
                f"bytes; delete_adapters gives back {held['given_back']:.0%}"
            )
    (ROOT / "benches" / "width.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, ROOT / "docs" / "width.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
