"""insert_adapter_name / remove_adapter_name: against cases, and against PEFT on real models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastkeys import insert_adapter_name, remove_adapter_name

CASES = [
    # (checkpoint key, model key, peft_type)
    ("base_model.model.m.q_proj.lora_A.weight", "base_model.model.m.q_proj.lora_A.default.weight", "lora"),
    (
        "base_model.model.m.q_proj.lora_embedding_B",
        "base_model.model.m.q_proj.lora_embedding_B.default",
        "lora",
    ),
    ("m.q.lora_magnitude_vector", "m.q.lora_magnitude_vector.default.weight", "lora"),
    ("base_model.tinylora_v.0", "base_model.tinylora_v.default.0", "tinylora"),
    ("base_model.vera_A", "base_model.vera_A.default", "vera"),
    ("m.q.vera_lambda_b", "m.q.vera_lambda_b.default", "vera"),
    ("m.q.hada_w1_a", "m.q.hada_w1_a.default", "loha"),
    (
        "m.embed.token_adapter.trainable_tokens_delta",
        "m.embed.token_adapter.trainable_tokens_delta.default",
        "lora",
    ),
    # Module names that contain the prefix, the tensor name or the adapter name.
    ("m.lora_block.q.lora_A.weight", "m.lora_block.q.lora_A.default.weight", "lora"),
    ("m.default.q.lora_B.weight", "m.default.q.lora_B.default.weight", "lora"),
    ("m.lora_A_proj.lora_A.weight", "m.lora_A_proj.lora_A.default.weight", "lora"),
    ("m.weight.lora_A.weight", "m.weight.lora_A.default.weight", "lora"),
    ("m.q.randlora_A", "m.q.randlora_A.default", "randlora"),
]


@pytest.mark.parametrize(("checkpoint_key", "model_key", "peft_type"), CASES)
def test_insert_and_remove(checkpoint_key: str, model_key: str, peft_type: str) -> None:
    assert insert_adapter_name([checkpoint_key], "default", peft_type) == [model_key]
    assert remove_adapter_name([model_key], "default", peft_type) == [checkpoint_key]
    assert insert_adapter_name([checkpoint_key], "default") == [model_key]  # every method


def test_untouched_keys_are_the_callers_objects() -> None:
    keys = ["m.q.base_layer.weight", "m.q.randlora_A", "m.q.lora_A.weight"]
    out = insert_adapter_name(keys, "x", "lora")
    assert out[0] is keys[0] and out[1] is keys[1]
    assert out[2] == "m.q.lora_A.x.weight"
    back = remove_adapter_name(["m.q.lora_A.other.weight", "m.q.lora_A.x.weight"], "x", "lora")
    assert back == ["m.q.lora_A.other.weight", "m.q.lora_A.weight"]


def test_remove_modules_to_save_and_unicode() -> None:
    assert remove_adapter_name(["m.score.modules_to_save.ä.weight"], "ä") == ["m.score.weight"]
    assert insert_adapter_name(["m.q.lora_A.weight"], "a\ud800", "lora") == ["m.q.lora_A.a\ud800.weight"]
    assert remove_adapter_name(["m.q.lora_A.a\ud800.weight"], "a\ud800", "lora") == ["m.q.lora_A.weight"]


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"adapter_name 'a\.b' contains a dot"):
        insert_adapter_name(["x"], "a.b")
    with pytest.raises(TypeError, match=r"keys\[1\] must be str, not int"):
        remove_adapter_name(["x", 1], "a")  # type: ignore[list-item]


peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from .peft_models import METHOD_CONFIGS, save_adapter, tiny_llama  # noqa: E402

RENAMED_METHODS = [
    *("lora", "dora", "adalora", "loha", "lokr", "ia3", "vera", "pvera", "randlora", "boft", "oft"),
    *("tinylora", "unilora", "ln_tuning", "trainable_tokens", "lora+trainable_token_indices"),
]


def _peft_mapping(directory: Path, adapter_name: str) -> dict[str, str]:
    """PEFT's own checkpoint key -> model key mapping, from the tuner's remap on a real model."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import AuxiliaryTrainingWrapper
    from safetensors.torch import load_file

    model: Any = peft.PeftModel.from_pretrained(tiny_llama(), directory, adapter_name)
    config = model.peft_config[adapter_name]
    state = list(load_file(directory / "adapter_model.safetensors"))
    # As set_peft_model_state_dict does: auxiliary wrappers (trainable tokens, modules_to_save)
    # map their own keys, the tuner remaps the rest.
    aux: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrapper: Any = module  # PEFT leaves this method untyped
            for saved, loaded in wrapper.adapter_state_dict_load_map(adapter_name).items():
                aux[f"{name}.{saved}"] = f"{name}.{loaded}"
    rest = [key for key in state if key not in aux]
    tuner: Any = PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]
    # Only the keys matter here: the values are never read.
    remapped = tuner._remap_adapter_state_dict_for_load(
        model=model, config=config, adapter_name=adapter_name, state_dict=dict.fromkeys(rest)
    )
    mapping = dict(zip(rest, remapped, strict=True))
    return {key: aux.get(key) or mapping[key] for key in state}


@pytest.mark.parametrize("method", RENAMED_METHODS)
@pytest.mark.parametrize("adapter_name", ["default", "lora", "1"])
def test_same_as_peft(method: str, adapter_name: str, tmp_path: Path) -> None:
    directory = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    mapping = _peft_mapping(directory, adapter_name)
    peft_type = peft.PeftConfig.from_pretrained(str(directory)).peft_type
    checkpoint_keys = list(mapping)
    assert insert_adapter_name(checkpoint_keys, adapter_name, peft_type) == list(mapping.values())
    model_keys = list(mapping.values())
    assert remove_adapter_name(model_keys, adapter_name, peft_type) == checkpoint_keys


def test_same_as_peft_on_tricky_module_names(tmp_path: Path) -> None:
    """Modules named like a prefix, a tensor or the adapter."""
    from torch import nn

    class Tricky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.default = nn.Linear(4, 4)
            self.lora_block = nn.ModuleDict({"q": nn.Linear(4, 4)})
            self.lora_A_proj = nn.Linear(4, 4)

    model = peft.get_peft_model(
        Tricky(), peft.LoraConfig(r=2, target_modules=["default", "q", "lora_A_proj"])
    )
    model.save_pretrained(tmp_path)
    import re

    from safetensors.torch import load_file

    checkpoint_keys = list(load_file(tmp_path / "adapter_model.safetensors"))
    model_keys = insert_adapter_name(checkpoint_keys, "default", "lora")
    expected = [k for k in model.state_dict() if re.search(r"\.lora_[AB]\.default\.weight$", k)]
    assert len(expected) == 6
    assert sorted(model_keys) == sorted(expected)
    assert remove_adapter_name(model_keys, "default", "lora") == checkpoint_keys
