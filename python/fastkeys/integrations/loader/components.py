"""diffusers' `load_lora_adapter` loop for many adapters (`fastkeys.diffusers.load_adapters`).

diffusers loads a LoRA into a model (a UNet, a transformer: a `ModelMixin` with `PeftAdapterMixin`)
by building a `LoraConfig` from the file (the `lora_adapter_metadata` its `save_lora_adapter`
writes, else ranks and target modules read off the tensors), then PEFT's
`inject_adapter_in_model(config, model, name, state_dict=...)`, a fresh tuner over the whole model
that injects into the modules the state dict names, and `set_peft_model_state_dict`. Each call
also computes `model.state_dict()`, so a loop over many adapters costs O(model x adapters).

The fast path is the PEFT loader's (`inject.load_fast`) on the view of the model transformers'
loop uses too (`hf.Host`, the fresh tuner without its whole-model injection), reading the
checkpoint's module paths under the prefix (`stored_under`) and refusing unless they are exactly
the modules the config targets. It runs where the differential tests verified it
(tests/integrations/loader/test_diffusers_loop.py): the diffusers releases of `VERIFIED_DIFFUSERS`,
a model that already holds adapters, a new name, a LoRA checkpoint in PEFT's layout, no hotswap
preparation, offloading or tensor parallelism, and the allow-list of `policy`. Everything else goes
through diffusers' own `load_lora_adapter`, fed the tensors and metadata fastkeys read and checked
(diffusers opens no file), under `hf.guarded_load`, and the result's `reason` says why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastkeys.checkpoints.scan import Checkpoint, _inside, scan
from fastkeys.integrations.loader import policy
from fastkeys.integrations.loader.api import attempt_fast, check_name
from fastkeys.integrations.loader.files import read_tensors
from fastkeys.integrations.loader.hf import Host, fresh_tuner, guarded_load, holder_refusal, version_refusal
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.inject import load_fast
from fastkeys.integrations.loader.methods import LORA
from fastkeys.integrations.loader.peft_re import check_expressions
from fastkeys.integrations.loader.plan import Options
from fastkeys.integrations.loader.result import DIFFUSERS, FAST, AdapterLoadResult
from fastkeys.integrations.loader.transaction import Transaction

# The diffusers releases whose `load_lora_adapter` the fast path was verified against (0.42 in the
# venv, 0.39 in `make test`'s compat slice: scripts/compat.py).
VERIFIED_DIFFUSERS = ("0.39", "0.42")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


class ComponentSource:
    """A diffusers LoRA file read as far as deciding needs: its header, the `lora_adapter_metadata`
    in it (None when absent, as diffusers reads it) and the tensor names under the prefix."""

    def __init__(self, adapter_name: str, path: object, weight_name: str, prefix: str | None) -> None:
        self.file, self.directory = _weights_file(adapter_name, path, weight_name)
        self.checkpoint: Checkpoint = scan(self.file)
        self.metadata = _lora_metadata(self.checkpoint, self.file)
        self.prefix = prefix
        self.stored_under = "" if prefix is None else f"{prefix}."
        self.names = [name for name in self.checkpoint if name.startswith(self.stored_under)]
        if not self.names:
            raise ValueError(
                f"adapter {adapter_name!r}: no tensor of {self.file} starts with {self.stored_under!r} "
                "(diffusers would load nothing and only log it); pass prefix=None for a file saved "
                'by a model\'s save_lora_adapter, or the component\'s prefix ("unet", "transformer")'
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file (diffusers filters by the prefix itself), in the file's order."""
        return read_tensors(self.checkpoint, self.directory)

    def config(self, adapter_name: str) -> tuple[Any, str | None]:
        """(the LoraConfig diffusers builds for this file, None) or (None, why the fast path
        cannot build it). ValueError naming the file for metadata PEFT cannot take."""
        paths = [name[len(self.stored_under) :] for name in self.names]
        if any(".lokr_" in path for path in paths):
            return None, "a LoKr checkpoint (diffusers fuses projections and builds its own config)"
        if "lora_A" not in paths[0]:
            return None, "a checkpoint not in PEFT's layout (diffusers converts it)"
        if "lora_controlnet" in paths:
            return None, "a control LoRA (diffusers converts it)"
        metadata = self.metadata
        if metadata is not None and self.prefix is not None:
            metadata = {
                key.removeprefix(self.stored_under): value
                for key, value in metadata.items()
                if key.startswith(self.stored_under)
            }
        from diffusers.utils.peft_utils import _create_lora_config

        rank = {
            f"^{path}": self.checkpoint[name].shape[1]
            for name, path in zip(self.names, paths, strict=True)
            if "lora_B" in path and len(self.checkpoint[name].shape) > 1
        }
        try:
            # get_peft_kwargs reads the state dict's keys only (ranks come from `rank`)
            config = _create_lora_config(  # type: ignore[no-untyped-call]
                dict.fromkeys(paths), None, metadata, rank, adapter_name=adapter_name
            )
        except Exception as error:  # LoraConfig(**metadata): whatever its checks raise on a hostile value
            raise ValueError(f"{self.file}: its LoRA config is not one PEFT accepts ({error!r})") from None
        check_expressions(config, str(self.file))
        return config, None


def _weights_file(adapter_name: str, path: object, weight_name: str) -> tuple[Path, Path]:
    """(the file, the directory it must lie in): `path` itself and its directory, or `path`'s
    `weight_name`, which must resolve inside `path` (no `..`, no link to a directory elsewhere).
    Checked before the file is opened."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"adapter {adapter_name!r}: the checkpoint must be a .safetensors file or a directory "
            f"path, not {type(path).__name__}"
        )
    file = Path(path)
    directory = file if file.is_dir() else file.parent
    if file.is_dir():
        file = file / weight_name
    if not file.is_file() or file.suffix != ".safetensors":
        raise FileNotFoundError(
            2, f"adapter {adapter_name!r}: no .safetensors file (weight_name={weight_name!r})", str(file)
        )
    real = os.path.realpath(file)
    if not _inside(directory, real):
        raise ValueError(f"{file}: lies outside the checkpoint directory {directory}")
    return Path(real), directory  # opened as resolved: a link swapped in after this check is not followed


def _lora_metadata(checkpoint: Checkpoint, file: Path) -> dict[str, Any] | None:
    """diffusers' `_load_sft_state_dict_metadata`: the JSON object under `lora_adapter_metadata`."""
    raw = checkpoint.metadata.get(_METADATA_KEY)
    if not raw:
        return None
    try:
        metadata = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{file}: its {_METADATA_KEY} is not JSON ({error})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{file}: its {_METADATA_KEY} must be a JSON object")
    return metadata


def _tensor_parallel(model: Any) -> bool:
    """diffusers' own test (0.42); diffusers 0.39 has no tensor parallelism."""
    try:
        from diffusers.hooks.tensor_parallel import _is_tensor_parallel
    except ImportError:
        return False
    return bool(_is_tensor_parallel(model))


def _model_refusal(model: Any, adapter_name: str, config: Any, index: ModelIndex) -> str | None:
    """Why diffusers' load of this adapter into `model` is not the fast path's, or None."""
    held = holder_refusal(model, adapter_name)
    if held is not None:
        return held
    if getattr(model, "_prepare_lora_hotswap_kwargs", None) is not None:
        return "enable_lora_hotswap was called: diffusers prepares the model for compiled hotswaps"
    if _tensor_parallel(model):
        return "the model is tensor-parallel (diffusers raises)"
    if any(
        getattr(module, "_diffusers_hook", None) is not None or hasattr(module, "_hf_hook")
        for module in (model, *index.modules.values())  # the index leaves out the root
    ):
        return "the model has offloading or other hooks (diffusers removes and reapplies them)"
    if not isinstance(config.inference_mode, bool):
        # the fast path sets it from the value's truth, diffusers' config keeps the value itself
        return f"inference_mode={config.inference_mode!r} is not a bool"
    if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
        return "modules_to_save and trainable tokens are not verified through diffusers"
    host = Host(model, fresh_tuner(model, LORA.tuner, adapter_name))
    return policy.model_refusal(host, adapter_name, index, config, wrappers=False)


def unwrapped(model: Any) -> Any:
    """The module a `torch.compile`d model wraps: diffusers' `load_lora_adapter` on the compiled
    model runs on it (the method is looked up there), and so does this loader."""
    inner = getattr(model, "_orig_mod", None)
    return inner if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module) else model


def load_one(
    model: Any,
    adapter_name: str,
    path: str | os.PathLike[str],
    *,
    prefix: str | None,
    weight_name: str = WEIGHT_NAME,
    low_cpu_mem_usage: bool = False,
) -> AdapterLoadResult:
    """Loads one LoRA file into a diffusers model, ending in the state of
    `model.load_lora_adapter(file, adapter_name=adapter_name, prefix=prefix,
    low_cpu_mem_usage=low_cpu_mem_usage)`: by the fast path where it was verified, else by
    diffusers; either way all or nothing."""
    check_name(adapter_name)
    model = unwrapped(model)
    source = ComponentSource(adapter_name, path, weight_name, prefix)
    index = ModelIndex(model)
    import diffusers

    reason = version_refusal(diffusers, VERIFIED_DIFFUSERS)
    config = None  # diffusers' private config builder is called on the verified releases only
    if reason is None:
        config, reason = source.config(adapter_name)
    if reason is None:
        reason = policy.config_refusal(config) or _model_refusal(model, adapter_name, config, index)
    if reason is None:
        assert config is not None

        def fast_load(tx: Transaction) -> None:
            host = Host(model, fresh_tuner(model, LORA.tuner, adapter_name))
            tx.record_entries(host.peft_config, adapter_name)
            # inject_adapter_in_model casts no dtype; the config's own inference_mode decides which
            # tensors need gradients, and diffusers calls no eval()
            load_fast(
                host,
                adapter_name,
                config,
                source.checkpoint,
                source.directory,
                index,
                tx,
                Options(not config.inference_mode, False, low_cpu_mem_usage),
                stored_under=source.stored_under,
                ends_in_eval=False,
            )

        reason = attempt_fast(fast_load)
        if reason is None:
            return AdapterLoadResult([], [], FAST, None, [])
    return _diffusers_load(model, adapter_name, source, config, index, low_cpu_mem_usage, reason)


def _diffusers_load(
    model: Any,
    adapter_name: str,
    source: ComponentSource,
    config: Any,
    index: ModelIndex,
    low_cpu_mem_usage: bool,
    reason: str,
) -> AdapterLoadResult:
    """diffusers' own `load_lora_adapter`, fed the checked tensors and metadata, under
    `hf.guarded_load`; `config`: the LoraConfig diffusers will build, where fastkeys built it too
    (its special initialisation's base weights are protected), else None."""
    tensors = source.tensors()
    info, judged, written = guarded_load(
        model,
        adapter_name,
        config,
        None if config is None else config.to_dict(),
        index,
        source.directory,
        lambda: model.load_lora_adapter(
            tensors,
            adapter_name=adapter_name,
            prefix=source.prefix,
            metadata=source.metadata,
            low_cpu_mem_usage=low_cpu_mem_usage,
        ),
        "diffusers",
    )
    del info  # load_lora_adapter returns None
    return AdapterLoadResult(list(judged.verdict), list(judged.unexpected), DIFFUSERS, reason, written)
