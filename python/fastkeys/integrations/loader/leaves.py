"""LoRA's leaf modules as torch's constructors leave them, at a fraction of their cost.

A LoRA adapter adds, per target, two `nn.Linear` (no bias) and an `nn.Identity` (no dropout), put
into three `ModuleDict`s. torch builds each through `Module.__init__` (a dozen writes through
`Module.__setattr__`) and registers each parameter and child through checks written for any user
code: at the benchmark's shape that was a third of a fast load. Here a leaf is a copy of the state
a real constructor left in a template (every dict, set and list copied, so nothing is shared), with
the loaded weight as its parameter, and a `ModuleDict` entry is written into its `_modules`.

That is what torch's own calls produce as long as no global registration hook is installed (they
run inside `add_module` and `register_parameter` and may replace what is registered), and the
template holds only state of the kinds checked below; otherwise torch's own calls run.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from fastkeys.integrations.loader import boundary

_COPIED = (dict, OrderedDict, set, list)
_SHARED = (bool, int, float, str, type(None))


class _Template:
    """The state torch's constructor leaves in a `kind` (Linear: 1x1, no bias, on the meta device),
    and which of its values are (empty) containers a copy must not share."""

    def __init__(self, kind: type[nn.Module]) -> None:
        module = nn.Linear(1, 1, bias=False, device="meta") if kind is nn.Linear else kind()
        self.state = dict(vars(module))
        self.containers = [
            (name, type(value)) for name, value in self.state.items() if type(value) in _COPIED
        ]
        self.exact = all(
            type(value) in _SHARED or (type(value) in _COPIED and (not value or name == "_parameters"))
            for name, value in self.state.items()
        )

    def copy(self) -> dict[str, Any]:
        state = self.state.copy()
        for name, kind in self.containers:
            state[name] = kind()
        return state


@functools.cache
def _template(kind: type[nn.Module]) -> _Template:
    return _Template(kind)


class Leaves:
    """Builds one load's leaves: by copying templates when that is exact (checked once per load),
    through torch's own calls otherwise."""

    def __init__(self) -> None:
        self.linear_template = _template(nn.Linear)
        self.identity_template = _template(nn.Identity)
        self.direct = (
            self.linear_template.exact
            and self.identity_template.exact
            and list(self.linear_template.state["_parameters"]) == ["weight", "bias"]
            and not boundary.registration_hooks_installed()
        )

    def frozen_linear(self, weight: torch.Tensor) -> nn.Linear:
        """`nn.Linear(in, out, bias=False)` holding `weight` (frozen), without the random
        initialisation its constructor spends on values loading overwrites."""
        parameter = nn.Parameter(weight, requires_grad=False)
        linear = nn.Linear.__new__(nn.Linear)
        if not self.direct:
            nn.Module.__init__(linear)
            linear.in_features = weight.shape[1]
            linear.out_features = weight.shape[0]
            linear.weight = parameter
            linear.register_parameter("bias", None)
            return linear
        state = self.linear_template.copy()
        parameters = state["_parameters"] = self.linear_template.state["_parameters"].copy()
        parameters["weight"] = parameter  # the template's order: weight, bias (None)
        state["in_features"] = weight.shape[1]
        state["out_features"] = weight.shape[0]
        vars(linear).update(state)
        return linear

    def identity(self) -> nn.Identity:
        if not self.direct:
            return nn.Identity()
        module = nn.Identity.__new__(nn.Identity)
        vars(module).update(self.identity_template.copy())
        return module

    def put(self, container: nn.ModuleDict, name: str, module: nn.Module) -> None:
        """`container[name] = module`, for a name `policy.model_refusal` already checked (a string
        with no dot that is no attribute of torch's containers)."""
        if self.direct:
            container._modules[name] = module
        else:
            container[name] = module
