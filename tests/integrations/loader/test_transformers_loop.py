"""`fastkeys.transformers.load_adapters` against transformers' own `model.load_adapter` loop on a
real tiny Llama (no PeftModel: transformers' PEFT integration).

Every end state is compared with the loop's (`fixtures.loading.adapted_state`: state_dict keys,
values bitwise, dtypes, devices; module names and types; every module's attributes, transformers'
`_hf_peft_config_loaded` and `peft_config` included; requires_grad; training flags; configs; every
tuner layer's active adapters and per-adapter numbers; outputs with each adapter active). Every
load after the first must take the fast path where the allow-list admits it; the rest goes through
transformers, fed fastkeys' checked tensors, and must end equal too. Both engines run this module.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
import transformers

import fastkeys.transformers
from fastkeys.integrations.loader import boundary, hf, inject
from fixtures.loading import (
    QV,
    TRACED,
    adapted_state,
    adapter,
    assert_same_state,
    layer_state,
    merged_copy,
    one_thread,  # noqa: F401  (autouse)
    rewrite,
    spread,
    traced_lines,
    warm_line_count,
)
from fixtures.peft_models import METHOD_CONFIGS, save_seeded_adapter, tiny_llama

pytestmark = pytest.mark.engine  # checkpoint scans, key renaming and expressions run on the engine: both

# fastkeys' loader, PEFT and transformers
TRACED_HERE = (*TRACED, str(Path(transformers.__file__).parent))
INPUTS = torch.tensor([[1, 5, 9, 2, 7]])
LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def transformers_loop(
    first: Path, adapters: dict[str, Path], scratch: Path, dtype: torch.dtype = torch.float32, **options: Any
) -> Any:
    """A tiny Llama (in `dtype`) after transformers' `load_adapter` of `first`, then of each adapter."""
    model = tiny_llama().to(dtype)
    model.load_adapter(str(first), adapter_name="first")
    for name, directory in adapters.items():
        model.load_adapter(
            str(merged_copy(directory, scratch / f"merged-{name}")), adapter_name=name, **options
        )
    return model


def with_first(first: Path, dtype: torch.dtype = torch.float32) -> Any:
    model = tiny_llama().to(dtype)
    model.load_adapter(str(first), adapter_name="first")
    return model


def outputs(model: Any, name: str) -> torch.Tensor:
    """The logits with `name` active in every tuner layer (transformers' `set_adapter` needs a newer
    PEFT than the pinned one, so each layer's own)."""
    for module in model.modules():
        if isinstance(module, boundary.BaseTunerLayer):
            module.set_adapter(name)
    torch.manual_seed(0)
    with torch.no_grad():
        return model(INPUTS).logits  # type: ignore[no-any-return]


def initialised(model: Any) -> list[str]:
    """The parameters transformers marked as loaded (`initialize_weights()` leaves them alone)."""
    return [name for name, p in model.named_parameters() if getattr(p, "_is_hf_initialized", False)]


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(adapted_state(expected), adapted_state(actual))
    assert layer_state(actual) == layer_state(expected)
    assert initialised(actual) == initialised(expected)
    for name in expected.peft_config:
        assert torch.equal(outputs(expected, name), outputs(actual, name)), name


def lora_family(tmp_path: Path) -> dict[str, Path]:
    """LoRA adapters that differ in what the fast path reproduces: targets (names, a regex, layers,
    exclusions), rank, alpha, rsLoRA, dropout, checkpoint dtype and shards."""
    return {
        "b": adapter(tmp_path, "b", seed=2, target_modules=["q_proj", "k_proj"], lora_alpha=16),
        "c": adapter(tmp_path, "c", seed=3, lora_dropout=0.1, use_rslora=True, r=8),
        "d": adapter(tmp_path, "d", seed=4, target_modules=r".*\.(o_proj|up_proj)", dtype=torch.bfloat16),
        "e": adapter(tmp_path, "e", seed=5, target_modules=["v_proj"], layers_to_transform=[1],
                     layers_pattern="layers"),
        "f": adapter(tmp_path, "f", seed=6, target_modules=LLAMA_MODULES, exclude_modules=["down_proj"],
                     dtype=torch.float16),
        "h": save_seeded_adapter(peft.LoraConfig(r=2, target_modules=QV), tmp_path / "h", seed=8, shards=2),
    }  # fmt: skip


@pytest.mark.parametrize("is_trainable", [False, True])
def test_lora_adapters_end_like_transformers_loop(tmp_path: Path, is_trainable: bool) -> None:
    first = adapter(tmp_path, "first", seed=1)
    adapters = lora_family(tmp_path)
    expected = transformers_loop(first, adapters, tmp_path, is_trainable=is_trainable)
    actual = with_first(first)
    results = fastkeys.transformers.load_adapters(actual, adapters, is_trainable=is_trainable)
    assert {name: (r.loader, r.reason) for name, r in results.items()} == {
        name: ("fastkeys", None) for name in adapters
    }
    assert all(r.missing_keys == [] for r in results.values())
    assert_same(expected, actual)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_keeps_its_dtype_as_transformers_does(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """transformers' injection casts no adapter to float32 (PEFT's loader does)."""
    first = adapter(tmp_path, "first", seed=1)
    adapters = {
        "b": adapter(tmp_path, "b", seed=2, dtype=torch.bfloat16),
        "c": adapter(tmp_path, "c", seed=3),
    }
    expected = transformers_loop(first, adapters, tmp_path, dtype)
    actual = with_first(first, dtype)
    results = fastkeys.transformers.load_adapters(actual, adapters)
    assert [r.loader for r in results.values()] == ["fastkeys", "fastkeys"]
    assert_same_state(adapted_state(expected), adapted_state(actual))


def test_a_frozen_load_after_a_trainable_one_puts_every_adapter_in_eval_mode(tmp_path: Path) -> None:
    first = adapter(tmp_path, "first", seed=1)
    b, c = adapter(tmp_path, "b", seed=2, lora_dropout=0.1), adapter(tmp_path, "c", seed=3)
    expected = with_first(first)
    expected.load_adapter(str(b), adapter_name="b", is_trainable=True)
    expected.load_adapter(str(c), adapter_name="c")
    actual = with_first(first)
    fastkeys.transformers.load_adapters(actual, {"b": b}, is_trainable=True)
    assert fastkeys.transformers.load_adapters(actual, {"c": c})["c"].loader == "fastkeys"
    assert_same(expected, actual)


METHODS: dict[str, Callable[[int], Any]] = {
    "loha": lambda r: peft.LoHaConfig(r=r, alpha=8, target_modules=QV, rank_dropout=0.1),
    "lokr": lambda r: peft.LoKrConfig(
        r=r, alpha=4, target_modules=["q_proj", "o_proj"], decompose_both=r > 2
    ),
    "ia3": lambda r: peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"] if r > 2 else ["v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
    ),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_other_methods_end_like_transformers_loop(tmp_path: Path, method: str) -> None:
    make = METHODS[method]
    first = save_seeded_adapter(make(2), tmp_path / "first", seed=1)
    adapters = {
        f"{method}{i}": save_seeded_adapter(make(2 + 2 * i), tmp_path / f"a{i}", seed=2 + i, dtype=dtype)
        for i, dtype in enumerate([None, torch.bfloat16, None])
    }
    expected = transformers_loop(first, adapters, tmp_path)
    actual = with_first(first)
    results = fastkeys.transformers.load_adapters(actual, adapters)
    assert [r.loader for r in results.values()] == ["fastkeys"] * len(adapters), results
    assert_same(expected, actual)


def test_the_first_adapter_is_transformers_and_the_rest_fast(tmp_path: Path) -> None:
    adapters = {
        "a": adapter(tmp_path, "a", seed=1),
        "b": adapter(tmp_path, "b", seed=2, target_modules=["k_proj"]),
    }
    expected = tiny_llama()
    for name, directory in adapters.items():
        expected.load_adapter(str(directory), adapter_name=name)
    actual = tiny_llama()
    results = fastkeys.transformers.load_adapters(actual, adapters)
    assert results["a"].loader == "transformers"
    assert "holds no adapter yet" in str(results["a"].reason)
    assert results["b"].loader == "fastkeys"
    assert_same(expected, actual)


def _bin(directory: Path) -> Path:
    from safetensors.torch import load_file

    tensors = load_file(directory / "adapter_model.safetensors")
    torch.save(tensors, directory / "adapter_model.bin")
    (directory / "adapter_model.safetensors").unlink()
    return directory


def _without_one_tensor(directory: Path) -> Path:
    return rewrite(directory, lambda t: t.pop(sorted(t)[0]))


# each: (what makes the load transformers', the words of the reason)
ROUTED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "bin": (_bin, "a .bin checkpoint"),
    "missing tensor": (_without_one_tensor, "the checkpoint lacks 1 of the adapter's tensors"),
    "dora": (
        lambda d: save_seeded_adapter(peft.LoraConfig(r=4, target_modules=QV, use_dora=True), d, seed=9),
        "DoRA: transformers' loader leaves the magnitude vectors as initialised",
    ),
    "bias": (
        lambda d: save_seeded_adapter(peft.LoraConfig(r=4, target_modules=QV, bias="lora_only"), d, seed=9),
        "bias='lora_only'",
    ),
    "olora": (  # rewrites the base weights of its targets through `.data =`
        lambda d: _olora(d, "x"),
        "init_lora_weights='olora' may change the base weights",
    ),
}


def _olora(directory: Path, name: str) -> Path:
    return save_seeded_adapter(
        peft.LoraConfig(r=2, target_modules=QV, init_lora_weights="olora"), directory.parent / name, seed=9
    )


@pytest.mark.parametrize("case", sorted(ROUTED))
def test_refused_loads_go_to_transformers_and_end_equal(tmp_path: Path, case: str) -> None:
    make, words = ROUTED[case]
    first = adapter(tmp_path, "first", seed=1)
    routed = make(adapter(tmp_path, "x", seed=2))
    expected = with_first(first)
    if case == "bin":
        # transformers 5.24 cannot load a .bin adapter from a directory (it opens
        # adapter_model.safetensors regardless); its state-dict form is the reference
        config = peft.PeftConfig.from_pretrained(str(routed))
        tensors = torch.load(routed / "adapter_model.bin", weights_only=True)
        expected.load_adapter(adapter_name="x", peft_config=config, adapter_state_dict=tensors)
    else:
        expected.load_adapter(str(routed), adapter_name="x")
    actual = with_first(first)
    result = fastkeys.transformers.load_adapters(actual, {"x": routed})["x"]
    assert (result.loader, words in str(result.reason)) == ("transformers", True), result
    if case == "missing tensor":
        assert len(result.missing_keys) == 1 and ".x." in result.missing_keys[0]
    if case == "dora":  # what transformers' load does with them, said in the verdict
        assert len(result.missing_keys) == 4 and all(
            "lora_magnitude_vector.x.weight" in k for k in result.missing_keys
        )
        assert sorted(result.unexpected_keys) == sorted(k[: -len(".weight")] for k in result.missing_keys)
    written = [
        f"model.layers.{i}.self_attn.{m}.base_layer.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert result.base_weights_written == (written if case == "olora" else [])
    assert_same(expected, actual)


def test_an_unverified_transformers_goes_to_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = adapter(tmp_path, "first", seed=1)
    directory = adapter(tmp_path, "x", seed=2)
    expected = transformers_loop(first, {"x": directory}, tmp_path)
    monkeypatch.setattr(hf, "VERIFIED_TRANSFORMERS", ("4.0",))
    actual = with_first(first)
    result = fastkeys.transformers.load_adapters(actual, {"x": directory})["x"]
    assert result.loader == "transformers"
    assert "is not a version the fast path was verified on (4.0)" in str(result.reason)
    assert_same(expected, actual)


def test_an_existing_name_is_transformers_error_and_changes_nothing(tmp_path: Path) -> None:
    first = adapter(tmp_path, "first", seed=1)
    model = with_first(first)
    before = adapted_state(model)
    with pytest.raises(ValueError, match="Adapter with name first already exists"):
        fastkeys.transformers.load_adapters(model, {"first": adapter(tmp_path, "again", seed=2)})
    assert_same_state(before, adapted_state(model))


# each: (the checkpoint, the key added to it, what the refusal names)
HOSTILE: dict[str, tuple[Callable[[Path], Path], str, str]] = {
    "base weight": (
        lambda tmp: adapter(tmp, "hostile", seed=2),
        "base_model.model.model.layers.0.mlp.gate_proj.weight",
        r"model\.layers\.0\.mlp\.gate_proj\.weight.*every adapter shares",
    ),
    "base weight, after OLoRA rewrote its targets'": (
        lambda tmp: _olora(tmp / "x", "hostile"),
        "base_model.model.model.layers.0.mlp.gate_proj.weight",
        r"model\.layers\.0\.mlp\.gate_proj\.weight.*every adapter shares",
    ),
    "another adapter's weight": (  # IA3 keys are renamed by their prefix, this one is kept as it is
        lambda tmp: save_seeded_adapter(
            peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            tmp / "hostile",
            seed=2,
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.first.weight",
        r"'model\.layers\.0\.self_attn\.q_proj\.lora_A\.first\.weight', a weight of another adapter",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_checkpoint_writing_what_is_not_its_own_is_refused_and_rolled_back(
    tmp_path: Path, case: str
) -> None:
    """transformers' loop writes these; fastkeys refuses them (as on PEFT's path), and the model is
    rolled back whole, the base weights a special initialisation rewrote included."""
    make, key, words = HOSTILE[case]
    first = adapter(tmp_path, "first", seed=1)
    model = with_first(first)
    shape = model.get_parameter(key.removeprefix("base_model.model.")).shape
    directory = rewrite(make(tmp_path), lambda t: t.update({key: torch.zeros(shape)}))
    before = adapted_state(model)
    with pytest.raises(ValueError, match=words):
        fastkeys.transformers.load_adapters(model, {"hostile": directory})
    assert_same_state(before, adapted_state(model))
    assert "hostile" not in model.peft_config


def test_another_adapter_s_saved_copy_is_refused_and_rolled_back(tmp_path: Path) -> None:
    first = adapter(tmp_path, "first", seed=1, modules_to_save=["model.norm"])
    model = with_first(first)
    key = "base_model.model.model.norm.modules_to_save.first.weight"
    directory = rewrite(
        adapter(tmp_path, "hostile", seed=2), lambda t: t.update({key: torch.full((32,), 9.0)})
    )
    before = adapted_state(model)
    with pytest.raises(
        ValueError, match=r"'model\.norm\.modules_to_save\.first\.weight', a weight of another"
    ):
        fastkeys.transformers.load_adapters(model, {"hostile": directory})
    assert_same_state(before, adapted_state(model))


def test_a_second_boft_adapter_ends_like_transformers_loop(tmp_path: Path) -> None:
    """BOFT's layers hold a buffer of their own (`boft_P`, registered again by each adapter): an
    adapter's, not a base weight."""
    first, second = (
        save_seeded_adapter(METHOD_CONFIGS["boft"](), tmp_path / n, seed=i) for i, n in enumerate("fx")
    )
    expected = transformers_loop(first, {"x": second}, tmp_path)
    actual = with_first(first)
    result = fastkeys.transformers.load_adapters(actual, {"x": second})["x"]
    assert result.loader == "transformers" and result.base_weights_written == [], result
    assert_same(expected, actual)


def test_a_load_that_unmerges_says_so(tmp_path: Path) -> None:
    """transformers' load unmerges merged layers in place (PEFT's set_adapter): reported."""
    first = adapter(tmp_path, "first", seed=1)
    directory = adapter(tmp_path, "x", seed=2)
    expected, actual = with_first(first), with_first(first)
    for model in (expected, actual):
        for module in model.modules():
            if isinstance(module, boundary.BaseTunerLayer):
                module.merge()
    expected.load_adapter(str(directory), adapter_name="x")
    result = fastkeys.transformers.load_adapters(actual, {"x": directory})["x"]
    assert (result.loader, result.reason) == ("transformers", "the model has merged adapter layers")
    assert result.base_weights_written == [
        f"model.layers.{i}.self_attn.{m}.base_layer.weight" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    assert_same(expected, actual)


def test_a_failure_midway_leaves_no_trace_and_keeps_earlier_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = adapter(tmp_path, "first", seed=1)
    adapters = {
        "b": adapter(tmp_path, "b", seed=2),
        "c": adapter(tmp_path, "c", seed=3, target_modules=LLAMA_MODULES),
    }
    expected = transformers_loop(first, {"b": adapters["b"]}, tmp_path)
    model = with_first(first)
    real = inject._add_lora_linear
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        if calls.count("c") == 3:  # of the 4 existing LoRA layers it targets
            raise RuntimeError("disk gone")
        real(*args, **kwargs)

    monkeypatch.setattr(inject, "_add_lora_linear", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        fastkeys.transformers.load_adapters(model, adapters)
    assert list(model.peft_config) == ["first", "b"]
    assert_same(expected, model)


@pytest.mark.parametrize("path", ["fastkeys", "transformers"])
def test_an_interrupted_load_leaves_the_model_as_it_was_or_loaded(tmp_path: Path, path: str) -> None:
    """Ctrl-C at lines spread over the whole load (fastkeys' loader, PEFT and transformers code it
    calls): the model is as it was, or, past the end of the load, as the loop leaves it."""
    first = adapter(tmp_path, "first", seed=1)
    directory = adapter(tmp_path, "x", seed=2, target_modules=["q_proj", "o_proj"])
    if path == "transformers":
        directory = _without_one_tensor(directory)
    loaded = adapted_state(transformers_loop(first, {"x": directory}, tmp_path))
    start = adapted_state(with_first(first))
    model = with_first(first)
    total = warm_line_count(
        lambda: fastkeys.transformers.load_adapters(model, {"x": directory}),
        lambda: fastkeys.transformers.load_adapters(with_first(first), {"x": directory}),
        TRACED_HERE,
    )
    interrupted = 0
    for point in spread(total, 12):
        model = with_first(first)
        try:
            traced_lines(
                functools.partial(fastkeys.transformers.load_adapters, model, {"x": directory}),
                point,
                TRACED_HERE,
            )
        except KeyboardInterrupt:
            interrupted += 1
        assert_same_state(loaded if "x" in model.peft_config else start, adapted_state(model))
    assert interrupted >= 10, (interrupted, total)


def test_models_that_are_not_transformers_models_are_refused(tmp_path: Path) -> None:
    directory = adapter(tmp_path, "x", seed=2)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), adapter(tmp_path, "first", seed=1), "first")
    with pytest.raises(TypeError, match=r"fastkeys\.peft\.load_adapters"):
        fastkeys.transformers.load_adapters(peft_model, {"x": directory})
    with pytest.raises(TypeError, match="not Linear"):
        fastkeys.transformers.load_adapters(torch.nn.Linear(2, 2), {"x": directory})
    with pytest.raises(TypeError, match="adapters must map adapter names"):
        fastkeys.transformers.load_adapters(tiny_llama(), [directory])  # type: ignore[arg-type]
