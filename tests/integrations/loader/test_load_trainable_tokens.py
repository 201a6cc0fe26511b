"""LoRA adapters with `trainable_token_indices` on the fast path, against PEFT's own `load_adapter`
loop.

The seed scenario's other half (PEFT issue #1932): a Llama whose vocabulary was resized, adapters that
train the new tokens' rows (`TrainableTokensWrapper`), as a list (the input embeddings) or a dict
(`embed_tokens`, and `lm_head` when untied), tied and untied embeddings; the first adapter loaded with
`PeftModel.from_pretrained` (PEFT creates the wrappers), the next ones with `load_adapters`. Every end
state is compared with PEFT's (`fixtures.loading.end_state`), and so are the outputs with each
adapter active, the wrappers' own bookkeeping and the embeddings' tie. What the fast path does not
reproduce goes to PEFT's loader, says why, and ends equal too.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import fastkeys.peft
from fixtures.loading import (
    assert_same_outputs,
    assert_same_state,
    assert_untouched,
    end_state,
    spread,
    traced_lines,
)
from tests.integrations.loader.test_load_saved_modules import loops, resized_llama, save, ties

pytestmark = pytest.mark.engine  # scans checkpoints, renames keys on the engine: both implementations

INPUTS = torch.tensor([[1, 5, 9, 2, 70, 7, 66]])  # 66, 70: tokens of the resized vocabulary
Wrapper = peft.utils.other.TrainableTokensWrapper


def indices(form: str, rows: list[int]) -> Any:
    """`rows` in the config's form: a list (the input embeddings), or a dict."""
    if form == "list":
        return rows
    if form == "dict":
        return {"embed_tokens": rows}
    return {"embed_tokens": rows, "lm_head": rows[::-1][:2]}  # "both": untied only


def lora(tokens: Any, targets: list[str] | None = None, **extra: Any) -> Any:
    return peft.LoraConfig(
        r=4, target_modules=targets or ["q_proj", "v_proj"], trainable_token_indices=tokens, **extra
    )


def wrappers(model: Any) -> list[tuple[Any, ...]]:
    """Every TrainableTokensWrapper's bookkeeping and its token adapter's."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, Wrapper):
            layer = module.token_adapter
            found.append(
                (
                    name,
                    module.active_adapter,
                    sorted(module._adapters),
                    layer.active_adapter,
                    dict(layer.token_indices),
                    list(layer.trainable_tokens_delta),
                    list(layer.trainable_tokens_original),
                    layer.tied_adapter is not None,
                    [(k, p.requires_grad, p.dtype) for k, p in layer.trainable_tokens_delta.items()],
                    module.training,
                    layer.trainable_tokens_delta.training,
                )
            )
    return found


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(end_state(expected), end_state(actual))
    assert wrappers(actual) == wrappers(expected)
    assert ties(actual) == ties(expected)
    assert_same_outputs(expected, actual, INPUTS)
    assert wrappers(actual) == wrappers(expected)  # after set_adapter too


def series(form: str) -> dict[str, Any]:
    """Adapters after the first: the same rows, other rows and other targets, rsLoRA."""
    return {
        "same": lora(indices(form, [64, 70, 3])),
        "other": lora(indices(form, [1, 65, 71, 66]), ["k_proj"]),
        "again": lora(indices(form, [70, 0]), ["q_proj", "up_proj"], use_rslora=True),
    }


# ---------------------------------------------------------------------------------------------
# The fast path.


@pytest.mark.parametrize(
    ("tied", "form"), [(False, "list"), (False, "dict"), (False, "both"), (True, "list"), (True, "dict")]
)
@pytest.mark.parametrize("is_trainable", [False, True])
def test_trainable_tokens_adapters_end_like_peft_loop(
    tmp_path: Path, tied: bool, form: str, is_trainable: bool
) -> None:
    factory = resized_llama(tied)
    first = save(lora(indices(form, [64, 65, 2])), tmp_path / "first", factory, seed=1)
    adapters = {
        name: save(c, tmp_path / name, factory, seed=i + 2)
        for i, (name, c) in enumerate(series(form).items())
    }
    # a bf16 checkpoint: the deltas keep the model's dtype (float32), the values cast once
    adapters["again"] = save(series(form)["again"], tmp_path / "again", factory, seed=9, dtype=torch.bfloat16)
    expected, actual, results = loops(factory, first, adapters, tmp_path, is_trainable=is_trainable)
    assert {name: (r.loader, r.reason) for name, r in results.items()} == dict.fromkeys(
        adapters, ("fastkeys", None)
    )
    for result in results.values():
        assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same(expected, actual)
    assert len(wrappers(actual)) == (2 if tied or form == "both" else 1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("active", ["first", "same"])
def test_active_adapter_switched_between_loads(tmp_path: Path, tied: bool, active: str) -> None:
    """The wrappers keep the active adapter they hold (the first's, or one loaded by the fast path);
    the loads after the switch follow."""
    factory = resized_llama(tied)
    first = save(lora([64, 65]), tmp_path / "first", factory, seed=1)
    adapters = {
        name: save(c, tmp_path / name, factory, seed=i + 2)
        for i, (name, c) in enumerate(series("list").items())
    }
    expected, actual, results = loops(factory, first, adapters, tmp_path, activate=(2, active))
    assert {r.loader for r in results.values()} == {"fastkeys"}, results
    assert_same(expected, actual)


def test_trained_model_in_training_mode(tmp_path: Path) -> None:
    """A model in training mode with the first adapter's deltas trainable: PEFT's eval() at the end,
    the flags of the existing deltas kept."""
    factory = resized_llama(True)
    first = save(lora([64, 65]), tmp_path / "first", factory, seed=1)
    directory = save(lora([66, 3]), tmp_path / "a", factory, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = peft.PeftModel.from_pretrained(factory(), first, "first", is_trainable=True)
        actual = peft.PeftModel.from_pretrained(factory(), first, "first", is_trainable=True)
        expected.train()
        actual.train()
        expected.load_adapter(directory, "a")
        result = fastkeys.peft.load_adapter(actual, directory, "a")
    assert result.loader == "fastkeys", result.reason
    assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# What goes to PEFT's loader: the reason, and the same end state.


@pytest.mark.parametrize(
    ("tied", "first_tokens", "config", "reason"),
    [
        (False, None, lora([64, 65]), "which is not wrapped yet"),
        (False, {"embed_tokens": [64]}, lora({"embed_tokens": [65], "lm_head": [1]}), "not wrapped yet"),
        (True, [64, 65], lora({"embed_tokens": [65], "lm_head": [65]}), "several trainable token layers"),
        (False, [64, 65], lora([64], modules_to_save=["lm_head"]), "modules_to_save beside trainable tokens"),
        (False, [64], lora({"model.embed_tokens": [3], "embed_tokens": [4]}), "matched twice"),
    ],
    ids=["first", "new-layer", "tied-two-layers", "saved-too", "twice"],
)
def test_refused_cases_go_to_peft_and_end_equal(
    tmp_path: Path, tied: bool, first_tokens: Any, config: Any, reason: str
) -> None:
    factory = resized_llama(tied)
    first = save(lora(first_tokens), tmp_path / "first", factory, seed=1)
    directory = save(config, tmp_path / "x", factory, seed=2)
    expected, actual, results = loops(factory, first, {"x": directory}, tmp_path)
    assert results["x"].loader == "peft"
    assert reason in (results["x"].reason or ""), results["x"].reason
    assert_same(expected, actual)


def test_mixed_wrappers_go_to_peft(tmp_path: Path) -> None:
    """A model holding a ModulesToSaveWrapper and a TrainableTokensWrapper: PEFT's loader."""
    factory = resized_llama(False)
    first = save(lora([64, 3], modules_to_save=["lm_head"]), tmp_path / "first", factory, seed=1)
    directory = save(lora([65], modules_to_save=["lm_head"]), tmp_path / "x", factory, seed=2)
    expected, actual, results = loops(factory, first, {"x": directory}, tmp_path)
    assert results["x"].loader == "peft"
    assert "beside trainable tokens" in (results["x"].reason or ""), results["x"].reason
    assert_same(expected, actual)


@pytest.mark.parametrize("tied", [False, True])
def test_adapter_without_tokens_fails_like_peft(tmp_path: Path, tied: bool) -> None:
    """PEFT 0.21's loader reads every untied wrapper's delta from each checkpoint: an adapter without
    trainable tokens raises KeyError there. The load goes to PEFT's loader, which raises it, and the
    model is left as it was."""
    factory = resized_llama(tied)
    first = save(lora([64, 65]), tmp_path / "first", factory, seed=1)
    directory = save(lora(None, ["k_proj"]), tmp_path / "x", factory, seed=2)
    expected = peft.PeftModel.from_pretrained(factory(), first, "first")
    with pytest.raises(KeyError):
        expected.load_adapter(directory, "x")
    model = peft.PeftModel.from_pretrained(factory(), first, "first")
    before, wrapped = end_state(model), wrappers(model)
    with pytest.raises(KeyError):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert_untouched(model, before, "x")
    assert wrappers(model) == wrapped


def test_low_cpu_mem_usage_goes_to_peft(tmp_path: Path) -> None:
    factory = resized_llama(False)
    first = save(lora([64]), tmp_path / "first", factory, seed=1)
    adapters = {"x": save(lora([65, 66]), tmp_path / "x", factory, seed=2)}
    expected, actual, results = loops(factory, first, adapters, tmp_path, low_cpu_mem_usage=True)
    assert results["x"].loader == "peft" and "low_cpu_mem_usage" in (results["x"].reason or "")
    assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# All or nothing.


def test_exception_inside_the_second_wrapper_rolls_back(tmp_path: Path, monkeypatch: Any) -> None:
    """Untied, embed_tokens and lm_head: the first wrapper's update succeeds, the second fails; the
    model ends as it was, and the next load is the fast path's and ends as PEFT's loop."""
    factory = resized_llama(False)
    first = save(lora(indices("both", [64, 65, 2])), tmp_path / "first", factory, seed=1)
    directory = save(lora(indices("both", [66, 70, 3])), tmp_path / "x", factory, seed=2)
    model = peft.PeftModel.from_pretrained(factory(), first, "first")
    before, wrapped = end_state(model), wrappers(model)
    original: Any = Wrapper.update
    calls: list[str] = []

    def failing(self: Any, adapter_name: str, **kwargs: Any) -> None:
        calls.append(adapter_name)
        original(self, adapter_name, **kwargs)
        if len(calls) == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(Wrapper, "update", failing)
    with pytest.raises(RuntimeError, match="boom"):
        fastkeys.peft.load_adapter(model, directory, "x")
    assert len(calls) == 2
    assert_untouched(model, before, "x")
    assert wrappers(model) == wrapped
    monkeypatch.undo()
    expected = peft.PeftModel.from_pretrained(factory(), first, "first")
    expected.load_adapter(directory, "x")
    assert fastkeys.peft.load_adapter(model, directory, "x").loader == "fastkeys"
    assert_same(expected, model)


@pytest.mark.parametrize("tied", [False, True])
def test_keyboard_interrupt_anywhere_leaves_the_model_as_it_was(tmp_path: Path, tied: bool) -> None:
    """Ctrl-C at lines spread over the whole load (fastkeys' loader and PEFT's code it calls): the
    model is as it was, or, past the end of the load, as PEFT's loop leaves it."""
    factory = resized_llama(tied)
    form = "list" if tied else "both"
    first = save(lora(indices(form, [64, 65, 2])), tmp_path / "first", factory, seed=1)
    directory = save(lora(indices(form, [66, 70, 3]), ["k_proj"]), tmp_path / "x", factory, seed=2)
    expected = peft.PeftModel.from_pretrained(factory(), first, "first")
    expected.load_adapter(directory, "x")
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
