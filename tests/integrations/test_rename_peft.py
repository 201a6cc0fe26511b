"""insert_adapter_name / remove_adapter_name against PEFT's own remapping on real models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fastkeys import insert_adapter_name, remove_adapter_name

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from fixtures.peft_models import METHOD_CONFIGS, save_adapter, tiny_llama  # noqa: E402

pytestmark = pytest.mark.engine  # fastkeys' verdicts come from the engine: both implementations

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
