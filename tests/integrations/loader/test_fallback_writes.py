"""What a load through PEFT's loader may write, held to PEFT's own loads on tiny real models:
the rollback's record of the other adapters (flags only, `fallback.record_for_load`), base weights
written in place (special initialisations, unmerging), and other adapters' tensors (refused by
identity, the tuner's included)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import fastkeys.peft
from fastkeys.integrations.loader import boundary
from fixtures.loading import adapter, assert_same_state, assert_untouched, end_state, rewrite, with_first
from fixtures.peft_models import METHOD_CONFIGS, save_seeded_adapter, tiny_llama

pytestmark = pytest.mark.engine  # checkpoint scans and expressions run on the engine: both


@pytest.fixture
def first(tmp_path: Path) -> Path:
    return save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "first")


# What PEFT's own load changes in the other adapters' modules inside tuner layers: flags only, the
# premise of `fallback.record_for_load`, which records no more of them. Each case is a load that
# goes to PEFT's path.
PREMISE: dict[str, tuple[Callable[[Path], Path], str, dict[str, Any]]] = {
    # case: (the checkpoint, its name, PEFT's options)
    "lora": (lambda tmp: adapter(tmp, "x", seed=3), "x", {}),
    "new targets and biases": (
        lambda tmp: adapter(tmp, "x", seed=3, target_modules=["q_proj", "k_proj"], bias="lora_only"),
        "x",
        {},
    ),
    "dora": (lambda tmp: adapter(tmp, "x", seed=3, use_dora=True), "x", {}),
    "low_cpu_mem_usage": (lambda tmp: adapter(tmp, "x", seed=3), "x", {"low_cpu_mem_usage": True}),
    "trainable": (lambda tmp: adapter(tmp, "x", seed=3, lora_dropout=0.1), "x", {"is_trainable": True}),
    "a tensor missing": (
        lambda tmp: rewrite(adapter(tmp, "x", seed=3), lambda t: t.pop(sorted(t)[0])),
        "x",
        {},
    ),
    "over an existing name": (lambda tmp: adapter(tmp, "x", seed=3), "second", {}),
    "a module to save": (lambda tmp: adapter(tmp, "x", seed=3, modules_to_save=["lm_head"]), "x", {}),
}


def _other_adapters_modules(model: Any, name: str) -> dict[str, Any]:
    """Every module of an adapter other than `name` inside a tuner layer's ModuleDict: its identity,
    and each attribute (dicts as their entries' identities, tensors' versions and data pointers),
    but the `training` flag."""

    def value(item: Any) -> Any:
        if isinstance(item, torch.Tensor):
            return (id(item), item._version, item.data_ptr())
        return item if isinstance(item, (int, float, str, bool, tuple, type(None))) else id(item)

    found: dict[str, Any] = {}
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, boundary.BaseTunerLayer):
            continue
        for attribute, child in layer._modules.items():
            if type(child) is not torch.nn.ModuleDict:
                continue
            for key, entry in child._modules.items():
                if key == name:
                    continue
                for inner, module in entry.named_modules():
                    found[f"{layer_name}.{attribute}.{key}.{inner}"] = (
                        id(module),
                        {
                            a: {k: value(x) for k, x in v.items()} if isinstance(v, dict) else value(v)
                            for a, v in vars(module).items()
                            if a != "training"
                        },
                    )
    return found


@pytest.mark.parametrize("case", list(PREMISE))
def test_peft_s_load_changes_only_flags_of_the_other_adapters_modules(
    tmp_path: Path, first: Path, case: str
) -> None:
    make, name, options = PREMISE[case]
    model = with_first(first)
    model.load_adapter(adapter(tmp_path, "second", seed=2, lora_dropout=0.1), "second", is_trainable=True)
    model.train()
    before = _other_adapters_modules(model, name)
    assert len(before) == 12 * len({"first", "second"} - {name})  # A, B and dropout in 4 layers each
    model.load_adapter(make(tmp_path), name, **options)
    assert _other_adapters_modules(model, name) == before


@pytest.mark.parametrize("init", ["olora", "kasa"])
def test_a_special_initialisation_s_base_weight_writes_are_reported_and_rolled_back(
    tmp_path: Path, first: Path, init: str
) -> None:
    """OLoRA and KaSA rewrite their targets' base weights through `.data =` (no new tensor, no new
    version): PEFT's loop does it too, so the load ends as PEFT's and names them; a load that then
    fails leaves them as they were."""
    special: dict[str, Any] = (
        {"init_lora_weights": "olora"} if init == "olora" else {"kasa_config": peft.tuners.lora.KasaConfig()}
    )
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], **special)
    directory = save_seeded_adapter(config, tmp_path / "special", seed=3)
    if init == "kasa":  # KaSA adapters load only beside KaSA adapters
        first = save_seeded_adapter(config, tmp_path / "kasa-first", seed=1)

    def with_first(first: Path) -> Any:
        return peft.PeftModel.from_pretrained(tiny_llama(), first, "first")

    expected = with_first(first)
    expected.load_adapter(directory, "x")
    actual = with_first(first)
    result = fastkeys.peft.load_adapter(actual, directory, "x")
    assert result.loader == "peft" and result.base_weights_written == [
        f"model.layers.{i}.self_attn.{m}.base_layer.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert_same_state(end_state(expected), end_state(actual))
    rewrite(
        directory,
        lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(64, 32)}),
    )
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(ValueError, match="every adapter shares"):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert_untouched(model, before, "x")


def _fail_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """PEFT's load_adapter raises after it loaded everything."""
    import peft.peft_model

    loaded = peft.peft_model.set_peft_model_state_dict  # type: ignore[attr-defined]

    def then_fail(*args: Any, **kwargs: Any) -> Any:
        loaded(*args, **kwargs)
        raise RuntimeError("late")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", then_fail)


@pytest.mark.parametrize("name", ["model", "weight"])
def test_an_adapter_named_like_a_key_segment_cannot_overwrite_another_adapter(
    tmp_path: Path, first: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Such names go to PEFT's path, and every key holds them: ownership is decided by identity.
    With low_cpu_mem_usage torch would have put a new Parameter into another adapter's module."""
    directory = rewrite(
        adapter(tmp_path, "x", seed=3),
        lambda t: t.update(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.first.weight": torch.ones(4, 32)}
        ),
    )
    model = with_first(first)
    before = end_state(model)
    for low_cpu_mem_usage in (False, True):
        with pytest.raises(ValueError, match="would overwrite another adapter's weights"):
            fastkeys.peft.load_adapter(model, directory, name, low_cpu_mem_usage=low_cpu_mem_usage)
        assert_untouched(model, before, name)


def test_tensors_the_tuner_holds_are_guarded_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """VB-LoRA's vector bank belongs to the tuner, outside the base model: another adapter's is
    refused, and a load over an existing name that fails late restores that adapter's bank."""
    dirs = [save_seeded_adapter(METHOD_CONFIGS["vblora"](), tmp_path / f"v{i}", seed=i) for i in (1, 2, 3)]

    def start() -> Any:
        model = peft.PeftModel.from_pretrained(tiny_llama(), dirs[0], "first")
        model.load_adapter(dirs[1], "second")
        return model

    model = start()
    bank = model.base_model.vblora_vector_bank["first"]
    hostile = rewrite(
        dirs[2], lambda t: t.update({"base_model.vblora_vector_bank.first": torch.full_like(bank, 5.0)})
    )
    before = end_state(model)
    with pytest.raises(ValueError, match="would overwrite another adapter's weights"):
        fastkeys.peft.load_adapter(model, hostile, "x")
    assert_untouched(model, before, "x")
    rewrite(hostile, lambda t: t.pop("base_model.vblora_vector_bank.first"))
    _fail_late(monkeypatch)
    with pytest.raises(RuntimeError, match="late"):
        fastkeys.peft.load_adapter(model, hostile, "second")
    assert_same_state(before, end_state(model))


def test_a_load_that_unmerges_says_so_and_rolls_back(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PEFT's load unmerges merged layers in place (`.data -=`): reported, and undone on failure."""
    directory = adapter(tmp_path, "x", seed=3)
    expected = with_first(first)
    expected.merge_adapter()
    expected.load_adapter(directory, "x")
    actual = with_first(first)
    actual.merge_adapter()
    result = fastkeys.peft.load_adapter(actual, directory, "x")
    assert result.loader == "peft" and result.base_weights_written == [
        f"model.layers.{i}.self_attn.{m}.base_layer.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert_same_state(end_state(expected), end_state(actual))
    model = with_first(first)
    model.merge_adapter()
    before = end_state(model)
    _fail_late(monkeypatch)
    with pytest.raises(RuntimeError, match="late"):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert_untouched(model, before, "x")


def test_a_merged_layer_inside_another_adapter_s_entry_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tuner layer wrapping another adapter's entry (only a hand-built model has one) is merged;
    PEFT's load unmerges it in place and then fails: its base weight is as it was."""
    first = adapter(tmp_path, "first", seed=1)
    model = with_first(first)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    config = peft.LoraConfig(r=2, lora_alpha=2)
    inner = boundary.LoraLinear(
        q_proj.lora_A["first"], adapter_name="inner", config=config, r=2, lora_alpha=2
    )
    with torch.no_grad():
        inner.lora_B["inner"].weight.add_(0.5)
    q_proj.lora_A["first"] = inner
    inner.merge(adapter_names=["inner"])
    weight = inner.get_base_layer().weight
    merged = weight.detach().clone()
    loaded = vars(peft.peft_model)["set_peft_model_state_dict"]

    def then_fail(*args: Any, **kwargs: Any) -> Any:
        loaded(*args, **kwargs)
        raise RuntimeError("late")

    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", then_fail)
    with pytest.raises(RuntimeError, match="late"):
        fastkeys.peft.load_adapter(model, adapter(tmp_path, "x", seed=3), "x", torch_device="cpu")
    assert torch.equal(weight, merged)
