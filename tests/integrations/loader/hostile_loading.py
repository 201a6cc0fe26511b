"""Hostile checkpoints on the loading path (issue 16, docs/hostile.md). Not collected by itself:
test_loading_fails_closed.py runs this module in a child pytest with a time limit and an
address-space cap, so a hang or a runaway allocation fails instead of stalling the suite."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file

import fastkeys.peft
from fastkeys.integrations.loader import files
from fixtures.loading import (
    adapter,
    assert_same_state,
    assert_untouched,
    edit_config,
    end_state,
    rewrite,
    with_first,
)
from fixtures.peft_models import save_seeded_adapter, tiny_llama


@pytest.fixture
def first(tmp_path: Path) -> Path:
    return save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "first")


def test_a_checkpoint_writing_a_base_weight_is_refused(tmp_path: Path, first: Path) -> None:
    directory = adapter(tmp_path, "hostile")
    rewrite(
        directory,
        lambda t: t.update(
            {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": torch.zeros(32, 32)}
        ),
    )
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(
        ValueError, match=r"would overwrite a weight of the base model that every adapter shares"
    ):
        fastkeys.peft.load_adapter(model, directory, "hostile")
    assert_untouched(model, before, "hostile")


@pytest.mark.parametrize(("name", "fields"), [("x", {"init_lora_weights": "x"}), ("a.b", {})])
def test_a_failure_inside_peft_s_injection_leaves_no_trace(
    tmp_path: Path, first: Path, name: str, fields: dict[str, Any]
) -> None:
    directory = (
        edit_config(adapter(tmp_path, "broken"), r=2**20, **fields) if fields else adapter(tmp_path, "b")
    )
    model = with_first(first)
    before = end_state(model)
    with pytest.raises((ValueError, KeyError, TypeError)):
        fastkeys.peft.load_adapter(model, directory, name)
    assert_untouched(model, before, name)


def _after_the_scan(monkeypatch: pytest.MonkeyPatch, edit: Any) -> None:
    """`edit(path of the adapter file)` runs right after the loader scanned the checkpoint."""
    from fastkeys.integrations.loader import api

    scanned = api.scan  # type: ignore[attr-defined]

    def scan_then_edit(path: Any) -> Any:
        checkpoint = scanned(path)
        edit(Path(path) / "adapter_model.safetensors")
        return checkpoint

    monkeypatch.setattr(api, "scan", scan_then_edit)  # the name api reads checkpoints through


def test_a_shard_swapped_for_a_fifo_after_the_scan_is_refused_at_once(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = adapter(tmp_path, "swap")

    def swap(target: Path) -> None:
        target.unlink()
        os.mkfifo(target)

    _after_the_scan(monkeypatch, swap)
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(ValueError, match="not a regular file"):
        fastkeys.peft.load_adapter(model, directory, "swap")
    assert_untouched(model, before, "swap")


def _file_rewritten_after_the_scan(data: bytearray) -> bytes:
    """Same size, another header: a dtype changed (F32 -> I32 keeps every size)."""
    return bytes(data).replace(b'"F32"', b'"I32"', 1)


def _header_length_past_the_end(data: bytearray) -> bytes:
    return (len(data) * 4).to_bytes(8, "little") + bytes(data[8:])


def _header_cut(data: bytearray) -> bytes:
    return bytes(data[:8]) + b"[" + bytes(data[9:])  # no longer a JSON object


@pytest.mark.parametrize("change", [_file_rewritten_after_the_scan, _header_length_past_the_end, _header_cut])
def test_a_file_changed_after_the_scan_is_refused_naming_it(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch, change: Any
) -> None:
    directory = adapter(tmp_path, "changed")
    _after_the_scan(monkeypatch, lambda target: target.write_bytes(change(bytearray(target.read_bytes()))))
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors"):
        fastkeys.peft.load_adapter(model, directory, "changed")
    assert_untouched(model, before, "changed")


def test_bin_checkpoints_load_like_peft_through_the_same_checks(tmp_path: Path, first: Path) -> None:
    directory = _bin_adapter(tmp_path, "bin")
    expected = with_first(first)
    expected.load_adapter(directory, "bin")
    actual = with_first(first)
    result = fastkeys.peft.load_adapter(actual, directory, "bin")
    assert result.loader == "peft" and result.reason == "a .bin checkpoint"
    assert_same_state(end_state(expected), end_state(actual))
    outside = tmp_path / "outside.bin"
    shutil.move(directory / "adapter_model.bin", outside)
    (directory / "adapter_model.bin").symlink_to(outside)
    with pytest.raises(ValueError, match="lies outside the checkpoint directory"):
        fastkeys.peft.load_adapter(actual, directory, "escaped")
    (directory / "adapter_model.bin").unlink()
    shutil.copy(outside, directory / "adapter_model.bin")
    with open(directory / "adapter_config.json", "a") as config:
        config.truncate(5 << 20)  # past the 4 MiB cap (sparse)
    with pytest.raises(ValueError, match="more than the limit"):
        fastkeys.peft.load_adapter(actual, directory, "big")


def test_from_pretrained_reads_a_single_file_through_the_checks(tmp_path: Path) -> None:
    directory = adapter(tmp_path, "single")
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(directory / "adapter_model.safetensors", outside)
    (directory / "adapter_model.safetensors").symlink_to(outside)
    base = tiny_llama()
    before = {key: value.clone() for key, value in base.state_dict().items()}
    with pytest.raises(ValueError, match="lies outside the checkpoint directory"):
        fastkeys.peft.from_pretrained(base, str(directory))
    assert [name for name, _ in base.named_modules() if "lora" in name] == []
    assert all(torch.equal(before[key], value) for key, value in base.state_dict().items())


def test_ctrl_c_while_reading_tensors_stays_a_keyboard_interrupt(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(path: str, directory: Path) -> bytes:
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "read_checked", interrupted)
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(KeyboardInterrupt):
        fastkeys.peft.load_adapter(model, adapter(tmp_path, "x"), "x")
    assert_untouched(model, before, "x")


def _bin_adapter(tmp_path: Path, name: str) -> Path:
    directory = adapter(tmp_path, name)
    tensors = load_file(directory / "adapter_model.safetensors")
    torch.save(tensors, directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    return directory


def _linked_out(directory: Path, name: str, outside: Path) -> Path:
    shutil.move(directory / name, outside)
    (directory / name).symlink_to(outside)
    return directory


def test_transformers_and_diffusers_wrappers_check_a_local_directory_first(tmp_path: Path) -> None:
    """The same containment as `scan` before the library opens anything by path."""
    import fastkeys.diffusers
    import fastkeys.transformers
    from fixtures.peft_models import save_diffusers_lora, tiny_unet

    directory = _linked_out(adapter(tmp_path, "t"), "adapter_model.safetensors", tmp_path / "t.safetensors")
    model = tiny_llama()
    with pytest.raises(ValueError, match="lies outside the checkpoint directory"):
        fastkeys.transformers.load_adapter(model, str(directory), "t")
    assert not getattr(model, "_hf_peft_config_loaded", False)
    lora = save_diffusers_lora(tiny_unet, tmp_path / "unet")
    weights = next(lora.glob("*.safetensors")).name
    _linked_out(lora, weights, tmp_path / "unet.safetensors")
    unet = tiny_unet()
    with pytest.raises(ValueError, match="lies outside the checkpoint directory"):
        fastkeys.diffusers.load_lora_adapter(unet, str(lora), "u")
    assert not [name for name, _ in unet.named_modules() if "lora" in name]
