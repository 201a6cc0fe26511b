"""insert_adapter_name / remove_adapter_name against cases (no torch needed); against PEFT on real
models in tests/integrations/test_rename_peft.py."""

from __future__ import annotations

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
