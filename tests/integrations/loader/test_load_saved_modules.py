"""LoRA adapters with `modules_to_save` on the fast path, against PEFT's own `load_adapter` loop.

The seed scenario (PEFT issue #1932): a Llama whose vocabulary was resized, adapters that save
`lm_head` and/or `embed_tokens`, tied and untied embeddings; the first adapter loaded with
`PeftModel.from_pretrained` (PEFT creates the wrappers), the next ones with `load_adapters`. Every end
state is compared with PEFT's (`fixtures.loading.end_state`: state_dict bitwise, module tree,
attributes, requires_grad, training flags, configs, active adapters) and so are the outputs with each
adapter active, the wrappers' own bookkeeping and the embeddings' tie. What the fast path does not
reproduce goes to PEFT's loader, says why, and ends equal too.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import fastkeys.peft
from fixtures.loading import (
    assert_same_outputs,
    assert_same_state,
    assert_untouched,
    end_state,
    merged_copy,
    spread,
    traced_lines,
)
from fixtures.peft_models import RESIZED_VOCAB, save_seeded_adapter, tiny_llama

pytestmark = pytest.mark.engine  # scans checkpoints, renames keys on the engine: both implementations

INPUTS = torch.tensor([[1, 5, 9, 2, 70, 7]])  # 70: a token of the resized vocabulary
SAVED = {"lm": ["lm_head"], "embed": ["embed_tokens"], "both": ["lm_head", "embed_tokens"]}


def resized_llama(tied: bool) -> Callable[[], Any]:
    """tiny_llama's shapes, embeddings tied or not, the vocabulary resized after building."""
    config = tiny_llama().config
    config.tie_word_embeddings = tied

    def make() -> Any:
        torch.manual_seed(0)
        model = LlamaForCausalLM(copy.deepcopy(config))
        model.resize_token_embeddings(RESIZED_VOCAB, mean_resizing=False)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        return model

    return make


def lora(saved: list[str] | None, targets: list[str] | None = None, **extra: Any) -> Any:
    return peft.LoraConfig(
        r=4, target_modules=targets or ["q_proj", "v_proj"], modules_to_save=saved, **extra
    )


def save(config: Any, directory: Path, factory: Callable[[], Any], seed: int, dtype: Any = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied embeddings in modules_to_save: PEFT warns
        return save_seeded_adapter(config, directory, factory, seed=seed, dtype=dtype)


def wrappers(model: Any) -> list[tuple[Any, ...]]:
    """Every ModulesToSaveWrapper's bookkeeping, and what its copies share with the model."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, peft.utils.other.ModulesToSaveWrapper):
            found.append(
                (
                    name,
                    module.active_adapter,
                    sorted(module._adapters),
                    list(module.modules_to_save),
                    module.disable_adapters,
                    [(k, p.requires_grad) for k, p in module.named_parameters()],
                )
            )
    return found


def ties(model: Any) -> list[bool]:
    """Which parameters are one object (the tie of embed_tokens and lm_head, as loading leaves it)."""
    parameters = list(model.named_parameters(remove_duplicate=False))
    return [a is b for i, (_, a) in enumerate(parameters) for _, b in parameters[i + 1 :]]


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(end_state(expected), end_state(actual))
    assert wrappers(actual) == wrappers(expected)
    assert ties(actual) == ties(expected)
    assert sorted(actual.modules_to_save or []) == sorted(expected.modules_to_save or [])
    assert_same_outputs(expected, actual, INPUTS)
    assert wrappers(actual) == wrappers(expected)  # after set_adapter too


def loops(
    factory: Callable[[], Any],
    first: Path,
    adapters: dict[str, Path],
    scratch: Path,
    activate: tuple[int, str] | None = None,
    **options: Any,
) -> tuple[Any, Any, dict[str, Any]]:
    """(PEFT's load_adapter loop, load_adapter of fastkeys, the results); `activate`: (after how
    many loads, which adapter) both models switch to with `set_adapter`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(factory(), first, "first")
        actual = peft.PeftModel.from_pretrained(factory(), first, "first")
        results = {}
        for done, (name, directory) in enumerate(adapters.items()):
            if activate is not None and activate[0] == done:
                expected.set_adapter(activate[1])
                actual.set_adapter(activate[1])
            expected.load_adapter(merged_copy(directory, scratch / f"merged-{name}"), name, **options)
            results[name] = fastkeys.peft.load_adapter(actual, directory, name, **options)
    return expected, actual, results


# ---------------------------------------------------------------------------------------------
# The fast path.


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("saved", list(SAVED))
@pytest.mark.parametrize("is_trainable", [False, True])
def test_resized_vocabulary_adapters_end_like_peft_loop(
    tmp_path: Path, tied: bool, saved: str, is_trainable: bool
) -> None:
    factory = resized_llama(tied)
    modules = SAVED[saved]
    first = save(lora(modules), tmp_path / "first", factory, seed=1)
    configs = {
        "same": lora(modules),
        "none": lora(None, ["k_proj"]),  # no copy: the wrappers' active adapter is kept
        "part": lora(modules[-1:], ["o_proj"]),
        "again": lora(modules, ["q_proj", "up_proj"], use_rslora=True),
    }
    adapters = {
        name: save(c, tmp_path / name, factory, seed=i + 2) for i, (name, c) in enumerate(configs.items())
    }
    # a bf16 checkpoint: the copies keep the model's dtype (cast_adapter_dtype leaves them alone)
    adapters["again"] = save(configs["again"], tmp_path / "again", factory, seed=9, dtype=torch.bfloat16)
    expected, actual, results = loops(factory, first, adapters, tmp_path, is_trainable=is_trainable)
    assert {name: (r.loader, r.reason) for name, r in results.items()} == dict.fromkeys(
        adapters, ("fastkeys", None)
    )
    for result in results.values():
        assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same(expected, actual)


def test_entries_match_as_peft_matches_them(tmp_path: Path) -> None:
    """`_set_trainable` matches by `name.endswith(entry)`: "head" is lm_head's entry too; an entry that
    a name inside the adapters' layers could end with ("irst": `q_proj.lora_A.first`) is refused,
    and PEFT's loader raises its own error for it."""
    factory = resized_llama(False)
    first = save(lora(["lm_head"]), tmp_path / "first", factory, seed=1)
    adapters = {"x": save(lora(["head"]), tmp_path / "x", factory, seed=2)}
    expected, actual, results = loops(factory, first, adapters, tmp_path)
    assert results["x"].loader == "fastkeys", results["x"].reason
    assert_same(expected, actual)
    directory = save(lora(["irst"]), tmp_path / "y", factory, seed=3)  # saves no module
    with pytest.raises(ValueError, match="child of"):
        expected.load_adapter(merged_copy(directory, tmp_path / "merged-y"), "y")
    before = end_state(actual)
    with pytest.raises(ValueError, match="child of"):
        fastkeys.peft.load_adapter(actual, directory, "y")
    assert_untouched(actual, before, "y")


@pytest.mark.parametrize("active", ["none", "same"])
def test_active_adapter_switched_between_loads(tmp_path: Path, active: str) -> None:
    """With an adapter that has no copy active, every wrapper ends with no active adapter; with one
    that has, the wrappers keep it; the loads after the switch follow either way."""
    factory = resized_llama(False)
    first = save(lora(["lm_head", "embed_tokens"]), tmp_path / "first", factory, seed=1)
    configs = {"same": lora(["lm_head"]), "none": lora(None), "later": lora(["embed_tokens", "lm_head"])}
    adapters = {
        name: save(c, tmp_path / name, factory, seed=i + 2) for i, (name, c) in enumerate(configs.items())
    }
    expected, actual, results = loops(factory, first, adapters, tmp_path, activate=(2, active))
    assert {r.loader for r in results.values()} == {"fastkeys"}
    assert_same(expected, actual)


def test_trained_model_in_training_mode(tmp_path: Path) -> None:
    """The base model trains (requires_grad and train mode set back on after the first load): the
    copies take the original module's flags, as PEFT's deepcopy does."""
    factory = resized_llama(True)
    first = save(lora(["lm_head", "embed_tokens"]), tmp_path / "first", factory, seed=1)
    adapters = {"a": save(lora(["lm_head", "embed_tokens"]), tmp_path / "a", factory, seed=2)}

    def unfreeze(model: Any) -> Any:
        model.train()
        for name, parameter in model.named_parameters():
            if "original_module" in name:
                parameter.requires_grad_(True)
        return model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = unfreeze(peft.PeftModel.from_pretrained(factory(), first, "first"))
        actual = unfreeze(peft.PeftModel.from_pretrained(factory(), first, "first"))
        expected.load_adapter(merged_copy(adapters["a"], tmp_path / "merged"), "a", is_trainable=True)
        result = fastkeys.peft.load_adapter(actual, adapters["a"], "a", is_trainable=True)
    assert result.loader == "fastkeys", result.reason
    assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# What goes to PEFT's loader: the reason, and the same end state.


def _extra_key(directory: Path) -> Path:
    """The input embeddings' base weight, as `save_embedding_layers` stores it."""
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(5)
    tensors["base_model.model.model.embed_tokens.weight"] = torch.randn(
        RESIZED_VOCAB, 32, generator=generator
    )
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


def _without_saved(directory: Path) -> Path:
    path = directory / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if "lm_head" not in k}
    save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize(
    ("first_saved", "config", "edit", "reason"),
    [
        (["lm_head"], lora(["embed_tokens"]), None, "embed_tokens, which is not wrapped yet"),
        (None, lora(["lm_head"]), None, "lm_head, which is not wrapped yet"),
        (["lm_head"], lora(["lm_head"], bias="all"), None, "bias='all'"),
        (["lm_head"], lora(["lm_head"]), _extra_key, "outside the adapter's modules"),
    ],
    ids=["unwrapped", "first-without", "bias", "extra-key"],
)
def test_refused_cases_go_to_peft_and_end_equal(
    tmp_path: Path, first_saved: list[str] | None, config: Any, edit: Any, reason: str
) -> None:
    factory = resized_llama(False)
    first = save(lora(first_saved), tmp_path / "first", factory, seed=1)
    directory = save(config, tmp_path / "x", factory, seed=2)
    if edit is not None:
        edit(directory)
    expected, actual, results = loops(factory, first, {"x": directory}, tmp_path)
    assert results["x"].loader == "peft"
    assert reason in (results["x"].reason or ""), results["x"].reason
    assert_same(expected, actual)


def test_low_cpu_mem_usage_goes_to_peft(tmp_path: Path) -> None:
    """PEFT assigns the checkpoint's tensors to the copies then (new parameters in the checkpoint's
    dtype: a bf16 checkpoint leaves a bf16 lm_head that its fp32 inputs fail in)."""
    factory = resized_llama(True)
    first = save(lora(["lm_head"]), tmp_path / "first", factory, seed=1)
    adapters = {"x": save(lora(["lm_head"]), tmp_path / "x", factory, seed=2)}
    expected, actual, results = loops(factory, first, adapters, tmp_path, low_cpu_mem_usage=True)
    assert results["x"].loader == "peft" and "low_cpu_mem_usage" in (results["x"].reason or "")
    assert_same(expected, actual)


def test_trainable_tokens_in_the_model_go_to_peft(tmp_path: Path) -> None:
    factory = resized_llama(False)
    first = save(lora(["lm_head"], trainable_token_indices=[0, 3]), tmp_path / "first", factory, seed=1)
    directory = save(lora(["lm_head"], trainable_token_indices=[1]), tmp_path / "x", factory, seed=2)
    expected, actual, results = loops(factory, first, {"x": directory}, tmp_path)
    assert results["x"].loader == "peft" and "trainable tokens" in (results["x"].reason or "")
    assert_same(expected, actual)


def test_a_load_hook_inside_a_wrapper_sends_the_load_to_peft(tmp_path: Path) -> None:
    """PEFT's loader runs a copy's load_state_dict hooks; the fast path would not. (A config that
    matches a module inside a wrapper is refused as well, but PEFT 0.21's matcher excludes those
    modules by itself: no case reaches it.)"""
    factory = resized_llama(False)
    first = save(lora(["lm_head"]), tmp_path / "first", factory, seed=1)
    directory = save(lora(["lm_head"]), tmp_path / "x", factory, seed=2)
    calls: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(factory(), first, "first")
        actual = peft.PeftModel.from_pretrained(factory(), first, "first")
        models: dict[str, Any] = {"peft": expected, "fastkeys": actual}
        for name, model in models.items():
            copy_ = model.base_model.model.lm_head.modules_to_save["first"]
            copy_.register_load_state_dict_pre_hook(lambda *_args, name=name: calls.append(name))
        expected.load_adapter(directory, "x")
        result = fastkeys.peft.load_adapter(actual, directory, "x")
    assert result.loader == "peft", result
    assert "lm_head.modules_to_save.first has a load_state_dict hook" in (result.reason or "")
    assert calls == ["peft", "fastkeys"]  # PEFT's load ran it, in both
    assert wrappers(actual) == wrappers(expected)
    assert_same_outputs(expected, actual, INPUTS)


def test_missing_saved_tensor_fails_like_peft(tmp_path: Path) -> None:
    """PEFT's loader raises KeyError for a wrapper's tensor the checkpoint lacks; so does the load,
    through PEFT's loader, leaving the model as it was."""
    factory = resized_llama(False)
    first = save(lora(["lm_head"]), tmp_path / "first", factory, seed=1)
    directory = _without_saved(save(lora(["lm_head"]), tmp_path / "x", factory, seed=2))
    model = peft.PeftModel.from_pretrained(factory(), first, "first")
    before = end_state(model)
    with pytest.raises(KeyError):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert_untouched(model, before, "x")
    assert wrappers(model)[0][2] == ["first"]


# ---------------------------------------------------------------------------------------------
# All or nothing.


def shared_weight(model: Any) -> Any:
    """The embedding weight the wrapped embed_tokens and lm_head share."""
    return model.get_submodule("base_model.model.model.embed_tokens.original_module").weight


def test_exception_inside_the_second_wrapper_rolls_back(tmp_path: Path, monkeypatch: Any) -> None:
    """Tied embeddings, both saved: the first wrapper's update freezes the shared weight, the second
    fails; the model ends as it was (flags of the shared weight included), and the next load is
    PEFT's."""
    factory = resized_llama(True)
    first = save(lora(["lm_head", "embed_tokens"]), tmp_path / "first", factory, seed=1)
    directory = save(lora(["embed_tokens", "lm_head"]), tmp_path / "x", factory, seed=2)
    model = peft.PeftModel.from_pretrained(factory(), first, "first")
    shared_weight(model).requires_grad_(True)
    before, wrapped = end_state(model), wrappers(model)
    original = peft.utils.other.ModulesToSaveWrapper.update
    calls = []

    def failing(self: Any, adapter_name: str, **kwargs: Any) -> None:
        calls.append(adapter_name)
        original(self, adapter_name, **kwargs)  # type: ignore[no-untyped-call]
        if len(calls) == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(peft.utils.other.ModulesToSaveWrapper, "update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert len(calls) == 2
    assert_untouched(model, before, "x")
    assert wrappers(model) == wrapped
    monkeypatch.undo()
    expected = peft.PeftModel.from_pretrained(factory(), first, "first")
    shared_weight(expected).requires_grad_(True)
    expected.load_adapter(merged_copy(directory, tmp_path / "merged"), "x")
    assert fastkeys.peft.load_adapter(model, directory, "x").loader == "fastkeys"
    assert_same(expected, model)


def test_keyboard_interrupt_anywhere_leaves_the_model_as_it_was(tmp_path: Path) -> None:
    """Ctrl-C at lines spread over the whole load (fastkeys' loader and PEFT's code it calls): the
    model is as it was, or, past the end of the load, as PEFT's loop leaves it."""
    factory = resized_llama(True)
    first = save(lora(["lm_head", "embed_tokens"]), tmp_path / "first", factory, seed=1)
    directory = save(lora(["lm_head", "embed_tokens"], ["k_proj"]), tmp_path / "x", factory, seed=2)
    expected = peft.PeftModel.from_pretrained(factory(), first, "first")
    expected.load_adapter(merged_copy(directory, tmp_path / "merged"), "x")
    loaded, loaded_wrappers = end_state(expected), wrappers(expected)
    model = peft.PeftModel.from_pretrained(factory(), first, "first")
    start, start_wrappers = end_state(model), wrappers(model)
    total, _fired = traced_lines(lambda: fastkeys.peft.load_adapter(model, directory, "x"))
    assert_same_state(loaded, end_state(model))
    interrupted = 0
    for point in spread(total, 24):
        model = peft.PeftModel.from_pretrained(factory(), first, "first")
        try:
            traced_lines(lambda model=model: fastkeys.peft.load_adapter(model, directory, "x"), point)  # type: ignore[misc]
        except KeyboardInterrupt:
            interrupted += 1
        if "x" not in model.peft_config:
            assert_untouched(model, start, "x")
            assert wrappers(model) == start_wrappers
            assert fastkeys.peft.load_adapter(model, directory, "x").loader == "fastkeys"
        assert_same_state(loaded, end_state(model))
        assert wrappers(model) == loaded_wrappers
    assert interrupted >= 22, (interrupted, total)
