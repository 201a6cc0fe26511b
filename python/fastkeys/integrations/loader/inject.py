"""The fast path: PEFT's `load_adapter` for one adapter, touching only the adapter's modules.

PEFT's loop walks the whole model several times per adapter, and inside each targeted layer every
adapter the layer holds. Here, per target: a plain LoRA target that already is a `lora.Linear` gets
its two matrices built around the loaded tensors (no random initialisation that loading overwrites);
any other target (every target of LoHa, LoKr, IA3) runs PEFT's own per-layer code, as the method's
record says (`methods.py`): on a layer that holds the method's adapters already, its `update_layer`
(without its O(adapters) passes, whose effect on the new adapter is applied directly), on a module
not wrapped yet, the tuner's `_create_and_replace`; the loaded tensors are then copied in as
`load_state_dict` would. PEFT snapshots and restores the `requires_grad` of every pre-existing
parameter around an injection, so its whole-model passes change nothing but the new adapter; that
is what makes the per-adapter path exact.

Every change is recorded first in the caller's transaction; a `Refused` or any other exception
(KeyboardInterrupt included) leaves the caller to roll it back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastkeys.checkpoints.scan import Checkpoint
from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.files import read_tensors
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.leaves import Leaves
from fastkeys.integrations.loader.methods import Layout, Method, method_of
from fastkeys.integrations.loader.peft_re import linear_time_matching
from fastkeys.integrations.loader.plan import (
    MODEL_PREFIX,
    Options,
    Refused,
    check_checkpoint,
    condense_targets,
    make_plan,
    selected,
)
from fastkeys.integrations.loader.saved import NOTHING, add_saved, plan_saved
from fastkeys.integrations.loader.tokens import NO_TOKENS, add_tokens, is_tokens_wrapper, plan_tokens
from fastkeys.integrations.loader.transaction import Transaction


def load_fast(
    peft_model: Any,
    adapter_name: str,
    config: Any,
    checkpoint: Checkpoint,
    directory: Path,
    index: ModelIndex,
    tx: Transaction,
    options: Options,
    stored_under: str | None = None,
    ends_in_eval: bool = True,
) -> list[Any]:
    """Adds the adapter; returns the tuner layers that now hold it. `stored_under`: as in
    `plan.make_plan` (diffusers' checkpoints); `ends_in_eval`: a load that is not trainable ends
    with the model's `eval()` (PEFT's and transformers' loaders; diffusers' does not)."""
    is_trainable, autocast_adapter_dtype, low_cpu_mem_usage = options
    tuner = peft_model.base_model
    method = method_of(config)
    if method is None:  # policy.config_refusal sent it to PEFT already
        raise Refused(f"the config's method {config.peft_type} is not covered")
    peft_model._check_new_adapter_config(config, is_trainable=is_trainable)
    config.inference_mode = not is_trainable
    condense_targets(tuner, config)
    targets = selected(tuner, config, index)
    saved, tokens = NOTHING, NO_TOKENS
    if getattr(config, "trainable_token_indices", None) is not None or any(
        map(is_tokens_wrapper, index.wrappers.values())
    ):
        tokens = plan_tokens(tuner, config, adapter_name, index, targets)
    else:
        saved = plan_saved(tuner, config, adapter_name, index, targets)
    if low_cpu_mem_usage and (saved.updated or tokens.updated):
        raise Refused("low_cpu_mem_usage=True assigns the checkpoint's tensors to the modules to save")
    plan = make_plan(
        tuner,
        config,
        index,
        checkpoint,
        adapter_name,
        method,
        low_cpu_mem_usage=low_cpu_mem_usage,
        saved={**saved.expected, **tokens.expected},
        targets=targets,
        stored_under=stored_under,
    )
    active = list(tuner.active_adapters)
    tx.record(tuner, adapter_name)
    peft_model.peft_config[adapter_name] = config
    tuner._check_new_adapter_config(config)
    touched: dict[int, Any] = {}
    built = plan.quick.keys() | plan.direct.keys()  # entries built around the loaded tensors
    with torch.no_grad():
        for name in plan.targets:
            if name not in built:
                layer = _inject_with_peft(tuner, index, tx, name, config, adapter_name, method)
                touched[id(layer)] = layer
        expected = dict(plan.expected)
        for name in plan.targets:
            if name not in built:
                for key, parameter in adapter_parameters(index.modules[name], adapter_name, name).items():
                    if parameter.device.type == "meta":
                        raise Refused(f"{key} is on the meta device")
                    expected[key] = tuple(parameter.shape)
        check_checkpoint(checkpoint, plan, expected, adapter_name)
        tensors = read_tensors(checkpoint, directory, [plan.by_model_key[key] for key in expected], own=False)
        leaves = Leaves()
        quick: set[int] = set()
        for name, (r, alpha) in plan.quick.items():
            layer = index.modules[name]
            _record_lora(tx, layer, adapter_name)
            touched[id(layer)] = layer
            quick.add(id(layer))
            prefix = f"{MODEL_PREFIX}{name}."
            _add_lora_linear(
                layer,
                adapter_name,
                r,
                alpha,
                config,
                tensors[plan.by_model_key[f"{prefix}lora_A.{adapter_name}.weight"]],
                tensors[plan.by_model_key[f"{prefix}lora_B.{adapter_name}.weight"]],
                autocast_adapter_dtype,
                leaves,
            )
        upcast: list[nn.Parameter] = []
        low = boundary.upcast_dtypes() if autocast_adapter_dtype else frozenset()
        for name, layout in plan.direct.items():
            layer = index.modules[name]
            _record_direct(tx, layer, adapter_name, layout)
            touched[id(layer)] = layer
            prefix = f"{MODEL_PREFIX}{name}."
            loaded = {
                attribute: tensors[plan.by_model_key[f"{prefix}{attribute}.{adapter_name}"]]
                for attribute in layout.tensors
            }
            upcast += _add_direct(layer, adapter_name, layout, loaded, low)
        for layer in touched.values():
            if id(layer) in quick:
                continue  # _add_lora_linear built its weights frozen
            # what update_layer's set_adapter(active, inference_mode) does to the new adapter: it
            # is not active, so its weights are frozen
            for attribute in layer.adapter_layer_names:
                holder = getattr(layer, attribute)
                if adapter_name in holder:
                    boundary.set_layer_requires_grad(holder[adapter_name], False)
        # inject_adapter's model-wide set_adapter stores the active list in every layer (a plain
        # attribute: what Module.__setattr__ does with a list, without its checks)
        for layer in index.layers.values():
            tx.record_attributes(layer, ("_active_adapter",))
            vars(layer)["_active_adapter"] = list(active)
        tuner.active_adapter = list(active)
        for layer in touched.values():
            layer._freeze_non_trainable_peft_weights([adapter_name])
        for name in plan.targets:
            if name not in built:
                layer = index.modules[name]
                if autocast_adapter_dtype:
                    _upcast(layer, adapter_name)
                for key, parameter in adapter_parameters(layer, adapter_name, name).items():
                    parameter.copy_(tensors[plan.by_model_key[key]])
        for parameter in upcast:
            # cast_adapter_dtype puts the float32 copy in through ParameterDict.__setitem__, which
            # wraps a tensor in a Parameter that requires grad
            parameter.requires_grad_(True)
        if is_trainable:
            for layer in touched.values():
                layer.set_requires_grad(adapter_name, True)
        copies = add_saved(
            index, saved, adapter_name, tx, {key: tensors[plan.by_model_key[key]] for key in saved.expected}
        )
        deltas = add_tokens(
            index,
            tokens,
            adapter_name,
            tx,
            {key: tensors[plan.by_model_key[key]] for key in tokens.expected},
            _mover,
        )
        if is_trainable:
            for copy in copies:
                boundary.set_layer_requires_grad(copy, True)
            for delta in deltas:
                delta.requires_grad_(True)
        _extend_unique(tuner.targeted_module_names, plan.targets)
        if not is_trainable and ends_in_eval:
            if any(m.training for wrapper in index.wrappers.values() for m in wrapper.modules()):
                tx.record_training(peft_model.modules())
                peft_model.eval()
            else:
                eval_like_peft(peft_model, index, touched.values(), adapter_name, tx)
    return list(touched.values())


def _record_layer(tx: Transaction, layer: Any, adapter_name: str) -> None:
    """A tuner layer and its per-adapter containers, as far as adding `adapter_name` changes them."""
    tx.record(layer, adapter_name)
    for child in layer._modules.values():
        if isinstance(child, (nn.ModuleDict, nn.ParameterDict, boundary.BufferDict)):
            for entries in (child._modules, child._parameters, child._buffers):
                tx.record_entries(entries, adapter_name)
            keys = vars(child).get("_keys")  # a ParameterDict's own list of its keys
            if isinstance(keys, dict):
                tx.record_entries(keys, adapter_name)


# What `_add_lora_linear` writes in a layer, each at the new adapter's entry: plain per-adapter dicts,
# and ModuleDicts.
_LORA_VALUES = ("r", "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias")
_LORA_MODULES = ("lora_dropout", "lora_A", "lora_B")


def _record_lora(tx: Transaction, layer: Any, adapter_name: str) -> None:
    state, modules = vars(layer), layer._modules
    for attribute in _LORA_VALUES:
        tx.record_entries(state[attribute], adapter_name)
    for attribute in _LORA_MODULES:
        tx.record_entries(modules[attribute]._modules, adapter_name)


def _record_direct(tx: Transaction, layer: Any, adapter_name: str, layout: Layout) -> None:
    """What `_add_direct` and the bookkeeping after it change in a layer: the layout's per-adapter
    dicts and ParameterDicts, each at the entry `adapter_name` (the adapter's own entries are new
    objects; the active adapter list and the training flags are recorded where they change).
    `policy.model_refusal` keeps names that are attributes of torch's containers away."""
    for attribute in layout.values:
        tx.record_entries(getattr(layer, attribute), adapter_name)
    for attribute in layout.tensors:
        holder = getattr(layer, attribute)
        tx.record_entries(holder._parameters, adapter_name)
        tx.record_entries(holder._keys, adapter_name)


def adapter_parameters(layer: Any, adapter_name: str, module_name: str) -> dict[str, Any]:
    """The parameters of the adapter `adapter_name` in `layer` (the tuner layer at `module_name`),
    by model key."""
    found: dict[str, Any] = {}
    for attribute in layer.adapter_layer_names:
        holder = getattr(layer, attribute, None)
        if holder is None or adapter_name not in holder:
            continue
        entry = holder[adapter_name]
        key = f"{MODEL_PREFIX}{module_name}.{attribute}.{adapter_name}"
        if isinstance(entry, nn.Parameter):
            found[key] = entry
        else:
            for local, parameter in entry.named_parameters():
                found[f"{key}.{local}"] = parameter
    return found


def _upcast(layer: Any, adapter_name: str) -> None:
    """PEFT's `cast_adapter_dtype` for one adapter of one layer: fp16/bf16 (and float8) -> fp32."""
    low = boundary.upcast_dtypes()
    # PEFT walks the whole layer (every adapter's modules); the adapter's entries are in the
    # layer's own dicts.
    for holder in layer._modules.values():
        if not _is_adapter_dict(holder) or adapter_name not in holder:
            continue
        entry = holder[adapter_name]
        if isinstance(entry, torch.Tensor):
            if entry.dtype in low:
                holder[adapter_name] = entry.to(torch.float32)
            continue
        for owner in entry.modules():
            for local, parameter in list(owner.named_parameters(recurse=False)):
                if parameter.dtype in low:
                    setattr(
                        owner,
                        local,
                        nn.Parameter(parameter.data.to(torch.float32), requires_grad=parameter.requires_grad),
                    )


def _inject_with_peft(
    tuner: Any, index: ModelIndex, tx: Transaction, name: str, config: Any, adapter_name: str, method: Method
) -> Any:
    """PEFT's own per-module step: the method's `update` on a layer of the method (without its
    O(adapters) passes), or the tuner's `_create_and_replace` for a module not wrapped yet. Returns
    the layer."""
    target = index.modules[name]
    model = tuner.model
    if isinstance(target, boundary.BaseTunerLayer):
        if not isinstance(target, method.layer) or type(target).__module__ != method.layer.__module__:
            raise Refused(f"{name} is a {type(target).__name__}, not a {method.name} layer")
        refusal = method.layer_refusal(target, config)
        if refusal is not None:
            raise Refused(refusal)
        tuner._check_target_module_compatiblity(config, model, name.rpartition(".")[2])
        _record_layer(tx, target, adapter_name)
        # update_layer ends with the layer's set_adapter, a pass over every adapter the layer
        # holds; its effect on the new adapter is applied by the caller.
        target.set_adapter = _no_set_adapter
        target._move_adapter_to_device_of_base_layer = _mover(target)
        try:
            method.update(tuner, target, name, config, adapter_name)
        finally:
            del target.set_adapter, target._move_adapter_to_device_of_base_layer
        return target
    parent, old, child_name = boundary.get_submodules(model, name)
    tuner._check_target_module_compatiblity(config, model, child_name)
    tx.record(parent, child_name)
    tx.record_all(old.modules())
    # _create_and_replace freezes the whole new layer, base weights included; inject_adapter then
    # restores every parameter that existed before, which here are the old module's.
    existing = [(parameter, parameter.requires_grad) for parameter in old.parameters()]
    with linear_time_matching():
        tuner._create_and_replace(config, adapter_name, old, child_name, parent, current_key=name)
    for parameter, requires_grad in existing:
        parameter.requires_grad = requires_grad
    new = getattr(parent, child_name)
    index.modules[name] = new
    if not isinstance(new, method.layer) or type(new).__module__ != method.layer.__module__:
        raise Refused(f"PEFT wrapped {name} as a {type(new).__name__}")
    index.layers[name] = new
    return new


def _add_lora_linear(
    layer: Any,
    adapter_name: str,
    r: int,
    alpha: float,
    config: Any,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    autocast_adapter_dtype: bool,
    leaves: Leaves,
) -> None:
    """`lora.Linear.update_layer` for a plain LoRA adapter, with the loaded weights in place of the
    random initialisation that loading overwrites: same modules, dtypes (the base layer's, then
    fp16/bf16 upcast to fp32 as `cast_adapter_dtype` does) and values (one cast from the checkpoint's
    dtype, as `load_state_dict`'s copy does). Writes only what `_record_lora` records."""
    base = layer.get_base_layer()
    device, dtype = layer._get_base_layer_device_and_dtype(base)
    if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    if autocast_adapter_dtype and dtype in boundary.upcast_dtypes():
        dtype = torch.float32
    state, modules = vars(layer), layer._modules
    state["r"][adapter_name] = r
    state["lora_alpha"][adapter_name] = alpha
    dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else leaves.identity()
    leaves.put(modules["lora_dropout"], adapter_name, dropout)
    # always a fresh allocation, as PEFT's parameters are: a tensor read from the file may sit at an
    # unaligned address, and matmul kernels can round differently there (seen: r=1 outputs differ)
    weight_a = weight_a.to(device=device, dtype=dtype, copy=True)
    weight_b = weight_b.to(device=device, dtype=dtype, copy=True)
    leaves.put(modules["lora_A"], adapter_name, leaves.frozen_linear(weight_a))
    leaves.put(modules["lora_B"], adapter_name, leaves.frozen_linear(weight_b))
    state["lora_bias"][adapter_name] = False
    state["scaling"][adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    state["use_rslora"][adapter_name] = config.use_rslora
    state["use_dora"][adapter_name] = False


def _add_direct(
    layer: Any,
    adapter_name: str,
    layout: Layout,
    loaded: dict[str, torch.Tensor],
    low: frozenset[torch.dtype],
) -> list[nn.Parameter]:
    """`update_layer` for one adapter of a layout (`methods.py`), with the loaded values in place of
    the random initialisation that loading overwrites: the per-adapter values, then each parameter
    on the base layer's device in its dtype (`_move_adapter_to_device_of_base_layer`), fp16/bf16
    upcast to fp32 as `cast_adapter_dtype` does, holding the loaded values cast once (as
    `load_state_dict`'s copy does). Returns the parameters that upcast made (they must end
    requiring grad, as `cast_adapter_dtype` leaves them)."""
    base = layer.get_base_layer()
    device, dtype = layer._get_base_layer_device_and_dtype(base)
    if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()  # what torch.empty gave, left as it is by the move
    upcast = dtype in low  # the dtypes cast_adapter_dtype raises; none without autocast
    if upcast:
        dtype = torch.float32
    for attribute, value in layout.values.items():
        getattr(layer, attribute)[adapter_name] = value
    made = []
    for attribute in layout.tensors:
        # a fresh allocation, as PEFT's parameters are (see _add_lora_linear)
        value = loaded[attribute].to(device=device, dtype=dtype, copy=True)
        parameter = nn.Parameter(value, requires_grad=False)
        getattr(layer, attribute)[adapter_name] = parameter
        made.append(parameter)
    return made if upcast else []


def _is_adapter_dict(holder: Any) -> bool:
    """A layer's per-adapter container (ModuleDict, ParameterDict, BufferDict)."""
    return isinstance(holder, (nn.ModuleDict, nn.ParameterDict, boundary.BufferDict))


def _mover(layer: Any) -> Callable[..., None]:
    """PEFT's `_move_adapter_to_device_of_base_layer` for a new adapter, which skips an adapter dict
    when any parameter in it is on the meta device: it checks the dict's every adapter (O(adapters)
    per layer). Only the new entry can be on the meta device (a finished load leaves none there), so
    checking the new entry is the same test."""

    def move(adapter_name: str, device: Any = None) -> None:
        base_layer = layer.get_base_layer()
        if isinstance(base_layer, nn.MultiheadAttention):
            base_layer = base_layer.out_proj
        base_device, base_dtype = layer._get_base_layer_device_and_dtype(base_layer)
        target_device = device if device is not None else base_device
        if target_device is None:
            return
        target_dtype = (
            base_dtype
            if base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex)
            else None
        )
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            holder: Any = getattr(layer, attribute, None)
            if not _is_adapter_dict(holder) or adapter_name not in holder:
                continue
            item = holder[adapter_name]
            own = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            if any(p.device.type == "meta" for p in own):
                continue
            item_dtype = getattr(item, "dtype", None)
            cast = item_dtype is None or item_dtype.is_floating_point or item_dtype.is_complex
            if target_dtype is not None and cast:
                holder[adapter_name] = item.to(target_device, dtype=target_dtype)
            else:
                holder[adapter_name] = item.to(target_device)

    return move


def _no_set_adapter(*_args: Any, **_kwargs: Any) -> None:
    return None


def _extend_unique(names: list[str], new: list[str]) -> None:
    seen = set(names)
    names.extend(name for name in new if name not in seen and not seen.add(name))  # type: ignore[func-returns-value]


def eval_like_peft(
    peft_model: Any, index: ModelIndex, layers: Iterable[Any], adapter_name: str, tx: Transaction
) -> None:
    """PEFT ends a non-trainable load with `peft_model.eval()`. When the model is already in eval
    mode (every indexed module and every adapter container says so), only the adapter's modules in
    `layers` need it (recorded where a flag changes: a swapped adapter's modules exist already)."""
    if peft_model.training or any(module.training for module in index.modules.values()):
        tx.record_training(peft_model.modules())
        peft_model.eval()
        return
    for layer in layers:
        # a layer's per-adapter containers are among its children (eval() would visit them all)
        for holder in layer._modules.values():
            if _is_adapter_dict(holder):
                if holder.training:
                    tx.record_training(peft_model.modules())
                    peft_model.eval()
                    return
                entry = holder._modules.get(adapter_name)
                if entry is None:
                    continue
                if entry._modules:
                    tx.record_training(entry.modules())
                    entry.eval()
                elif entry.training:  # a leaf (Linear, Dropout, Identity): eval() without its recursion
                    tx.record_training((entry,))
                    vars(entry)["training"] = False
