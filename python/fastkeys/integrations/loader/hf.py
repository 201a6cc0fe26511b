"""transformers' `model.load_adapter` loop for many adapters (`fastkeys.transformers.load_adapters`).

transformers loads an adapter into a `PreTrainedModel` through PEFT's `inject_adapter_in_model`: a
fresh tuner over the whole model, which matches every module, builds the adapter, makes it the
active adapter of every tuner layer and restores the `requires_grad` of everything else; then its
own `_load_pretrained_model` copies the tensors in and, unless `is_trainable`, `model.eval()` and
`requires_grad_(False)` on every tuner layer. Each call walks the whole model, so a loop over many
adapters costs O(model x adapters).

The fast path is the PEFT loader's (`inject.load_fast`), run on a view of the model (`Host`) whose
tuner is the fresh one `inject_adapter_in_model` creates, without its whole-model injection; then
transformers' own ending: every tuner layer frozen unless `is_trainable`. It runs where the
differential tests verified it (tests/integrations/loader/test_transformers_loop.py): the versions
of `VERIFIED_TRANSFORMERS`, a model that already holds adapters, a new name, no auxiliary
wrappers, no device map or tensor parallelism, and the allow-list of `policy`. Everything else goes
through transformers' own `load_adapter`, fed the config and the tensors fastkeys read and checked
(transformers opens no file), under a transaction, and the result's `reason` says why.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fastkeys.integrations import recorder
from fastkeys.integrations.loader import boundary, policy
from fastkeys.integrations.loader.api import Source, attempt_fast, check_name, checkpoint_directory
from fastkeys.integrations.loader.fallback import (
    BaseWeights,
    guarded_writes,
    merged_base_tensors,
    saved_by_peft,
    special_init_targets,
    split_adapters,
    tensor_ids,
)
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.inject import adapter_parameters, load_fast
from fastkeys.integrations.loader.methods import method_of
from fastkeys.integrations.loader.peft_re import linear_time_matching
from fastkeys.integrations.loader.plan import Options
from fastkeys.integrations.loader.result import FAST, TRANSFORMERS, AdapterLoadResult
from fastkeys.integrations.loader.transaction import Transaction, settled_heap

# The transformers releases whose `load_adapter` the fast path was verified against.
VERIFIED_TRANSFORMERS = ("5.24",)


class Host:
    """What `load_fast` reads and calls of a PeftModel, for a transformers model: the fresh tuner
    transformers' load creates, the model's own `peft_config`, and none of PeftModel's checks of a
    new config (transformers makes none)."""

    def __init__(self, model: nn.Module, tuner: Any) -> None:
        self._model = model
        self.base_model = tuner
        self.peft_config: dict[str, Any] = model.peft_config  # type: ignore[assignment]
        self.hf_device_map = getattr(model, "hf_device_map", None)

    @property
    def training(self) -> bool:
        return self._model.training

    def modules(self) -> Any:
        return self._model.modules()

    def eval(self) -> None:
        self._model.eval()

    def _check_new_adapter_config(self, config: Any, is_trainable: bool) -> None:
        return None


def fresh_tuner(model: nn.Module, tuner_class: type, adapter_name: str) -> Any:
    """The tuner `inject_adapter_in_model` creates (`BaseTuner.__init__`'s attributes), before its
    injection: its active adapter is the new one, its `peft_config` the model's."""
    tuner: Any = object.__new__(tuner_class)
    nn.Module.__init__(tuner)
    tuner.model = model
    tuner.targeted_module_names = []
    tuner.targeted_parameter_names = []
    tuner.active_adapter = adapter_name
    return tuner


def version_refusal(library: Any, verified: tuple[str, ...]) -> str | None:
    """Why the fast path does not run on this release of `library` (transformers, diffusers), or
    None: its minor release is one the differential tests verified, and PEFT's (`boundary`)."""
    found = recorder.version(library)
    if ".".join(found.split(".")[:2]) not in verified:
        versions = ", ".join(verified)
        return f"{library.__name__} {found} is not a version the fast path was verified on ({versions})"
    return boundary.version_refusal()


def holder_refusal(model: Any, adapter_name: str) -> str | None:
    """Why a library's load into a model that is not a PeftModel is not the fast path's, whatever
    the library: the model holds no adapter yet (the library's first load prepares it) or one of
    this name (the library raises, or hotswaps)."""
    configs = getattr(model, "peft_config", None)
    if not getattr(model, "_hf_peft_config_loaded", False) or not isinstance(configs, dict) or not configs:
        return "the model holds no adapter yet (the library's first load prepares it)"
    if adapter_name in configs:
        return f"the model holds an adapter named {adapter_name!r} already (the library raises or hotswaps)"
    return None


def _model_refusal(model: Any, adapter_name: str, config: Any, index: ModelIndex) -> str | None:
    """Why transformers' load of this adapter into `model` is not the fast path's, or None."""
    held = holder_refusal(model, adapter_name)
    if held is not None:
        return held
    if getattr(model, "_tp_size", None) not in (None, 1):
        return "the model is tensor-parallel"
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return "modules_to_save and trainable tokens: transformers' loader renames their tensors"
    if getattr(config, "use_dora", False):
        # transformers 5.24 renames the checkpoint's `lora_magnitude_vector` to
        # `lora_magnitude_vector.<name>`, not `.<name>.weight`: the magnitudes stay as initialised
        return (
            "DoRA: transformers' loader leaves the magnitude vectors as initialised (it reports them "
            "missing and the checkpoint's as unexpected)"
        )
    method = method_of(config)
    if method is None:
        return policy.config_refusal(config) or "the config's method is not covered"
    host = Host(model, fresh_tuner(model, method.tuner, adapter_name))
    return policy.model_refusal(host, adapter_name, index, config, wrappers=False)


def load_one(
    model: Any, adapter_name: str, path: str | os.PathLike[str], *, is_trainable: bool = False
) -> AdapterLoadResult:
    """Loads one adapter from a local directory into a transformers model, ending in the state of
    `model.load_adapter(path, adapter_name=adapter_name, is_trainable=is_trainable)`: by the fast
    path where it was verified, else by transformers; either way all or nothing."""
    check_name(adapter_name)
    source = Source(checkpoint_directory(adapter_name, path))
    index = ModelIndex(model)
    import transformers

    reason = (
        version_refusal(transformers, VERIFIED_TRANSFORMERS)
        or (None if source.checkpoint is not None else "a .bin checkpoint")
        or policy.config_refusal(source.config)
        or _model_refusal(model, adapter_name, source.config, index)
    )
    if reason is None:
        assert source.checkpoint is not None
        checkpoint = source.checkpoint
        method = method_of(source.config)
        assert method is not None
        tuner_class = method.tuner

        def fast_load(tx: Transaction) -> None:
            host = Host(model, fresh_tuner(model, tuner_class, adapter_name))
            tx.record_entries(host.peft_config, adapter_name)  # a PeftModel's is its tuner's, recorded there
            options = Options(is_trainable, False, False)  # inject_adapter_in_model casts no dtype
            layers = load_fast(
                host, adapter_name, source.config, checkpoint, source.directory, index, tx, options
            )
            for layer in layers:  # what transformers marks on every tensor it loaded, so that a later
                # `initialize_weights()` leaves them as loaded
                for parameter in adapter_parameters(layer, adapter_name, "").values():
                    parameter._is_hf_initialized = True
            if not is_trainable:
                _freeze_tuner_layers(index, tx)

        reason = attempt_fast(fast_load)
        if reason is None:
            return AdapterLoadResult([], [], FAST, None, [])
    return _transformers_load(model, adapter_name, source, index, is_trainable, reason)


def _freeze_tuner_layers(index: ModelIndex, tx: Transaction) -> None:
    """transformers' `requires_grad_(False)` on every tuner layer, and its `model.eval()` inside
    them (`eval_like_peft` covers the rest of the model), where a flag is set. The layers hold every
    adapter's modules, so this walk grows with the adapters (docs/loading.md: about 2.8 us per
    leaf module, LoRA's two Linears and dropout per adapter and layer)."""
    unfrozen: list[nn.Parameter] = []
    training: list[nn.Module] = []
    stack: list[nn.Module] = list(index.layers.values())
    while stack:
        module = stack.pop()
        if module.training:
            training.append(module)
        unfrozen.extend(p for p in module._parameters.values() if p is not None and p.requires_grad)
        stack.extend(child for child in module._modules.values() if child is not None)
    if unfrozen:
        tx.record_grads(unfrozen)
        for parameter in unfrozen:
            parameter.requires_grad_(False)
    if training:
        tx.record_training(training)
        for module in training:
            module.training = False


def _transformers_load(
    model: Any, adapter_name: str, source: Source, index: ModelIndex, is_trainable: bool, reason: str
) -> AdapterLoadResult:
    """transformers' own `load_adapter`, fed the checked config and tensors, under `guarded_load`."""
    tensors = source.tensors()
    info, judged, written = guarded_load(
        model,
        adapter_name,
        source.config,
        source.config_dict,
        index,
        source.directory,
        lambda: model.load_adapter(
            adapter_name=adapter_name,
            peft_config=source.config,
            adapter_state_dict=dict(tensors),
            is_trainable=is_trainable,
        ),
        "transformers",
    )
    unexpected = sorted(getattr(info, "unexpected_keys", ()) or ())
    return AdapterLoadResult(list(judged.verdict), unexpected, TRANSFORMERS, reason, written)


def guarded_load(
    model: Any,
    adapter_name: str,
    config: Any,
    config_dict: Mapping[str, Any] | None,
    index: ModelIndex,
    directory: Path,
    call: Callable[[], Any],
    library: str,
) -> tuple[Any, recorder.Judged, list[str]]:
    """`call()`, a library's own load of one adapter into a model that is not a PeftModel
    (transformers', diffusers'), fed the checked config and tensors, under a transaction: every
    module recorded, the values of an adapter it replaces (a hotswap) and of the base weights a
    special initialisation rewrites (PiSSA, OLoRA, ...) protected, and every `load_state_dict` that
    reaches the model checked before torch copies (`fallback.guarded_writes`: diffusers copies into
    the existing tensors, whose values are protected first). A checkpoint that writes a base weight
    PEFT does not save, or another adapter's tensor, is refused (ValueError) and rolled back; the
    special initialisation's own writes are what the library's loop does too, and are reported.
    `config` may be None and `config_dict` None where only the library knows the config before the
    load (diffusers builds it from the file): then the config the load puts in the model's
    `peft_config` decides which base weights PEFT saves. A load whose result fastkeys did not see
    (`library`'s loader went another way) is rolled back too.
    (what `call` returned, fastkeys' verdict on the raw load, the base weights written)."""
    tx = Transaction()
    tx.record_all(model.modules())
    if adapter_name in (getattr(model, "peft_config", None) or {}):
        for name, layer in index.layers.items():
            for parameter in adapter_parameters(layer, adapter_name, name).values():
                tx.protect(parameter)
    full, _flagged, others, nested = split_adapters(model, adapter_name)
    for tensor in special_init_targets(config, index.modules) + merged_base_tensors(full + nested):
        tx.protect(tensor)
    other_ids = {id(other[2]) for other in others}
    base = BaseWeights(model)
    saved = config_dict if config_dict is not None else _LoadedConfig(model, adapter_name)
    try:
        with (
            recorder.loading(adapter_name) as load,
            linear_time_matching(),
            guarded_writes(model, base, adapter_name, saved, tx, other_ids, other_ids | tensor_ids(full)),
            settled_heap(),
        ):
            info = call()
        load.raise_error()
        foreign = [
            name
            for name in base.changed()  # copied from the checkpoint: a new tensor or a new version
            if not saved_by_peft(*name.rpartition(".")[::2], saved)
        ]
        if foreign:
            raise ValueError(
                f"the checkpoint of adapter {adapter_name!r} at {directory} would overwrite "
                f"{foreign[0]!r}, a weight of the base model that every adapter shares; fastkeys loads only "
                "the base weights PEFT itself saves (embeddings with save_embedding_layers, biases when "
                "the config trains them)"
            )
        overwritten = next(
            (
                (owner, attribute)
                for owner, attribute, tensor, version in others
                if owner._parameters.get(attribute, owner._buffers.get(attribute)) is not tensor
                or tensor._version != version
            ),
            None,
        )
        if overwritten is not None:
            owner, attribute = overwritten
            path = next(name for name, module in model.named_modules() if module is owner)
            raise ValueError(
                f"the checkpoint of adapter {adapter_name!r} at {directory} would overwrite "
                f"{path + '.' + attribute!r}, a weight of another adapter; an adapter's checkpoint "
                "holds only its own tensors"
            )
        written = base.changed(tx.differs)
        judged = load.result_for(model)
        if judged is None:
            raise recorder.missing_internal(
                importlib.import_module(library),
                f"{library} loading adapters through PEFT's set_peft_model_state_dict or "
                "transformers' PreTrainedModel._load_pretrained_model",
                recorder.INSTEAD,
            )
    except BaseException:
        tx.roll_back()
        raise
    return info, judged, written


class _LoadedConfig(Mapping[str, Any]):
    """The config a library builds during its load (diffusers, from the file) as `to_dict()`
    reads it, looked up when asked: empty until the load has put it in the model's `peft_config`."""

    def __init__(self, model: Any, adapter_name: str) -> None:
        self._model = model
        self._name = adapter_name

    def _fields(self) -> dict[str, Any]:
        built = (getattr(self._model, "peft_config", None) or {}).get(self._name)
        return built.to_dict() if built is not None else {}

    def __getitem__(self, key: str) -> Any:
        return self._fields()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())
