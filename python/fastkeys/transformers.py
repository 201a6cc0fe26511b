"""transformers' `model.load_adapter` with fastkeys' verdict on the missing keys.

transformers 5.x keeps a missing key when it contains the adapter name *or* the method name
(`"lora"`), so loading a second LoRA adapter reports every tensor of the first one as MISSING, and
an adapter called `foo` is blamed for `foobar`'s tensors. `load_adapter` here calls transformers'
own `model.load_adapter` (same arguments, same side effects) and replaces that filter with
fastkeys' rule, applied to the raw result of the load.

To see the raw result, the first call wraps the function that `load_adapter` loads through
(`transformers.modeling_utils.PreTrainedModel._load_pretrained_model` on 5.x,
`peft.utils.set_peft_model_state_dict` on 4.57) with a pass-through (`fastkeys.integrations.
recorder`): for a model being loaded inside a fastkeys call on the same thread, it replaces the raw
`missing_keys` by fastkeys' verdict before transformers filters and reports them, so the LOAD REPORT
(5.x) or warning (4.57) shows only the tensors that are really missing. Every other load, on any
thread, is untouched. Importing this module imports none of torch, peft, transformers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fastkeys.integrations import recorder
from fastkeys.rules import validate as _validate

if TYPE_CHECKING:
    from fastkeys.integrations.loader.result import AdapterLoadResult

__all__ = ["load_adapter", "load_adapters"]


def _prepare() -> None:
    """Imports transformers (and peft, which its adapter loading needs) and installs the recorder."""
    try:
        import peft  # noqa: F401  (transformers' load_adapter imports it; say so before loading)
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError(
            'fastkeys.transformers needs transformers, peft and torch: pip install "fastkeys[transformers]"'
        ) from error
    recorder.install_transformers()


def load_adapter(model: Any, peft_model_id: Any = None, adapter_name: str = "default", **kwargs: Any) -> Any:
    """`model.load_adapter(peft_model_id, adapter_name=adapter_name, **kwargs)` on a transformers
    model, with the same arguments and side effects. Returns the load result with `missing_keys`
    (a set) holding exactly the adapter's tensors that the checkpoint lacks, and `unexpected_keys`
    as the library reports them (an adapter checkpoint holds only adapter tensors, so each of them
    is one that went nowhere): on transformers 5.x its `LoadStateDictInfo`; on 4.57, whose
    `load_adapter` returns None, torch's `_IncompatibleKeys` (`missing_keys`, `unexpected_keys`).

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, when tensors of this adapter are missing.
    RuntimeError naming the supported range on a transformers older than 4.57 or newer than 5.x.
    """
    _validate.name("adapter_name", adapter_name)
    if not callable(getattr(model, "load_adapter", None)):
        raise TypeError(
            "model must be a transformers model with PEFT support (a PreTrainedModel), "
            f"not {type(model).__name__}"
        )
    _prepare()
    from fastkeys.integrations.loader.files import check_local

    check_local(peft_model_id)
    with recorder.loading(adapter_name) as load:
        info = model.load_adapter(peft_model_id, adapter_name=adapter_name, **kwargs)
    load.raise_error()
    judged = load.result_for(model)
    if judged is None:  # loaded some other way: returning transformers' result would be wrong
        import transformers

        raise recorder.missing_internal(
            transformers,
            "load_adapter loading through PreTrainedModel._load_pretrained_model (5.x) or "
            "peft.utils.set_peft_model_state_dict (4.57)",
            recorder.INSTEAD,
        )
    missing = judged.verdict
    if info is None:  # transformers 4.57
        from torch.nn.modules.module import _IncompatibleKeys

        info = _IncompatibleKeys(set(missing), set(judged.unexpected))
    else:
        # Our verdict already went through transformers' own filter; set it again so that the
        # result is our verdict even if a later transformers filters differently.
        info.missing_keys = set(missing)
    recorder.warn_missing(
        adapter_name, missing, peft_model_id if peft_model_id is not None else "state_dict", 2
    )
    return info


def load_adapters(
    model: Any,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    is_trainable: bool = False,
    progress: bool | Callable[[int, int, str], None] | None = None,
) -> dict[str, AdapterLoadResult]:
    """Loads many adapters (name -> local checkpoint directory, in order) into a transformers
    model, ending in the state of `for name, path in adapters.items(): model.load_adapter(path,
    adapter_name=name, is_trainable=is_trainable)`: the same `peft_config`, active adapter, module
    tree, values, `requires_grad` and training flags.

    After the first adapter (which transformers' own load prepares the model with), each adapter
    is built in the layers it targets only, where that was verified exact (the transformers
    releases, methods, config fields and model states of the PEFT loader's allow-list); anywhere
    else transformers' `load_adapter` runs, fed the config and tensors fastkeys read through its
    checks (containment, regular files, size caps), and the result's `loader`/`reason` say so.
    Returns `{name: fastkeys.peft.AdapterLoadResult}` with fastkeys' verdict on missing keys.

    A failing adapter raises after leaving no trace of itself (a KeyboardInterrupt included);
    those loaded before it stay. A name already in the model is transformers' ValueError (or its
    hotswap, after `enable_peft_hotswap`). `progress` as in `fastkeys.peft.load_adapters`."""
    if not callable(getattr(model, "load_adapter", None)) or not callable(
        getattr(model, "named_modules", None)
    ):
        raise TypeError(
            "model must be a transformers model with PEFT support (a PreTrainedModel), "
            f"not {type(model).__name__}"
        )
    _prepare()
    import peft

    if isinstance(model, peft.PeftModel):
        raise TypeError("model is a peft.PeftModel: load its adapters with fastkeys.peft.load_adapters")
    from fastkeys.integrations.loader import api, boundary, hf

    boundary.install()
    return api.load_in_order(
        lambda name, path: hf.load_one(model, name, path, is_trainable=is_trainable), adapters, progress
    )
