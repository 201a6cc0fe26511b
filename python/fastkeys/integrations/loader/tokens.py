"""`trainable_token_indices` on the fast path: PEFT's `TrainableTokensWrapper` steps for one new LoRA
adapter.

For an adapter added to a model whose trainable-token wrappers exist already, PEFT's `inject_adapter`
does: `_set_adapter` over every wrapper (each keeps the one active adapter it holds, or none: the
wrapper's `_active_adapter` becomes that name or `[]`, its `token_adapter`'s `[name]` or `[]`); then
`set_additional_trainable_modules`: the target layers (the config's dict, or, for a list, the input
embeddings' name), and for each one `_set_trainable` over every module name ending in it (the whole
model, `remove_duplicate=False`): the wrapper's own `update(adapter_name, token_indices=...)` (its
`TrainableTokensLayer.update_layer`: the rows of the base weight into `trainable_tokens_delta` and
`trainable_tokens_original`, then a device move) and its `set_adapter(active_adapter)`; with tied
embeddings, the same for the modules tied to the input embeddings, with `tied_adapter=` the input
embeddings' token adapter (the update adds the name only). It then restores the `requires_grad` of
every parameter that existed before, so the new delta ends frozen; `load_adapter` unfreezes it when
`is_trainable`, copies the checkpoint's `<wrapper>.token_adapter.trainable_tokens_delta` into the
new delta (a tied wrapper loads nothing: it shares the dicts), and calls `eval()` unless
`is_trainable`.

Here the same happens for the wrappers alone: PEFT's own `check_set_adapter` and `update` on each
(its device move replaced by its effect on the new entry, as for tuner layers), the flags, the copy.
Anything this was not verified for is refused, for PEFT's loader: a layer not wrapped yet (PEFT
creates the wrapper), `modules_to_save` beside trainable tokens, several target layers with tied
embeddings (PEFT's tying heuristics), a base weight that is not float32 (`cast_adapter_dtype`),
wrappers of other classes, hooks, names PEFT's `endswith` matching may find inside the adapters'
layers or the wrappers, indices outside the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.plan import MODEL_PREFIX, Refused
from fastkeys.integrations.loader.transaction import Transaction
from fastkeys.integrations.loader.wrappers import scan_wrappers

_BASES = (nn.Embedding, nn.Linear)
_DELTA = "token_adapter.trainable_tokens_delta"


class Tokens(NamedTuple):
    """What the load does to the trainable-token wrappers: the active adapter each keeps (every
    wrapper), the updates in PEFT's order (wrapper name, the kwargs PEFT passes) and the deltas the
    checkpoint fills."""

    active: dict[str, Any]  # wrapper name -> its new `_active_adapter` (a name or [])
    updated: list[tuple[str, dict[str, Any]]]
    expected: dict[str, tuple[str, tuple[int, ...]]]  # model key -> (checkpoint name, shape)


NO_TOKENS = Tokens({}, [], {})


def is_tokens_wrapper(module: Any) -> bool:
    return type(module) is boundary.TrainableTokensWrapper


def tokens_refusal(index: ModelIndex) -> str | None:
    """Why the model's trainable-token wrappers keep a load off the fast path, or None."""
    layers = {id(wrapper.token_adapter) for wrapper in index.wrappers.values() if is_tokens_wrapper(wrapper)}
    for name, wrapper in index.wrappers.items():
        if not is_tokens_wrapper(wrapper):
            return (
                f"{name} is a {type(wrapper).__name__} beside trainable tokens: mixed auxiliary wrappers "
                "are handled by PEFT's loader"
            )
        layer = wrapper._modules.get("token_adapter")
        if type(layer) is not boundary.TrainableTokensLayer:
            return f"{name}'s token adapter is a {type(layer).__name__}, not PEFT's TrainableTokensLayer"
        base = layer._modules.get("base_layer")
        if type(base) not in _BASES:
            return f"{name} wraps a {type(base).__name__}, not an nn.Embedding or nn.Linear"
        if base.weight.dtype != torch.float32:
            return (
                f"{name}'s weight is {base.weight.dtype} (cast_adapter_dtype on token deltas: not verified)"
            )
        if layer.merged_adapters:
            return f"{name} has merged trainable tokens"
        tied = layer.tied_adapter
        if tied is not None and id(tied) not in layers:
            return f"{name} is tied to a token adapter outside the model's wrappers"
    return None


def plan_tokens(tuner: Any, config: Any, adapter_name: str, index: ModelIndex, targets: list[str]) -> Tokens:
    """What adding `adapter_name` (LoRA, `config`) does to the trainable-token wrappers; Refused where
    it is not verified. Reads the model only."""
    if getattr(config, "modules_to_save", None):
        raise Refused("modules_to_save beside trainable tokens is handled by PEFT's loader")
    for name in targets:
        if name in index.wrappers:
            raise Refused(f"the config targets {name}, a trainable tokens wrapper")
    internal: set[str] = {"base_layer", "original_module", "token_adapter", adapter_name}
    internal.update(tuner.peft_config)
    for name, wrapper in index.wrappers.items():
        if not is_tokens_wrapper(wrapper):
            raise Refused(f"{name} is a {type(wrapper).__name__}, not a trainable tokens wrapper")
    inside: set[str] = set()  # segments of the names of the wrappers' modules and parameters
    new_active = scan_wrappers(
        tuner,
        config,
        adapter_name,
        index,
        "trainable tokens",
        (
            "trainable tokens",
            lambda w: adapter_name in w._adapters or adapter_name in w.token_adapter.token_indices,
        ),
        internal,
        inside,
    )
    if adapter_name in inside:
        raise Refused(
            f"the adapter name {adapter_name!r} is a segment of names inside the trainable tokens wrappers"
        )
    in_layers = {adapter_name, *tuner.peft_config}  # segments inside the adapters' layers
    for layer in index.layers.values():
        internal.update(layer._modules)
        in_layers.update(layer._modules)
        if layer.get_base_layer()._modules:
            raise Refused("a tuner layer's base layer has submodules, which PEFT's wrapper steps visit")
    entries = getattr(config, "trainable_token_indices", None)
    if entries is None:
        _check_all_read(index, [])
        return Tokens(new_active, [], {})
    if index.shared:
        raise Refused("a module of the model is reached under two names, which PEFT's wrapper steps visit")
    model = tuner.model
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(entries, dict):
        layers = dict(entries)
    else:
        found_name = next((n for n, m in index.modules.items() if m is embeddings), None)
        if found_name is None:
            raise Refused("the input embeddings are not found among the model's modules")
        layers = {found_name: entries}
    weights_tied = bool(boundary.BaseTuner.get_model_config(tuner).get("tie_word_embeddings", False))
    if len(layers) > 1 and weights_tied:
        raise Refused("several trainable token layers with tied embeddings: PEFT's tying rules, not verified")
    updated: list[tuple[str, dict[str, Any]]] = []
    for entry, indices in layers.items():
        for name in _matches(index, internal, [entry]):
            updated.append((name, {"token_indices": indices}))
    if weights_tied and embeddings is not None and is_tokens_wrapper(embeddings):
        source = embeddings.token_adapter
        own = [kwargs for name, kwargs in updated if index.wrappers[name] is embeddings]
        if len(own) != 1:
            raise Refused("the tied input embeddings' wrapper is not updated once by this adapter")
        tied_names = boundary.get_module_names_tied_with_embedding(model)
        for name in _tied_matches(index, in_layers, list(tied_names)):
            if index.wrappers[name].token_adapter.tied_adapter is not source:
                raise Refused(f"{name} is not tied to the input embeddings' token adapter")
            updated.append((name, {"token_indices": own[0]["token_indices"], "tied_adapter": source}))
    names = [name for name, _kwargs in updated]
    if len(set(names)) != len(names):
        raise Refused("a trainable tokens wrapper is matched twice")
    _check_all_read(index, names)
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, kwargs in updated:
        layer = index.wrappers[name].token_adapter
        base = layer.get_base_layer()
        indices = kwargs["token_indices"]
        rows = base.weight.shape[0]
        if not isinstance(indices, list) or not all(type(i) is int and 0 <= i < rows for i in indices):
            raise Refused(f"token indices for {name} are not ints inside its {rows} rows")
        if "tied_adapter" in kwargs:
            if layer.tied_adapter is None:
                raise Refused(f"{name} is tied by PEFT but its wrapper is not")
            continue
        if layer.tied_adapter is not None:
            raise Refused(f"{name}'s wrapper is tied, but PEFT would update it as untied")
        width = base.embedding_dim if hasattr(base, "embedding_dim") else base.in_features
        stored = f"{MODEL_PREFIX}{name}.{_DELTA}"
        # PEFT's wrapper step renames the checkpoint's key; its tuner remap then changes only keys
        # that an adapter parameter's name, without the adapter name, equals: none ends in the name
        expected[f"{stored}.{adapter_name}"] = (stored, (len(indices), width))
    return Tokens(new_active, updated, expected)


def _check_all_read(index: ModelIndex, updated: list[str]) -> None:
    """PEFT's `set_peft_model_state_dict` reads every untied wrapper's delta from the checkpoint
    (KeyError when it lacks one) and loads it under the new adapter's name."""
    for name, wrapper in index.wrappers.items():
        if wrapper.token_adapter.tied_adapter is None and name not in updated:
            raise Refused(
                f"PEFT's loader reads {name}'s trainable tokens from every checkpoint; "
                "this adapter has none there"
            )


_TIED = ".token_adapter.base_layer"


def _tied_matches(index: ModelIndex, in_layers: set[str], entries: list[str]) -> list[str]:
    """The wrappers `_set_trainable` updates for the names tied to the input embeddings: with the
    wrappers in place PEFT finds them as `<wrapper>.token_adapter.base_layer` and updates the
    grandparent; Refused for names of any other form."""
    if not entries or not all(entry.endswith(_TIED) for entry in entries):
        raise Refused(f"the modules tied to the input embeddings ({entries}) are not wrapped as verified")
    if "token_adapter" in in_layers:
        raise Refused("'token_adapter' names a module inside the adapters' layers")
    for name in index.modules:
        if any(name.endswith(entry) for entry in entries):
            raise Refused(f"{name} ends like a tied module's name")
    found = [w for w in index.wrappers if any(f"{w}{_TIED}".endswith(entry) for entry in entries)]
    if not found:
        raise Refused(f"the tied modules {entries} match no wrapper (PEFT raises its own error)")
    return found


def _matches(index: ModelIndex, internal: set[str], entries: list[str]) -> list[str]:
    """The names `_set_trainable` finds for `entries` (`endswith` over every module name), each a
    trainable tokens wrapper already; Refused otherwise."""
    for entry in entries:
        last = entry.rpartition(".")[2]
        clash = next((segment for segment in internal if segment.endswith(last)), None)
        if clash is not None:
            raise Refused(f"trainable tokens entry {entry!r} may match {clash!r} inside an adapter's layers")
    found = [name for name in index.modules if any(name.endswith(entry) for entry in entries)]
    if not found:
        raise Refused(f"trainable tokens entries {entries} match no module (PEFT raises its own error)")
    for name in found:
        if not is_tokens_wrapper(index.wrappers.get(name)):
            raise Refused(f"trainable tokens match {name}, which is not wrapped yet (PEFT creates wrappers)")
    return found


def add_tokens(
    index: ModelIndex,
    tokens: Tokens,
    adapter_name: str,
    tx: Transaction,
    loaded: dict[str, Any],
    mover: Callable[[Any], Callable[..., None]],
) -> list[nn.Parameter]:
    """PEFT's wrapper steps for the new adapter (see the module's docstring), recorded in `tx` first;
    `loaded` maps model keys to the checkpoint's tensors; `mover(layer)`: the layer's device move
    for one new adapter (`inject._mover`). Returns the new deltas."""
    for name, chosen in tokens.active.items():
        wrapper = index.wrappers[name]
        layer = wrapper.token_adapter
        tx.record_attributes(wrapper, ("_active_adapter",))
        tx.record_attributes(layer, ("_active_adapter",))
        # set_adapter(name) / set_adapter([]) on the wrapper and on its token adapter
        vars(wrapper)["_active_adapter"] = chosen
        vars(layer)["_active_adapter"] = [chosen] if isinstance(chosen, str) else []
    for name, _kwargs in tokens.updated:
        wrapper = index.wrappers[name]
        layer = wrapper.token_adapter
        tx.record(wrapper)  # its `_adapters` set
        tx.record(layer, adapter_name)
        tx.record_entries(layer.token_indices, adapter_name)
        delta = layer.trainable_tokens_delta
        tx.record_entries(delta._parameters, adapter_name)
        tx.record_entries(delta._keys, adapter_name)
        # a non-persistent buffer: its name goes into `_non_persistent_buffers_set` too
        tx.record(layer.trainable_tokens_original)
    deltas: list[nn.Parameter] = []
    for name, kwargs in tokens.updated:
        wrapper = index.wrappers[name]
        layer = wrapper.token_adapter
        # PEFT's own step; its device move checks every adapter of the dicts for the meta device
        layer._move_adapter_to_device_of_base_layer = mover(layer)
        try:
            wrapper.update(adapter_name, **kwargs)
        finally:
            del layer._move_adapter_to_device_of_base_layer
        if "tied_adapter" not in kwargs:
            deltas.append(layer.trainable_tokens_delta[adapter_name])
    for delta in deltas:
        # the wrapper's set_adapter(active_adapter): the new adapter is not active, so it is frozen
        delta.requires_grad_(False)
    for name, _kwargs in tokens.updated:
        key = f"{MODEL_PREFIX}{name}.{_DELTA}.{adapter_name}"
        if key in tokens.expected:
            delta = index.wrappers[name].token_adapter.trainable_tokens_delta[adapter_name]
            delta.detach().copy_(loaded[key])
    return deltas
