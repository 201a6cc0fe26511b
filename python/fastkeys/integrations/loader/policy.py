"""Which loads the fast path may take: an allow-list, so that anything new goes through PEFT.

The fast path reproduces PEFT's `load_adapter` for what the differential tests verified: the
methods of `methods.py`, each with the config fields and values its record lists, the options
below, on the versions in `boundary.VERIFIED`. A method, a field this list does not know (a new
PEFT release adds one), a value outside it, an option or a model state it was not verified for:
PEFT's loader runs, and the result's `reason` names the method, field, option or version.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.methods import (
    COVERED,
    LORA,
    LORA_ALLOWED,
    Method,
    Rule,
    method_of,
)
from fastkeys.integrations.loader.saved import wrappers_refusal

__all__ = [
    "ALLOWED",
    "config_refusal",
    "model_refusal",
    "options_refusal",
    "swap_refusal",
]

# field -> (accepted?, what is accepted): every LoraConfig field of the verified PEFT releases (the
# other methods' lists are in their records, `methods.py`)
ALLOWED: dict[str, Rule] = LORA_ALLOWED

# PEFT keeps each adapter's weights in these, under the adapter's name as an attribute
_CONTAINERS = (nn.ModuleDict, nn.ParameterDict, boundary.BufferDict)
_CONTAINER_ATTRIBUTES = frozenset(name for c in _CONTAINERS for name in vars(c()))

_AUXILIARY = "modules_to_save and trainable tokens are handled by PEFT's auxiliary wrappers"
# Clearer words for the common refusals.
_WHY = {
    "peft_type": f"the fast path covers {COVERED}; this is {{value}}",
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
    method = method_of(config)
    if method is None:
        shown = getattr(config, "peft_type", None)
        return _WHY["peft_type"].format(value=getattr(shown, "value", shown))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name, None)
        rule = method.allowed.get(field.name)
        if rule is None:
            return f"{type(config).__name__}.{field.name} is not a field the fast path was verified with"
        accepted, wanted = rule
        if not accepted(value):
            shown = getattr(value, "value", value)  # PeftType: its name
            why = _WHY.get(field.name)
            if why is not None:
                return why.format(value=shown)
            return f"{field.name}={shown!r} is not on the fast path's list (it takes {wanted})"
    if type(config) is not method.config:
        return f"the config is a {type(config).__name__}, not PEFT's {method.config.__name__}"
    return None


def options_refusal(*, torch_device: Any) -> str | None:
    """Options the fast path leaves to PEFT. (`low_cpu_mem_usage` is decided per target by the plan:
    it is exact when every target's base weight is fp32; `is_trainable` and
    `autocast_adapter_dtype` are reproduced.)"""
    if torch_device is not None:
        return f"torch_device={torch_device!r} is honoured by PEFT's loader"
    return None


def model_refusal(
    peft_model: Any, adapter_name: str, index: ModelIndex, config: Any, *, wrappers: bool = True
) -> str | None:
    """Why the model's state keeps this load of `config` (a config `config_refusal` accepted) from
    the fast path, or None. `wrappers`: whether the caller reproduces PEFT's auxiliary wrappers
    (PEFT's loader does; transformers' renames their keys)."""
    method: Method | None = method_of(config)
    if method is None:
        return config_refusal(config) or "the config's method is not covered"
    if adapter_name in peft_model.peft_config:
        return swap_refusal(peft_model, adapter_name, index)
    if not index.layers:
        return "the model has no adapter layers yet (PEFT freezes the base model on the first injection)"
    if "." in adapter_name or adapter_name in index.segments:
        return (
            f"the adapter name {adapter_name!r} is also a segment of the model's parameter names, "
            "which changes how PEFT restores their requires_grad"
        )
    if adapter_name in _CONTAINER_ATTRIBUTES or any(hasattr(c, adapter_name) for c in _CONTAINERS):
        return f"the adapter name {adapter_name!r} is an attribute of torch's per-adapter containers"
    tuner = peft_model.base_model
    active = tuner.active_adapters
    if any(getattr(peft_model.peft_config.get(name), "bias", "none") != "none" for name in active):
        return "an active adapter trains biases, which PEFT re-marks across the whole model"
    return _state_refusal(peft_model, index, method, saved=wrappers and method is LORA)


def swap_refusal(peft_model: Any, adapter_name: str, index: ModelIndex) -> str | None:
    """Why loading over the existing adapter `adapter_name` (PEFT then copies the checkpoint's
    tensors into its parameters, under its existing config) is not the fast path's, or None."""
    config = peft_model.peft_config[adapter_name]
    method = method_of(config)
    if method is None or config_refusal(config) is not None:
        return f"the existing adapter {adapter_name!r} is of a method or config the fast path does not cover"
    return _state_refusal(peft_model, index, method)


def _state_refusal(peft_model: Any, index: ModelIndex, method: Method, *, saved: bool = False) -> str | None:
    """`saved`: modules_to_save wrappers are reproduced (`saved.py`: a new LoRA adapter)."""
    tuner = peft_model.base_model
    if type(tuner) is not method.tuner:
        return f"the model's tuner is {type(tuner).__name__}, not {method.tuner.__name__}"
    if index.auxiliary and not saved:
        return _AUXILIARY
    if saved and (refusal := wrappers_refusal(peft_model, index)) is not None:
        return refusal
    if index.load_hook is not None:
        return (
            f"the model's module {index.load_hook or '(root)'!r} has a load_state_dict hook or its own "
            "_load_from_state_dict, which PEFT's load_state_dict runs on the adapter's keys"
        )
    if getattr(peft_model, "hf_device_map", None) is not None:
        return "the model is dispatched with a device map"
    if any(layer.merged for layer in index.layers.values()):
        return "the model has merged adapter layers"
    if not all(isinstance(layer, method.layer) for layer in index.layers.values()):
        return f"the model holds tuner layers that are not {method.layer.__name__}s"
    model_type = getattr(getattr(tuner.model, "config", None), "model_type", None)
    if model_type is not None and boundary.get_checkpoint_conversion_mapping(model_type) is not None:
        return f"transformers converts {model_type} adapters between v4 and v5"
    return None
