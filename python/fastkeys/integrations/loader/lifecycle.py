"""Switching and evicting adapters at the cost of the layers that hold them.

PEFT's `set_adapter` visits every module of the model and, in every LoRA layer, every adapter the
layer holds (setting `requires_grad` on each); its `delete_adapter` walks `named_modules()`, the
internals of every layer included. Both grow with model x adapters. Here, for a model on the
allow-list (`tuner_refusal`, `layer_refusal`), the end state PEFT's code reaches is written directly:

- the active list is stored in every layer (PEFT stores it everywhere: one O(layers) pass);
- `requires_grad` is written only on the adapters it can change: the ones being activated, the ones
  active in any layer before, and the ones whose parameters in the first layer holding them
  require grad (one look per adapter);
- an evicted adapter's entries are removed (what `LoraLayer.delete_adapter` removes) from the layers
  that hold it, and the active-adapter switch each layer would make is made here;
- when the deleted adapter was the only active one, each layer picks its new one among what it
  holds, as PEFT's layers do (a min over the layer's adapter dicts, in C: O(layers x adapters)
  string comparisons, in that case only).

The one assumption, which PEFT's own operations keep (`set_adapter`, `delete_adapter`,
`load_adapter`, `set_requires_grad`, `enable/disable_adapter_layers`): an adapter that is active in
no layer and whose parameters in the first layer holding it are all frozen is frozen everywhere.
A parameter of such an adapter unfrozen by hand in a later layer only would stay trainable, where
PEFT's `set_adapter` would freeze it.

Anything off the allow-list runs PEFT's own function. Either way the call is all or nothing: every
change is recorded first and rolled back on any exception, KeyboardInterrupt included.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import peft
import torch
from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.fallback import merged_base_tensors
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.result import FAST, PEFT
from fastkeys.integrations.loader.transaction import Transaction, deferred_interrupts, settled_heap

__all__ = ["AdapterChangeResult", "delete_adapters", "set_adapter"]


class AdapterChangeResult(NamedTuple):
    """What `set_adapter` / `delete_adapters` did: `path` is "fastkeys" (the per-layer path) or
    "peft" (PEFT's own function ran); `reason` says why PEFT's ran (None on the fastkeys path)."""

    path: str
    reason: str | None


def _lora_class(name: str) -> Any:
    try:
        return getattr(importlib.import_module("peft.tuners.lora.layer"), name)
    except (ImportError, AttributeError):
        return None


# The layer types the differential tests verified (exact types: a subclass may override
# set_adapter or delete_adapter).
_LAYER_TYPES = tuple(cls for cls in (boundary.LoraLinear, _lora_class("Embedding")) if cls is not None)
_DELETED_WARNING = "Adapter {deleted} was active which is now deleted. Setting active adapter to {new}."


# ---------------------------------------------------------------------------------------------
# The public entry points (called by fastkeys.peft).


def set_adapter(peft_model: Any, adapter_name: Any, *, inference_mode: bool = False) -> AdapterChangeResult:
    """A str: `peft_model.set_adapter(name, inference_mode=...)`. A list: PEFT's way to activate
    several, `peft_model.base_model.set_adapter(names, inference_mode=...)` (PeftModel's own takes
    only a str, and leaves `peft_model.active_adapter` as it is)."""
    _check_model(peft_model)
    if isinstance(adapter_name, str):
        if adapter_name not in peft_model.peft_config:
            raise ValueError(f"Adapter {adapter_name} not found.")
    elif isinstance(adapter_name, list):
        for name in adapter_name:
            if not isinstance(name, str):
                raise TypeError(f"adapter names must be str, not {type(name).__name__}: {name!r}")
            if name not in peft_model.peft_config:
                # PEFT's base_model.set_adapter would store the unknown name silently
                raise ValueError(f"Adapter {name} not found.")
    else:
        raise TypeError(f"adapter_name must be a str or a list of str, not {type(adapter_name).__name__}")
    if not isinstance(inference_mode, bool):
        raise TypeError(f"inference_mode must be a bool, not {type(inference_mode).__name__}")

    state = _State(peft_model)
    if state.refusal is not None:
        if isinstance(adapter_name, str):
            return _with_peft(
                peft_model, state.refusal, lambda: peft_model.set_adapter(adapter_name, inference_mode)
            )
        base = peft_model.base_model
        if not isinstance(base, peft.tuners.tuners_utils.BaseTuner):
            raise TypeError(
                f"several active adapters need a PEFT tuner; this model's is {type(base).__name__}"
            )
        return _with_peft(peft_model, state.refusal, lambda: base.set_adapter(adapter_name, inference_mode))
    with state:
        state.activate_everywhere(adapter_name, not inference_mode)
    return AdapterChangeResult(FAST, None)


def delete_adapters(peft_model: Any, adapter_names: Any) -> AdapterChangeResult:
    """`for name in adapter_names: peft_model.delete_adapter(name)`, for one name (a str) or many,
    all or nothing: every name is checked before anything is deleted."""
    _check_model(peft_model)
    names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"adapter_names must be a str or a list of str, not {type(adapter_names).__name__}")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"adapter names must be str, not {type(name).__name__}: {name!r}")
        if name in seen:
            raise ValueError(f"adapter {name!r} is named twice")
        seen.add(name)
        if name not in peft_model.peft_config:
            raise ValueError(f"Adapter {name} does not exist")
    if not names:
        return AdapterChangeResult(FAST, None)

    state = _State(peft_model)
    if state.refusal is not None:

        def peft_loop() -> None:
            for name in names:
                peft_model.delete_adapter(name)

        return _with_peft(peft_model, state.refusal, peft_loop)
    messages: dict[str, None] = {}
    with state:
        for name in names:
            state.delete(name, messages)
    for message in messages:
        warnings.warn(message, UserWarning, stacklevel=3)
    return AdapterChangeResult(FAST, None)


def _check_model(peft_model: Any) -> None:
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, not {type(peft_model).__name__}")


# ---------------------------------------------------------------------------------------------
# The model's LoRA layers, and the allow-list.


class _Layer:
    """A LoRA layer, with direct references to the dicts PEFT's set_adapter and delete_adapter read:
    `weights`, the entries of its adapter_layer_names containers (adapter name -> module or
    parameter), and `keyed`, every container whose keys are adapter names (adapter_layer_names and
    other_param_names), each with the dict holding its keys."""

    __slots__ = ("keyed", "layer", "weights")

    def __init__(self, layer: Any) -> None:
        self.layer = layer
        self.weights: list[dict[str, Any]] = []
        self.keyed: list[tuple[Any, dict[str, Any]]] = []
        own = layer.__dict__
        children = own["_modules"]
        for attribute in layer.adapter_layer_names:
            holder = children.get(attribute)
            kind = type(holder)
            if kind is nn.ModuleDict:
                keys = entries = holder._modules
            elif kind is nn.ParameterDict:
                keys, entries = holder._keys, holder._parameters
                if len(entries) != len(keys):
                    raise _Unverified(f"its {attribute} holds entries that are not parameters")
            else:
                raise _Unverified(f"its {attribute} is a {kind.__name__}")
            self.weights.append(entries)
            self.keyed.append((holder, keys))
        for attribute in layer.other_param_names:
            holder = own.get(attribute)
            if holder is None:
                holder = children.get(attribute)
            kind = type(holder)
            if kind is dict:
                self.keyed.append((holder, holder))
            elif kind is nn.ModuleDict:
                self.keyed.append((holder, holder._modules))
            else:
                raise _Unverified(f"its {attribute} is a {kind.__name__}")

    def holds(self, name: str) -> bool:
        return any(name in keys for _holder, keys in self.keyed) or name in self.layer.lora_variant

    def set_flags(self, wanted: dict[str, bool], flipped: list[tuple[torch.Tensor, bool]]) -> None:
        """`requires_grad = wanted[name]` on the weights of each adapter `name` in this layer, as
        PEFT's `_set_layer_requires_grad` sets it (leaf tensors only); each flip is noted first."""
        for entries in self.weights:
            if not entries:
                continue
            for name, flag in wanted.items():
                entry = entries.get(name)
                if entry is None:
                    continue
                for parameter in _tensors(entry):
                    if parameter.is_leaf and parameter.requires_grad is not flag:
                        flipped.append((parameter, parameter.requires_grad))
                        parameter.requires_grad_(flag)

    def any_trainable(self, name: str) -> bool | None:
        """Whether a weight of adapter `name` requires grad here; None when the layer lacks it."""
        found = False
        for entries in self.weights:
            entry = entries.get(name)
            if entry is not None:
                found = True
                if any(parameter.requires_grad for parameter in _tensors(entry)):
                    return True
        return False if found else None

    def active(self) -> list[str]:
        """The layer's `active_adapters`."""
        active = self.layer._active_adapter
        return [active] if isinstance(active, str) else active

    def first_available(self) -> str | None:
        """`_all_available_adapter_names()[0]`: the least name in any of the layer's adapter dicts
        (a min over each dict's keys, in C)."""
        least: str | None = None
        for _holder, keys in self.keyed:
            if keys:
                candidate = min(keys)
                if least is None or candidate < least:
                    least = candidate
        return least

    def delete(self, name: str, tx: Transaction) -> None:
        """`LoraLayer.delete_adapter(name)` without its active-adapter switch: the entry `name` goes
        from every container that has it, and from `lora_variant`. Recorded first."""
        for holder, keys in self.keyed:
            if name in keys:
                tx.record_entries(keys, name)
                if keys is not holder and isinstance(holder, nn.ParameterDict):
                    tx.record_entries(holder._parameters, name)
                del holder[name]
        variants = self.layer.lora_variant
        if name in variants:
            tx.record_entries(variants, name)
            del variants[name]


def _tensors(entry: Any) -> Iterable[torch.Tensor]:
    """What `_set_layer_requires_grad` visits: a tensor itself, or a module's parameters (a leaf
    module's read from its own dict)."""
    if isinstance(entry, torch.Tensor):
        return (entry,)
    if entry._modules:
        return entry.parameters()  # type: ignore[no-any-return]
    return [parameter for parameter in entry._parameters.values() if parameter is not None]


class _Unverified(Exception):
    """A layer the fastkeys path was not verified on; the message says why."""


def tuner_refusal(tuner: Any) -> str | None:
    """Why the versions or the tuner keep the call from the fastkeys path, or None."""
    reason = boundary.version_refusal()
    if reason is not None:
        return reason
    if type(tuner) is not boundary.LoraModel:
        return f"the model's tuner is {type(tuner).__name__}, not LoraModel"
    return None


def layer_refusal(tuner: Any, layers: list[tuple[str, Any]], auxiliary: bool) -> str | None:
    """Why the model's layers keep the call from the fastkeys path, or None (cheap checks; each
    layer's containers are checked as its `_Layer` is built)."""
    if auxiliary:
        return (
            "the model has auxiliary wrappers (modules_to_save, trainable tokens), which PEFT switches itself"
        )
    if not layers:
        return "the model has no adapter layers"
    prefix = tuner.prefix
    for name, layer in layers:
        if type(layer) not in _LAYER_TYPES:
            return (
                f"{name} is a {type(layer).__name__}; the fastkeys path covers lora.Linear and lora.Embedding"
            )
        base = layer._modules.get("base_layer")
        if not isinstance(base, nn.Module) or isinstance(base, boundary.BaseTunerLayer) or base._modules:
            return f"{name} wraps a module with submodules"
        if layer.merged_adapters:
            return "the model has merged adapter layers (PEFT unmerges them, or refuses to delete them)"
        if layer._disable_adapters:
            return "the model's adapter layers are disabled"
        if layer.frozen_peft_weight_names:
            return f"{name} holds adapter weights that a LoRA variant keeps frozen"
        if prefix in name:
            return f"the module name {name!r} contains {prefix!r}, which PEFT's delete_adapter skips"
    return None


# ---------------------------------------------------------------------------------------------
# The per-layer path.


class _State:
    """One call on one model: its layers (in `named_modules()` order), what it changed (a
    transaction and the `requires_grad` flags it flipped), and the adapters whose weights may
    require grad. Used as a context manager: any exception rolls everything back."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model
        self.tuner = peft_model.base_model
        self.layers: list[_Layer] = []
        self.refusal = tuner_refusal(self.tuner)
        if self.refusal is None:
            index = ModelIndex(self.tuner.model)
            found, auxiliary = list(index.layers.items()), index.auxiliary
            self.refusal = layer_refusal(self.tuner, found, auxiliary)
            for name, layer in found if self.refusal is None else ():
                try:
                    self.layers.append(_Layer(layer))
                except _Unverified as why:
                    self.refusal = f"{name}: {why}"
                    break
        self.tx = Transaction()
        self.flipped: list[tuple[torch.Tensor, bool]] = []
        self._maybe_trainable: set[str] | None = None

    def __enter__(self) -> _State:
        return self

    def __exit__(self, kind: Any, _error: Any, _traceback: Any) -> None:
        if kind is not None:
            with deferred_interrupts():
                for parameter, requires_grad in reversed(self.flipped):
                    parameter.requires_grad_(requires_grad)
                self.tx.roll_back()

    def maybe_trainable(self) -> set[str]:
        """The adapters whose weights may require grad anywhere: the ones active in any layer, and
        the ones with a weight that requires grad in the first layer holding them."""
        if self._maybe_trainable is None:
            found: set[str] = set()
            for layer in self.layers:
                found.update(layer.active())
            pending = [name for name in self.tuner.peft_config if name not in found]
            for layer in self.layers:
                if not pending:
                    break
                left = []
                for name in pending:
                    trainable = layer.any_trainable(name)
                    if trainable is None:
                        left.append(name)
                    elif trainable:
                        found.add(name)
                pending = left
            self._maybe_trainable = found
        return self._maybe_trainable

    def _set_active(self, layer: _Layer, names: list[str], wanted: dict[str, bool]) -> None:
        """A layer's `set_adapter(names, ...)`: `wanted` holds the flag of every adapter whose weights
        may change (the others are frozen already)."""
        layer.set_flags(wanted, self.flipped)
        self.tx.record_attributes(layer.layer, ("_active_adapter",))
        # what nn.Module.__setattr__ does with a list (not a parameter, module or buffer name)
        layer.layer.__dict__["_active_adapter"] = names

    def _wanted(self, names: list[str], requires_grad: bool) -> dict[str, bool]:
        wanted = dict.fromkeys(self.maybe_trainable(), False)
        wanted.update(dict.fromkeys(names, requires_grad))
        return wanted

    def activate_everywhere(self, adapter_name: str | list[str], requires_grad: bool) -> None:
        """PeftModel.set_adapter (a str) or BaseTuner.set_adapter (a list)."""
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        wanted = self._wanted(names, requires_grad)
        for layer in self.layers:
            # a str becomes a new list in each layer; a list is stored as it is, in every layer
            self._set_active(layer, [adapter_name] if isinstance(adapter_name, str) else adapter_name, wanted)
        self.tx.record_attributes(self.tuner, ("active_adapter",))
        self.tuner.active_adapter = adapter_name
        if isinstance(adapter_name, str):
            self.tx.record_attributes(self.peft_model, ("active_adapter",))
            self.peft_model.active_adapter = adapter_name
        self.maybe_trainable().update(names)

    def delete(self, deleted: str, messages: dict[str, None]) -> None:
        """PeftModel.delete_adapter(deleted) on a LoRA model."""
        tx = self.tx
        configs = self.tuner.peft_config
        tx.record_entries(configs, deleted)
        del configs[deleted]
        first: list[str] | None = None
        chosen: set[str] = set()
        wanted: dict[tuple[str, ...], dict[str, bool]] = {}
        for layer in self.layers:
            if layer.holds(deleted):
                layer.delete(deleted, tx)
            active = layer.active()
            if deleted in active:
                # what the layer's delete_adapter does next: set_adapter (inference_mode=False) to
                # the other active adapters, else to the least name the layer still holds
                remaining = active[:]
                remaining.remove(deleted)
                if not remaining:
                    new = layer.first_available()
                    if new is not None:
                        messages[_DELETED_WARNING.format(deleted=deleted, new=new)] = None
                        remaining = [new]
                        chosen.add(new)
                key = tuple(remaining)
                if key not in wanted:
                    wanted[key] = self._wanted(remaining, True)
                self._set_active(layer, remaining, wanted[key])
            if first is None:
                first = layer.active()[:]
        tx.record_attributes(self.tuner, ("active_adapter",))
        self.tuner.active_adapter = first or []
        new_active = self.tuner.active_adapters
        if len(new_active) == 1:
            tx.record_attributes(self.peft_model, ("active_adapter",))
            self.peft_model.active_adapter = new_active[0]
        trainable = self.maybe_trainable()
        trainable.update(chosen)
        trainable.discard(deleted)


# ---------------------------------------------------------------------------------------------
# PEFT's own functions, held to all or nothing.


def _with_peft(peft_model: Any, reason: str, call: Callable[[], Any]) -> AdapterChangeResult:
    tx = Transaction()
    tx.record_all(peft_model.modules())
    for tensor in merged_base_tensors(peft_model.modules()):
        tx.protect(tensor)
    try:
        with settled_heap():  # PEFT's walks set off full collections; the records need not be in them
            call()
    except BaseException:
        tx.roll_back()
        raise
    return AdapterChangeResult(PEFT, reason)
