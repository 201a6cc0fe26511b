"""Loading PEFT adapters: PEFT's end state, fastkeys' verdict on missing keys, at the adapter's cost.

PEFT filters the missing keys with its substring rule before its callers see them, so the keys it
wrongly drops cannot be recovered from its answer. `load_adapter` and `load_adapters` load LoRA
adapters by a per-adapter path (`_loader`) that ends in exactly the state PEFT's `load_adapter`
would, and give everything else to PEFT; `from_pretrained` calls PEFT. Where PEFT loads, fastkeys
reads the raw result that torch's `load_state_dict` returned inside PEFT's
`set_peft_model_state_dict`: the first call wraps that function with a pass-through that records
results only for the thread inside a fastkeys call. Importing this module imports neither torch nor
peft; calling it needs both.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from .matching import MissingAdapterKeysWarning, filter_missing

__all__ = ["AdapterLoadResult", "filter_load_result", "from_pretrained", "load_adapter", "load_adapters"]

if TYPE_CHECKING:
    from ._loader import AdapterLoadResult

_TESTED_WITH = "0.21"
# Inside `_raw_results` a caller wants torch's raw load result, which only PEFT's loader produces.
_RAW_REQUESTED = "the raw load result was requested"
_SHOWN = 5
_recording = threading.local()
_install_lock = threading.Lock()
# PEFT's own warning about missing keys (and its variant with a prefix hint), replaced by
# fastkeys' verdict. Matched at the start of the message, as `warnings` filters do.
_PEFT_MISSING_WARNINGS = (
    r"Found missing adapter keys while loading the checkpoint",
    r"Adapter name '.*' should not be contained in the prefix '.*'\. This could be the potential reason",
)


def _peft_model_module() -> Any:
    try:
        import peft
        from peft import peft_model
    except ImportError as error:
        raise ImportError("fastkeys.peft needs peft and torch: pip install 'fastkeys[peft]'") from error
    missing = [name for name in ("PeftModel", "set_peft_model_state_dict") if not hasattr(peft_model, name)]
    if missing:
        raise RuntimeError(
            f"fastkeys.peft relies on peft.peft_model.{missing[0]}, which peft "
            f"{getattr(peft, '__version__', '?')} does not have "
            f"(fastkeys is tested with peft {_TESTED_WITH}); "
            "use fastkeys.filter_missing on a load result instead"
        )
    _install(peft_model)
    return peft_model


def _install(module: Any) -> None:
    with _install_lock:
        original = module.set_peft_model_state_dict
        if getattr(original, "__fastkeys_recording__", False):
            return

        @functools.wraps(original)
        def recording(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            stack = getattr(_recording, "stack", None)
            if stack:
                # PEFT filters `missing_keys` in place right after this returns: keep a copy.
                snapshot = result._replace(missing_keys=list(result.missing_keys))
                for records in stack:
                    records.append(snapshot)
            return result

        recording.__fastkeys_recording__ = True  # type: ignore[attr-defined]
        module.set_peft_model_state_dict = recording


@contextlib.contextmanager
def _raw_results() -> Iterator[list[Any]]:
    """Collects the raw results of this thread's loads while open (nested ones included)."""
    stack = getattr(_recording, "stack", None)
    if stack is None:
        stack = _recording.stack = []
    records: list[Any] = []
    stack.append(records)
    try:
        yield records
    finally:
        stack.pop()


def _last(records: list[Any], what: str) -> Any:
    if not records:
        raise RuntimeError(
            f"PEFT's {what} did not call set_peft_model_state_dict, so there is no load result to check "
            f"(fastkeys is tested with peft {_TESTED_WITH})"
        )
    return records[-1]


def __getattr__(name: str) -> Any:
    if name == "AdapterLoadResult":
        from ._loader import AdapterLoadResult

        return AdapterLoadResult
    raise AttributeError(f"module 'fastkeys.peft' has no attribute {name!r}")


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

    LoRA adapters (DoRA, rsLoRA) load by a path that touches only the adapter's own modules; every
    other case goes through PEFT's loader, and the result's `loader`/`reason` say so. A failed load
    leaves the model as it was. `missing_keys` is fastkeys' verdict on what the checkpoint lacks."""
    from . import _loader

    _peft_model_module()
    return _loader.load_one(
        peft_model,
        adapter_name,
        model_id,
        is_trainable=is_trainable,
        torch_device=torch_device,
        autocast_adapter_dtype=autocast_adapter_dtype,
        low_cpu_mem_usage=low_cpu_mem_usage,
        force_peft=_RAW_REQUESTED if getattr(_recording, "stack", None) else None,
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
    from . import _loader

    _peft_model_module()
    return _loader.load_many(
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
    A local directory with a sharded checkpoint (`adapter_model.safetensors.index.json` and shards)
    is read too: PEFT gets its shards merged into a temporary single file.

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, when tensors of the adapter are missing
    from the checkpoint; PEFT's own warning about missing keys is filtered out while PEFT loads
    (other warnings pass; like any `warnings.catch_warnings`, this is not thread-safe).
    """
    from . import _loader

    peft_model_module = _peft_model_module()
    with _raw_results() as records, warnings.catch_warnings(), _loader.readable_by_peft(model_id) as source:
        for message in _PEFT_MISSING_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=UserWarning)
        loaded = peft_model_module.PeftModel.from_pretrained(model, source, adapter_name, **kwargs)
    result = filter_load_result(loaded, _last(records, "from_pretrained"), adapter_name)
    missing = list(result.missing_keys)
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (
            f", ... ({len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else ""
        )
        warnings.warn(
            MissingAdapterKeysWarning(
                f"adapter {adapter_name!r}: {len(missing)} of its tensors are missing from the checkpoint "
                f"at {model_id}: {shown}",
                adapter_name,
                missing,
            ),
            stacklevel=2,
        )
    return loaded
