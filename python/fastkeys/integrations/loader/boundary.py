"""Everything fastkeys uses of PEFT's (and torch's) internals, and the versions it was verified on.

The fast path re-does, for one adapter, what PEFT's `load_adapter` does to the whole model, so it
is exact only on the PEFT and torch releases it was checked against (`VERIFIED`); anywhere else the
loader goes through PEFT's own code and says why (`version_refusal`). A private symbol that is gone
refuses the fast path the same way instead of failing on import.

PEFT's own loader needs two hooks, both pass-throughs installed once for the whole process that act
only for the thread inside a fastkeys call (`fastkeys.integrations.recorder`, the mechanism
`fastkeys.transformers` and `fastkeys.diffusers` use too):
- `recorded_results()`: torch's raw `load_state_dict` result from inside
  `set_peft_model_state_dict`, before PEFT filters it;
- `fed_tensors(path, tensors)`: PEFT reads an adapter's weights with `safetensors.torch.load_file`;
  for the placeholder file named `path` it gets the tensors fastkeys already read from the files it
  checked, so PEFT never opens the user's checkpoint by path a second time.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Iterator
from typing import Any

import peft
import torch

from fastkeys.integrations import recorder

# The versions the fast path was verified on (with those of transformers and diffusers, in one place)
VERIFIED = recorder.VERIFIED


def _symbol(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


# The private PEFT symbols the fast path uses (None where this PEFT lacks one).
_SYMBOLS = {
    "BaseTunerLayer": ("peft.tuners.tuners_utils", "BaseTunerLayer"),
    "ExcludedModule": ("peft.tuners.tuners_utils", "_ExcludedModule"),
    "check_target_module_exists": ("peft.tuners.tuners_utils", "check_target_module_exists"),
    "get_submodules": ("peft.tuners.tuners_utils", "_get_submodules"),
    "set_layer_requires_grad": ("peft.tuners.tuners_utils", "_set_layer_requires_grad"),
    "UPCAST_DTYPES": ("peft.tuners.tuners_utils", "UPCAST_DTYPES"),
    "LoraLayer": ("peft.tuners.lora.layer", "LoraLayer"),
    "LoraLinear": ("peft.tuners.lora.layer", "Linear"),
    "LoraModel": ("peft.tuners.lora.model", "LoraModel"),
    "LoHaLayer": ("peft.tuners.loha.layer", "LoHaLayer"),
    "LoHaLinear": ("peft.tuners.loha.layer", "Linear"),
    "LoHaModel": ("peft.tuners.loha.model", "LoHaModel"),
    "LoKrLayer": ("peft.tuners.lokr.layer", "LoKrLayer"),
    "LoKrLinear": ("peft.tuners.lokr.layer", "Linear"),
    "LoKrModel": ("peft.tuners.lokr.model", "LoKrModel"),
    "lokr_factorization": ("peft.tuners.lokr.layer", "factorization"),
    "IA3Layer": ("peft.tuners.ia3.layer", "IA3Layer"),
    "IA3Linear": ("peft.tuners.ia3.layer", "Linear"),
    "IA3Model": ("peft.tuners.ia3.model", "IA3Model"),
    "HRALayer": ("peft.tuners.hra.layer", "HRALayer"),
    "HRALinear": ("peft.tuners.hra.layer", "HRALinear"),
    "HRAModel": ("peft.tuners.hra.model", "HRAModel"),
    "OFTLayer": ("peft.tuners.oft.layer", "OFTLayer"),
    "OFTModel": ("peft.tuners.oft.model", "OFTModel"),
    "AuxiliaryTrainingWrapper": ("peft.utils.other", "AuxiliaryTrainingWrapper"),
    "ModulesToSaveWrapper": ("peft.utils.other", "ModulesToSaveWrapper"),
    "TrainableTokensWrapper": ("peft.utils.other", "TrainableTokensWrapper"),
    "TrainableTokensLayer": ("peft.tuners.trainable_tokens.layer", "TrainableTokensLayer"),
    "get_module_names_tied_with_embedding": ("peft.utils.other", "_get_module_names_tied_with_embedding"),
    "BaseTuner": ("peft.tuners.tuners_utils", "BaseTuner"),
    "get_pattern_key": ("peft.utils.other", "get_pattern_key"),
    "find_minimal_target_modules": ("peft.tuners.tuners_utils", "_find_minimal_target_modules"),
    "MIN_TARGET_MODULES_FOR_OPTIMIZATION": ("peft.utils.constants", "MIN_TARGET_MODULES_FOR_OPTIMIZATION"),
    "BufferDict": ("peft.tuners._buffer_dict", "BufferDict"),
    "get_checkpoint_conversion_mapping": (
        "peft.utils.transformers_weight_conversion",
        "get_checkpoint_conversion_mapping",
    ),
    "EMBEDDING_LAYER_NAMES": ("peft.utils.constants", "EMBEDDING_LAYER_NAMES"),
    "CONFIG_MAPPING": ("peft.mapping", "PEFT_TYPE_TO_CONFIG_MAPPING"),
}
_found = {key: _symbol(module, name) for key, (module, name) in _SYMBOLS.items()}
MISSING = [f"{_SYMBOLS[key][0]}.{_SYMBOLS[key][1]}" for key, value in _found.items() if value is None]

BaseTunerLayer: Any = _found["BaseTunerLayer"]
ExcludedModule: Any = _found["ExcludedModule"]
check_target_module_exists: Any = _found["check_target_module_exists"]
get_submodules: Any = _found["get_submodules"]
set_layer_requires_grad: Any = _found["set_layer_requires_grad"]
LoraLayer: Any = _found["LoraLayer"]
LoraLinear: Any = _found["LoraLinear"]
LoraModel: Any = _found["LoraModel"]
LoHaLayer: Any = _found["LoHaLayer"]
LoHaLinear: Any = _found["LoHaLinear"]
LoHaModel: Any = _found["LoHaModel"]
LoKrLayer: Any = _found["LoKrLayer"]
LoKrLinear: Any = _found["LoKrLinear"]
LoKrModel: Any = _found["LoKrModel"]
lokr_factorization: Any = _found["lokr_factorization"]
IA3Layer: Any = _found["IA3Layer"]
IA3Linear: Any = _found["IA3Linear"]
IA3Model: Any = _found["IA3Model"]
HRALayer: Any = _found["HRALayer"]
HRALinear: Any = _found["HRALinear"]
HRAModel: Any = _found["HRAModel"]
OFTLayer: Any = _found["OFTLayer"]
OFTModel: Any = _found["OFTModel"]
AuxiliaryTrainingWrapper: Any = _found["AuxiliaryTrainingWrapper"]
ModulesToSaveWrapper: Any = _found["ModulesToSaveWrapper"]
TrainableTokensWrapper: Any = _found["TrainableTokensWrapper"]
TrainableTokensLayer: Any = _found["TrainableTokensLayer"]
get_module_names_tied_with_embedding: Any = _found["get_module_names_tied_with_embedding"]
BaseTuner: Any = _found["BaseTuner"]
get_pattern_key: Any = _found["get_pattern_key"]
find_minimal_target_modules: Any = _found["find_minimal_target_modules"]
MIN_TARGET_MODULES_FOR_OPTIMIZATION: int = _found["MIN_TARGET_MODULES_FOR_OPTIMIZATION"] or 20
BufferDict: Any = _found["BufferDict"]
get_checkpoint_conversion_mapping: Any = _found["get_checkpoint_conversion_mapping"]
# PEFT's `save_embedding_layers` saves the base weights of modules with these names
EMBEDDING_LAYER_NAMES: tuple[str, ...] = tuple(_found["EMBEDDING_LAYER_NAMES"] or ("embed_tokens", "lm_head"))
CONFIG_MAPPING: dict[Any, Any] = _found["CONFIG_MAPPING"] or {}
LORA: Any = peft.PeftType.LORA
LOHA: Any = peft.PeftType.LOHA
LOKR: Any = peft.PeftType.LOKR
IA3: Any = peft.PeftType.IA3
HRA: Any = peft.PeftType.HRA
OFT: Any = peft.PeftType.OFT


# The private methods the fast path calls on PEFT's objects (checked like the symbols above): on
# every tuner and tuner layer of a method it covers (`methods.py`), and on the PeftModel.
_TUNER_METHODS = (
    "_check_new_adapter_config",
    "_check_target_module_compatiblity",
    "_check_target_module_exists",
    "_create_and_replace",
)
_LAYER_METHODS = (
    "_get_base_layer_device_and_dtype",
    "_freeze_non_trainable_peft_weights",
    "_move_adapter_to_device_of_base_layer",
    "update_layer",
)
PRIVATE_METHODS = {
    "LoraModel": _TUNER_METHODS,
    "LoraLayer": (*_LAYER_METHODS, "resolve_lora_variant"),
    "LoHaModel": _TUNER_METHODS,
    "LoHaLayer": _LAYER_METHODS,
    "LoKrModel": _TUNER_METHODS,
    "LoKrLayer": _LAYER_METHODS,
    "IA3Model": _TUNER_METHODS,
    "IA3Layer": _LAYER_METHODS,
    "HRAModel": _TUNER_METHODS,
    "HRALayer": _LAYER_METHODS,
    "OFTModel": _TUNER_METHODS,
    "OFTLayer": _LAYER_METHODS,
    "PeftModel": ("_check_new_adapter_config",),
}
_owners = {name: _found[name] for name in PRIVATE_METHODS if name != "PeftModel"} | {
    "PeftModel": peft.PeftModel
}
MISSING += [
    f"{owner}.{method}"
    for owner, methods in PRIVATE_METHODS.items()
    for method in methods
    if _owners[owner] is None or not hasattr(_owners[owner], method)
]


@functools.cache
def upcast_dtypes() -> frozenset[torch.dtype]:
    """The dtypes PEFT's `cast_adapter_dtype` raises to fp32."""
    low = {torch.float16, torch.bfloat16}
    names = _found["UPCAST_DTYPES"] or ()
    low.update(dtype for name in names if isinstance(dtype := getattr(torch, name, None), torch.dtype))
    return frozenset(low)


def registration_hooks_installed() -> bool:
    """Whether a global module, parameter or buffer registration hook is installed (torch runs them
    inside `add_module` and `register_parameter`, and they may replace what is registered). A torch
    without these private lists counts as having one."""
    from torch.nn.modules import module

    lists = [
        getattr(module, f"_global_{kind}_registration_hooks", None)
        for kind in ("module", "parameter", "buffer")
    ]
    return any(hooks is None or len(hooks) > 0 for hooks in lists)


def versions() -> dict[str, str]:
    # PEFT exactly as it says (a "+fork" build is not the release verified); torch without its
    # build tag ("+cu132": the same release for every accelerator)
    return {"peft": str(getattr(peft, "__version__", "?")), "torch": recorder.version(torch)}


def version_refusal() -> str | None:
    """Why this PEFT/torch is not one the fast path was verified on, or None."""
    found = versions()
    if found["peft"] not in VERIFIED["peft"]:
        return (
            f"PEFT {found['peft']} is not a version the fast path was verified on "
            f"({', '.join(VERIFIED['peft'])})"
        )
    if ".".join(found["torch"].split(".")[:2]) not in VERIFIED["torch"]:
        return (
            f"torch {found['torch']} is not a version the fast path was verified on "
            f"({', '.join(VERIFIED['torch'])})"
        )
    if MISSING:
        return f"this PEFT has no {MISSING[0]}"
    return None


# ---------------------------------------------------------------------------------------------
# The two pass-through hooks on PEFT's loader, installed by `fastkeys.integrations.recorder`.


def install() -> None:
    """Installs both hooks (idempotent). RuntimeError naming the version if PEFT lacks a function."""
    recorder.install_peft()


@contextlib.contextmanager
def recorded_results() -> Iterator[list[Any]]:
    """Collects the raw results of this thread's PEFT loads while open (nested ones included)."""
    install()
    with recorder.loading(None, judging=False) as load:
        yield load.raw


def recording() -> bool:
    """Whether this thread is inside `recorded_results` (its caller wants torch's raw result)."""
    return recorder.recording()


@contextlib.contextmanager
def fed_tensors(path: str, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """While open, PEFT's read of the file `path` (an empty safetensors file) on this thread
    returns `tensors` instead."""
    install()
    with recorder.feeding(path, tensors):
        yield


def last_result(records: list[Any], what: str) -> Any:
    """The raw result of the last load in `records`; RuntimeError naming the version when PEFT's
    `what` loaded without `set_peft_model_state_dict`."""
    if not records:
        raise recorder.missing_internal(
            peft, f"PEFT's {what} loading through set_peft_model_state_dict", recorder.INSTEAD
        )
    return records[-1]
