"""Tiny real models and adapters for the integration tests (no hub: built from configs)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

VOCAB = 64
RESIZED_VOCAB = 72
QV = ["q_proj", "v_proj"]


def tiny_llama(resized: bool = False, hidden_size: int = 32) -> Any:
    """A 2-layer Llama built from a config (seeded); `resized` grows the vocabulary afterwards."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden_size,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    if resized:
        model.resize_token_embeddings(RESIZED_VOCAB, mean_resizing=False)
    return model


def tiny_bert() -> Any:
    torch.manual_seed(0)
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            num_labels=3,  # type: ignore[call-arg]  # a PretrainedConfig keyword
        )
    )


# Every PEFT method that can be built on the tiny causal LM: name -> config factory.
METHOD_CONFIGS: dict[str, Callable[[], Any]] = {
    "lora": lambda: peft.LoraConfig(r=4, target_modules=QV),
    "dora": lambda: peft.LoraConfig(r=4, target_modules=QV, use_dora=True),
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=QV),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=QV),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=QV),
    "ia3": lambda: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=QV),
    "pvera": lambda: peft.PveraConfig(r=4, target_modules=QV),
    "randlora": lambda: peft.RandLoraConfig(r=4, target_modules=QV),
    "vblora": lambda: peft.VBLoRAConfig(r=4, vector_length=8, num_vectors=16, target_modules=QV),
    "boft": lambda: peft.BOFTConfig(boft_block_size=8, target_modules=QV),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV),
    "hra": lambda: peft.HRAConfig(r=4, target_modules=QV),
    "c3a": lambda: peft.C3AConfig(block_size=8, target_modules=QV),
    "fourierft": lambda: peft.FourierFTConfig(n_frequency=16, target_modules=QV),
    "waveft": lambda: peft.WaveFTConfig(n_frequency=16, target_modules=QV),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=QV),
    "delora": lambda: peft.DeloraConfig(r=4, target_modules=QV),
    "gralora": lambda: peft.GraloraConfig(r=4, gralora_k=2, target_modules=QV),
    "road": lambda: peft.RoadConfig(group_size=8, target_modules=QV),
    "miss": lambda: peft.MissConfig(r=4, target_modules=QV),
    "hira": lambda: peft.HiraConfig(r=4, target_modules=QV),
    "tinylora": lambda: peft.TinyLoraConfig(target_modules=QV),
    "unilora": lambda: peft.UniLoraConfig(target_modules=QV),
    "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm"]),
    "trainable_tokens": lambda: peft.TrainableTokensConfig(
        target_modules=["embed_tokens"], token_indices=[0, 1, 2]
    ),
    "lora+modules_to_save": lambda: peft.LoraConfig(r=4, target_modules=QV, modules_to_save=["model.norm"]),
    "lora+trainable_token_indices": lambda: peft.LoraConfig(
        r=4, target_modules=QV, trainable_token_indices=[0, 1]
    ),
}


TRICKY_NAMES = ["foo", "foobar", "default_1", "default_10", "model", "1", "mlp", "lora", "ädäpter"]


def tricky_lora_config() -> Any:
    """LoRA on attention and MLP, so that an adapter called `mlp` meets module names too."""
    return peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"])


def save_adapter(config: Any, directory: Path, model_factory: Callable[[], Any] = tiny_llama) -> Path:
    """Trains nothing: wraps a fresh model, perturbs the adapter so it is not at its init, saves."""
    model = peft.get_peft_model(model_factory(), config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.01)
    model.save_pretrained(directory)
    return directory


def checkpoint_keys(directory: Path) -> list[str]:
    return list(load_file(directory / "adapter_model.safetensors"))


def without(directory: Path, key: str, target: Path) -> Path:
    """A copy of the saved adapter at `target` that lost the tensor `key`."""
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(directory):
        if name != "adapter_model.safetensors":
            shutil.copy(directory / name, target / name)
    tensors = load_file(directory / "adapter_model.safetensors")
    del tensors[key]
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    return target


def peft_type_of(directory: Path) -> str:
    return str(json.loads((directory / "adapter_config.json").read_text())["peft_type"])


def raw_load(directory: Path, adapter_name: str, existing: dict[str, Path]) -> tuple[list[str], Any]:
    """Loads `directory` as `adapter_name` through fastkeys.peft.load_adapter into a resized model
    that already holds the `existing` adapters; returns (fastkeys' missing keys, torch's raw result)."""
    import fastkeys.peft

    names = iter(existing.items())
    first_name, first_dir = next(names)
    model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), first_dir, first_name)
    for name, path in names:
        model.load_adapter(path, name)
    with fastkeys.peft._raw_results() as records:
        verdict = fastkeys.peft.load_adapter(model, str(directory), adapter_name)
    raw = records[-1]
    assert verdict.loader == "peft" and verdict.unexpected_keys == raw.unexpected_keys
    return list(verdict.missing_keys), raw


def pretrained_load(directory: Path, adapter_name: str) -> tuple[list[str], Any]:
    """Loads through fastkeys.peft.from_pretrained into a fresh resized model; returns (the keys its
    MissingAdapterKeysWarning names, or [] without one; torch's raw result)."""
    import warnings

    import fastkeys
    import fastkeys.peft

    with warnings.catch_warnings(record=True) as caught, fastkeys.peft._raw_results() as records:
        warnings.simplefilter("always")
        fastkeys.peft.from_pretrained(tiny_llama(resized=True), str(directory), adapter_name)
    ours = [w.message for w in caught if isinstance(w.message, fastkeys.MissingAdapterKeysWarning)]
    assert len(ours) <= 1, "at most one warning per load"
    assert not [w for w in caught if "Found missing adapter keys" in str(w.message)], (
        "PEFT's warning is hidden"
    )
    return (list(ours[0].missing_keys) if ours else []), records[-1]


# What PEFT 0.21 raises itself when a tensor is missing, instead of reporting a missing key:
# VeRA/PVeRA without their projections, and the auxiliary wrappers (modules_to_save, trainable
# tokens), whose load map assumes every key is present.
PEFT_REFUSALS = (
    (ValueError, "Specified to load"),
    (KeyError, "base_model.model."),
)


def load_or_refusal(load: Callable[..., Any], *args: Any) -> Any:
    """`load(*args)`, or None when PEFT refuses to load (see PEFT_REFUSALS)."""
    try:
        return load(*args)
    except (ValueError, KeyError) as error:
        assert any(isinstance(error, kind) and text in str(error) for kind, text in PEFT_REFUSALS), (
            f"unexpected failure: {error!r}"
        )
        return None


def peft_load_adapter_filter(missing: list[str], adapter_name: str, peft_type: str) -> list[str]:
    """PEFT 0.21's filter in `load_adapter` (a faithful copy, checked against PEFT in the tests)."""
    from fastkeys import scenarios, tuners

    return scenarios.peft_substring_filter(
        missing, adapter_name, tuners.METHODS[peft_type.lower()].prefix, peft_type
    )


def peft_from_pretrained_filter(missing: list[str], adapter_name: str, peft_type: str) -> list[str]:
    """PEFT 0.21's `from_pretrained`: `load_adapter`'s filter, then its `is_shared_parameter`."""
    from fastkeys import scenarios, tuners

    prefix = tuners.METHODS[peft_type.lower()].prefix
    return scenarios.peft_from_pretrained_filter(missing, adapter_name, prefix, peft_type)


def survey(directory: Path, adapter_name: str, existing: dict[str, Path], scratch: Path) -> dict[str, int]:
    """Loads the complete checkpoint, then each one-tensor-short copy, and counts how often each
    filter gives exactly the right keys (none for the complete one, the newly missing otherwise)."""
    peft_type = peft_type_of(directory)
    filters: dict[str, Callable[[Any], list[str]]] = {
        "load_adapter": lambda raw: peft_load_adapter_filter(raw.missing_keys, adapter_name, peft_type),
        "from_pretrained": lambda raw: peft_from_pretrained_filter(raw.missing_keys, adapter_name, peft_type),
    }
    verdict, complete = raw_load(directory, adapter_name, existing)
    counts = {"tensors": 0, "refused": 0, "raw_missing": len(complete.missing_keys)}
    counts["complete_fastkeys"] = len(verdict)
    for name, keep in filters.items():
        counts[f"complete_{name}"] = len(keep(complete))
        counts[f"dropped_{name}"] = 0
    counts["dropped_fastkeys"] = 0
    for index, key in enumerate(checkpoint_keys(directory)):
        counts["tensors"] += 1
        loaded = load_or_refusal(
            raw_load, without(directory, key, scratch / f"d{index}"), adapter_name, existing
        )
        if loaded is None:
            counts["refused"] += 1
            continue
        verdict, raw = loaded
        truth = set(raw.missing_keys) - set(complete.missing_keys)
        counts["dropped_fastkeys"] += set(verdict) == truth
        for name, keep in filters.items():
            counts[f"dropped_{name}"] += set(keep(raw)) == truth
    return counts


def save_seeded_adapter(
    config: Any,
    directory: Path,
    model_factory: Callable[[], Any] = tiny_llama,
    *,
    seed: int = 0,
    dtype: Any = None,
    shards: int = 1,
) -> Path:
    """Like save_adapter, with values drawn from `seed` (so adapters differ), saved in `dtype`, and
    split into `shards` files with an `adapter_model.safetensors.index.json` when shards > 1."""
    model = peft.get_peft_model(model_factory(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)
    model.save_pretrained(directory)
    file = directory / "adapter_model.safetensors"
    tensors = load_file(file)
    if dtype is not None:
        tensors = {name: tensor.to(dtype) for name, tensor in tensors.items()}
        save_file(tensors, file, metadata={"format": "pt"})
    if shards > 1:
        names = list(tensors)
        weight_map = {}
        for shard in range(shards):
            shard_name = f"adapter_model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[shard::shards]}
            save_file(part, directory / shard_name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard_name))
        file.unlink()
        index = {"metadata": {"format": "pt"}, "weight_map": weight_map}
        (directory / "adapter_model.safetensors.index.json").write_text(json.dumps(index))
    return directory
