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
    are in the model."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, Any] = {}
        self.layers: dict[str, Any] = {}
        self.auxiliary = False
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
                continue
            memo.add(id(module))
            if name:
                self.modules[name] = module
                segments.update(name.split("."))
            segments.update(module._parameters)
            segments.update(module._buffers)
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
                    inner = base
                continue
            if kind == 2:
                self.auxiliary = True
                continue
            prefix = name + "." if name else ""
            children = [(prefix + key, child) for key, child in module._modules.items() if child is not None]
            stack.extend(reversed(children))
        self.segments = segments
