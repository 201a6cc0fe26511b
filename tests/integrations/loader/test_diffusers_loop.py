"""`fastkeys.diffusers.load_adapters` against diffusers' own `model.load_lora_adapter` loop on real
tiny diffusers models (an SD3 transformer and a UNet, built from configs).

Every end state is compared with the loop's (`fixtures.loading.adapted_state`: state_dict keys,
values bitwise, dtypes, devices; module names and types; every module's attributes, diffusers'
`_hf_peft_config_loaded` and `peft_config` included; requires_grad; training flags; configs; every
tuner layer's active adapters and per-adapter numbers). Every load after the first must take the
fast path where the allow-list admits it; the rest goes through diffusers, fed fastkeys' checked
tensors, and must end equal too. Both engines run this module.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers
from safetensors import safe_open
from safetensors.torch import save_file

import fastkeys.diffusers
from fastkeys.integrations.loader import components, inject
from fixtures.loading import (
    TRACED,
    adapted_state,
    assert_same_state,
    layer_state,
    one_thread,  # noqa: F401  (autouse)
    spread,
    traced_lines,
    warm_line_count,
)
from fixtures.peft_models import DIFFUSERS_FILE, tiny_sd3_transformer, tiny_unet

pytestmark = pytest.mark.engine  # checkpoint scans, key renaming and expressions run on the engine: both

TRACED_HERE = (*TRACED, str(Path(diffusers.__file__).parent))
MODELS: dict[str, Callable[[], Any]] = {"sd3": tiny_sd3_transformer, "unet": tiny_unet}
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(autouse=True)
def quiet() -> Iterator[None]:
    """diffusers logs its substring filter's verdict on every load; the tests compare states."""
    logger = diffusers.utils.logging.get_logger("diffusers")
    level = logger.level
    logger.setLevel("CRITICAL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logger.setLevel(level)


def lora_file(
    model: str,
    directory: Path,
    seed: int,
    *,
    metadata: bool = True,
    prefix: str | None = None,
    dtype: torch.dtype = torch.float32,
    **config: Any,
) -> Path:
    """A LoRA trained off its init on a fresh `model`, saved by diffusers' `save_lora_adapter`
    (with its `lora_adapter_metadata`), then optionally without the metadata, under a prefix, or
    cast."""
    fresh = MODELS[model]()
    fresh.add_adapter(peft.LoraConfig(**{"r": 2, "lora_alpha": 2, "target_modules": ATTENTION, **config}))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in fresh.named_parameters():
            if ".lora_" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    fresh.save_lora_adapter(directory, adapter_name="default", weight_name=DIFFUSERS_FILE)
    file = directory / DIFFUSERS_FILE
    if metadata and prefix is None and dtype == torch.float32:
        return directory
    with safe_open(str(file), "pt") as opened:
        tensors = {key: opened.get_tensor(key).to(dtype) for key in opened.keys()}  # noqa: SIM118
        header = opened.metadata() or {}
    if prefix is not None:
        tensors = {f"{prefix}.{key}": value for key, value in tensors.items()}
        header = {
            "lora_adapter_metadata": json.dumps(
                {f"{prefix}.{k}": v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
            ),
            "format": "pt",
        }
    save_file(tensors, str(file), metadata=header if metadata else {"format": "pt"})
    return directory


def diffusers_loop(model: str, adapters: dict[str, Path], **options: Any) -> Any:
    built = MODELS[model]()
    for name, directory in adapters.items():
        built.load_lora_adapter(str(directory), adapter_name=name, weight_name=DIFFUSERS_FILE, **options)
    return built


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(adapted_state(expected), adapted_state(actual))
    assert layer_state(actual) == layer_state(expected)


def family(tmp_path: Path, model: str) -> dict[str, Path]:
    """LoRA files that differ in what the fast path reproduces: targets, rank, alpha, rsLoRA,
    dropout, dtype, a file without metadata (diffusers reads the config off the tensors)."""
    return {
        "b": lora_file(model, tmp_path / "b", 2, target_modules=["to_q", "to_k"], lora_alpha=8),
        "c": lora_file(model, tmp_path / "c", 3, r=4, lora_dropout=0.1, use_rslora=True),
        "d": lora_file(model, tmp_path / "d", 4, dtype=torch.bfloat16),
        "e": lora_file(model, tmp_path / "e", 5, metadata=False, r=3),
        "f": lora_file(model, tmp_path / "f", 6, target_modules=["to_v"], init_lora_weights=False),
        "g": lora_file(model, tmp_path / "g", 7, target_modules=["to_k"], use_dora=True),
    }


@pytest.mark.parametrize("model", sorted(MODELS))
def test_lora_files_end_like_diffusers_loop(tmp_path: Path, model: str) -> None:
    first = lora_file(model, tmp_path / "first", 1)
    adapters = family(tmp_path, model)
    expected = diffusers_loop(model, {"first": first, **adapters}, prefix=None)
    actual = diffusers_loop(model, {"first": first}, prefix=None)
    results = fastkeys.diffusers.load_adapters(actual, adapters, prefix=None)
    assert {name: (r.loader, r.reason) for name, r in results.items()} == {
        name: ("fastkeys", None) for name in adapters
    }
    assert all(r.missing_keys == [] and r.unexpected_keys == [] for r in results.values())
    assert_same(expected, actual)
    assert list(actual.peft_config) == ["first", *adapters]
    assert expected.active_adapters() == actual.active_adapters() == ["g"]


def test_low_cpu_mem_usage_ends_like_diffusers_loop(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    adapters = {"b": lora_file("sd3", tmp_path / "b", 2), "c": lora_file("sd3", tmp_path / "c", 3, r=4)}
    expected = diffusers_loop("sd3", {"first": first, **adapters}, prefix=None, low_cpu_mem_usage=True)
    actual = diffusers_loop("sd3", {"first": first}, prefix=None, low_cpu_mem_usage=True)
    results = fastkeys.diffusers.load_adapters(actual, adapters, prefix=None, low_cpu_mem_usage=True)
    assert {r.loader for r in results.values()} == {"fastkeys"}
    assert_same(expected, actual)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_inference_mode_files_keep_every_training_flag_as_diffusers_does(tmp_path: Path, mode: str) -> None:
    """A file saved with `inference_mode=True` loads frozen; diffusers calls no `eval()` (PEFT's and
    transformers' loaders do), so every module keeps its training flag, the new ones included."""
    first = lora_file("sd3", tmp_path / "first", 1)
    adapters = {
        "x": lora_file("sd3", tmp_path / "x", 2, inference_mode=True),
        "y": lora_file("sd3", tmp_path / "y", 3),
    }

    def start(names: dict[str, Path]) -> Any:
        model = tiny_sd3_transformer()
        model.train(mode == "train")
        for name, directory in names.items():
            model.load_lora_adapter(
                str(directory), adapter_name=name, prefix=None, weight_name=DIFFUSERS_FILE
            )
        return model

    expected, actual = start({"first": first, **adapters}), start({"first": first})
    results = fastkeys.diffusers.load_adapters(actual, adapters, prefix=None)
    assert {r.loader for r in results.values()} == {"fastkeys"}
    assert_same(expected, actual)
    assert not any(p.requires_grad for n, p in actual.named_parameters() if ".x." in n)


def test_a_compiled_model_loads_into_the_module_it_wraps(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    second = lora_file("sd3", tmp_path / "second", 2)
    expected: Any = torch.compile(
        diffusers_loop("sd3", {"first": first}, prefix=None)
    )  # compiles when called
    expected.load_lora_adapter(str(second), adapter_name="second", prefix=None, weight_name=DIFFUSERS_FILE)
    compiled: Any = torch.compile(diffusers_loop("sd3", {"first": first}, prefix=None))
    results = fastkeys.diffusers.load_adapters(compiled, {"second": second}, prefix=None)
    assert results["second"].loader == "fastkeys"
    assert_same(expected._orig_mod, compiled._orig_mod)


def test_a_pipeline_file_under_a_prefix_and_a_single_file_path(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1, prefix="transformer")
    second = lora_file("sd3", tmp_path / "second", 2, prefix="transformer", r=4)
    expected = diffusers_loop("sd3", {"first": first, "second": second})  # diffusers' prefix="transformer"
    actual = diffusers_loop("sd3", {"first": first})
    results = fastkeys.diffusers.load_adapters(actual, {"second": second / DIFFUSERS_FILE})
    assert results["second"].loader == "fastkeys"
    assert_same(expected, actual)
    with pytest.raises(ValueError, match=r"no tensor of .* starts with 'transformer\.'.*prefix=None"):
        fastkeys.diffusers.load_adapters(actual, {"third": lora_file("sd3", tmp_path / "third", 3)})
    assert "third" not in actual.peft_config


def test_the_first_adapter_is_diffusers_and_the_rest_fast(tmp_path: Path) -> None:
    adapters = {name: lora_file("sd3", tmp_path / name, seed) for seed, name in enumerate("ab", 1)}
    expected = diffusers_loop("sd3", adapters, prefix=None)
    actual = tiny_sd3_transformer()
    results = fastkeys.diffusers.load_adapters(actual, adapters, prefix=None)
    assert (results["a"].loader, "holds no adapter yet" in str(results["a"].reason)) == ("diffusers", True)
    assert results["b"].loader == "fastkeys"
    assert_same(expected, actual)


def rewrite_file(
    directory: Path, edit: Callable[[dict[str, torch.Tensor]], object], metadata: dict[str, str] | None = None
) -> Path:
    """The LoRA file in `directory` rewritten: `edit` changes its tensors in place; the header's
    metadata kept, or `metadata` instead."""
    file = directory / DIFFUSERS_FILE
    with safe_open(str(file), "pt") as opened:
        tensors = {key: opened.get_tensor(key) for key in opened.keys()}  # noqa: SIM118
        header = opened.metadata()
    edit(tensors)
    save_file(tensors, str(file), metadata=header if metadata is None else metadata)
    return directory


def _old_layout(directory: Path) -> Path:
    """diffusers' attention-processor layout (`.lora.down.weight`), which it converts to PEFT's."""

    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for key in list(tensors):
            tensors[key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")] = tensors.pop(
                key
            )

    return rewrite_file(directory, rename, {"format": "pt"})


def _without_one_tensor(directory: Path) -> Path:
    return rewrite_file(directory, lambda tensors: tensors.pop(sorted(tensors)[-1]))


# each: (what makes the load diffusers', the words of the reason)
ROUTED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "old layout": (_old_layout, "not in PEFT's layout"),
    "missing tensor": (_without_one_tensor, "the checkpoint lacks 1 of the adapter's tensors"),
    "pissa": (lambda d: lora_file("sd3", d, 9, init_lora_weights="pissa"), "pissa"),
}


@pytest.mark.parametrize("case", sorted(ROUTED))
def test_refused_loads_go_to_diffusers_and_end_equal(tmp_path: Path, case: str) -> None:
    make, words = ROUTED[case]
    first = lora_file("sd3", tmp_path / "first", 1)
    routed = make(
        lora_file("sd3", tmp_path / "x", 2) if case in ("old layout", "missing tensor") else tmp_path / "x"
    )
    expected = diffusers_loop("sd3", {"first": first, "x": routed}, prefix=None)
    actual = diffusers_loop("sd3", {"first": first}, prefix=None)
    result = fastkeys.diffusers.load_adapters(actual, {"x": routed}, prefix=None)["x"]
    assert (result.loader, words in str(result.reason)) == ("diffusers", True), result
    if case == "missing tensor":
        assert len(result.missing_keys) == 1 and ".x." in result.missing_keys[0]
    else:
        assert result.missing_keys == []
    assert bool(result.base_weights_written) == (case == "pissa")
    assert_same(expected, actual)


def _hooked(model: Any) -> Any:
    from accelerate.hooks import ModelHook, add_hook_to_module  # type: ignore[import-untyped]

    add_hook_to_module(model, ModelHook())  # on the root, as model CPU offloading puts its hook
    return model


def test_a_hooked_model_and_an_odd_inference_mode_go_to_diffusers(tmp_path: Path) -> None:
    """A hook on the model itself (not only on its modules) and an `inference_mode` that is not a
    bool (diffusers keeps the value, the fast path would store its truth) take diffusers' path."""
    first = lora_file("sd3", tmp_path / "first", 1)
    odd = lora_file("sd3", tmp_path / "odd", 2)
    with safe_open(str(odd / DIFFUSERS_FILE), "pt") as opened:
        header = json.loads(opened.metadata()["lora_adapter_metadata"])
    rewrite_file(odd, lambda t: None, {"lora_adapter_metadata": json.dumps({**header, "inference_mode": 1})})
    second = lora_file("sd3", tmp_path / "second", 3)
    cases: list[tuple[dict[str, Path], Callable[[], Any], str]] = [
        ({"odd": odd}, lambda: diffusers_loop("sd3", {"first": first}, prefix=None), "inference_mode=1"),
        ({"second": second}, lambda: _hooked(diffusers_loop("sd3", {"first": first}, prefix=None)), "hooks"),
    ]
    for adapters, start, words in cases:
        expected = start()
        for name, directory in adapters.items():
            expected.load_lora_adapter(
                str(directory), adapter_name=name, prefix=None, weight_name=DIFFUSERS_FILE
            )
        actual = start()
        results = fastkeys.diffusers.load_adapters(actual, adapters, prefix=None)
        assert [(r.loader, words in str(r.reason)) for r in results.values()] == [("diffusers", True)], (
            results
        )
        assert_same(expected, actual)


def test_an_unverified_diffusers_goes_to_diffusers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    second = lora_file("sd3", tmp_path / "second", 2)
    expected = diffusers_loop("sd3", {"first": first, "second": second}, prefix=None)
    monkeypatch.setattr(components, "VERIFIED_DIFFUSERS", ("0.1",))
    actual = diffusers_loop("sd3", {"first": first}, prefix=None)
    result = fastkeys.diffusers.load_adapters(actual, {"second": second}, prefix=None)["second"]
    assert (result.loader, "not a version the fast path was verified on" in str(result.reason)) == (
        "diffusers",
        True,
    )
    assert_same(expected, actual)


def test_an_existing_name_is_diffusers_error_and_changes_nothing(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    before = adapted_state(model)
    with pytest.raises(ValueError, match="Adapter name first already in use"):
        fastkeys.diffusers.load_adapters(
            model, {"first": lora_file("sd3", tmp_path / "again", 2)}, prefix=None
        )
    assert_same_state(before, adapted_state(model))


# each: the key a hostile file adds (zeros of the tensor's shape), what the refusal names
FOREIGN = {
    "base weight": ("proj_out.weight", "a weight of the base model"),
    "a tuner layer's base weight": (
        "transformer_blocks.0.attn.to_q.base_layer.weight",
        "a weight of the base model",
    ),
    "another adapter's weight": (
        "transformer_blocks.0.attn.to_q.lora_A.first.weight",
        "another adapter's weights",
    ),
}


@pytest.mark.parametrize("case", sorted(FOREIGN))
def test_a_file_writing_what_is_not_its_own_is_refused_and_every_value_restored(
    tmp_path: Path, case: str
) -> None:
    """diffusers copies a file's tensors into the existing ones in place: a key naming a base
    weight or another adapter's tensor is refused before the copy, and the values are as before."""
    key, words = FOREIGN[case]
    first = lora_file("sd3", tmp_path / "first", 1)
    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    shape = model.get_parameter(key).shape
    directory = rewrite_file(
        lora_file("sd3", tmp_path / "x", 2), lambda t: t.update({key: torch.zeros(shape)})
    )
    before = adapted_state(model)
    with pytest.raises(ValueError, match=words):
        fastkeys.diffusers.load_adapters(model, {"x": directory}, prefix=None)
    assert_same_state(before, adapted_state(model))


def test_a_failure_midway_leaves_no_trace_and_keeps_earlier_adapters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    adapters = {"b": lora_file("sd3", tmp_path / "b", 2), "c": lora_file("sd3", tmp_path / "c", 3)}
    expected = diffusers_loop("sd3", {"first": first, "b": adapters["b"]}, prefix=None)
    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    real = inject._add_lora_linear
    calls = []

    def failing(*args: Any, **kwargs: Any) -> None:
        calls.append(args[1])
        if calls.count("c") == 3:
            raise RuntimeError("disk gone")
        real(*args, **kwargs)

    monkeypatch.setattr(inject, "_add_lora_linear", failing)
    with pytest.raises(RuntimeError, match="disk gone"):
        fastkeys.diffusers.load_adapters(model, adapters, prefix=None)
    assert list(model.peft_config) == ["first", "b"]
    assert_same(expected, model)


def test_a_wrong_shape_is_refused_naming_the_file_and_changes_nothing(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    wrong: list[str] = []

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        wrong.append(sorted(k for k in tensors if "lora_A" in k)[0])
        tensors[wrong[0]] = torch.zeros(tensors[wrong[0]].shape[0], tensors[wrong[0]].shape[1] + 1)

    directory = rewrite_file(lora_file("sd3", tmp_path / "x", 2), widen)
    key = wrong[0]
    before = adapted_state(model)
    with pytest.raises(ValueError, match=rf"{DIFFUSERS_FILE}: tensor '{key}' has shape"):
        fastkeys.diffusers.load_adapters(model, {"x": directory}, prefix=None)
    assert_same_state(before, adapted_state(model))


@pytest.mark.parametrize("path", ["fastkeys", "diffusers"])
def test_an_interrupted_load_leaves_the_model_as_it_was_or_loaded(tmp_path: Path, path: str) -> None:
    """Ctrl-C at lines spread over the whole load (fastkeys' loader, PEFT and diffusers code it
    calls): the model is as it was, or, past the end of the load, as the loop leaves it."""
    first = lora_file("sd3", tmp_path / "first", 1)
    directory = lora_file("sd3", tmp_path / "x", 2, target_modules=["to_q", "to_out.0"])
    if path == "diffusers":
        directory = _old_layout(directory)
    loaded = adapted_state(diffusers_loop("sd3", {"first": first, "x": directory}, prefix=None))
    start = adapted_state(diffusers_loop("sd3", {"first": first}, prefix=None))

    def load(model: Any) -> Any:
        return fastkeys.diffusers.load_adapters(model, {"x": directory}, prefix=None)

    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    total = warm_line_count(
        lambda: load(model), lambda: load(diffusers_loop("sd3", {"first": first}, prefix=None)), TRACED_HERE
    )
    interrupted = 0
    for point in spread(total, 12):
        model = diffusers_loop("sd3", {"first": first}, prefix=None)
        try:
            traced_lines(functools.partial(load, model), point, TRACED_HERE)
        except KeyboardInterrupt:
            interrupted += 1
        assert_same_state(loaded if "x" in model.peft_config else start, adapted_state(model))
    assert interrupted >= 10, (interrupted, total)


def test_hostile_paths_are_refused_before_anything_is_read(tmp_path: Path) -> None:
    first = lora_file("sd3", tmp_path / "first", 1)
    model = diffusers_loop("sd3", {"first": first}, prefix=None)
    before = adapted_state(model)
    outside = lora_file("sd3", tmp_path / "outside", 2)
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(outside / DIFFUSERS_FILE, linked / DIFFUSERS_FILE)
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        fastkeys.diffusers.load_adapters(model, {"x": linked}, prefix=None)
    # a directory elsewhere, reached through weight_name; its file is not even opened (a header
    # read would fail on these bytes with another error)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / DIFFUSERS_FILE).write_bytes(b"\xff" * 64)
    os.symlink(elsewhere, linked / "sub")
    for weight_name in (
        f"sub/{DIFFUSERS_FILE}",
        f"../elsewhere/{DIFFUSERS_FILE}",
        str(elsewhere / DIFFUSERS_FILE),
    ):
        with pytest.raises(ValueError, match="outside the checkpoint directory"):
            fastkeys.diffusers.load_adapters(model, {"x": linked}, prefix=None, weight_name=weight_name)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / DIFFUSERS_FILE)
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors file"):
        fastkeys.diffusers.load_adapters(model, {"x": fifo}, prefix=None)
    with pytest.raises(FileNotFoundError, match=r"weight_name='other\.safetensors'"):
        fastkeys.diffusers.load_adapters(model, {"x": outside}, prefix=None, weight_name="other.safetensors")
    bad = lora_file("sd3", tmp_path / "bad", 3)
    rewrite_file(bad, lambda t: None, {"lora_adapter_metadata": '{"r": 2, "nope": 1}'})
    with pytest.raises(ValueError, match="its LoRA config is not one PEFT accepts"):
        fastkeys.diffusers.load_adapters(model, {"x": bad}, prefix=None)
    rewrite_file(bad, lambda t: None, {"lora_adapter_metadata": "[1, 2"})
    with pytest.raises(ValueError, match="lora_adapter_metadata is not JSON"):
        fastkeys.diffusers.load_adapters(model, {"x": bad}, prefix=None)
    assert_same_state(before, adapted_state(model))


def test_models_that_are_not_diffusers_models_are_refused(tmp_path: Path) -> None:
    directory = lora_file("sd3", tmp_path / "x", 2)
    with pytest.raises(TypeError, match="not Linear"):
        fastkeys.diffusers.load_adapters(torch.nn.Linear(2, 2), {"x": directory})
    with pytest.raises(TypeError, match="adapters must map adapter names"):
        fastkeys.diffusers.load_adapters(tiny_sd3_transformer(), [directory])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prefix must be a str or None"):
        fastkeys.diffusers.load_adapters(tiny_sd3_transformer(), {"x": directory}, prefix=1)  # type: ignore[arg-type]
