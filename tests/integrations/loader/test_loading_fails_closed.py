"""fastkeys.peft's loader fails closed: exact as PEFT's loop, or PEFT's own loader with the reason,
and every load all or nothing (issue 16). Differential against PEFT's loop on tiny real models."""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, cast

import peft
import pytest
import torch

import fastkeys
import fastkeys.peft
from fastkeys.integrations.loader import boundary, policy
from fixtures.loading import (
    QV,
    adapter,
    assert_same_state,
    assert_untouched,
    both_loops,
    end_state,
    rewrite,
    spread,
    traced_lines,
    with_first,
)
from fixtures.peft_models import save_seeded_adapter, tiny_llama

CHILD_SECONDS = 600  # the hostile module takes well under a minute
CHILD_MEMORY = 6 << 30  # bytes of address space: torch needs about 4 GiB just to import

# every load reads its checkpoint and renames its keys on the engine: both implementations
pytestmark = pytest.mark.engine


@pytest.fixture
def first(tmp_path: Path) -> Path:
    return save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "first")


# ---------------------------------------------------------------------------------------------
# 1. The allow-list: fields, versions, options.


def test_every_field_of_this_peft_is_on_the_allow_list() -> None:
    """A new LoraConfig field must be looked at (and verified) before the fast path takes it."""
    fields = {field.name for field in dataclasses.fields(peft.LoraConfig)}
    assert fields <= set(policy.ALLOWED), fields - set(policy.ALLOWED)


def test_a_config_field_the_fast_path_does_not_know_goes_to_peft(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dataclasses.dataclass
    class NewLoraConfig(peft.LoraConfig):
        shiny_new_option: bool = False

    monkeypatch.setitem(boundary.CONFIG_MAPPING, peft.PeftType.LORA, NewLoraConfig)
    model = with_first(first)
    result = fastkeys.peft.load_adapter(model, adapter(tmp_path, "x"), "x")
    assert result.loader == "peft"
    assert result.reason == "NewLoraConfig.shiny_new_option is not a field the fast path was verified with"


@pytest.mark.parametrize(
    ("library", "version", "reason"),
    [
        ("peft", "0.99.0", "PEFT 0.99.0 is not a version the fast path was verified on (0.21.2)"),
        ("peft", "0.21.2+fork", "PEFT 0.21.2+fork is not a version the fast path was verified on (0.21.2)"),
        ("torch", "2.99.1+cpu", "torch 2.99.1 is not a version the fast path was verified on (2.15)"),
    ],
)
def test_an_unverified_version_goes_to_peft(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch, library: str, version: str, reason: str
) -> None:
    monkeypatch.setattr(sys.modules[library], "__version__", version)
    expected, actual, results = both_loops(tiny_llama, first, {"x": adapter(tmp_path, "x")}, tmp_path)
    assert (results["x"].loader, results["x"].reason) == ("peft", reason)
    assert_same_state(end_state(expected), end_state(actual))


def test_a_private_peft_symbol_gone_sends_loads_to_peft(
    tmp_path: Path, first: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(boundary, "MISSING", ["LoraModel._create_and_replace"])
    result = fastkeys.peft.load_adapter(with_first(first), adapter(tmp_path, "x"), "x")
    assert (result.loader, result.reason) == ("peft", "this PEFT has no LoraModel._create_and_replace")


def test_torch_device_is_peft_s(tmp_path: Path, first: Path) -> None:
    """PEFT raises for the meta device: so does fastkeys (PEFT's own error), and nothing changes."""
    directory = adapter(tmp_path, "x")
    reference = with_first(first)
    with pytest.raises(Exception) as peft_error:
        reference.load_adapter(directory, "x", torch_device="meta")
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(type(peft_error.value)):
        fastkeys.peft.load_adapter(model, directory, "x", torch_device="meta")
    assert_same_state(before, end_state(model))
    result = fastkeys.peft.load_adapter(model, directory, "y", torch_device="cpu")
    assert result.loader == "peft" and result.reason == "torch_device='cpu' is honoured by PEFT's loader"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_cpu_mem_usage_exact_or_routed(tmp_path: Path, first: Path, dtype: torch.dtype) -> None:
    def factory() -> Any:
        return tiny_llama().to(dtype)

    adapters = {"x": adapter(tmp_path, "x", dtype=torch.float32)}
    expected, actual, results = both_loops(factory, first, adapters, tmp_path, low_cpu_mem_usage=True)
    assert_same_state(end_state(expected), end_state(actual))
    if dtype == torch.float32:
        assert results["x"].loader == "fastkeys"
    else:
        assert results["x"].loader == "peft"
        assert "low_cpu_mem_usage=True rounds adapter weights" in (results["x"].reason or "")


SWAPS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # case: (how the second checkpoint is saved, options of the swap, loader expected)
    "same shape": ({}, {}, "fastkeys"),
    "trainable": ({}, {"is_trainable": True}, "fastkeys"),
    "bf16 checkpoint": ({"dtype": torch.bfloat16}, {}, "fastkeys"),
    "active adapter": ({}, {"active": True}, "fastkeys"),
    "model in train mode": ({}, {"train": True}, "fastkeys"),
    "a tensor missing": ({"drop": True}, {}, "peft"),
    "low_cpu_mem_usage": ({}, {"low_cpu_mem_usage": True}, "peft"),
}


@pytest.mark.parametrize("case", list(SWAPS))
def test_loading_over_an_existing_name_swaps_its_weights_as_peft_does(
    tmp_path: Path, first: Path, case: str
) -> None:
    """PEFT's load_adapter over an existing name copies the checkpoint into that adapter's
    parameters (a hot swap); fastkeys does it at the adapter's cost where that is the same state."""
    saving, options, loader = SWAPS[case]
    one = adapter(tmp_path, "one", seed=1)
    two = adapter(tmp_path, "two", seed=2, dtype=saving.get("dtype"))
    if saving.get("drop"):
        rewrite(two, lambda tensors: tensors.pop(next(iter(sorted(tensors)))))
    active, train = options.pop("active", False), options.pop("train", False)
    models = []
    for who in ("peft", "fastkeys"):
        model = with_first(first)
        model.load_adapter(one, "x")
        if active:
            model.set_adapter("x")
        if train:
            model.train()
        if who == "peft":
            model.load_adapter(two, "x", **options)
        else:
            result = fastkeys.peft.load_adapter(model, two, "x", **options)
            assert result.loader == loader, result
            assert (result.reason is None) == (loader == "fastkeys"), result
            assert len(result.missing_keys) == (1 if saving.get("drop") else 0), result
            assert result.base_weights_written == []
        models.append(model)
    assert_same_state(end_state(models[0]), end_state(models[1]))


def test_a_swap_that_does_not_fit_is_peft_s_error_and_changes_nothing(tmp_path: Path, first: Path) -> None:
    model = with_first(first)
    model.load_adapter(adapter(tmp_path, "one", seed=1), "x")
    before = end_state(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fastkeys.peft.load_adapter(model, adapter(tmp_path, "wide", seed=2, r=8), "x")
    assert_same_state(before, end_state(model))


def test_a_module_peft_wraps_is_no_base_weight_written(tmp_path: Path, first: Path) -> None:
    """On PEFT's path, a module wrapped for the first time keeps its weight (under `base_layer`):
    nothing of the base model was written."""
    model = with_first(first)
    directory = adapter(tmp_path, "k", target_modules=["q_proj", "k_proj"])
    result = fastkeys.peft.load_adapter(model, directory, "k", torch_device="cpu")
    assert result.loader == "peft" and result.base_weights_written == []


def test_no_random_numbers_are_drawn_before_a_load_is_routed(tmp_path: Path, first: Path) -> None:
    """A checkpoint that lacks a tensor goes to PEFT after the fast path began; under the same seed
    the lost tensor is initialised as PEFT's loop initialises it."""
    directory = adapter(tmp_path, "lost", target_modules=["q_proj", "up_proj"])
    rewrite(directory, lambda t: t.pop("base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"))
    expected = with_first(first)
    torch.manual_seed(123)
    expected.load_adapter(directory, "lost")
    actual = with_first(first)
    torch.manual_seed(123)
    result = fastkeys.peft.load_adapter(actual, directory, "lost")
    assert result.loader == "peft" and "lacks 1 of the adapter's tensors" in (result.reason or "")
    assert_same_state(end_state(expected), end_state(actual))


# ---------------------------------------------------------------------------------------------
# 2. An index that cannot go stale or leak.


def _insert(model: Any) -> None:
    torch.manual_seed(3)
    layers = model.base_model.model.model.layers
    layers.insert(1, type(layers[0])(model.base_model.model.config, layer_idx=1))


def _append(model: Any) -> None:
    torch.manual_seed(3)
    layers = model.base_model.model.model.layers
    layers.append(type(layers[0])(model.base_model.model.config, layer_idx=2))


def _behind_torch(model: Any) -> None:
    torch.manual_seed(4)
    model.base_model.model.model.layers[1].mlp._modules["up_proj"] = torch.nn.Linear(32, 64)


def _new_parameter(model: Any) -> None:
    model.base_model.model.model.norm.register_parameter("scale", torch.nn.Parameter(torch.ones(32)))


def _new_buffer(model: Any) -> None:
    model.base_model.model.model.norm.register_buffer("scale", torch.ones(32))


def _setattr_module(model: Any) -> None:
    torch.manual_seed(5)
    model.base_model.model.model.layers[0].mlp.extra_proj = torch.nn.Linear(32, 32)


def _delattr_module(model: Any) -> None:
    del model.base_model.model.model.layers[1].mlp.up_proj


def _pop(model: Any) -> None:
    model.base_model.model.model.layers.pop(1)


MUTATIONS = [
    _insert,
    _append,
    _behind_torch,
    _new_parameter,
    _new_buffer,
    _setattr_module,
    _delattr_module,
    _pop,
]


@pytest.mark.parametrize("mutate", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
def test_the_model_may_change_between_loads(tmp_path: Path, first: Path, mutate: Any) -> None:
    """Public torch mutations between two loads: the second load ends as PEFT's loop ends (names
    like `scale` included: a segment of the model's parameter names then)."""
    before = adapter(tmp_path, "before", seed=1, target_modules=["q_proj", "up_proj", "extra_proj"])
    after = adapter(tmp_path, "after", seed=2, target_modules=["q_proj", "up_proj", "extra_proj"])
    models = []
    for loader in ("peft", "fastkeys"):
        model = with_first(first)
        for name, directory in (("before", before), ("after", after), ("scale", after)):
            if loader == "peft":
                model.load_adapter(directory, name)
            else:
                fastkeys.peft.load_adapter(model, directory, name)
            if name == "before":
                mutate(model)
        models.append(model)
    assert_same_state(end_state(models[0]), end_state(models[1]))


@pytest.mark.parametrize("where", ["module", "base_layer", "override"])
def test_load_state_dict_hooks_send_the_load_to_peft(tmp_path: Path, first: Path, where: str) -> None:
    """PEFT's load_state_dict runs a module's load_state_dict hooks (and its own
    `_load_from_state_dict`) on the adapter's keys; the fast path would not, so it steps aside."""
    second = adapter(tmp_path, "second", seed=2)

    def halve(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        for key in [key for key in state_dict if key.startswith(prefix) and ".lora_B." in key]:
            state_dict[key] = state_dict[key] / 2

    class Halving(torch.nn.Module):
        def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
            halve(self, state_dict, prefix)
            super()._load_from_state_dict(state_dict, prefix, *args)

    models = []
    for loader in ("peft", "fastkeys"):
        model = with_first(first)
        layer = model.base_model.model.model.layers[0]
        if where == "module":
            layer.self_attn.register_load_state_dict_pre_hook(halve)
        elif where == "base_layer":
            layer.self_attn.q_proj.base_layer.register_load_state_dict_pre_hook(halve)
        else:
            layer.__class__ = type("HalvingLayer", (type(layer), Halving), {})
        if loader == "peft":
            model.load_adapter(second, "second")
        else:
            result = fastkeys.peft.load_adapter(model, second, "second")
            assert result.loader == "peft" and "load_state_dict hook" in (result.reason or ""), result
        models.append(model)
    assert_same_state(end_state(models[0]), end_state(models[1]))


def test_no_process_wide_hook_and_nothing_outlives_the_model(tmp_path: Path, first: Path) -> None:
    registration = torch.nn.modules.module._global_module_registration_hooks
    hooks_before = dict(registration)
    model = with_first(first)
    model.base_model.model.model.layers[0].back_to_root = [model]  # a cycle through the root
    fastkeys.peft.load_adapters(model, {"a": adapter(tmp_path, "a"), "b": adapter(tmp_path, "b", seed=2)})
    assert dict(registration) == hooks_before
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------------------------------------
# 4. All or nothing; base weights. (Hostile checkpoints: hostile_loading.py, in a child.)


def test_hostile_checkpoints_in_a_child_with_time_and_memory_limits() -> None:
    """hostile_loading.py (checkpoints that write base weights, blow up inside PEFT, swap a
    shard for a FIFO, link out of the directory, ...) runs in a child pytest with a time limit and
    an address-space cap, so a hang or a runaway allocation fails instead of stalling the suite."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (CHILD_MEMORY, CHILD_MEMORY))

    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/integrations/loader/hostile_loading.py",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=CHILD_SECONDS,
        preexec_fn=limit,
        env={**os.environ, "FASTKEYS_IMPLEMENTATION": fastkeys.IMPLEMENTATION},
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


def test_a_failure_after_torch_copied_a_base_weight_restores_its_values(tmp_path: Path, first: Path) -> None:
    """An allowed base weight (an embedding) is copied, then a bad tensor fails the load: the
    embedding's values come back."""
    directory = adapter(tmp_path, "bad")
    rewrite(
        directory,
        lambda t: t.update(
            {
                "base_model.model.model.embed_tokens.weight": torch.zeros(64, 32),
                "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight": torch.zeros(4, 31),
            }
        ),
    )
    model = with_first(first)
    before = end_state(model)
    with pytest.raises(RuntimeError, match="size mismatch"):
        fastkeys.peft.load_adapter(model, directory, "bad")
    assert_untouched(model, before, "bad")


def test_save_embedding_layers_checkpoints_load_and_say_so(tmp_path: Path) -> None:
    """PEFT's legitimate base weights: a resized vocabulary's embeddings, saved with the adapter."""
    torch.manual_seed(7)
    base = tiny_llama(resized=True)
    trained: Any = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=QV), adapter_name="emb")
    with torch.no_grad():
        trained.base_model.model.model.embed_tokens.weight.add_(1.0)
    trained.save_pretrained(str(tmp_path / "emb"), save_embedding_layers=True)
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=QV), tmp_path / "first")
    expected = peft.PeftModel.from_pretrained(tiny_llama(resized=True), first, "first")
    expected.load_adapter(tmp_path / "emb" / "emb", "emb")
    actual = peft.PeftModel.from_pretrained(tiny_llama(resized=True), first, "first")
    result = fastkeys.peft.load_adapter(actual, tmp_path / "emb" / "emb", "emb")
    assert result.loader == "peft"
    assert "model.embed_tokens.weight" in result.base_weights_written
    assert_same_state(end_state(expected), end_state(actual))


# ---------------------------------------------------------------------------------------------
# 5. Containment on every entry point; reads through what was checked.


# ---------------------------------------------------------------------------------------------
# 4. Interruptions: a KeyboardInterrupt at points spread over a whole load.


@pytest.mark.parametrize("path", ["fastkeys", "peft", "swap"])
def test_an_interrupted_load_leaves_the_model_as_it_was_or_loaded(
    tmp_path: Path, first: Path, path: str
) -> None:
    """KeyboardInterrupt at 24 points spread over every traced line of a whole load (fastkeys' loader
    and PEFT's code): it stays a KeyboardInterrupt, and the model is as it was or as loaded."""
    extra: dict[str, Any] = (
        {"target_modules": ["q_proj", "k_proj"], "bias": "lora_only"} if path == "peft" else {}
    )
    directory = adapter(tmp_path, "x", **extra)
    swapped = adapter(tmp_path, "swapped", seed=5) if path == "swap" else None

    def start() -> Any:
        model = with_first(first)
        if swapped is not None:  # the load replaces the values of an adapter loaded before
            fastkeys.peft.load_adapter(model, swapped, "x")
        return model

    loaded = start()
    assert fastkeys.peft.load_adapter(loaded, directory, "x").loader == (
        "fastkeys" if path == "swap" else path
    )
    after = end_state(loaded)
    fresh = start()
    total, _fired = traced_lines(lambda: fastkeys.peft.load_adapter(fresh, directory, "x"))
    points = spread(total, 24)
    interrupted = 0
    for point in points:
        model = start()
        before = end_state(model)
        try:
            traced_lines(lambda model=model: fastkeys.peft.load_adapter(model, directory, "x"), point)  # type: ignore[misc]
        except KeyboardInterrupt:
            interrupted += 1
        state = end_state(model)
        done = "x" in model.peft_config if swapped is None else not torch.equal(*_first_a(before, state))
        assert_same_state(after if done else before, state)
    assert interrupted >= len(points) - 1, (interrupted, points, total)


def _first_a(*states: dict[str, Any]) -> list[torch.Tensor]:
    key = next(key for key in states[0]["state_dict"] if ".lora_A.x." in key)
    return [state["state_dict"][key][2] for state in states]


def test_from_pretrained_reads_a_local_subfolder_as_peft_does(tmp_path: Path) -> None:
    inner = adapter(tmp_path / "repo", "inner")
    expected = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "repo"), subfolder="inner")
    actual = fastkeys.peft.from_pretrained(tiny_llama(), str(tmp_path / "repo"), subfolder="inner")
    assert inner.is_dir()
    assert_same_state(end_state(expected), end_state(actual))
    with pytest.raises(TypeError, match="subfolder must be a str, not int"):
        fastkeys.peft.from_pretrained(tiny_llama(), str(tmp_path / "repo"), subfolder=cast(Any, 3))
