"""check_adapter and check_base on real tiny models and adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

import fastkeys.peft as fkpeft  # noqa: E402
from fastkeys import check_adapter, check_base, scan  # noqa: E402
from fastkeys.integrations.loader import boundary  # noqa: E402
from fixtures.peft_models import (  # noqa: E402
    METHOD_CONFIGS,
    checkpoint_keys,
    load_or_refusal,
    save_adapter,
    tiny_llama,
    without,
)

pytestmark = pytest.mark.engine  # fastkeys' verdicts come from the engine: both implementations

CHECKED = ["lora", "dora", "loha", "ia3", "vera", "vblora", "tinylora", "unilora", "trainable_tokens",
           "lora+modules_to_save", "lora+trainable_token_indices"]  # fmt: skip


def _load(directory: Path, path: Path) -> tuple[Any, Any, list[str]]:
    model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), directory, "default")
    with boundary.recorded_results() as records:
        verdict = fkpeft.load_adapter(model, str(path), "target")
    return verdict, records[-1], list(model.state_dict())


@pytest.mark.parametrize("method", CHECKED)
def test_check_adapter_equals_the_real_load(method: str, tmp_path: Path) -> None:
    directory = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    variants = [directory] + [
        without(directory, key, tmp_path / f"d{i}") for i, key in enumerate(checkpoint_keys(directory))
    ]
    compared = 0
    for path in variants:
        loaded = load_or_refusal(_load, directory, path)
        if loaded is None:
            continue
        verdict, raw, model_keys = loaded
        predicted = check_adapter(model_keys, scan(path), "target")
        assert sorted(predicted.missing_keys) == sorted(verdict.missing_keys), path.name
        assert sorted(predicted.unexpected_keys) == sorted(raw.unexpected_keys), path.name
        compared += 1
    assert compared >= 2


def test_check_adapter_reports_unexpected_keys_and_takes_keys_or_paths(tmp_path: Path) -> None:
    directory = save_adapter(METHOD_CONFIGS["lora"](), tmp_path / "adapter")
    model = peft.PeftModel.from_pretrained(tiny_llama(), directory, "default")
    keys = list(model.state_dict())
    assert check_adapter(keys, directory, "default") == ([], [])
    stray = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    result = check_adapter(keys, [*checkpoint_keys(directory), stray], "default", "lora")
    assert result.unexpected_keys == ["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    assert result.missing_keys == []


def _save_base(model: Any, directory: Path, shards: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = list(state)
    weight_map = {}
    for shard in range(shards):
        file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[shard::shards]}
        save_file(part, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return directory


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_base(tiny_llama(), tmp_path_factory.mktemp("base"), shards=3)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "loha", "lokr", "vera", "ia3"])
def test_check_base_clean_on_the_matching_base(method: str, base_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    assert check_base(base_dir, adapter) == []


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "loha", "lokr"])
def test_check_base_finds_a_differently_sized_base(method: str, tmp_path: Path) -> None:
    bigger = tiny_llama(hidden_size=48)
    base = _save_base(bigger, tmp_path / "bigger")
    adapter = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    findings = check_base(base, adapter)
    shapes = [f for f in findings if f.kind == "shape"]
    assert shapes, findings
    assert all("q_proj" in f.key or "v_proj" in f.key for f in shapes)
    assert any("48" in f.message for f in shapes)


def test_check_base_finds_a_wrong_prefix(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(METHOD_CONFIGS["lora"](), tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    renamed = {
        k.replace("base_model.model.model.", "base_model.model.model.model."): v for k, v in tensors.items()
    }
    save_file(renamed, adapter / "adapter_model.safetensors")
    findings = check_base(base_dir, adapter)
    # One finding for the rewrite instead of one per module (and per target it leaves untrained).
    assert [f.kind for f in findings] == ["prefix"] and findings[0].key == "model."
    assert "extra prefix 'model.'" in findings[0].message
    assert "4 of 4 adapter modules exist in the base model" in findings[0].message


def test_check_base_targets(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "v_proj", "nonexistent_proj"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(adapter / "adapter_model.safetensors")
    lost = [k for k in tensors if "layers.1.self_attn.v_proj" in k]
    save_file({k: v for k, v in tensors.items() if k not in lost}, adapter / "adapter_model.safetensors")
    findings = {(f.kind, f.key) for f in check_base(base_dir, adapter)}
    assert findings == {
        ("unmatched_target", "nonexistent_proj"),
        ("untrained_target", "model.layers.1.self_attn.v_proj"),
    }


def test_check_base_needs_a_config(base_dir: Path, tmp_path: Path) -> None:
    adapter = save_adapter(METHOD_CONFIGS["lora"](), tmp_path / "adapter")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        check_base(base_dir, adapter)


def test_check_base_follows_layers_to_transform(base_dir: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    adapter = save_adapter(config, tmp_path / "adapter")
    assert all(".layers.1." in key for key in checkpoint_keys(adapter))
    assert check_base(base_dir, adapter) == []
    saved = json.loads((adapter / "adapter_config.json").read_text())
    saved["layers_to_transform"] = [0, 1]
    (adapter / "adapter_config.json").write_text(json.dumps(saved))
    assert {(f.kind, f.key) for f in check_base(base_dir, adapter)} == {
        ("untrained_target", "model.layers.0.self_attn.q_proj"),
        ("untrained_target", "model.layers.0.self_attn.v_proj"),
    }
