"""Which loads the fast path may take: an allow-list, so that anything new goes through PEFT.

The fast path reproduces PEFT's `load_adapter` for what the differential tests verified: the
LoraConfig fields below with the values listed, the options below, on the versions in
`boundary.VERIFIED`. A field this list does not know (a new PEFT release adds one), a value outside
it, an option or a model state it was not verified for: PEFT's loader runs, and the result's
`reason` names the field, option or version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex

# PEFT condenses target lists this long against the whole model's names (inner modules included).
PEFT_CONDENSES_TARGETS = 20
_PLAIN_INITS = (True, False, "gaussian")


def _anything(_value: Any) -> bool:
    return True


def _unset(value: Any) -> bool:
    return value is None or value == {} or value == [] or value is False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, (list, set, tuple)) and all(isinstance(item, str) for item in value)


def _targets(value: Any) -> bool:
    if isinstance(value, str):
        return value != "all-linear"
    return _strings(value) and 0 < len(value) < PEFT_CONDENSES_TARGETS


# field -> (accepted?, what is accepted): every LoraConfig field of the verified PEFT releases
ALLOWED: dict[str, tuple[Callable[[Any], bool], str]] = {
    # bookkeeping PEFT keeps in the config and does not read while loading
    "task_type": (_anything, "any"),
    "peft_type": (lambda v: v == boundary.LORA, "LORA"),
    "auto_mapping": (_anything, "any"),
    "peft_version": (_anything, "any"),
    "base_model_name_or_path": (_anything, "any"),
    "revision": (_anything, "any"),
    "inference_mode": (_anything, "any (set from is_trainable)"),
    # what the fast path reproduces
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "target_modules": (_targets, f"an expression, or fewer than {PEFT_CONDENSES_TARGETS} names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _strings(v), "None, a str or names"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fan_in_fan_out": (lambda v: v is False, "False"),
    "bias": (lambda v: v == "none", '"none"'),
    "use_rslora": (lambda v: isinstance(v, bool), "a bool"),
    "modules_to_save": (_unset, "unset"),
    "init_lora_weights": (lambda v: any(v is p or v == p for p in _PLAIN_INITS), "True, False or 'gaussian'"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or isinstance(v, list), "None, an int or ints"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _strings(v), "None, a str or strs"),
    "rank_pattern": (lambda v: isinstance(v, dict), "a dict"),
    "alpha_pattern": (lambda v: isinstance(v, dict), "a dict"),
    "use_dora": (lambda v: isinstance(v, bool), "a bool"),
    "lora_bias": (lambda v: isinstance(v, bool), "a bool"),
    "runtime_config": (lambda v: not getattr(v, "ephemeral_gpu_offload", True), "no ephemeral GPU offload"),
    # features the fast path leaves to PEFT: accepted only unset
    **{
        field: (_unset, "unset")
        for field in (
            "megatron_config",
            "trainable_token_indices",
            "loftq_config",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "velora_config",
            "alora_invocation_tokens",
            "use_qalora",
            "monteclora_config",
            "layer_replication",
            "target_parameters",
            "use_bdlora",
            "arrow_config",
            "kasa_config",
            "ensure_weight_tying",
        )
    },
    # read only together with a feature above
    "megatron_core": (_anything, "any"),
    "qalora_group_size": (_anything, "any"),
}

_AUXILIARY = "modules_to_save and trainable tokens are handled by PEFT's auxiliary wrappers"
# Clearer words for the common refusals.
_WHY = {
    "peft_type": "the fast path covers LoRA (with DoRA, rsLoRA); this is {value}",
    "modules_to_save": _AUXILIARY,
    "trainable_token_indices": _AUXILIARY,
    "target_modules": "target_modules={value!r} is resolved by PEFT from the whole model",
    "init_lora_weights": "init_lora_weights={value!r} may change the base weights",
    "bias": "bias={value!r}: PEFT re-marks biases across the whole model",
}


def config_refusal(config: Any) -> str | None:
    """Why the fast path does not reproduce this config exactly, or None."""
    if not dataclasses.is_dataclass(config):
        return f"the config is a {type(config).__name__}, not a PEFT config"
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        rule = ALLOWED.get(field.name)
        if rule is None:
            return f"{type(config).__name__}.{field.name} is not a field the fast path was verified with"
        accepted, wanted = rule
        if not accepted(value):
            shown = getattr(value, "value", value)  # PeftType: its name
            why = _WHY.get(field.name)
            if why is not None:
                return why.format(value=shown)
            return f"{field.name}={shown!r} is not on the fast path's list (it takes {wanted})"
    return None


def options_refusal(*, torch_device: Any) -> str | None:
    """Options the fast path leaves to PEFT. (`low_cpu_mem_usage` is decided per target by the plan:
    it is exact when every target's base weight is fp32; `is_trainable` and
    `autocast_adapter_dtype` are reproduced.)"""
    if torch_device is not None:
        return f"torch_device={torch_device!r} is honoured by PEFT's loader"
    return None


def model_refusal(peft_model: Any, adapter_name: str, index: ModelIndex) -> str | None:
    """Why the model's state keeps this load from the fast path, or None."""
    tuner = peft_model.base_model
    if type(tuner) is not boundary.LoraModel:
        return f"the model's tuner is {type(tuner).__name__}, not LoraModel"
    if adapter_name in peft_model.peft_config:
        return f"the model already has an adapter named {adapter_name!r}: PEFT's loader replaces its weights"
    if not index.layers:
        return "the model has no adapter layers yet (PEFT freezes the base model on the first injection)"
    if "." in adapter_name or adapter_name in index.segments:
        return (
            f"the adapter name {adapter_name!r} is also a segment of the model's parameter names, "
            "which changes how PEFT restores their requires_grad"
        )
    if index.auxiliary:
        return _AUXILIARY
    active = tuner.active_adapters
    if any(getattr(peft_model.peft_config.get(name), "bias", "none") != "none" for name in active):
        return "an active adapter trains biases, which PEFT re-marks across the whole model"
    if getattr(peft_model, "hf_device_map", None) is not None:
        return "the model is dispatched with a device map"
    if any(layer.merged for layer in index.layers.values()):
        return "the model has merged adapter layers"
    model_type = getattr(getattr(tuner.model, "config", None), "model_type", None)
    if model_type is not None and boundary.get_checkpoint_conversion_mapping(model_type) is not None:
        return f"transformers converts {model_type} adapters between v4 and v5"
    return None
