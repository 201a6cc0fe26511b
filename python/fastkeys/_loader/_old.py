"""Loading PEFT adapters at the adapter's cost (the machinery behind `fastkeys.peft`).

PEFT's `load_adapter` walks the whole model several times per adapter (matching, freezing,
`set_adapter`, dtype casting, `load_state_dict`), and inside each layer it walks every adapter the
layer already holds, so loading N adapters costs O(N^2). The fast path here does for one LoRA
adapter exactly what that loop does, but only to the modules the adapter targets:

1. an index of the model's module names (those PEFT's matcher visits: everything outside the
   tuner layers' own internals), built by one walk and kept valid by a global module-registration
   hook that marks it stale when anything registers a module outside a tuner layer;
2. PEFT's own matcher (`_check_target_module_exists`) over the index, and PEFT's own per-layer
   code (`update_layer`, or `_create_and_replace` for a module not wrapped yet), with the layer's
   O(adapters) `set_adapter` pass left out and its effect on the new adapter applied directly;
3. the tensors copied straight into the new parameters, as `load_state_dict` would copy them.

Everything PEFT's whole-model passes would change elsewhere is restored by PEFT itself (it snapshots
`requires_grad` around an injection), so the fast path only has to get the new adapter right. Any
case where that argument does not hold (another method, auxiliary modules, bias training, merged
layers, special initialisations, an incomplete checkpoint, ...) goes through PEFT's loader and the
result says why. Imported only by `fastkeys.peft`: it imports torch and peft.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import peft
import torch
from torch import nn

from ..checkpoint import Checkpoint, scan
from ..matching import filter_missing, insert_adapter_name

# PEFT's internals, the same ones its loader uses (typed Any: PEFT ships no complete annotations).
_tuners_utils: Any = importlib.import_module("peft.tuners.tuners_utils")
_lora_layer: Any = importlib.import_module("peft.tuners.lora.layer")
_other: Any = importlib.import_module("peft.utils.other")
BufferDict: Any = importlib.import_module("peft.tuners._buffer_dict").BufferDict
LoraLayer: Any = _lora_layer.LoraLayer
LoraModel: Any = importlib.import_module("peft.tuners.lora.model").LoraModel
BaseTunerLayer: Any = _tuners_utils.BaseTunerLayer
AuxiliaryTrainingWrapper: Any = _other.AuxiliaryTrainingWrapper
get_pattern_key: Any = _other.get_pattern_key

FAST = "fastkeys"
PEFT = "peft"
_SINGLE_FILE = "adapter_model.safetensors"
_BIN_FILE = "adapter_model.bin"
# PEFT condenses target lists this long against the whole model's names (inner modules included).
_PEFT_CONDENSES_TARGETS = 20
_PLAIN_INITS = (True, False, "gaussian")
_PROGRESS_AFTER = 4  # adapters: fewer load too fast for a bar to help


class AdapterLoadResult(NamedTuple):
    """What loading one adapter did. `missing_keys` are fastkeys' verdict (the adapter's tensors the
    checkpoint lacks), `unexpected_keys` the checkpoint's tensors the model has no place for.
    `loader` is "fastkeys" (the per-adapter path) or "peft" (PEFT's own loader), and `reason` says
    why PEFT's loader ran (None on the fast path)."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    loader: str
    reason: str | None


class _Refused(Exception):
    """The fast path cannot reproduce PEFT exactly here; the message is the reason."""


# ---------------------------------------------------------------------------------------------
# The index of the model's modules.

_generation = 0  # bumped whenever a module is registered outside a tuner layer's internals
_quiet = threading.local()
_hook_lock = threading.Lock()
_hook_installed = False
_base_dicts: weakref.WeakSet[Any] = weakref.WeakSet()  # ModuleDicts outside tuner layers


def _on_register(parent: Any, name: str, child: Any | None) -> None:
    global _generation
    if getattr(_quiet, "depth", 0):
        return
    # Adapters come and go inside tuner layers (their ModuleDicts, or fresh dicts PEFT merges into
    # them): that never changes the names PEFT's matcher visits, so it must not cost a re-index. A
    # ModuleDict of the base model itself (one an index has seen) does count.
    if (
        isinstance(parent, (nn.ModuleDict, BaseTunerLayer))
        and not isinstance(child, BaseTunerLayer)
        and parent not in _base_dicts
    ):
        return
    _generation += 1


def _install_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if not _hook_installed:
            nn.modules.module.register_module_module_registration_hook(_on_register)
            _hook_installed = True


@contextmanager
def _own_changes() -> Iterator[None]:
    """Registrations made by the fast path itself: it updates the index in place."""
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        yield
    finally:
        _quiet.depth -= 1


class _Index:
    """The module names PEFT's `inject_adapter` visits (in its order), with their modules, and
    every dotted segment of the model's parameter names outside tuner-layer internals."""

    def __init__(self, model: Any) -> None:
        self.generation = _generation
        self.modules: dict[str, Any] = {}
        self.layers: dict[str, Any] = {}
        self.auxiliary = False
        segments: set[str] = {"weight", "bias", "base_layer"}
        inner = None  # the tuner layer whose internals named_modules (preorder) is inside
        for name, module in model.named_modules():
            if not name or (inner is not None and name.startswith(inner)):
                continue
            self.modules[name] = module
            if isinstance(module, nn.ModuleDict):
                _base_dicts.add(module)
            segments.update(name.split("."))
            segments.update(module._parameters)
            if isinstance(module, BaseTunerLayer):
                self.layers[name] = module
                inner = name + "."
                segments.update(getattr(module, "adapter_layer_names", ()))
                segments.update(getattr(module, "other_param_names", ()))
            if isinstance(module, AuxiliaryTrainingWrapper):
                self.auxiliary = True
        self.segments = segments
        self.matches: dict[str, list[tuple[str, Any]]] = {}

    def attached(self, model: Any, names: list[str]) -> bool:
        """Each of `names` still resolves to the module the index holds for it."""
        try:
            return all(model.get_submodule(name) is self.modules[name] for name in names)
        except (AttributeError, KeyError):
            return False

    def wrapped(self, name: str, module: Any) -> None:
        self.modules[name] = module
        if isinstance(module, BaseTunerLayer):
            self.layers[name] = module
        self.matches.clear()


_indexes: weakref.WeakKeyDictionary[Any, _Index] = weakref.WeakKeyDictionary()


def _index_of(model: Any, rebuild: bool = False) -> _Index:
    """The model's index, rebuilt when a module was registered outside the fast path since (or when
    the caller found a module moved: removals fire no hook)."""
    _install_hook()
    index = _indexes.get(model)
    if rebuild or index is None or index.generation != _generation:
        index = _indexes[model] = _Index(model)
    return index


# ---------------------------------------------------------------------------------------------
# Reading checkpoints.


def _checkpoint(directory: Path) -> Checkpoint:
    """The adapter's safetensors files (single or sharded) and its config, as `scan` reads them:
    every file a regular file that resolves inside `directory` (a Hugging Face cache snapshot's
    links into its `blobs/` included), the config size-capped and its fields checked."""
    return scan(directory)


def _is_sharded(checkpoint: Checkpoint) -> bool:
    return len(checkpoint.files) != 1 or Path(checkpoint.files[0]).name != _SINGLE_FILE


def _read_tensors(checkpoint: Checkpoint, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(checkpoint.shard_of(name), []).append(name)
    tensors: dict[str, torch.Tensor] = {}
    for file, wanted in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in wanted:
                    tensors[name] = handle.get_tensor(name)
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(f"{file}: cannot read tensor {name!r}: {error}") from error
    return tensors


def _read_config(directory: Path, checkpoint: Checkpoint) -> Any:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    config_file = directory / "adapter_config.json"
    config = checkpoint.adapter_config  # read by `scan`: a regular file, size-capped, checked
    if config is None:
        raise FileNotFoundError(2, "the adapter has no adapter_config.json", str(config_file))
    peft_type = config.get("peft_type")
    configs: dict[Any, Any] = PEFT_TYPE_TO_CONFIG_MAPPING  # keyed by PeftType, a str enum
    if peft_type not in configs:
        raise ValueError(f"{config_file}: unknown peft_type {peft_type!r}")
    return configs[peft_type].from_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------
# The fast path.


def _refusal(peft_model: Any, adapter_name: str, config: Any, index: _Index) -> str | None:
    """Why the fast path cannot reproduce PEFT's loader for this adapter, or None."""
    conversion: Any = importlib.import_module("peft.utils.transformers_weight_conversion")
    tuner = peft_model.base_model
    if type(tuner) is not LoraModel or config.peft_type != peft.PeftType.LORA:
        return f"the fast path covers LoRA (with DoRA, rsLoRA); this is {config.peft_type.value}"
    if not index.layers:
        return "the model has no adapter layers yet (PEFT freezes the base model on the first injection)"
    if "." in adapter_name or adapter_name in index.segments:
        return (
            f"the adapter name {adapter_name!r} is also a segment of the model's parameter names, "
            "which changes how PEFT restores their requires_grad"
        )
    if index.auxiliary or config.modules_to_save or config.trainable_token_indices:
        return "modules_to_save and trainable tokens are handled by PEFT's auxiliary wrappers"
    if config.init_lora_weights not in _PLAIN_INITS:
        return f"init_lora_weights={config.init_lora_weights!r} may change the base weights"
    special = [
        field
        for field in (
            "layer_replication",
            "target_parameters",
            "alora_invocation_tokens",
            "arrow_config",
            "kasa_config",
            "velora_config",
            "monteclora_config",
            "loftq_config",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "megatron_config",
        )
        if getattr(config, field, None)
    ]
    special += [
        field
        for field in ("use_qalora", "use_bdlora", "ensure_weight_tying")
        if getattr(config, field, False)
    ]
    if special:
        return f"{special[0]} is set"
    if config.target_modules is None or config.target_modules == "all-linear":
        return "target_modules is resolved by PEFT from the whole model"
    if (
        isinstance(config.target_modules, (list, set))
        and len(config.target_modules) >= _PEFT_CONDENSES_TARGETS
    ):
        return f"PEFT condenses {len(config.target_modules)} target modules against every module name"
    active = tuner.active_adapters
    if any(getattr(peft_model.peft_config.get(name), "bias", "none") != "none" for name in active):
        return "an active adapter trains biases, which PEFT re-marks across the whole model"
    if config.bias != "none" and len(peft_model.peft_config) > 0:
        return f"bias={config.bias!r}: PEFT allows one such adapter and re-marks biases model-wide"
    if getattr(peft_model, "hf_device_map", None) is not None:
        return "the model is dispatched with a device map"
    if any(layer.merged for layer in index.layers.values()):
        return "the model has merged adapter layers"
    model_type = getattr(getattr(tuner.model, "config", None), "model_type", None)
    if model_type is not None and conversion.get_checkpoint_conversion_mapping(model_type) is not None:
        return f"transformers converts {model_type} adapters between v4 and v5"
    return None


def _selected(tuner: Any, config: Any, index: _Index) -> list[str]:
    """The names PEFT's matcher selects and does not exclude."""
    return [
        name
        for name, result in _targets(tuner, config, index)
        if not isinstance(result, _tuners_utils._ExcludedModule)
    ]


def _targets(tuner: Any, config: Any, index: _Index) -> list[tuple[str, Any]]:
    """(name, match result) of every indexed module PEFT's matcher selects or excludes, cached per
    matching-relevant config fields."""
    fields = {
        field: getattr(config, field, None)
        for field in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")
    }
    key = json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in fields.items()}, sort_keys=True)
    cached = index.matches.get(key)
    if cached is None:
        cached = []
        for name in index.modules:
            result = tuner._check_target_module_exists(config, name)
            if result:
                cached.append((name, result))
        index.matches[key] = cached
    return cached


class _Injection:
    """The new adapter's entries in each touched layer, and how to take them out again."""

    def __init__(self, adapter_name: str) -> None:
        self.adapter_name = adapter_name
        self.updated: list[Any] = []
        self.layer_names: dict[int, Any] = {}
        self.wrapped: list[tuple[Any, str, Any, Any, str]] = []

    def remember(self, layer: Any) -> None:
        self.updated.append(layer)
        self.layer_names[id(layer)] = layer.__dict__.get("adapter_layer_names")

    def layers(self) -> list[Any]:
        return self.updated + [new for _p, _n, _old, new, _k in self.wrapped]

    def roll_back(self, index: _Index) -> None:
        name = self.adapter_name
        with _own_changes():
            for parent, child_name, old, _new, key in reversed(self.wrapped):
                setattr(parent, child_name, old)
                index.wrapped(key, old)
                index.layers.pop(key, None)
            for layer in self.updated:
                for attribute in (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant"):
                    holder = getattr(layer, attribute, None)
                    if holder is not None and name in holder:
                        del holder[name]
                before = self.layer_names[id(layer)]
                if before is None:
                    layer.__dict__.pop("adapter_layer_names", None)
                else:
                    layer.adapter_layer_names = before


def _new_parameters(layer: Any, adapter_name: str, module_name: str) -> dict[str, Any]:
    """The new adapter's parameters in `layer`, by model key."""
    found: dict[str, Any] = {}
    for attribute in layer.adapter_layer_names:
        holder = getattr(layer, attribute, None)
        if holder is None or adapter_name not in holder:
            continue
        entry = holder[adapter_name]
        key = f"base_model.model.{module_name}.{attribute}.{adapter_name}"
        if isinstance(entry, nn.Parameter):
            found[key] = entry
        else:
            for local, parameter in entry.named_parameters():
                found[f"{key}.{local}"] = parameter
    return found


def _upcast(layer: Any, adapter_name: str) -> None:
    """PEFT's `cast_adapter_dtype` for one adapter of one layer: fp16/bf16 (and float8) -> fp32."""
    low = _upcast_dtypes()
    # PEFT walks the whole layer (every adapter's modules); the adapter's entries are in the
    # layer's own dicts.
    for holder in layer._modules.values():
        if not _is_adapter_dict(holder) or adapter_name not in holder:
            continue
        entry = holder[adapter_name]
        if isinstance(entry, torch.Tensor):
            if entry.dtype in low:
                holder[adapter_name] = entry.to(torch.float32)
            continue
        for owner in entry.modules():
            for local, parameter in list(owner.named_parameters(recurse=False)):
                if parameter.dtype in low:
                    setattr(
                        owner,
                        local,
                        nn.Parameter(parameter.data.to(torch.float32), requires_grad=parameter.requires_grad),
                    )


def _load_fast(
    peft_model: Any,
    adapter_name: str,
    config: Any,
    checkpoint: Checkpoint,
    index: _Index,
    *,
    is_trainable: bool,
    autocast_adapter_dtype: bool,
) -> AdapterLoadResult:
    """PEFT's `load_adapter` for one LoRA adapter, touching only its modules. Raises _Refused
    (nothing changed) when the checkpoint is not one the fast path reproduces exactly, ValueError
    (nothing changed) when it does not fit the model."""
    tuner = peft_model.base_model
    peft_model._check_new_adapter_config(config, is_trainable=is_trainable)
    config.inference_mode = not is_trainable
    targets = _selected(tuner, config, index)
    if not index.attached(tuner.model, targets):
        # a module was removed or replaced without registering anything: index afresh
        index = _index_of(tuner.model, rebuild=True)
        targets = _selected(tuner, config, index)
    if not targets:
        raise _Refused("the config matches no module (PEFT raises its own error)")
    active = list(tuner.active_adapters)
    by_model_key = _checkpoint_by_model_key(checkpoint, adapter_name)
    injection = _Injection(adapter_name)
    peft_model.peft_config[adapter_name] = config
    try:
        tuner._check_new_adapter_config(config)
        with _own_changes(), torch.no_grad():
            quick, expected = _plan(targets, index, config, adapter_name)
            for name in targets:
                if name not in quick:
                    _inject_with_peft(tuner, index, injection, name, config, adapter_name)
            layers = {id(layer): layer for layer in injection.layers()}
            for name in targets:
                if name not in quick:
                    parameters = _new_parameters(index.modules[name], adapter_name, name)
                    expected.update((key, tuple(p.shape)) for key, p in parameters.items())
            _check_checkpoint(checkpoint, by_model_key, expected, adapter_name)
            tensors = _read_tensors(checkpoint, [by_model_key[key] for key in expected])
            for name, (r, alpha) in quick.items():
                layer = index.modules[name]
                injection.remember(layer)
                layers[id(layer)] = layer
                prefix = f"base_model.model.{name}."
                _add_lora_linear(
                    layer,
                    adapter_name,
                    r,
                    alpha,
                    config,
                    tensors[by_model_key[f"{prefix}lora_A.{adapter_name}.weight"]],
                    tensors[by_model_key[f"{prefix}lora_B.{adapter_name}.weight"]],
                    autocast_adapter_dtype,
                )
            for layer in injection.updated:
                # what update_layer's set_adapter(active, inference_mode) does to the new adapter:
                # it is not active, so its weights are frozen
                for attribute in layer.adapter_layer_names:
                    holder = getattr(layer, attribute)
                    if adapter_name in holder:
                        _tuners_utils._set_layer_requires_grad(holder[adapter_name], False)
            # inject_adapter's model-wide set_adapter stores the active list in every layer
            for layer in index.layers.values():
                layer._active_adapter = list(active)
            tuner.active_adapter = list(active)
            for layer in layers.values():
                layer._freeze_non_trainable_peft_weights([adapter_name])
            for name in targets:
                if name not in quick:
                    layer = index.modules[name]
                    if autocast_adapter_dtype:
                        _upcast(layer, adapter_name)
                    for key, parameter in _new_parameters(layer, adapter_name, name).items():
                        if parameter.device.type == "meta":
                            raise _Refused(f"{key} is on the meta device")
                        parameter.copy_(tensors[by_model_key[key]])
            if is_trainable:
                for layer in layers.values():
                    layer.set_requires_grad(adapter_name, True)
            _extend_unique(tuner.targeted_module_names, targets)
            if not is_trainable:
                _eval(peft_model, index, layers.values(), adapter_name)
    except BaseException:
        injection.roll_back(index)
        del peft_model.peft_config[adapter_name]
        raise
    return AdapterLoadResult([], [], FAST, None)


def _plan(
    targets: list[str], index: _Index, config: Any, adapter_name: str
) -> tuple[dict[str, tuple[int, float]], dict[str, tuple[int, ...]]]:
    """The targets that are LoRA Linear layers already and need nothing but two new matrices
    ({name: (r, alpha)}), and the model keys and shapes of their new parameters."""
    quick: dict[str, tuple[int, float]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    plain = not (config.use_dora or config.lora_bias)
    for name in targets:
        layer = index.modules[name]
        if not (plain and type(layer) is _lora_layer.Linear and not hasattr(layer, "lora_arrow")):
            continue
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
        )
        if not isinstance(r, int) or r <= 0:
            continue  # PEFT's update_layer raises its own error
        quick[name] = (r, alpha)
        prefix = f"base_model.model.{name}."
        expected[f"{prefix}lora_A.{adapter_name}.weight"] = (r, layer.in_features)
        expected[f"{prefix}lora_B.{adapter_name}.weight"] = (layer.out_features, r)
    return quick, expected


def _check_checkpoint(
    checkpoint: Checkpoint,
    by_model_key: dict[str, str],
    expected: dict[str, tuple[int, ...]],
    adapter_name: str,
) -> None:
    missing = [key for key in expected if key not in by_model_key]
    if missing:
        raise _Refused(f"the checkpoint lacks {len(missing)} of the adapter's tensors (e.g. {missing[0]})")
    unexpected = [by_model_key[key] for key in by_model_key if key not in expected]
    if unexpected:
        raise _Refused(
            f"the checkpoint holds {len(unexpected)} tensors outside the adapter's modules "
            f"(e.g. {unexpected[0]})"
        )
    for key, shape in expected.items():
        found = checkpoint[by_model_key[key]]
        if tuple(found.shape) != shape:
            raise ValueError(
                f"{found.file}: tensor {by_model_key[key]!r} has shape {list(found.shape)}, "
                f"but adapter {adapter_name!r} needs {list(shape)} there"
            )


def _inject_with_peft(
    tuner: Any, index: _Index, injection: _Injection, name: str, config: Any, adapter_name: str
) -> None:
    """PEFT's own per-module step: `update_layer` on a LoRA layer (without its O(adapters) passes),
    or `_create_and_replace` for a module not wrapped yet."""
    target = index.modules[name]
    if isinstance(target, BaseTunerLayer):
        if not isinstance(target, LoraLayer) or type(target).__module__ != LoraLayer.__module__:
            raise _Refused(f"{name} is a {type(target).__name__}, not a LoRA layer")
        variant = target.resolve_lora_variant(config=config)
        if variant is not None and not type(variant).__name__.startswith("Dora"):
            raise _Refused(f"the LoRA variant {type(variant).__name__} is not covered")
        r_key = get_pattern_key(config.rank_pattern.keys(), name)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), name)
        injection.remember(target)
        # update_layer ends with the layer's set_adapter, a pass over every adapter the layer
        # holds; its effect on the new adapter is applied by the caller.
        target.set_adapter = _no_set_adapter
        target._move_adapter_to_device_of_base_layer = _mover(target)
        try:
            target.update_layer(
                adapter_name,
                config.rank_pattern.get(r_key, config.r),
                lora_alpha=config.alpha_pattern.get(alpha_key, config.lora_alpha),
                target_name=name,
                config=config,
            )
        finally:
            del target.set_adapter, target._move_adapter_to_device_of_base_layer
        return
    model = tuner.model
    parent, old, child_name = _tuners_utils._get_submodules(model, name)
    tuner._check_target_module_compatiblity(config, model, child_name)
    # _create_and_replace freezes the whole new layer, base weights included; inject_adapter then
    # restores every parameter that existed before, which here are the old module's.
    existing = [(parameter, parameter.requires_grad) for parameter in old.parameters()]
    tuner._create_and_replace(config, adapter_name, old, child_name, parent, current_key=name)
    for parameter, requires_grad in existing:
        parameter.requires_grad = requires_grad
    new = getattr(parent, child_name)
    injection.wrapped.append((parent, child_name, old, new, name))
    index.wrapped(name, new)
    if not isinstance(new, LoraLayer):
        raise _Refused(f"PEFT wrapped {name} as a {type(new).__name__}")


def _add_lora_linear(
    layer: Any,
    adapter_name: str,
    r: int,
    alpha: float,
    config: Any,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    autocast_adapter_dtype: bool,
) -> None:
    """`lora.Linear.update_layer` for a plain LoRA adapter, with the loaded weights in place of the
    random initialisation that loading overwrites: same modules, dtypes (the base layer's, then
    fp16/bf16 upcast to fp32 as `cast_adapter_dtype` does) and values (one cast from the checkpoint's
    dtype, as `load_state_dict`'s copy does)."""
    base = layer.get_base_layer()
    device, dtype = layer._get_base_layer_device_and_dtype(base)
    if dtype is None or not (dtype.is_floating_point or dtype.is_complex):
        dtype = torch.get_default_dtype()
    if autocast_adapter_dtype and dtype in _upcast_dtypes():
        dtype = torch.float32
    layer.r[adapter_name] = r
    layer.lora_alpha[adapter_name] = alpha
    dropout = nn.Dropout(p=config.lora_dropout) if config.lora_dropout > 0.0 else nn.Identity()
    layer.lora_dropout[adapter_name] = dropout
    # always a fresh allocation, as PEFT's parameters are: a tensor read from the file may sit at an
    # unaligned address, and matmul kernels can round differently there (seen: r=1 outputs differ)
    layer.lora_A[adapter_name] = _linear(weight_a.to(device=device, dtype=dtype, copy=True))
    layer.lora_B[adapter_name] = _linear(weight_b.to(device=device, dtype=dtype, copy=True))
    layer.lora_bias[adapter_name] = False
    layer.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    layer.use_rslora[adapter_name] = config.use_rslora
    layer.use_dora[adapter_name] = False


def _linear(weight: torch.Tensor) -> nn.Linear:
    """`nn.Linear(in, out, bias=False)` holding `weight` (frozen), without the random
    initialisation its constructor would spend (a third of a load's time) on values loading
    overwrites."""
    linear = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(linear)
    linear.out_features, linear.in_features = weight.shape
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.register_parameter("bias", None)
    return linear


def _is_adapter_dict(holder: Any) -> bool:
    """A layer's per-adapter container (ModuleDict, ParameterDict, BufferDict)."""
    return isinstance(holder, (nn.ModuleDict, nn.ParameterDict, BufferDict))


def _upcast_dtypes() -> set[torch.dtype]:
    low = {torch.float16, torch.bfloat16}
    low.update(
        dtype for name in _tuners_utils.UPCAST_DTYPES if (dtype := getattr(torch, name, None)) is not None
    )
    return low


def _mover(layer: Any) -> Callable[..., None]:
    """PEFT's `_move_adapter_to_device_of_base_layer` for a new adapter, which skips an adapter dict
    when any parameter in it is on the meta device: it checks the dict's every adapter (O(adapters)
    per layer). Only the new entry can be on the meta device (a finished load leaves none there), so
    checking the new entry is the same test."""

    def move(adapter_name: str, device: Any = None) -> None:
        base_layer = layer.get_base_layer()
        base_device, base_dtype = layer._get_base_layer_device_and_dtype(base_layer)
        target_device = device if device is not None else base_device
        if target_device is None:
            return
        target_dtype = (
            base_dtype
            if base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex)
            else None
        )
        for attribute in layer.adapter_layer_names + layer.other_param_names:
            holder = getattr(layer, attribute, None)
            if (
                not isinstance(holder, (nn.ModuleDict, nn.ParameterDict, BufferDict))
                or adapter_name not in holder
            ):
                continue
            item = holder[adapter_name]
            own = [item] if isinstance(item, torch.Tensor) else list(item.parameters())
            if any(p.device.type == "meta" for p in own):
                continue
            item_dtype = getattr(item, "dtype", None)
            cast = item_dtype is None or item_dtype.is_floating_point or item_dtype.is_complex
            if target_dtype is not None and cast:
                holder[adapter_name] = item.to(target_device, dtype=target_dtype)
            else:
                holder[adapter_name] = item.to(target_device)

    return move


def _no_set_adapter(*_args: Any, **_kwargs: Any) -> None:
    return None


def _extend_unique(names: list[str], new: list[str]) -> None:
    seen = set(names)
    names.extend(name for name in new if name not in seen and not seen.add(name))  # type: ignore[func-returns-value]


def _checkpoint_by_model_key(checkpoint: Checkpoint, adapter_name: str) -> dict[str, str]:
    names = list(checkpoint)
    return dict(zip(insert_adapter_name(names, adapter_name, "lora"), names, strict=True))


def _eval(peft_model: Any, index: _Index, layers: Any, adapter_name: str) -> None:
    """PEFT ends a non-trainable load with `peft_model.eval()`. When the model is already in eval
    mode (every indexed module and every adapter container says so), only the new modules need it."""
    if peft_model.training or any(module.training for module in index.modules.values()):
        peft_model.eval()
        return
    for layer in layers:
        for attribute in (*layer.adapter_layer_names, *layer.other_param_names):
            holder: Any = getattr(layer, attribute, None)
            if _is_adapter_dict(holder):
                if holder.training:
                    peft_model.eval()
                    return
                if adapter_name not in holder:  # ModuleDict has no get()
                    continue
                entry = holder[adapter_name]
                if isinstance(entry, nn.Module):
                    if entry._modules:
                        entry.eval()
                    else:  # a leaf (Linear, Dropout, Identity): what eval() does, without its recursion
                        entry.training = False


# ---------------------------------------------------------------------------------------------
# PEFT's loader, for everything the fast path does not reproduce.


def _load_with_peft(
    peft_model: Any,
    adapter_name: str,
    directory: Path,
    checkpoint: Checkpoint | None,
    reason: str,
    index: _Index | None,
    options: dict[str, Any],
) -> AdapterLoadResult:
    from .. import peft as glue

    glue._peft_model_module()
    snapshot = _Snapshot(peft_model)
    try:
        with glue._raw_results() as records, _merged(directory, checkpoint) as source:
            peft_model.load_adapter(str(source), adapter_name, **options)
    except BaseException:
        snapshot.restore(adapter_name)
        raise
    raw = glue._last(records, "load_adapter")
    result = filter_missing(raw, adapter_name, config=peft_model.peft_config[adapter_name])
    return AdapterLoadResult(list(result.missing_keys), list(result.unexpected_keys), PEFT, reason)


@contextmanager
def _merged(directory: Path, checkpoint: Checkpoint | None) -> Iterator[Path]:
    """`directory` itself when PEFT can read it, else a temporary copy with the shards merged
    into one `adapter_model.safetensors` (PEFT reads no sharded adapters)."""
    if checkpoint is None or not _is_sharded(checkpoint):
        yield directory
        return
    from safetensors.torch import save_file

    tensors = _read_tensors(checkpoint, list(checkpoint))
    with tempfile.TemporaryDirectory(prefix="fastkeys-adapter-") as scratch:
        target = Path(scratch)
        shutil.copyfile(directory / "adapter_config.json", target / "adapter_config.json")
        save_file(tensors, target / _SINGLE_FILE, metadata={"format": "pt"})
        yield target


@contextmanager
def readable_by_peft(model_id: Any) -> Iterator[Any]:
    """`model_id` itself, or for a local directory with a sharded checkpoint a temporary copy with
    the shards merged (PEFT's `from_pretrained` reads one file)."""
    directory = Path(model_id) if isinstance(model_id, (str, os.PathLike)) else None
    if directory is None or not directory.is_dir() or (directory / _SINGLE_FILE).is_file():
        yield model_id
        return
    if not any(directory.glob("*.safetensors.index.json")):
        yield model_id
        return
    with _merged(directory, _checkpoint(directory)) as merged:
        yield str(merged)


class _Snapshot:
    """What a failed PEFT load must give back: the module tree, requires_grad, training flags."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model
        self.modules = dict(peft_model.named_modules())
        self.training = {name: module.training for name, module in self.modules.items()}
        self.grads = {name: p.requires_grad for name, p in peft_model.named_parameters()}
        self.active = peft_model.base_model.active_adapter
        self.configs = dict(peft_model.peft_config)
        targeted = getattr(peft_model.base_model, "targeted_module_names", None)
        self.targeted = list(targeted) if isinstance(targeted, list) else None

    def restore(self, adapter_name: str) -> None:
        model = self.peft_model
        if adapter_name in model.peft_config and adapter_name not in self.configs:
            for module in model.modules():
                if isinstance(module, BaseTunerLayer):
                    for attribute in (*module.adapter_layer_names, *module.other_param_names, "lora_variant"):
                        holder = getattr(module, attribute, None)
                        if holder is not None and adapter_name in holder:
                            del holder[adapter_name]
            del model.peft_config[adapter_name]
        with _own_changes():
            # modules PEFT wrapped for the failed adapter go back to what they were
            for name, module in list(model.named_modules()):
                before = self.modules.get(name)
                if before is not None and before is not module and name:
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child, before)
        tuner = model.base_model
        if self.targeted is not None:
            tuner.targeted_module_names[:] = self.targeted
        for name, module in model.named_modules():
            if name in self.training:
                module.training = self.training[name]
        for name, parameter in model.named_parameters():
            if name in self.grads:
                parameter.requires_grad_(self.grads[name])
        tuner.active_adapter = self.active
        global _generation
        _generation += 1


# ---------------------------------------------------------------------------------------------
# The entry points behind fastkeys.peft.


def load_one(
    peft_model: Any,
    adapter_name: str,
    path: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    torch_device: str | None = None,
    autocast_adapter_dtype: bool = True,
    low_cpu_mem_usage: bool = False,
    force_peft: str | None = None,
) -> AdapterLoadResult:
    """Loads one adapter from a local directory, by the fast path when it is exact, else PEFT's."""
    _check_model(peft_model)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter names must be non-empty str, not {adapter_name!r}")
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"adapter {adapter_name!r}: the checkpoint must be a directory path, not {type(path).__name__}"
        )
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(2, f"adapter {adapter_name!r}: no such checkpoint directory", str(directory))
    options = {
        "is_trainable": is_trainable,
        "torch_device": torch_device,
        "autocast_adapter_dtype": autocast_adapter_dtype,
        "low_cpu_mem_usage": low_cpu_mem_usage,
    }
    has_safetensors = (directory / _SINGLE_FILE).is_file() or any(directory.glob("*.safetensors.index.json"))
    if not has_safetensors and (directory / _BIN_FILE).is_file():
        return _load_with_peft(peft_model, adapter_name, directory, None, "a .bin checkpoint", None, options)
    checkpoint = _checkpoint(directory)
    config = _read_config(directory, checkpoint)
    index = _index_of(peft_model.base_model.model)
    reason = force_peft or _refusal(peft_model, adapter_name, config, index)
    if reason is None:
        try:
            return _load_fast(
                peft_model,
                adapter_name,
                config,
                checkpoint,
                index,
                is_trainable=is_trainable,
                autocast_adapter_dtype=autocast_adapter_dtype,
            )
        except _Refused as refused:
            reason = str(refused)
    return _load_with_peft(peft_model, adapter_name, directory, checkpoint, reason, index, options)


def _check_model(peft_model: Any) -> None:
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, not {type(peft_model).__name__}")


def load_many(
    peft_model: Any,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    progress: bool | Callable[[int, int, str], None] | None = None,
    **options: Any,
) -> dict[str, AdapterLoadResult]:
    """Loads each adapter in order; a failure keeps the ones loaded before it and raises."""
    _check_model(peft_model)
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must map adapter names to checkpoint directories, not {type(adapters).__name__}"
        )
    names = list(adapters)
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"adapter names must be non-empty str, not {name!r}")
    taken = [name for name in names if name in peft_model.peft_config]
    if taken:
        raise ValueError(f"the model already has adapters named {taken}")
    report = _progress_reporter(progress, len(names))
    results: dict[str, AdapterLoadResult] = {}
    try:
        for done, name in enumerate(names, 1):
            results[name] = load_one(peft_model, name, adapters[name], **options)
            report(done, len(names), name)
    finally:
        report(-1, len(names), "")
    return results


def _progress_reporter(
    progress: bool | Callable[[int, int, str], None] | None, total: int
) -> Callable[[int, int, str], None]:
    """A callback (done, total, name); done == -1 ends the bar. None: a bar on stderr when it is a
    terminal and there are enough adapters to wait for."""
    if callable(progress):
        user = progress
        return lambda done, total, name: None if done < 0 else user(done, total, name)
    if progress is None:
        progress = total >= _PROGRESS_AFTER and sys.stderr.isatty()
    if not progress:
        return lambda done, total, name: None
    started = time.perf_counter()
    shown = [False]

    def draw(done: int, total: int, name: str) -> None:
        if done < 0:
            if shown[0]:
                sys.stderr.write("\n")
            return
        width = 30
        filled = width * done // max(total, 1)
        elapsed = time.perf_counter() - started
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\rloading adapters [{bar}] {done}/{total} {elapsed:.1f}s {name[:30]:<30}")
        sys.stderr.flush()
        shown[0] = True

    return draw
