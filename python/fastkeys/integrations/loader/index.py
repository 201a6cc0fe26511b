"""The model as PEFT's matcher sees it, read afresh for every load.

PEFT's `inject_adapter` tests every name `model.named_modules()` yields, the internals of every
tuner layer included, so its cost grows with the adapters already loaded. The names that can match
a config are the ones outside the tuner layers' internals; walking only those costs one visit per
base-model module, whatever the number of adapters. Nothing is cached between loads and no hook is
installed: any change a user makes to the model (`ModuleList.insert`, `_modules[...] = ...`,
`register_parameter`, `del`, ...) is seen by the next load, and nothing fastkeys keeps outlives it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fastkeys.integrations.loader import boundary


class ModelIndex:
    """`modules`: the names `named_modules()` yields outside tuner-layer internals and auxiliary
    wrappers, in its order, with their modules; `layers`: the tuner layers among them;
    `segments`: every dotted segment of the model's parameter and buffer names outside those
    internals; `auxiliary`: whether PEFT's auxiliary wrappers (modules_to_save, trainable tokens)
    are in the model, and `wrappers` those wrappers by name; `shared`: whether a module is reached
    twice (PEFT's `_set_trainable` visits it under each name); `load_hook`: the name of the first
    module (the root is "", a tuner layer's base layer is named by its layer) that has a
    `load_state_dict` hook or its own `_load_from_state_dict`, or None. PEFT's `load_state_dict`
    runs those on every key, adapters' included; the fast path does not."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, Any] = {}
        self.layers: dict[str, Any] = {}
        self.auxiliary = False
        self.wrappers: dict[str, Any] = {}
        self.shared = False
        self.load_hook: str | None = None
        custom: dict[type, bool] = {}  # type -> overrides _load_from_state_dict
        segments: set[str] = {"weight", "bias", "base_layer"}
        tuner_layer = boundary.BaseTunerLayer
        wrapper = boundary.AuxiliaryTrainingWrapper
        kinds: dict[type, int] = {}  # isinstance by type, once each (BaseTunerLayer is an ABC: slow)
        # named_modules' preorder walk with its duplicate removal, without recursion
        memo: set[int] = set()
        stack: list[tuple[str, Any]] = [("", model)]
        while stack:
            name, module = stack.pop()
            if id(module) in memo:
                self.shared = True
                continue
            memo.add(id(module))
            if name:
                self.modules[name] = module
                segments.update(name.split("."))
            segments.update(module._parameters)
            segments.update(module._buffers)
            if self.load_hook is None and _load_hook(module, custom):
                self.load_hook = name
            kind = kinds.get(type(module))
            if kind is None:
                kind = kinds[type(module)] = (
                    1 if isinstance(module, tuner_layer) else 2 if isinstance(module, wrapper) else 0
                )
            if kind == 1:
                self.layers[name] = module
                segments.update(getattr(module, "adapter_layer_names", ()))
                segments.update(getattr(module, "other_param_names", ()))
                # named_modules would visit the wrapped base module here: a module tied elsewhere is
                # then a duplicate there
                inner = module
                while isinstance(base := getattr(inner, "base_layer", None), nn.Module):
                    memo.add(id(base))
                    if self.load_hook is None and _load_hook(base, custom):
                        self.load_hook = name
                    inner = base
                continue
            if kind == 2:
                self.auxiliary = True
                self.wrappers[name] = module
                # the wrapper's own names (original_module, modules_to_save, its copies' names and
                # parameters): an adapter named like one changes what PEFT's loop restores
                for local, _parameter in module.named_parameters():
                    segments.update(local.split("."))
                continue
            prefix = name + "." if name else ""
            children = [(prefix + key, child) for key, child in module._modules.items() if child is not None]
            stack.extend(reversed(children))
        self.segments = segments


def _load_hook(module: nn.Module, custom: dict[type, bool]) -> bool:
    kind = type(module)
    overrides = custom.get(kind)
    if overrides is None:
        overrides = custom[kind] = kind._load_from_state_dict is not nn.Module._load_from_state_dict
    return overrides or bool(module._load_state_dict_pre_hooks) or bool(module._load_state_dict_post_hooks)
