"""Loading PEFT adapters: PEFT's end state, fastkeys' verdict on missing keys, at the adapter's cost.

PEFT filters the missing keys with its substring rule before its callers see them, so the keys it
wrongly drops cannot be recovered from its answer. `load_adapter` and `load_adapters` load LoRA
adapters by a per-adapter path that ends in exactly the state PEFT's `load_adapter` would, where
that was verified (an allow-list of config fields, options and versions), and give everything else
to PEFT's loader with the reason; every load is all or nothing. `from_pretrained` calls PEFT. The
machinery is the package `fastkeys.integrations.loader` (docs/loading.md). Importing this module
imports neither torch nor peft; calling it needs both.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastkeys.integrations import recorder
from fastkeys.integrations.loader.result import AdapterLoadResult
from fastkeys.rules.matching import filter_missing

if TYPE_CHECKING:
    from fastkeys.integrations.loader.lifecycle import AdapterChangeResult

__all__ = [
    "AdapterLoadResult",
    "add_weighted_adapter",
    "delete_adapters",
    "filter_load_result",
    "from_pretrained",
    "load_adapter",
    "load_adapters",
    "set_adapter",
]

# Inside `boundary.recorded_results` a caller wants torch's raw load result, which only PEFT's loader
# produces.
_RAW_REQUESTED = "the raw load result was requested"
# PEFT's own warning about missing keys (and its variant with a prefix hint), replaced by
# fastkeys' verdict. Matched at the start of the message, as `warnings` filters do.
_PEFT_MISSING_WARNINGS = (
    r"Found missing adapter keys while loading the checkpoint",
    r"Adapter name '.*' should not be contained in the prefix '.*'\. This could be the potential reason",
)


def _loader_api() -> Any:
    """`fastkeys.integrations.loader.api`, with PEFT's loader hooks installed; ImportError naming
    the extra when peft or torch is missing, RuntimeError naming the version when PEFT lacks what
    is hooked."""
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
    except ImportError as error:
        raise ImportError("fastkeys.peft needs peft and torch: pip install 'fastkeys[peft]'") from error
    from fastkeys.integrations.loader import api, boundary

    boundary.install()
    return api


def filter_load_result(peft_model: Any, load_result: Any, adapter_name: str) -> Any:
    """fastkeys' verdict on a raw load result of `adapter_name`, using the method and options of
    `peft_model.peft_config[adapter_name]`. Returns the same type with `missing_keys` filtered."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        raise TypeError(
            f"peft_model must be a PEFT model with a peft_config dict, not {type(peft_model).__name__}"
        )
    if adapter_name not in configs:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; it has {sorted(configs)}")
    return filter_missing(load_result, adapter_name, config=configs[adapter_name])


def load_adapter(
    peft_model: Any,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    *,
    is_trainable: bool = False,
    torch_device: str | None = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
) -> AdapterLoadResult:
    """`peft_model.load_adapter(model_id, adapter_name, ...)` with the same end state, from a local
    directory with a single or sharded safetensors checkpoint (or a `.bin`, through PEFT).

    LoRA adapters (DoRA, rsLoRA) load by a path that touches only the adapter's own modules where
    that path was verified exact; every other case goes through PEFT's loader, and the result's
    `loader`/`reason` say so. Loading over an existing name replaces that adapter's weights, as PEFT
    does. A failed or interrupted load leaves the model as it was. `missing_keys` is fastkeys'
    verdict on what the checkpoint lacks; `base_weights_written` names the base weights the load
    changed (a checkpoint that would overwrite any other than the embeddings PEFT saves with
    `save_embedding_layers` is refused with ValueError)."""
    api = _loader_api()
    from fastkeys.integrations.loader import boundary

    return api.load_one(  # type: ignore[no-any-return]
        peft_model,
        adapter_name,
        model_id,
        is_trainable=is_trainable,
        torch_device=torch_device,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
        force_peft=_RAW_REQUESTED if boundary.recording() else None,
    )


def load_adapters(
    peft_model: Any,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    is_trainable: bool = False,
    torch_device: str | None = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> dict[str, AdapterLoadResult]:
    """Loads many adapters (name -> checkpoint directory, in order) into `peft_model`, each as
    `load_adapter` would, at a cost that does not grow with the adapters already loaded.

    A failing adapter raises after leaving no trace of itself; those loaded before it stay.
    `progress`: None shows a bar on stderr when it is a terminal (and several adapters load), False
    hides it, True forces it, a callable is called as `progress(done, total, adapter_name)`."""
    return _loader_api().load_many(  # type: ignore[no-any-return]
        peft_model,
        adapters,
        progress=progress,
        is_trainable=is_trainable,
        torch_device=torch_device,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
    )


def from_pretrained(model: Any, model_id: str, adapter_name: str = "default", **kwargs: Any) -> Any:
    """`PeftModel.from_pretrained(model, model_id, adapter_name, **kwargs)`, returning the PeftModel.
    A local directory is read with the checks of `load_adapter` (containment, regular files, size
    caps, sharded checkpoints; PEFT is fed the checked tensors) and a failure leaves `model` as it
    was; a Hugging Face Hub id goes to PEFT as it is.

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, when tensors of the adapter are missing
    from the checkpoint; PEFT's own warning about missing keys is filtered out while PEFT loads
    (other warnings pass; like any `warnings.catch_warnings`, this is not thread-safe).
    """
    api = _loader_api()
    from fastkeys.integrations.loader import boundary

    with warnings.catch_warnings():
        for message in _PEFT_MISSING_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        # PEFT reads `subfolder` of a local directory; fastkeys reads that folder itself
        subfolder = kwargs.get("subfolder")
        if subfolder is not None and not isinstance(subfolder, str):
            raise TypeError(f"subfolder must be a str, not {type(subfolder).__name__}")
        local = None
        if isinstance(model_id, (str, os.PathLike)):
            local = os.path.join(model_id, subfolder) if subfolder else os.fspath(model_id)
        if local is not None and os.path.isdir(local):
            options = {key: value for key, value in kwargs.items() if key != "subfolder"}
            loaded, raw = api.from_pretrained(model, local, adapter_name, **options)
        else:
            import peft

            with boundary.recorded_results() as records:
                loaded = peft.PeftModel.from_pretrained(model, model_id, adapter_name, **kwargs)
            raw = boundary.last_result(records, "from_pretrained")
    result = filter_load_result(loaded, raw, adapter_name)
    recorder.warn_missing(adapter_name, list(result.missing_keys), model_id, 2)
    return loaded


def _lifecycle() -> Any:
    """`fastkeys.integrations.loader.lifecycle`; ImportError naming the extra when peft or torch is
    missing."""
    _loader_api()
    from fastkeys.integrations.loader import lifecycle

    return lifecycle


def set_adapter(
    peft_model: Any, adapter_name: str | list[str], *, inference_mode: bool = False
) -> AdapterChangeResult:
    """Makes `adapter_name` the active adapter, or a list of names the active ones, ending in
    exactly PEFT's state: for a str, `peft_model.set_adapter(name, inference_mode=...)`; for a
    list, `peft_model.base_model.set_adapter(names, inference_mode=...)` (PEFT's way to activate
    several; `peft_model.active_adapter` stays as it is). Active adapters require grad unless
    `inference_mode`, every other adapter is frozen, as PEFT does.

    On a LoRA model (lora.Linear/Embedding layers, nothing merged, disabled or wrapped for
    modules_to_save, verified PEFT and torch) only the layers' active lists and the weights of the
    adapters that change are touched; anywhere else PEFT's own function runs. Returns
    `AdapterChangeResult(path, reason)`: `path` is "fastkeys" or "peft", `reason` why PEFT's ran.
    All or nothing, a KeyboardInterrupt included. An unknown name is PEFT's `ValueError: Adapter
    {name} not found.`, for a name in a list too (where PEFT would store it silently)."""
    return _lifecycle().set_adapter(peft_model, adapter_name, inference_mode=inference_mode)  # type: ignore[no-any-return]


def delete_adapters(peft_model: Any, adapter_names: str | list[str]) -> AdapterChangeResult:
    """Deletes one adapter (a str) or several, ending in exactly the state of
    `for name in adapter_names: peft_model.delete_adapter(name)`, active adapters chosen as PEFT
    chooses them when an active one goes (and its UserWarning, once per distinct message).

    Only the layers holding the adapter are changed, plus the active lists PEFT rewrites; the same
    allow-list as `set_adapter` decides, anywhere else PEFT's `delete_adapter` runs in a loop.
    Returns `AdapterChangeResult(path, reason)`. All or nothing for the whole list: every name is
    checked first (`ValueError: Adapter {name} does not exist`, as PEFT's, or a name given twice),
    and a failure or KeyboardInterrupt leaves every adapter in place."""
    return _lifecycle().delete_adapters(peft_model, adapter_names)  # type: ignore[no-any-return]


def add_weighted_adapter(
    peft_model: Any,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str | None = None,
    **options: Any,
) -> AdapterChangeResult:
    """A new LoRA adapter combining `adapters` with `weights`, ending in exactly the state of
    `peft_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, **options)`
    (options: svd_rank, svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method;
    `combination_type=None` is PEFT's default, "svd" for LoRA; other tuners, such as IA3's, get
    their own function with the arguments given).

    For the deterministic combinations (cat, linear, svd, ties, ties_svd, magnitude_prune,
    magnitude_prune_svd) on a LoRA model of float32 `nn.Linear` targets, with the same allow-list as
    the loads, the new adapter's matrices are built in the layers it targets only, from PEFT's own
    per-layer combination; anywhere else PEFT's function runs. Returns `AdapterChangeResult(path,
    reason)`. All or nothing: where PEFT would raise half-way (a target holding none of the
    adapters, say), the model is left as it was. An existing `adapter_name` changes nothing, as in
    PEFT, with a UserWarning saying so."""
    _loader_api()
    from fastkeys.integrations.loader import weighted

    return weighted.add_weighted_adapter(
        peft_model, adapters, weights, adapter_name, combination_type, **options
    )
