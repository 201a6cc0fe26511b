"""diffusers' LoRA loading with fastkeys' verdict on the missing keys.

diffusers (`utils/peft_utils.py`, `_maybe_warn_for_unhandled_keys`) keeps a missing key when it
contains `.lora_` (or `lokr_`) and the adapter name as substrings, so an adapter called `foo` is
warned about `foobar`'s tensors and `default_1` about `default_10`'s, and its `load_lora_adapter`
returns nothing. `load_lora_adapter` and `load_lora_weights` here call diffusers' own methods
(same arguments, same side effects) and return fastkeys' verdict on the raw load results.

To see a raw result, the first call wraps `peft.set_peft_model_state_dict`, which diffusers
imports from `peft` each time it loads a LoRA into a model, with a pass-through that, inside a
fastkeys call on the same thread, records the result and hands diffusers' warning fastkeys'
verdict instead of the raw keys: diffusers then warns only about tensors that are really missing.
Text encoders in a pipeline are loaded by transformers' `load_adapter`, judged as in
`fastkeys.transformers`; both through `fastkeys.integrations.recorder`. Importing this module
imports none of torch, peft, diffusers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastkeys import transformers as _transformers
from fastkeys.integrations import recorder
from fastkeys.rules import validate as _validate

if TYPE_CHECKING:
    from fastkeys.integrations.loader.result import AdapterLoadResult

__all__ = ["load_adapters", "load_lora_adapter", "load_lora_weights"]


def _prepare() -> None:
    try:
        import diffusers
        import peft  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'fastkeys.diffusers needs diffusers, peft and torch: pip install "fastkeys[diffusers]"'
        ) from error
    try:
        from diffusers.loaders import peft as diffusers_peft
    except ImportError as error:  # diffusers without its PEFT integration
        raise recorder.missing_internal(
            diffusers, "diffusers.loaders.peft", "use fastkeys.filter_missing instead"
        ) from error
    if not hasattr(diffusers_peft, "PeftAdapterMixin"):
        raise recorder.missing_internal(
            diffusers, "diffusers.loaders.peft.PeftAdapterMixin", "use fastkeys.filter_missing"
        )
    recorder.install_peft()


def _result_for(load: Any, model: Any) -> tuple[str, Any] | None:
    """(adapter name, torch's `_IncompatibleKeys` with fastkeys' verdict) for `model`, or None."""
    judged = load.result_for(model)
    if judged is None:
        return None
    from torch.nn.modules.module import _IncompatibleKeys

    return judged.adapter_name, _IncompatibleKeys(judged.verdict, judged.unexpected)


def _adapters(model: Any) -> set[str]:
    configs = getattr(model, "peft_config", None)
    return set(configs) if isinstance(configs, dict) else set()


def _check_seen(load: Any, model: Any, before: set[str]) -> None:
    """A model that gained an adapter without a recorded load was loaded some other way (a newer
    diffusers): returning None there would be a silently wrong answer."""
    if load.result_for(model) is None and _adapters(model) - before:
        import diffusers

        raise recorder.missing_internal(
            diffusers,
            "diffusers loading LoRA weights through peft.set_peft_model_state_dict",
            recorder.INSTEAD,
        )


def _contained(source: Any) -> None:
    """A local directory gets the checks of `fastkeys.scan` before diffusers reads it by path."""
    from fastkeys.integrations.loader.files import check_local

    check_local(source)


def _check_name(adapter_name: str | None) -> None:
    if adapter_name is not None:
        _validate.name("adapter_name", adapter_name)


def load_lora_adapter(
    model: Any, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, **kwargs: Any
) -> Any:
    """`model.load_lora_adapter(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
    **kwargs)` on a diffusers model (a UNet or a transformer), with the same arguments and side
    effects. Returns torch's load result (`missing_keys`, `unexpected_keys`) with `missing_keys`
    holding exactly the adapter's tensors that the checkpoint lacks, or None when diffusers loaded
    no weights into the model (hotswapping, or no keys under `prefix`). `adapter_name=None` lets
    diffusers choose the name, as it does (`default_0`, `default_1`, ...).

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, when tensors of the adapter are missing.
    """
    _check_name(adapter_name)
    if not callable(getattr(model, "load_lora_adapter", None)):
        raise TypeError(
            "model must be a diffusers model with LoRA support (load_lora_adapter), "
            f"not {type(model).__name__}"
        )
    _prepare()
    before = _adapters(model)
    _contained(pretrained_model_name_or_path_or_dict)
    with recorder.loading(adapter_name) as load:
        model.load_lora_adapter(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
    load.raise_error()
    _check_seen(load, model, before)
    judged = _result_for(load, model)
    if judged is None:
        return None
    name, result = judged
    recorder.warn_missing(name, result.missing_keys, _source(pretrained_model_name_or_path_or_dict), 2)
    return result


def load_lora_weights(
    pipeline: Any, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, **kwargs: Any
) -> dict[str, Any]:
    """`pipeline.load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name,
    **kwargs)` on a diffusers pipeline, with the same arguments and side effects. Returns, for each
    component of the pipeline that received weights (`"unet"`, `"transformer"`, `"text_encoder"`,
    ...), its load result with `missing_keys` holding exactly the adapter's tensors that the
    checkpoint lacks for it.

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, naming every missing tensor of the adapter.
    """
    _check_name(adapter_name)
    if not callable(getattr(pipeline, "load_lora_weights", None)):
        raise TypeError(
            f"pipeline must be a diffusers pipeline with LoRA support (load_lora_weights), "
            f"not {type(pipeline).__name__}"
        )
    components = getattr(pipeline, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"pipeline must have a components dict, not {type(components).__name__}")
    _prepare()
    _transformers._prepare()  # the text encoders: transformers models
    before = {name: _adapters(component) for name, component in components.items()}
    _contained(pretrained_model_name_or_path_or_dict)
    with recorder.loading(adapter_name) as load:
        pipeline.load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
    load.raise_error()
    for name, component in components.items():
        _check_seen(load, component, before[name])
    results: dict[str, Any] = {}
    names: set[str] = set()
    for component_name, component in components.items():
        judged = _result_for(load, component) if component is not None else None
        if judged is not None:
            names.add(judged[0])
            results[component_name] = judged[1]
    missing = [key for result in results.values() for key in result.missing_keys]
    # diffusers picks the name per component when it is None; usually they agree.
    shown_name = adapter_name if adapter_name is not None else "/".join(sorted(names))
    recorder.warn_missing(shown_name, missing, _source(pretrained_model_name_or_path_or_dict), 2)
    return results


def _source(what: Any) -> str:
    return "state_dict" if isinstance(what, dict) else str(what)


def load_adapters(
    model: Any,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    prefix: str | None = "transformer",
    weight_name: str = "pytorch_lora_weights.safetensors",
    low_cpu_mem_usage: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> dict[str, AdapterLoadResult]:
    """Loads many LoRA adapters (name -> a local `.safetensors` file, or a directory holding
    `weight_name`; in order) into a diffusers model (a UNet, a transformer), ending in the state of
    `for name, path in adapters.items(): model.load_lora_adapter(path, adapter_name=name,
    prefix=prefix, weight_name=weight_name, low_cpu_mem_usage=low_cpu_mem_usage)`: the same
    `peft_config`, active adapter, module tree, values, `requires_grad` and training flags.

    After the first adapter (which diffusers' own load prepares the model with), each adapter is
    built in the layers it targets only, where that was verified exact (the diffusers releases,
    LoRA files in PEFT's layout, the config fields and model states of the PEFT loader's
    allow-list); anywhere else diffusers' `load_lora_adapter` runs, fed the tensors and metadata
    fastkeys read through its checks (containment, regular files, size caps), and the result's
    `loader`/`reason` say so. Returns `{name: fastkeys.peft.AdapterLoadResult}` with fastkeys'
    verdict on missing keys.

    Unlike diffusers, a file with no tensor under `prefix` raises ValueError (diffusers loads
    nothing and logs it). A failing adapter raises after leaving no trace of itself (a
    KeyboardInterrupt included); those loaded before it stay. `progress` as in
    `fastkeys.peft.load_adapters`."""
    if not callable(getattr(model, "load_lora_adapter", None)) or not callable(
        getattr(model, "named_modules", None)
    ):
        raise TypeError(
            "model must be a diffusers model with LoRA support (load_lora_adapter), "
            f"not {type(model).__name__}"
        )
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str or None, not {type(prefix).__name__}")
    if not isinstance(weight_name, str):
        raise TypeError(f"weight_name must be a str, not {type(weight_name).__name__}")
    _prepare()
    from fastkeys.integrations.loader import api, boundary, components

    boundary.install()
    return api.load_in_order(
        lambda name, path: components.load_one(
            model, name, path, prefix=prefix, weight_name=weight_name, low_cpu_mem_usage=low_cpu_mem_usage
        ),
        adapters,
        progress,
    )
