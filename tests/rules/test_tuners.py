"""The method table against the PEFT version installed for the tests."""

from __future__ import annotations

import pytest

from fastkeys import METHODS, filter_missing
from fastkeys.rules import records as tuners

peft_mapping = pytest.importorskip("peft.mapping")
from peft import PeftType  # noqa: E402


def test_every_registered_peft_method_is_in_the_table_with_its_prefix() -> None:
    registered = {
        peft_type.value.lower(): prefix
        for peft_type, prefix in peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items()
    }
    assert {name: method.prefix for name, method in METHODS.items()} == registered


def test_prompt_learning_flags_agree_with_peft() -> None:
    from peft.config import PromptLearningConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for peft_type, config_cls in PEFT_TYPE_TO_CONFIG_MAPPING.items():
        is_prompt_learning = issubclass(config_cls, PromptLearningConfig)
        assert METHODS[peft_type.value.lower()].prompt_learning == is_prompt_learning, peft_type


def test_peft_type_members_are_accepted() -> None:
    keys = ["m.lora_A.default", "m.hada_w1_a.default", "m.boft_R.default"]
    assert filter_missing(keys, peft_type=PeftType.LOHA) == ["m.hada_w1_a.default"]
    assert filter_missing(keys, peft_type=PeftType.BOFT) == ["m.boft_R.default"]


def test_methods_registered_at_run_time_are_picked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = type("FakeType", (), {"value": "MYMETHOD"})()
    monkeypatch.setitem(peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING, fake, "mymethod_")
    keys = ["m.mymethod_w.default", "m.lora_A.other"]
    assert filter_missing(keys, peft_type="MyMethod") == ["m.mymethod_w.default"]
    assert filter_missing(keys) == ["m.mymethod_w.default"]
    assert "mymethod" in tuners.known_methods()
    monkeypatch.delitem(peft_mapping.PEFT_TYPE_TO_PREFIX_MAPPING, fake)
    assert filter_missing(keys) == []
    with pytest.raises(ValueError, match="unknown peft_type 'MyMethod'"):
        filter_missing(keys, peft_type="MyMethod")


def test_peft_config_objects() -> None:
    from peft import LoHaConfig, LoraConfig

    keys = ["m.lora_A.default", "m.hada_w1_a.default"]
    assert filter_missing(keys, config=LoraConfig(r=4)) == ["m.lora_A.default"]
    assert filter_missing(keys, config=LoHaConfig(r=4)) == ["m.hada_w1_a.default"]
