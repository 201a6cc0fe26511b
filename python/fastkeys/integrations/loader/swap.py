"""Loading over an existing adapter name at the adapter's cost (a hot swap).

For a name the model already holds, PEFT's `load_adapter` reads no config and injects nothing: it
copies the checkpoint's tensors into the adapter's parameters with the whole model's
`load_state_dict` (keys renamed under the existing config's method), casts the adapter's fp16/bf16
parameters to fp32 (`_cast_adapter_dtype`) and, unless `is_trainable`, calls `eval()`. Here the
same copies go straight to the adapter's parameters, when that is verified to give the same state
(`policy.swap_refusal` for the model; here, for the checkpoint): it holds exactly the adapter's
parameters, each with its shape, none of them on the meta device or in a dtype the cast would
replace. Anything else raises `Refused` before the model changes, and PEFT's loader runs.

Every value written is recorded first in the caller's transaction (a copy of the adapter's
parameters), so a failure or an interruption restores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastkeys.checkpoints.scan import Checkpoint
from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.files import read_tensors
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.inject import adapter_parameters, eval_like_peft
from fastkeys.integrations.loader.plan import Options, Refused
from fastkeys.integrations.loader.transaction import Transaction
from fastkeys.rules.matching import insert_adapter_name


def swap_fast(
    peft_model: Any,
    adapter_name: str,
    checkpoint: Checkpoint,
    directory: Path,
    index: ModelIndex,
    tx: Transaction,
    options: Options,
) -> None:
    is_trainable, autocast_adapter_dtype, low_cpu_mem_usage = options
    if low_cpu_mem_usage:
        raise Refused("low_cpu_mem_usage=True replaces the adapter's parameters by the checkpoint's tensors")
    if torch.__future__.get_swap_module_params_on_conversion():
        raise Refused(
            "torch swaps parameters on load (torch.__future__.set_swap_module_params_on_conversion)"
        )
    config = peft_model.peft_config[adapter_name]
    parameters: dict[str, Any] = {}
    layers = []
    for name, layer in index.layers.items():
        found = adapter_parameters(layer, adapter_name, name)
        if found:
            parameters.update(found)
            layers.append(layer)
    names = list(checkpoint)
    by_model_key = dict(zip(insert_adapter_name(names, adapter_name, config.peft_type), names, strict=True))
    if not parameters or by_model_key.keys() != parameters.keys():
        raise Refused(f"the checkpoint does not hold exactly the tensors of adapter {adapter_name!r}")
    low = boundary.upcast_dtypes() if autocast_adapter_dtype else frozenset()
    for key, parameter in parameters.items():
        if tuple(checkpoint[by_model_key[key]].shape) != tuple(parameter.shape):
            raise Refused(f"{by_model_key[key]} does not have the shape of {key} (PEFT raises its own error)")
        if parameter.device.type == "meta" or parameter.dtype in low:
            raise Refused(
                f"{key} is a {parameter.dtype} parameter on {parameter.device}, which PEFT recreates"
            )
    tensors = read_tensors(checkpoint, directory, list(by_model_key.values()), own=False)
    with torch.no_grad():
        for key, parameter in parameters.items():
            tx.protect(parameter)
            parameter.copy_(tensors[by_model_key[key]])  # what load_state_dict does: one cast, in place
    if not is_trainable:
        eval_like_peft(peft_model, index, layers, adapter_name, tx)
