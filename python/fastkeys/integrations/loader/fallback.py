"""PEFT's own loader, for every load the fast path does not reproduce, held to the same rules.

- **What PEFT reads**: a scratch directory with the config fastkeys checked and an empty placeholder
  for the weights; PEFT's read of the placeholder is fed the tensors fastkeys read from the files it
  checked (`boundary.fed_tensors`). PEFT never opens the user's checkpoint, so containment, regular
  files, size caps and sharded checkpoints work as on the fast path.
- **Expressions**: PEFT's matching of config expressions runs on the linear-time engine.
- **Base weights**: a load-time hook on the base model sees the state dict torch is about to copy.
  A tensor that would overwrite a pre-existing base-model weight is refused (ValueError, before it
  is written) unless PEFT's own saving puts such weights in a checkpoint: an embedding
  (`save_embedding_layers`: `embed_tokens`, `lm_head`, a resized vocabulary) or a bias of an adapter
  whose config trains biases. One that would overwrite another adapter's weights is refused.
  Every base weight the load changed, by that copy or in place (special initialisations, whose
  targets are protected first and compared after: their `.data =` writes change no version), is
  reported.
- **All or nothing**: a transaction records every module first and protects the values of every
  pre-existing tensor that is written; a failure or an interruption anywhere in PEFT's code rolls
  the model back, values included.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file
from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.files import CONFIG_FILE, SINGLE_FILE
from fastkeys.integrations.loader.peft_re import linear_time_matching
from fastkeys.integrations.loader.transaction import Transaction, collector_paused, settled_heap


class BaseWeights:
    """The base model's tensors by name (outside adapter containers), each with the module that
    owns it and its version: what a load may write in place and must report. A module the load
    wraps keeps its tensors (they move under `base_layer`), so ownership, not the name, decides."""

    def __init__(self, model: nn.Module) -> None:
        self.entries: list[tuple[str, nn.Module, str, torch.Tensor, int]] = []
        for module_name, module in _base_modules(model):
            if isinstance(module, (boundary.BaseTunerLayer, boundary.AuxiliaryTrainingWrapper)):
                continue  # their own tensors are the adapters' (BOFT's boft_P), not the base model's
            prefix = module_name + "." if module_name else ""
            for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None:
                    self.entries.append((prefix + name, module, name, tensor, tensor._version))
        self.ids = {id(entry[3]) for entry in self.entries}

    def changed(self, differs: Callable[[torch.Tensor], bool] | None = None) -> list[str]:
        """Base tensors written in place, or replaced in their module, since this was made; with
        `differs` (a transaction's), also those whose values it sees changed (a `.data =` write
        changes neither identity nor version)."""
        changed = []
        for name, owner, attribute, tensor, version in self.entries:
            current = owner._parameters.get(attribute, owner._buffers.get(attribute))
            if (
                current is not tensor
                or tensor._version != version
                or (differs is not None and differs(tensor))
            ):
                changed.append(name)
        return changed


def _base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The base model's modules: not entering a tuner layer but through its `base_layer`, nor an
    auxiliary wrapper but through its `original_module`."""
    memo: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in memo:
            continue
        memo.add(id(module))
        yield name, module
        if isinstance(module, boundary.BaseTunerLayer):
            allowed: tuple[str, ...] | None = ("base_layer",)
        elif isinstance(module, boundary.AuxiliaryTrainingWrapper):
            allowed = ("original_module",)
        else:
            allowed = None
        prefix = name + "." if name else ""
        children = [
            (prefix + key, child)
            for key, child in module._modules.items()
            if child is not None and (allowed is None or key in allowed)
        ]
        stack.extend(reversed(children))


class Recorded(NamedTuple):
    """What `record_for_load` found: the ids of the other adapters' tensors, the ids of every tensor
    in the model (both for `guarded_writes`), and the modules a tuner layer can be among (for
    `merged_base_tensors`: `split_adapters`' full and nested modules)."""

    others: set[int]
    existing: set[int]
    modules: list[nn.Module]


def record_for_load(tx: Transaction, model: nn.Module, adapter_name: str) -> Recorded:
    """What PEFT's `load_adapter` of `adapter_name` into `model` may change, recorded for the
    rollback: every module in full, but the modules of the other adapters inside tuner layers (each
    LoRA adapter's Linear and dropout leaves: nearly all the modules of a model holding many
    adapters). Of those PEFT's load changes only flags (`set_adapter`'s `requires_grad`, `eval()`'s
    `training`), which are recorded; a write to their tensors, or to any other adapter's, is refused
    before torch copies (`guarded_writes`, given the ids this returns).
    tests/integrations/loader/test_loading_fails_closed.py checks this against PEFT's own loads."""
    with collector_paused():
        full, flagged, others, nested = split_adapters(model, adapter_name)
        tx.record_all(full)
        tx.record_training(flagged)
        # the flagged modules' parameters are among the other adapters' tensors (whose every
        # requires_grad is recorded: restoring a flag that did not change changes nothing)
        tx.record_grads(tensor for _owner, _attribute, tensor, _version in others)
        other_ids = {id(tensor) for _owner, _attribute, tensor, _version in others}
        # the flagged modules' tensors are all among the others'
        return Recorded(other_ids, other_ids | tensor_ids(full), full + nested)


def tensor_ids(modules: Iterable[nn.Module]) -> set[int]:
    """The ids of the parameters and buffers the modules hold themselves."""
    return {id(t) for m in modules for t in (*m._parameters.values(), *m._buffers.values()) if t is not None}


_CONTAINERS = (nn.ModuleDict, nn.ParameterDict, boundary.BufferDict)
_HOLDERS = (boundary.BaseTunerLayer, boundary.AuxiliaryTrainingWrapper, boundary.BaseTuner)


class Split(NamedTuple):
    """The modules of a model, for a load of one adapter (`split_adapters`)."""

    full: list[nn.Module]  # to record in full
    flagged: list[nn.Module]  # the other adapters' modules in tuner layers' ModuleDicts: PEFT's
    # load changes only their flags
    others: list[tuple[nn.Module, str, torch.Tensor, int]]  # every tensor of another adapter, in
    # the per-adapter containers of tuner layers, auxiliary wrappers and the tuner: (owner,
    # attribute, tensor, version)
    nested: list[nn.Module]  # the flagged modules that have children: where a tuner layer wrapping
    # another adapter's entry would be (only a hand-built model has one: PEFT injects nothing under
    # a tuner layer); the leaves, nearly all the modules of a model holding many adapters, cannot be


def split_adapters(model: nn.Module, adapter_name: str) -> Split:
    """The modules of `model`, for a load of `adapter_name`: see `Split`."""
    full: list[nn.Module] = []
    flagged: list[nn.Module] = []
    others: list[tuple[nn.Module, str, torch.Tensor, int]] = []
    nested: list[nn.Module] = []

    append = others.append

    def owned(modules: Any) -> None:
        for module in modules:
            for attribute, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is not None:
                    append((module, attribute, tensor, tensor._version))

    seen: set[int] = set()
    stack: list[nn.Module] = [model]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        full.append(module)
        tuner_layer = isinstance(module, boundary.BaseTunerLayer)
        holder = isinstance(module, _HOLDERS)
        for child in module._modules.values():
            if child is None:
                continue
            if not holder or not isinstance(child, _CONTAINERS) or id(child) in seen:
                stack.append(child)
                continue
            seen.add(id(child))
            full.append(child)
            for key, tensor in (*child._parameters.items(), *child._buffers.items()):
                if key != adapter_name and tensor is not None:
                    others.append((child, key, tensor, tensor._version))
            only_flags = tuner_layer and type(child) is nn.ModuleDict
            for key, entry in child._modules.items():
                if entry is None:
                    continue
                if key == adapter_name:
                    stack.append(entry)
                    continue
                if entry._modules:
                    inner = list(entry.modules())
                    owned(inner)
                    if only_flags:
                        flagged.extend(inner)
                        nested.extend(module for module in inner if module._modules)
                else:  # a leaf (LoRA's Linear and dropout): `owned` inlined, the hot path
                    for attribute, tensor in entry._parameters.items():
                        if tensor is not None:
                            append((entry, attribute, tensor, tensor._version))
                    for attribute, tensor in entry._buffers.items():
                        if tensor is not None:
                            append((entry, attribute, tensor, tensor._version))
                    if only_flags:
                        flagged.append(entry)
                if not only_flags:
                    stack.append(entry)
    return Split(full, flagged, others, nested)


def _adapter_entry(top: nn.Module, local: str) -> str | None:
    """The adapter whose entry the key `local` (under `top`) addresses: the segment after the first
    per-adapter container of a tuner layer, auxiliary wrapper or tuner on its path; None if none."""
    module: nn.Module | None = top
    in_holder = False
    for segment in local.split("."):
        if module is None:
            return None
        if in_holder and isinstance(module, _CONTAINERS):
            return segment
        in_holder = isinstance(module, _HOLDERS)
        module = module._modules.get(segment)
    return None


def merged_base_tensors(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The base weights of the tuner layers among `modules` with merged adapters: PEFT's
    `set_adapter`, which a load runs, unmerges them in place (`.data -=`, no new version).
    `split_adapters`' full and nested modules are the ones to look at, a cheaper walk than
    `model.modules()` once the model holds many adapters."""
    return [
        tensor
        for module in modules
        if isinstance(module, boundary.BaseTunerLayer) and module.merged_adapters
        for tensor in module.get_base_layer().parameters()
    ]


def saved_by_peft(module_path: str, attribute: str, config: Mapping[str, object]) -> bool:
    """Whether PEFT's own saving writes this base weight into an adapter checkpoint: an embedding
    (`save_embedding_layers`, a resized vocabulary), or a bias when the adapter trains biases."""
    if attribute == "bias" and config.get("bias") not in (None, "none"):
        return True
    segments = [s for s in module_path.split(".") if s not in ("base_layer", "original_module")]
    return bool(segments) and segments[-1] in boundary.EMBEDDING_LAYER_NAMES


@contextmanager
def guarded_writes(
    top: nn.Module,
    base: BaseWeights,
    adapter_name: str,
    config: Mapping[str, object],
    tx: Transaction,
    others: set[int],
    existing: set[int] | None = None,
) -> Iterator[None]:
    """While open, every `load_state_dict` that reaches `top` (the PeftModel: the tuner holds
    tensors too, VB-LoRA's vector bank) is checked before torch copies: see the module docstring.
    `others`: the ids of the other adapters' tensors (`record_for_load`), refused whatever the key
    says (an adapter named `model` or `0` is a segment of every key); `existing`: the ids of every
    tensor in `top` before the load (`record_for_load`'s; None: read here)."""
    if existing is None:
        existing = tensor_ids(top.modules())

    def check(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_args: Any) -> None:
        for key in state_dict:
            if not key.startswith(prefix):
                continue
            local = key[len(prefix) :]
            path, _, attribute = local.rpartition(".")
            try:
                owner = module.get_submodule(path)
            except AttributeError:
                continue  # torch reports it as unexpected
            tensor = owner._parameters.get(attribute, owner._buffers.get(attribute))
            if tensor is None or id(tensor) not in existing:
                continue  # created by this load
            if id(tensor) in others and _adapter_entry(module, local) != adapter_name:
                # (a tensor the new adapter's entry shares with another adapter, VeRA's projections,
                # is the new adapter's too: PEFT's loop writes it)
                raise ValueError(
                    f"the checkpoint of adapter {adapter_name!r} holds {key!r}, which would overwrite "
                    "another adapter's weights"
                )
            if id(tensor) in base.ids:
                if not saved_by_peft(path, attribute, config):
                    raise ValueError(
                        f"the checkpoint of adapter {adapter_name!r} holds {key!r}, which would overwrite "
                        "a weight of the base model that every adapter shares; fastkeys loads only the base "
                        "weights PEFT itself saves: embeddings with save_embedding_layers "
                        f"({', '.join(boundary.EMBEDDING_LAYER_NAMES)}), biases when the config trains them"
                    )
            elif adapter_name not in local.split("."):
                raise ValueError(
                    f"the checkpoint of adapter {adapter_name!r} holds {key!r}, which would overwrite "
                    "another adapter's weights"
                )
            tx.protect(tensor)

    handle = top.register_load_state_dict_pre_hook(check)  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        handle.remove()


def peft_load(
    call: Callable[[str], Any],
    top: nn.Module,
    base_model: nn.Module,
    adapter_name: str,
    config: dict[str, object],
    tensors: dict[str, torch.Tensor],
    tx: Transaction,
    protect: list[torch.Tensor],
    others: set[int],
    existing: set[int] | None = None,
) -> tuple[Any, Any, list[str]]:
    """Runs `call(directory)` (PEFT's `load_adapter` or `from_pretrained` on a scratch directory
    holding `config`, fed `tensors`) under the rules above: `top` is the model PEFT loads the state
    dict into, `base_model` the base model under it, `others` the ids of the other adapters'
    tensors, `existing` the ids of every tensor (`guarded_writes`). The caller recorded the model in
    `tx` and rolls it back if this raises. Returns (PEFT's
    return value, torch's raw load result, the base weights the load changed)."""
    base = BaseWeights(base_model)
    for tensor in protect:
        tx.protect(tensor)
    with tempfile.TemporaryDirectory(prefix="fastkeys-adapter-") as scratch:
        directory = Path(scratch)
        (directory / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
        placeholder = directory / SINGLE_FILE
        save_file({}, placeholder)
        with (
            boundary.recorded_results() as records,
            boundary.fed_tensors(str(placeholder), tensors),
            linear_time_matching(),
            guarded_writes(top, base, adapter_name, config, tx, others, existing),
            settled_heap(),
        ):
            returned = call(str(directory))
    raw = boundary.last_result(records, "loader")
    return returned, raw, base.changed(tx.differs)


def special_init_targets(config: Any, index_modules: dict[str, Any]) -> list[torch.Tensor]:
    """The base weights a special initialisation (PiSSA, OLoRA, CorDA, KaSA, ...) may rewrite in place:
    those of the modules the config targets, protected before PEFT runs."""
    init = getattr(config, "init_lora_weights", True)
    if (init is True or init is False or init == "gaussian") and getattr(config, "kasa_config", None) is None:
        return []  # KaSA truncates the base weights at initialisation
    found: list[torch.Tensor] = []
    with linear_time_matching():
        for name, module in index_modules.items():
            if boundary.check_target_module_exists(config, name):
                base = module.get_base_layer() if isinstance(module, boundary.BaseTunerLayer) else module
                found.extend(
                    t for t in (*base._parameters.values(), *base._buffers.values()) if t is not None
                )
    return found
