"""`modules_to_save` on the fast path: PEFT's `ModulesToSaveWrapper` steps for one new LoRA adapter.

For an adapter added to a model whose wrappers exist already, PEFT's `inject_adapter` does, per
wrapper: `_set_adapter` over every wrapper (each keeps the one active adapter it holds, or none),
then, for every module name `_set_trainable` matches (`name.endswith(entry)` over the whole model,
tuner-layer and wrapper internals included), the wrapper's own `update(adapter_name)` (a deepcopy of
`original_module` into `modules_to_save[adapter_name]`, `original_module.requires_grad_(False)`)
and its `set_adapter(active_adapter)`; then it restores the `requires_grad` of every parameter that
existed before. `load_adapter` then sets the copies trainable when `is_trainable`, copies the
checkpoint's `<wrapper>.<key>` into `<wrapper>.modules_to_save.<adapter>.<key>` through
`load_state_dict`, and calls `eval()` unless `is_trainable`.

Here the same happens for the wrappers alone: PEFT's own `update` and `check_set_adapter` on each,
the requires_grad restoration for the parameters `update` touched, the copy, the flags. Anything
this was not verified for (a module not wrapped yet, a subclassed wrapper, a wrapped module that is
not exactly an `nn.Linear` or `nn.Embedding`, accelerate hooks, load hooks, a name PEFT would match
inside a tuner layer or a wrapper) is refused, for PEFT's loader. Trainable tokens: `tokens.py`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import peft
from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.plan import MODEL_PREFIX, Refused
from fastkeys.integrations.loader.tokens import is_tokens_wrapper, tokens_refusal
from fastkeys.integrations.loader.transaction import Transaction
from fastkeys.integrations.loader.wrappers import scan_wrappers
from fastkeys.rules.matching import insert_adapter_name

_WRAPPED = (nn.Linear, nn.Embedding)


class Saved(NamedTuple):
    """What the load does to the wrappers: the active adapter each keeps (every wrapper), the ones
    that get a copy for the new adapter (PEFT's order) and the tensors they load."""

    active: dict[str, Any]  # wrapper name -> its new `_active_adapter`
    updated: list[str]  # wrapper names
    expected: dict[str, tuple[str, tuple[int, ...]]]  # model key -> (checkpoint name, shape)


NOTHING = Saved({}, [], {})


def wrappers_refusal(peft_model: Any, index: ModelIndex) -> str | None:
    """Why the model's auxiliary wrappers keep a load off the fast path, or None. Trainable-token
    wrappers are judged by `tokens.py`."""
    if any(is_tokens_wrapper(wrapper) for wrapper in index.wrappers.values()):
        refusal = tokens_refusal(index)
        if refusal is not None:
            return refusal
    for name, wrapper in index.wrappers.items():
        if is_tokens_wrapper(wrapper):
            continue
        if type(wrapper) is not boundary.ModulesToSaveWrapper:
            return f"{name} is a {type(wrapper).__name__}: other wrappers are handled by PEFT's loader"
        if type(wrapper.original_module) not in _WRAPPED:
            return (
                f"{name} saves a {type(wrapper.original_module).__name__}, not an nn.Linear or nn.Embedding"
            )
    if type(peft_model).add_adapter is not peft.PeftModel.add_adapter:
        return f"{type(peft_model).__name__}.add_adapter adds modules to save of its own"
    return None


def plan_saved(tuner: Any, config: Any, adapter_name: str, index: ModelIndex, targets: list[str]) -> Saved:
    """What adding `adapter_name` (LoRA, `config`) does to the wrappers; Refused where it is not
    verified. Reads the model only."""
    entries = list(config.modules_to_save or [])
    if not entries and not index.wrappers:
        return NOTHING
    for name in targets:
        if name in index.wrappers:
            raise Refused(f"the config targets {name}, a modules_to_save wrapper")
    internal: set[str] = {"base_layer", "original_module", "modules_to_save", adapter_name}
    internal.update(tuner.peft_config)
    new_active = scan_wrappers(
        tuner,
        config,
        adapter_name,
        index,
        "modules_to_save",
        ("a copy", lambda w: adapter_name in w._adapters or adapter_name in w.modules_to_save),
        internal,
    )
    for layer in index.layers.values():
        internal.update(layer._modules)
        if layer.get_base_layer()._modules:
            # PEFT's wrapper steps visit them (a wrapper among them, a name an entry matches); the
            # index does not
            raise Refused(
                "a tuner layer's base layer has submodules, which PEFT's modules_to_save steps visit"
            )
    if not entries:
        return Saved(new_active, [], {})
    if index.shared:
        raise Refused(
            "a module of the model is reached under two names, which PEFT's modules_to_save visits twice"
        )
    for entry in entries:
        last = entry.rpartition(".")[2]
        clash = next((segment for segment in internal if segment.endswith(last)), None)
        if clash is not None:
            raise Refused(f"modules_to_save entry {entry!r} may match {clash!r} inside an adapter's layers")
    updated: list[str] = []
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in index.modules.items():
        if not any(name.endswith(entry) for entry in entries):
            continue
        if name not in index.wrappers:
            raise Refused(
                f"modules_to_save matches {name}, which is not wrapped yet (PEFT creates the wrapper)"
            )
        updated.append(name)
        for local, tensor in module.original_module.state_dict(keep_vars=True).items():
            stored = f"{MODEL_PREFIX}{name}.{local}"
            key = f"{MODEL_PREFIX}{name}.modules_to_save.{adapter_name}.{local}"
            if insert_adapter_name([key], adapter_name, config.peft_type) != [key]:
                raise Refused(f"PEFT's key renaming changes {key}")
            expected[key] = (stored, tuple(tensor.shape))
    return Saved(new_active, updated, expected)


def add_saved(
    index: ModelIndex, saved: Saved, adapter_name: str, tx: Transaction, loaded: dict[str, Any]
) -> list[nn.Module]:
    """PEFT's wrapper steps for the new adapter (see the module's docstring), recorded in `tx`
    first; `loaded` maps model keys to the checkpoint's tensors. Returns the new copies."""
    for name, chosen in saved.active.items():
        wrapper = index.wrappers[name]
        tx.record_attributes(wrapper, ("_active_adapter",))
        vars(wrapper)["_active_adapter"] = chosen
    restore = []
    for name in saved.updated:
        wrapper = index.wrappers[name]
        tx.record(wrapper)
        tx.record_entries(wrapper.modules_to_save._modules, adapter_name)
        tx.record(wrapper.original_module)
        restore += [(p, p.requires_grad) for p in wrapper.original_module.parameters()]
    copies = []
    for name in saved.updated:
        wrapper = index.wrappers[name]
        # PEFT's own step; _set_trainable's set_adapter(active_adapter) after it changes only the
        # requires_grad of the active copy, which inject_adapter restores
        wrapper.update(adapter_name)
        copies.append(wrapper.modules_to_save[adapter_name])
    for parameter, requires_grad in restore:
        parameter.requires_grad = requires_grad
    for name, copy in zip(saved.updated, copies, strict=True):
        prefix = f"{MODEL_PREFIX}{name}.modules_to_save.{adapter_name}."
        for local, tensor in copy.state_dict(keep_vars=True).items():
            tensor.detach().copy_(loaded[prefix + local])
    return copies
