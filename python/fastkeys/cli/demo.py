"""Synthetic but realistic key sets (no downloads), and PEFT's own filter as the reference.

Used by `fastkeys demo`, the benchmarks and the tests (`fixtures.peft_filters` holds the copy of
PEFT's `from_pretrained` filter that only the tests and docs need). Key shapes follow a Llama model wrapped by
PEFT: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.{adapter}.weight`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = [
    "PROJECTIONS",
    "adapter_keys",
    "base_keys",
    "model_keys",
    "peft_substring_filter",
]

PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def base_keys(layers: int) -> list[str]:
    """The base model's own keys as a PEFT-wrapped model reports them."""
    keys = ["base_model.model.model.embed_tokens.weight"]
    for i in range(layers):
        layer = f"base_model.model.model.layers.{i}"
        keys += [f"{layer}.{projection}.base_layer.weight" for projection in PROJECTIONS]
        keys += [f"{layer}.input_layernorm.weight", f"{layer}.post_attention_layernorm.weight"]
    keys += ["base_model.model.model.norm.weight", "base_model.model.lm_head.weight"]
    return keys


def adapter_keys(layers: int, adapter_name: str) -> list[str]:
    """One LoRA adapter's keys on every linear layer."""
    return [
        f"base_model.model.model.layers.{i}.{projection}.lora_{ab}.{adapter_name}.weight"
        for i in range(layers)
        for projection in PROJECTIONS
        for ab in "AB"
    ]


def model_keys(layers: int, adapter_names: Iterable[str]) -> list[str]:
    """Every key of a model with these adapters loaded, in state-dict order."""
    keys = base_keys(layers)
    for name in adapter_names:
        keys += adapter_keys(layers, name)
    return keys


def peft_substring_filter(
    missing_keys: Sequence[str], adapter_name: str, tuner_prefix: str, tuner: str = "LORA"
) -> list[str]:
    """A faithful copy of the loop in PEFT 0.21's `PeftModel.load_adapter`."""
    adapter_missing_keys = []
    for key in missing_keys:
        if tuner_prefix in key and adapter_name in key:
            if ".tinylora_v." in key:
                continue
            if (
                tuner == "UNILORA"
                and ".unilora_theta_d." in key
                and not key.startswith("base_model.unilora_theta_d.")
            ):
                continue
            adapter_missing_keys.append(key)
    return adapter_missing_keys
