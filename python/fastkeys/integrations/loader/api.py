"""The loader's entry points: read the checkpoint through `scan`'s checks, decide the path, load
under a transaction. Called by `fastkeys.peft`."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import peft
import torch

from fastkeys.checkpoints.scan import Checkpoint, scan
from fastkeys.integrations.loader import boundary, policy
from fastkeys.integrations.loader.fallback import (
    merged_base_tensors,
    peft_load,
    record_for_load,
    special_init_targets,
)
from fastkeys.integrations.loader.files import BIN_FILE, CONFIG_FILE, has_safetensors, read_bin, read_tensors
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.inject import load_fast
from fastkeys.integrations.loader.peft_re import check_expressions
from fastkeys.integrations.loader.plan import Options, Refused
from fastkeys.integrations.loader.result import FAST, PEFT, AdapterLoadResult
from fastkeys.integrations.loader.swap import swap_fast
from fastkeys.integrations.loader.transaction import Transaction
from fastkeys.rules.matching import filter_missing

_PROGRESS_AFTER = 4  # adapters: fewer load too fast for a bar to help


class Source:
    """An adapter checkpoint read as far as deciding needs: its checked config, its headers (or,
    for a `.bin`, its tensors) and PEFT's config object."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.checkpoint: Checkpoint | None = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if has_safetensors(directory) or not (directory / BIN_FILE).exists():
            self.checkpoint = scan(directory)
            config = self.checkpoint.adapter_config
            if config is None:
                raise FileNotFoundError(
                    2, "the adapter has no adapter_config.json", str(directory / CONFIG_FILE)
                )
            self.config_dict = config
        else:
            self.config_dict, self._tensors = read_bin(directory)
        where = str(directory / CONFIG_FILE)
        peft_type = self.config_dict.get("peft_type")
        if peft_type not in boundary.CONFIG_MAPPING:
            raise ValueError(f"{where}: unknown peft_type {peft_type!r}")
        with tempfile.TemporaryDirectory(prefix="fastkeys-config-") as scratch:
            (Path(scratch) / CONFIG_FILE).write_text(json.dumps(self.config_dict), encoding="utf-8")
            self.config = boundary.CONFIG_MAPPING[peft_type].from_pretrained(scratch)
        check_expressions(self.config, where)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            assert self.checkpoint is not None
            self._tensors = read_tensors(self.checkpoint, self.directory)
        return self._tensors


def checkpoint_directory(adapter_name: str, path: object) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"adapter {adapter_name!r}: the checkpoint must be a directory path, not {type(path).__name__}"
        )
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(2, f"adapter {adapter_name!r}: no such checkpoint directory", str(directory))
    return directory


def check_name(adapter_name: object) -> None:
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter names must be non-empty str, not {adapter_name!r}")


def _check_model(peft_model: Any) -> None:
    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, not {type(peft_model).__name__}")


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
    """Loads one adapter from a local directory: by the fast path where it is verified exact, else by
    PEFT's loader; either way all or nothing."""
    _check_model(peft_model)
    check_name(adapter_name)
    source = Source(checkpoint_directory(adapter_name, path))
    index = ModelIndex(peft_model.base_model.model)
    reason = (
        force_peft
        or boundary.version_refusal()
        or policy.options_refusal(torch_device=torch_device)
        or (None if source.checkpoint is not None else "a .bin checkpoint")
        or policy.config_refusal(source.config)
        or policy.model_refusal(peft_model, adapter_name, index, source.config)
    )
    fast = Options(is_trainable, autocast_adapter_dtype, low_cpu_mem_usage)
    if reason is None:
        assert source.checkpoint is not None
        checkpoint = source.checkpoint

        def fast_load(tx: Transaction) -> None:
            if adapter_name in peft_model.peft_config:  # PEFT's hot swap: the adapter's values only
                swap_fast(peft_model, adapter_name, checkpoint, source.directory, index, tx, fast)
            else:
                load_fast(
                    peft_model, adapter_name, source.config, checkpoint, source.directory, index, tx, fast
                )

        reason = attempt_fast(fast_load)
        if reason is None:
            return AdapterLoadResult([], [], FAST, None, [])
    options = {**fast._asdict(), "torch_device": torch_device}
    tensors = source.tensors()
    tx = Transaction()
    recorded = record_for_load(tx, peft_model, adapter_name)
    try:
        _returned, raw, written = peft_load(
            lambda directory: peft_model.load_adapter(directory, adapter_name, **options),
            peft_model,
            peft_model.base_model.model,
            adapter_name,
            source.config_dict,
            tensors,
            tx,
            special_init_targets(source.config, index.modules) + merged_base_tensors(recorded.modules),
            recorded.others,
            recorded.existing,
        )
    except BaseException:
        tx.roll_back()
        raise
    verdict = filter_missing(raw, adapter_name, config=peft_model.peft_config[adapter_name])
    return AdapterLoadResult(list(verdict.missing_keys), list(verdict.unexpected_keys), PEFT, reason, written)


def attempt_fast(load: Callable[[Transaction], None]) -> str | None:
    """Runs a fast path, `load(tx)`, under a new transaction: None when it loaded; when it was
    Refused, the model rolled back and the reason (for the library's loader). Any other exception
    (KeyboardInterrupt included) rolls back and propagates."""
    tx = Transaction()
    try:
        load(tx)
    except Refused as refused:
        tx.roll_back()
        return str(refused)
    except BaseException:
        tx.roll_back()
        raise
    return None


def load_many(
    peft_model: Any,
    adapters: Mapping[str, str | os.PathLike[str]],
    *,
    progress: bool | Callable[[int, int, str], None] | None = None,
    **options: Any,
) -> dict[str, AdapterLoadResult]:
    """Loads each adapter in order; a failure keeps the ones loaded before it and raises."""
    _check_model(peft_model)
    return load_in_order(lambda name, path: load_one(peft_model, name, path, **options), adapters, progress)


def load_in_order(
    load: Callable[[str, Any], AdapterLoadResult],
    adapters: Mapping[str, str | os.PathLike[str]],
    progress: bool | Callable[[int, int, str], None] | None,
) -> dict[str, AdapterLoadResult]:
    """`load(name, path)` for each adapter in order, every name checked first, with the progress
    bar; a failure keeps the ones loaded before it and raises."""
    if not isinstance(adapters, Mapping):
        raise TypeError(
            f"adapters must map adapter names to checkpoint directories, not {type(adapters).__name__}"
        )
    names = list(adapters)
    for name in names:
        check_name(name)
    report = progress_reporter(progress, len(names))
    results: dict[str, AdapterLoadResult] = {}
    try:
        for done, name in enumerate(names, 1):
            results[name] = load(name, adapters[name])
            report(done, len(names), name)
    finally:
        report(-1, len(names), "")
    return results


def from_pretrained(model: Any, model_id: Any, adapter_name: str, **kwargs: Any) -> tuple[Any, Any]:
    """`PeftModel.from_pretrained` for a local directory, read through the same checks as
    `load_one` and all or nothing; (the PeftModel, torch's raw load result)."""
    check_name(adapter_name)
    source = Source(checkpoint_directory(adapter_name, model_id))
    tensors = source.tensors()
    tx = Transaction()
    tx.record_all(model.modules())
    try:
        loaded, raw, _written = peft_load(
            lambda directory: peft.PeftModel.from_pretrained(model, directory, adapter_name, **kwargs),
            model,
            model,
            adapter_name,
            source.config_dict,
            tensors,
            tx,
            special_init_targets(source.config, ModelIndex(model).modules),
            set(),
        )
    except BaseException:
        tx.roll_back()
        raise
    return loaded, raw


def progress_reporter(
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
