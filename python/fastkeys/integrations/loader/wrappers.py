"""PEFT's steps over the auxiliary wrappers (`modules_to_save`, trainable tokens) when an adapter
is added, as far as the fast path reproduces them: shared by `saved` and `tokens`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex, _load_hook
from fastkeys.integrations.loader.peft_re import linear_time_matching
from fastkeys.integrations.loader.plan import Refused


def scan_wrappers(
    tuner: Any,
    config: Any,
    adapter_name: str,
    index: ModelIndex,
    kind: str,
    holds: tuple[str, Callable[[Any], bool]],
    segments: set[str],
    inside: set[str] | None = None,
) -> dict[str, Any]:
    """The adapter each wrapper makes active when `adapter_name` is added (what PEFT's
    `_set_adapter(model, active)` picks), by wrapper name. Refused where a wrapper holds
    `adapter_name` already (`holds`: what it holds, and the test), carries a load_state_dict or
    accelerate hook, or contains a module the config matches (`kind`: the wrappers' name in the
    reason). Adds the names of the wrappers' children to `segments`; with `inside`, every segment of
    the names of their modules, parameters and buffers."""
    what, held = holds
    active = list(tuner.active_adapters)
    chosen_by: dict[str, Any] = {}
    with linear_time_matching():
        for name, wrapper in index.wrappers.items():
            try:  # PEFT raises its own errors
                chosen = wrapper.check_set_adapter(active)
            except ValueError as error:
                raise Refused(f"{name}: {error}") from None
            chosen_by[name] = chosen if chosen in wrapper._adapters else []
            if held(wrapper):
                raise Refused(f"{name} holds {what} named {adapter_name!r} already")
            for local, module in wrapper.named_modules():
                if _load_hook(module, {}):
                    raise Refused(f"{name}.{local} has a load_state_dict hook, which PEFT runs")
                if hasattr(module, "_hf_hook"):
                    raise Refused(f"{name}.{local} has an accelerate hook")
                if inside is not None:
                    inside.update(local.split("."))
                    inside.update(module._parameters)
                    inside.update(module._buffers)
                if local:
                    segments.update(module._modules)
                    found = tuner._check_target_module_exists(config, f"{name}.{local}")
                    if found and not isinstance(found, boundary.ExcludedModule):
                        raise Refused(f"the config matches {name}.{local}, inside a {kind} wrapper")
    return chosen_by
