"""fastkeys.peft.add_weighted_adapter against PEFT's own `add_weighted_adapter` (issue 18), on real
tiny models loaded alike: the same end state (fixtures.loading.end_state: state_dict bitwise,
modules, their attributes, requires_grad, training, peft_config, active adapters everywhere,
targeted_module_names, per-layer options), the same outputs with the new adapter active, and later
operations that still agree. Then what goes to PEFT, errors, interruptions, and that the fast path
runs none of PEFT's whole-model passes.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import fastkeys.peft
from fixtures.loading import (
    QV,
    assert_same_state,
    end_state,
    one_thread,  # noqa: F401  (autouse: one torch thread)
    spread,
    traced_lines,
    warm_line_count,
)
from fixtures.peft_models import save_seeded_adapter, tiny_bert, tiny_llama

pytestmark = pytest.mark.engine  # PEFT's matcher over the new config runs on the engine: both

INPUTS = torch.tensor([[1, 2, 3, 4, 5, 6]])

LLAMA: dict[str, dict[str, Any]] = {
    "first": {"target_modules": QV},
    "ad": {"target_modules": QV},
    "bk": {"target_modules": ["k_proj", "down_proj", "q_proj"]},  # other layers than `ad`'s too
    "c8": {"target_modules": QV, "r": 8},  # another rank
    "rs": {"target_modules": ["q_proj", "o_proj"], "use_rslora": True, "layers_to_transform": [1]},
    "drop": {"target_modules": QV, "lora_dropout": 0.1},
    "rx": {"target_modules": r".*\.(q_proj|v_proj)"},  # expressions: combined as "(x)|(y)"
    "ry": {"target_modules": r".*\.v_proj"},
    "tr": {"target_modules": ["v_proj", "up_proj"]},  # loaded with is_trainable=True, active
    "dora": {"target_modules": QV, "use_dora": True},
    "o0": {"target_modules": ["o_proj"], "layers_to_transform": [0]},
    "rp": {"target_modules": QV, "rank_pattern": {"v_proj": 8}},  # q_proj r=4, v_proj r=8
    "xtr": {"target_modules": QV},  # loaded with is_trainable=True, active
}
TRAINABLE = ("tr", "xtr")


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weighted")
    return {
        name: save_seeded_adapter(
            peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **options}), root / name, tiny_llama, seed=seed
        )
        for seed, (name, options) in enumerate(LLAMA.items())
    }


def loaded(dirs: dict[str, Path], names: list[str], factory: Callable[[], Any] = tiny_llama) -> Any:
    model = peft.PeftModel.from_pretrained(factory(), dirs["first"], "first")
    for name in names:
        if name.startswith("-"):  # deleted again
            model.delete_adapter(name[1:])
            continue
        model.load_adapter(dirs[name], name, is_trainable=name in TRAINABLE)
    for name in names:
        if name in TRAINABLE:
            model.set_adapter(name)
    return model


def outputs(model: Any, name: str) -> torch.Tensor:
    model.set_adapter(name)
    torch.manual_seed(0)
    with torch.no_grad():
        logits: torch.Tensor = model(INPUTS)[0]
    return logits


def both(expected: Any, actual: Any, *args: Any, **options: Any) -> Any:
    """PEFT's add_weighted_adapter on `expected`, fastkeys' on `actual` (same random state), their
    end states compared; returns fastkeys' result."""
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as theirs:
        warnings.simplefilter("always")
        expected.add_weighted_adapter(*args, **options)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        result = fastkeys.peft.add_weighted_adapter(actual, *args, **options)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert_same_state(end_state(expected), end_state(actual))
    return result


CASES: dict[str, tuple[list[str], tuple[Any, ...], dict[str, Any]]] = {
    # name: (adapters loaded after `first`, (adapters, weights, new name, combination), options)
    "cat": (["ad"], (["ad", "first"], [0.7, -0.3], "mix", "cat"), {}),
    "cat_ranks": (["ad", "c8"], (["ad", "c8"], [1.0, 0.5], "mix", "cat"), {}),
    "linear": (["ad"], (["ad", "first"], [0.5, 0.5], "mix", "linear"), {}),
    "single": (["ad"], (["ad"], [2.0], "mix", "svd"), {}),  # one adapter: PEFT's linear
    # from_pretrained alone leaves each layer's active adapter a str; PEFT's injection a list
    "only_first": ([], (["first"], [1.0], "mix", "linear"), {}),
    "svd": (["ad", "bk"], (["ad", "bk"], [1.0, 1.0], "mix", "svd"), {}),
    "svd_rank_clamp": (
        ["ad", "c8"],
        (["c8", "ad"], [0.6, -0.4], "mix", "svd"),
        {"svd_rank": 3, "svd_clamp": 0.9},
    ),
    "ties": (["ad"], (["ad", "first"], [1.0, 0.5], "mix", "ties"), {"density": 0.5}),
    "ties_svd": (
        ["ad", "bk"],
        (["ad", "bk"], [1, 2], "mix", "ties_svd"),
        {"density": 0.6, "majority_sign_method": "frequency"},
    ),
    "magnitude_prune": (["ad"], (["first", "ad"], [0.3, 0.9], "mix", "magnitude_prune"), {"density": 0.7}),
    "magnitude_prune_svd": (
        ["ad", "bk"],
        (["ad", "bk"], [1.0, 1.0], "mix", "magnitude_prune_svd"),
        {"density": 0.7},
    ),
    "rslora_layers": (
        ["rs", "ad"],
        (["rs", "ad"], [1.0, 1.0], "mix", "linear"),
        {},
    ),  # rs's config: layer 1 only
    "dropout": (["drop", "ad"], (["drop", "ad"], [0.5, 0.5], "mix", "linear"), {}),
    "expressions": (["rx", "ry"], (["rx", "ry"], [1.0, 1.0], "mix", "svd"), {}),
    "trainable_active": (["ad", "tr"], (["ad", "tr"], [1.0, 1.0], "mix", "linear"), {}),
    # deleting the only active adapter leaves layers with different active adapters (the least name
    # each holds); PEFT's injection then writes the tuner's list into every layer
    "layers_disagree": (["ad", "bk", "-first"], (["ad", "bk"], [1.0, 1.0], "mix", "svd"), {}),
    "dora_involved": (["dora", "ad"], (["ad", "dora"], [1.0, 1.0], "mix", "cat"), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ends_as_peft(llama_dirs: dict[str, Path], case: str) -> None:
    names, args, options = CASES[case]
    expected = loaded(llama_dirs, names)
    actual = copy.deepcopy(expected)
    result = both(expected, actual, *args, **options)
    assert result == ("fastkeys", None)
    assert torch.equal(outputs(actual, "mix"), outputs(expected, "mix"))
    # later operations still agree: a load, a switch, deleting the combined adapter
    expected.load_adapter(llama_dirs["ad"], "later")
    fastkeys.peft.load_adapter(actual, llama_dirs["ad"], "later")
    expected.set_adapter("later")
    fastkeys.peft.set_adapter(actual, "later")
    expected.delete_adapter("mix")
    fastkeys.peft.delete_adapters(actual, ["mix"])
    assert_same_state(end_state(expected), end_state(actual))


def test_bert(tmp_path: Path) -> None:
    dirs = {
        name: save_seeded_adapter(
            peft.LoraConfig(r=4, target_modules=modules), tmp_path / name, tiny_bert, seed=i
        )
        for i, (name, modules) in enumerate({"first": ["query", "value"], "x": ["query", "key"]}.items())
    }
    expected = loaded(dirs, ["x"], tiny_bert)
    actual = copy.deepcopy(expected)
    assert both(expected, actual, ["first", "x"], [0.5, 1.5], "mix", "svd").path == "fastkeys"
    assert torch.equal(outputs(actual, "mix"), outputs(expected, "mix"))


def test_the_fast_path_runs_none_of_peft_s_passes(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No whole-model walk (named_modules, PEFT's inject_adapter, a layer's set_adapter): only the
    index's one visit per base-model module and the target layers."""
    expected = loaded(llama_dirs, ["ad", "bk"])
    actual = copy.deepcopy(expected)
    expected.add_weighted_adapter(["ad", "bk"], [1.0, 1.0], "mix", "svd")

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("one of PEFT's passes ran")

    with monkeypatch.context() as patched:
        for owner, name in (
            (torch.nn.Module, "named_modules"),
            (torch.nn.Module, "named_parameters"),
            (peft.tuners.tuners_utils.BaseTuner, "inject_adapter"),
            (peft.tuners.tuners_utils.BaseTunerLayer, "set_adapter"),
            (peft.tuners.lora.LoraLayer, "update_layer"),
        ):
            patched.setattr(owner, name, refused)
        result = fastkeys.peft.add_weighted_adapter(actual, ["ad", "bk"], [1.0, 1.0], "mix", "svd")
    assert result.path == "fastkeys"
    assert_same_state(end_state(expected), end_state(actual))


# ---------------------------------------------------------------------------------------------
# What goes to PEFT: its own function, the same end state, the reason.


def _float64(dirs: dict[str, Path], _root: Path) -> Any:
    model = loaded(dirs, ["ad"])
    for name, parameter in model.named_parameters():
        if ".ad." in name:
            parameter.data = parameter.data.double()  # PEFT's combination keeps this dtype
    return model


def _saved(dirs: dict[str, Path], root: Path) -> Any:
    config = peft.LoraConfig(r=4, target_modules=QV, modules_to_save=["lm_head"])
    model = peft.PeftModel.from_pretrained(tiny_llama(), save_seeded_adapter(config, root / "s", seed=9), "s")
    model.load_adapter(dirs["ad"], "ad")
    return model


PEFT_CASES: dict[str, tuple[Callable[[dict[str, Path], Path], Any], tuple[Any, ...], str]] = {
    # name: (the model, (adapters, weights, new name, combination[, options]), the reason)
    "dare": (
        lambda d, _r: loaded(d, ["ad"]),
        (["ad", "first"], [1.0, 1.0], "mix", "dare_linear", {"density": 0.5}),
        "dare_linear",
    ),
    # PEFT's _freeze_adapter freezes every parameter whose name contains "tr": xtr's too
    "name_inside_names": (
        lambda d, _r: loaded(d, ["ad", "xtr"]),
        (["ad", "first"], [1.0, 1.0], "tr", "cat"),
        "_freeze_adapter",
    ),
    "dora_first": (lambda d, _r: loaded(d, ["dora"]), (["dora", "first"], [1.0, 1.0], "mix", "cat"), "DoRA"),
    "auxiliary": (_saved, (["s", "ad"], [1.0, 1.0], "mix", "cat"), "auxiliary"),
    "weights_short": (lambda d, _r: loaded(d, ["ad"]), (["ad", "first"], [1.0], "mix", "cat"), "weights"),
    # rows cat leaves empty: PEFT's hold the signs of its random numbers (-0.0)
    "cat_partial": (
        lambda d, _r: loaded(d, ["ad", "bk"]),
        (["ad", "bk"], [1.0, 1.0], "mix", "cat"),
        "signed zeros",
    ),
    # PEFT's matrices are 8 wide where rp's q_proj is 4: PEFT keeps the width, the data narrower
    "rank_pattern": (lambda d, _r: loaded(d, ["rp"]), (["rp"], [1.0], "mix", "linear"), "rank_pattern"),
    "svd_rank_wide": (
        lambda d, _r: loaded(d, ["ad"]),
        (["ad", "first"], [1.0, 1.0], "mix", "svd", {"svd_rank": 40}),
        "exceeds",
    ),
    "float64_adapter": (_float64, (["ad", "first"], [1.0, 1.0], "mix", "linear"), "float32"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_other_cases_go_to_peft(llama_dirs: dict[str, Path], tmp_path: Path, case: str) -> None:
    build, args, reason = PEFT_CASES[case]
    options = args[4] if len(args) > 4 else {}
    expected = build(llama_dirs, tmp_path)
    actual = copy.deepcopy(expected)
    result = both(expected, actual, *args[:4], **options)
    assert result.path == "peft" and reason in (result.reason or ""), result


def test_an_existing_name_changes_nothing_and_says_so(llama_dirs: dict[str, Path]) -> None:
    model = loaded(llama_dirs, ["ad"])
    before = end_state(model)
    with pytest.warns(UserWarning, match="an adapter named 'ad' exists"):
        fastkeys.peft.add_weighted_adapter(model, ["first"], [1.0], "ad", "cat")
    assert_same_state(before, end_state(model))


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((["ad", "nope"], [1.0, 1.0], "mix", "cat"), "Adapter nope does not exist"),
        ((["ad", "c8"], [1.0, 1.0], "mix", "linear"), "same r value"),
        ((["ad", "first"], [1.0, 1.0], "mix", "blend"), "Invalid combination_type"),
    ],
)
def test_peft_s_errors_leave_the_model_as_it_was(llama_dirs: dict[str, Path], args: Any, error: str) -> None:
    model = loaded(llama_dirs, ["ad", "c8"])
    before = end_state(model)
    with pytest.raises(ValueError, match=error):
        fastkeys.peft.add_weighted_adapter(model, *args)
    assert_same_state(before, end_state(model))


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "wrapped"])
def test_where_peft_would_fail_half_way_nothing_changes(llama_dirs: dict[str, Path], wrapped: bool) -> None:
    """Under `bk`'s config (every layer) the union of `bk`'s and `rs`'s targets takes layer 0's
    o_proj, which holds neither (`rs` is layer 1 only): PEFT injects the new adapter, then raises at
    that layer. fastkeys raises the same error with the model as it was, whether o_proj is a plain
    Linear there or a LoRA layer of another adapter (`o0`)."""
    model = loaded(llama_dirs, ["bk", "rs", *(["o0"] if wrapped else [])])
    before = end_state(model)
    with pytest.raises(ValueError, match="No matching LoRAs found"):
        fastkeys.peft.add_weighted_adapter(model, ["bk", "rs"], [1.0, 1.0], "mix", "cat")
    assert_same_state(before, end_state(model))


def test_bad_arguments_go_to_peft_s_own_errors(llama_dirs: dict[str, Path]) -> None:
    model = loaded(llama_dirs, ["ad"])
    with pytest.raises(TypeError, match=r"peft\.PeftModel"):
        fastkeys.peft.add_weighted_adapter(model.base_model.model, ["ad"], [1.0], "mix")


def test_another_tuner_gets_its_own_function(tmp_path: Path) -> None:
    """IA3 has an add_weighted_adapter of its own (no combination_type): it runs, as PEFT's."""
    config = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    dirs = {
        name: save_seeded_adapter(config, tmp_path / name, seed=i) for i, name in enumerate(["first", "x"])
    }
    expected = loaded(dirs, ["x"])
    actual = copy.deepcopy(expected)
    result = both(expected, actual, ["first", "x"], [0.5, 1.5], "mix")
    assert result.path == "peft" and "IA3Model" in (result.reason or "")
    assert torch.equal(outputs(actual, "mix"), outputs(expected, "mix"))


def test_an_interrupted_call_leaves_the_model_as_it_was_or_as_done(llama_dirs: dict[str, Path]) -> None:
    model = loaded(llama_dirs, ["ad", "bk"])
    before = end_state(model)
    done = copy.deepcopy(model)
    call = ("ad", "first"), [0.5, 1.5], "mix", "cat"
    total = warm_line_count(
        lambda: fastkeys.peft.add_weighted_adapter(done, list(call[0]), *call[1:]),
        lambda: fastkeys.peft.add_weighted_adapter(copy.deepcopy(model), list(call[0]), *call[1:]),
    )
    after = end_state(done)
    interrupted = 0
    for point in spread(total, 16):
        trial = copy.deepcopy(model)
        try:
            traced_lines(
                functools.partial(fastkeys.peft.add_weighted_adapter, trial, list(call[0]), *call[1:]), point
            )
        except KeyboardInterrupt:
            interrupted += 1
        assert_same_state(after if "mix" in trial.peft_config else before, end_state(trial))
    assert interrupted >= 15, (interrupted, total)
