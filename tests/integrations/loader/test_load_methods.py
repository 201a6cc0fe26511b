"""The fast path for LoHa, LoKr and IA3 against PEFT's own `load_adapter` loop, on real tiny models.

Every end state is compared with the one PEFT produces, as in test_load_adapters.py (state_dict
keys, values bitwise, dtypes, devices; module names and types; requires_grad; training flags;
peft_config; active adapters; targeted_module_names; outputs with each adapter active), plus every
tuner layer's own per-adapter bookkeeping (`r`, `alpha`, `scaling`, the dropouts, IA3's
`is_feedforward`, ...). Configs are generated per method with its options; checkpoints are saved in
fp32, fp16 and bf16, in 1-3 shards; both `is_trainable` values; a Llama and a BERT. Every load after
the first of a family must take the fast path. Both engines run this module (`engine` marker).
FASTKEYS_FULL=1 adds a longer generated sweep.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

import fastkeys.peft
from fastkeys.integrations.loader import boundary, methods
from fixtures.loading import (
    assert_same_outputs,
    assert_same_state,
    both_loops,
    edit_config,
    end_state,
    layer_state,
    rewrite,
    spread,
    traced_lines,
)
from fixtures.peft_models import save_seeded_adapter, tiny_bert, tiny_llama

pytestmark = pytest.mark.engine  # checkpoint scans, key renaming and expressions run on the engine: both

FULL = os.environ.get("FASTKEYS_FULL") == "1"

LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_MODULES = ["query", "key", "value", "dense"]
# IA3: a layer keeps the feedforward flag of its first adapter, so every adapter of a sweep agrees
# on which modules are feedforward (PEFT's own loop fails otherwise: see the test below)
FEEDFORWARD = {"llama": {"gate_proj", "up_proj", "down_proj"}, "bert": {"dense"}}
ARCHITECTURES: dict[str, tuple[Callable[[], Any], list[str], str]] = {
    "llama": (tiny_llama, LLAMA_MODULES, "layers"),
    "bert": (tiny_bert, BERT_MODULES, "layer"),
}
INPUTS = torch.tensor([[1, 5, 9, 2, 7]])


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(end_state(expected), end_state(actual))
    assert layer_state(actual) == layer_state(expected)
    assert_same_outputs(expected, actual, INPUTS)


# ---------------------------------------------------------------------------------------------
# Generated configs, one generator per method.


def _selection(rng: random.Random, modules: list[str], layers_pattern: str) -> dict[str, Any]:
    chosen = rng.sample(modules, rng.randint(1, len(modules)))
    kwargs: dict[str, Any] = {"target_modules": chosen}
    if rng.random() < 0.25:
        kwargs["target_modules"] = r".*\.(" + "|".join(chosen) + ")"
    elif rng.random() < 0.2:
        kwargs["layers_to_transform"] = [rng.randint(0, 1)]
        kwargs["layers_pattern"] = layers_pattern
    elif rng.random() < 0.2 and len(chosen) > 1:
        kwargs["exclude_modules"] = [chosen[-1]]
    return kwargs


def _lycoris(rng: random.Random, modules: list[str], layers_pattern: str) -> dict[str, Any]:
    kwargs = _selection(rng, modules, layers_pattern)
    kwargs.update(
        r=rng.choice([1, 2, 4, 8, 16]),
        alpha=rng.choice([1, 8, 16, 3]),
        rank_dropout=rng.choice([0.0, 0.0, 0.1]),
        module_dropout=rng.choice([0.0, 0.0, 0.1]),
        use_effective_conv2d=rng.random() < 0.3,
    )
    first = kwargs["target_modules"]
    if isinstance(first, list) and rng.random() < 0.3:
        kwargs["rank_pattern"] = {first[0]: rng.choice([2, 3])}
    if isinstance(first, list) and rng.random() < 0.3:
        kwargs["alpha_pattern"] = {first[-1]: rng.choice([5, 7])}
    return kwargs


def loha_config(rng: random.Random, modules: list[str], layers_pattern: str, _architecture: str) -> Any:
    kwargs = _lycoris(rng, modules, layers_pattern)
    return peft.LoHaConfig(init_weights=rng.choice([True, False]), **kwargs)


def lokr_config(rng: random.Random, modules: list[str], layers_pattern: str, _architecture: str) -> Any:
    kwargs = _lycoris(rng, modules, layers_pattern)
    return peft.LoKrConfig(
        decompose_both=rng.random() < 0.4,
        decompose_factor=rng.choice([-1, -1, 2, 4, 8, 3]),
        rank_dropout_scale=rng.random() < 0.3,
        init_weights=rng.choice([True, False, "lycoris"]),
        **kwargs,
    )


def ia3_config(rng: random.Random, modules: list[str], _layers_pattern: str, architecture: str) -> Any:
    chosen = rng.sample(modules, rng.randint(1, len(modules)))
    feedforward = [module for module in chosen if module in FEEDFORWARD[architecture]]
    target: Any = chosen
    ff: Any = feedforward
    if rng.random() < 0.3:
        target = r".*\.(" + "|".join(chosen) + ")"
        ff = r".*\.(" + "|".join(feedforward) + ")" if feedforward else []
    exclude = [chosen[-1]] if isinstance(target, list) and len(chosen) > 1 and rng.random() < 0.2 else None
    if exclude and isinstance(ff, list):
        ff = [module for module in ff if module not in exclude] or []
        target = [module for module in target if module not in exclude] + exclude
    return peft.IA3Config(
        target_modules=target,
        feedforward_modules=ff,
        exclude_modules=exclude,
        init_ia3_weights=rng.choice([True, False]),
    )


def hra_config(rng: random.Random, modules: list[str], layers_pattern: str, _architecture: str) -> Any:
    return peft.HRAConfig(
        r=rng.choice([1, 2, 4, 8]),
        apply_GS=rng.random() < 0.4,
        init_weights=rng.choice([True, False]),
        **_selection(rng, modules, layers_pattern),
    )


def oft_config(rng: random.Random, modules: list[str], layers_pattern: str, _architecture: str) -> Any:
    by_rank = rng.random() < 0.4  # r x oft_block_size == in_features: one of them is given
    return peft.OFTConfig(
        r=rng.choice([2, 4, 8]) if by_rank else 0,
        oft_block_size=0 if by_rank else rng.choice([4, 8, 16]),
        module_dropout=rng.choice([0.0, 0.0, 0.1]),
        init_weights=rng.choice([True, False]),
        coft=rng.random() < 0.3,
        eps=rng.choice([6e-5, 1e-3]),
        block_share=rng.random() < 0.3,
        use_cayley_neumann=rng.random() < 0.7,
        num_cayley_neumann_terms=rng.choice([3, 5]),
        **_selection(rng, modules, layers_pattern),
    )


GENERATORS: dict[str, Callable[[random.Random, list[str], str, str], Any]] = {
    "loha": loha_config,
    "lokr": lokr_config,
    "ia3": ia3_config,
    "hra": hra_config,
    "oft": oft_config,
}
# Methods with a layout (entries built around the loaded tensors) and those whose every layer runs
# PEFT's own _create_and_replace
LAYOUTS = ["loha", "lokr", "ia3", "hra"]
PEFT_ROUTE = ["oft"]
# the default slice's main sweeps (FASTKEYS_FULL=1 sweeps every method as far)
MAIN = ["loha", "lokr", "ia3"]


def first_config(method: str, architecture: str) -> Any:
    modules = ARCHITECTURES[architecture][1]
    if method == "ia3":
        return peft.IA3Config(
            target_modules=modules[:2], feedforward_modules=[m for m in modules[:2] if m in FEEDFORWARD]
        )
    if method == "oft":
        return peft.OFTConfig(r=0, oft_block_size=8, target_modules=modules[:2])
    config_class = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "hra": peft.HRAConfig}[method]
    return config_class(r=4, target_modules=modules[:2])


def run_sweep(
    tmp_path: Path, method: str, architecture: str, seed: int, count: int, **options: Any
) -> dict[str, Any]:
    factory, modules, layers_pattern = ARCHITECTURES[architecture]
    rng = random.Random(seed)
    first = save_seeded_adapter(first_config(method, architecture), tmp_path / "first", factory)
    adapters: dict[str, Path] = {}
    for index in range(count):
        config = GENERATORS[method](rng, modules, layers_pattern, architecture)
        adapters[f"a{index}"] = save_seeded_adapter(
            config,
            tmp_path / f"a{index}",
            factory,
            seed=seed * 100 + index,
            dtype=rng.choice([None, None, torch.float16, torch.bfloat16]),
            shards=rng.choice([1, 2, 3]),
        )
    expected, actual, results = both_loops(factory, first, adapters, tmp_path, **options)
    assert_same(expected, actual)
    for name, result in results.items():
        assert (result.loader, result.reason) == ("fastkeys", None), (name, result)
        assert result.missing_keys == [] and result.unexpected_keys == []
    return results


# ---------------------------------------------------------------------------------------------
# Differential tests: the default slice.


@pytest.mark.parametrize("method", MAIN)
@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_generated_adapters_end_like_peft_loop(
    tmp_path: Path, method: str, architecture: str, is_trainable: bool
) -> None:
    seed = 11 + 7 * list(GENERATORS).index(method) + 3 * is_trainable + (architecture == "bert")
    run_sweep(tmp_path, method, architecture, seed=seed, count=3, is_trainable=is_trainable)


@pytest.mark.parametrize("method", ["hra", "oft"])
@pytest.mark.parametrize("architecture", ["llama", "bert"])
def test_hra_and_oft_end_like_peft_loop(tmp_path: Path, method: str, architecture: str) -> None:
    """HRA (a layout on Linear layers) and OFT (every layer through PEFT's own
    `_create_and_replace`)."""
    seed = 41 + 5 * (method == "oft") + (architecture == "bert")
    run_sweep(tmp_path, method, architecture, seed=seed, count=3, is_trainable=architecture == "bert")


def _half_llama() -> Any:
    return tiny_llama().to(torch.bfloat16)


@pytest.mark.parametrize("method", LAYOUTS + PEFT_ROUTE)
@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_models_cast_like_peft(tmp_path: Path, method: str, autocast: bool) -> None:
    """A bf16 model: PEFT upcasts the new adapter to fp32 (through ParameterDict, which leaves
    the parameters requiring grad even when the adapter is frozen) or keeps it in bf16."""
    rng = random.Random(3)
    first = save_seeded_adapter(first_config(method, "llama"), tmp_path / "first", _half_llama)
    adapters = {
        name: save_seeded_adapter(
            GENERATORS[method](rng, LLAMA_MODULES, "layers", "llama"),
            tmp_path / name,
            _half_llama,
            seed=seed,
            dtype=dtype,
        )
        for seed, (name, dtype) in enumerate({"fp32": torch.float32, "bf16": torch.bfloat16}.items())
    }
    expected, actual, results = both_loops(
        _half_llama, first, adapters, tmp_path, autocast_adapter_dtype=autocast
    )
    assert_same(expected, actual)
    assert {result.loader for result in results.values()} == {"fastkeys"}
    dtypes = {value[0] for key, value in end_state(actual)["state_dict"].items() if ".fp32" in key}
    assert dtypes == ({torch.float32} if autocast else {torch.bfloat16})


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
def test_an_interrupted_load_leaves_the_model_as_it_was_or_loaded(tmp_path: Path, method: str) -> None:
    """KeyboardInterrupt at points spread over a whole fast load (layers built around the loaded
    tensors and a module wrapped by PEFT's own code): the model is as it was, or as loaded."""

    config = first_config(method, "llama")
    first = save_seeded_adapter(config, tmp_path / "first")
    wider = GENERATORS[method](random.Random(5), LLAMA_MODULES, "layers", "llama")
    wider.target_modules = ["q_proj", "o_proj"]  # q_proj holds the method already, o_proj not
    if method == "ia3":
        wider.feedforward_modules = set()
    directory = save_seeded_adapter(wider, tmp_path / "x", seed=9)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    assert fastkeys.peft.load_adapter(loaded, directory, "x").loader == "fastkeys"
    after = end_state(loaded)
    fresh = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    total, _fired = traced_lines(lambda: fastkeys.peft.load_adapter(fresh, directory, "x"))
    points = spread(total, 8)
    interrupted = 0
    for point in points:
        model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
        before = end_state(model)
        try:
            traced_lines(lambda model=model: fastkeys.peft.load_adapter(model, directory, "x"), point)  # type: ignore[misc]
        except KeyboardInterrupt:
            interrupted += 1
        assert_same_state(after if "x" in model.peft_config else before, end_state(model))
        for module in model.modules():
            if isinstance(module, boundary.BaseTunerLayer):
                for attribute in (*module.adapter_layer_names, *module.other_param_names):
                    assert set(getattr(module, attribute, {})) <= set(model.peft_config), attribute
    assert total > 200 and interrupted >= len(points) - 1, (total, interrupted)


def conv_config(method: str, rng: random.Random) -> Any:
    if method == "ia3":
        chosen = rng.sample(["conv1", "conv2", "lin"], rng.randint(1, 3))
        return peft.IA3Config(target_modules=chosen, feedforward_modules=[m for m in chosen if m == "lin"])
    config_class = peft.LoHaConfig if method == "loha" else peft.LoKrConfig
    kwargs: dict[str, Any] = {"decompose_both": rng.random() < 0.5} if method == "lokr" else {}
    return config_class(
        r=rng.choice([1, 2, 4]),
        alpha=rng.choice([2, 8]),
        use_effective_conv2d=rng.random() < 0.5,
        target_modules=rng.sample(["conv1", "conv2", "seq", "lin"], rng.randint(1, 4)),
        **kwargs,
    )


def assert_same_conv_outputs(expected: Any, actual: Any) -> None:
    """Outputs with each adapter active, or the same error (PEFT 0.21.2's LoKr forward fails on
    some convolution layouts, in its own loop's model too)."""
    inputs = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    for name in expected.peft_config:
        outcomes = []
        for model in (expected, actual):
            model.set_adapter(name)
            try:
                with torch.no_grad():
                    outcomes.append(model(inputs))
            except RuntimeError as error:
                outcomes.append(str(error))
        if isinstance(outcomes[0], str):
            assert outcomes[1] == outcomes[0], name
        else:
            assert isinstance(outcomes[1], torch.Tensor) and torch.equal(outcomes[0], outcomes[1]), name


@pytest.mark.parametrize("method", ["loha", "lokr", "ia3"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_convolutions_end_like_peft_loop(tmp_path: Path, method: str, is_trainable: bool) -> None:
    """Conv1d/Conv2d layers (kernel 1 and 3, use_effective_conv2d) go through PEFT's own
    `_create_and_replace` on the existing layer, without its O(adapters) passes."""
    rng = random.Random(17 + is_trainable)
    first = save_seeded_adapter(conv_config(method, rng), tmp_path / "first", conv_net)
    adapters = {
        f"c{index}": save_seeded_adapter(
            conv_config(method, rng),
            tmp_path / f"c{index}",
            conv_net,
            seed=index,
            dtype=rng.choice([None, torch.float16, torch.bfloat16]),
        )
        for index in range(1, 5)
    }
    expected, actual, results = both_loops(conv_net, first, adapters, tmp_path, is_trainable=is_trainable)
    assert_same_state(end_state(expected), end_state(actual))
    assert layer_state(actual) == layer_state(expected)
    assert_same_conv_outputs(expected, actual)
    assert {(result.loader, result.reason) for result in results.values()} == {("fastkeys", None)}


@pytest.mark.parametrize("method", LAYOUTS)
def test_peft_s_own_update_route_ends_like_the_layouts(
    tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the method's layout switched off, every existing layer goes through PEFT's own
    `_create_and_replace` (the route of a method without a layout): the same end state as PEFT's
    loop, and as the layouts give."""
    record = methods.METHODS[getattr(peft.PeftType, method.upper())]
    monkeypatch.setitem(methods.METHODS, record.peft_type, record._replace(layout=None))
    run_sweep(tmp_path, method, "llama", seed=31, count=3, is_trainable=False)


# ---------------------------------------------------------------------------------------------
# Failing closed: what the fast path leaves to PEFT, and says so.


@pytest.mark.parametrize(
    "config_class", [peft.LoHaConfig, peft.LoKrConfig, peft.IA3Config, peft.HRAConfig, peft.OFTConfig]
)
def test_every_field_of_this_peft_is_on_the_method_s_allow_list(config_class: Any) -> None:
    method = next(method for method in methods.METHODS.values() if method.config is config_class)
    fields = {field.name for field in dataclasses.fields(config_class)}
    assert fields == set(method.allowed), fields ^ set(method.allowed)


def test_a_config_field_the_fast_path_does_not_know_goes_to_peft(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @dataclasses.dataclass
    class NewLoKrConfig(peft.LoKrConfig):
        shiny_new_option: bool = False

    first = save_seeded_adapter(peft.LoKrConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(peft.LoKrConfig(r=2, target_modules=["q_proj"]), tmp_path / "x", seed=1)
    monkeypatch.setitem(boundary.CONFIG_MAPPING, peft.PeftType.LOKR, NewLoKrConfig)
    model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    result = fastkeys.peft.load_adapter(model, directory, "x")
    assert (result.loader, result.reason) == (
        "peft",
        "NewLoKrConfig.shiny_new_option is not a field the fast path was verified with",
    )


class ConvNet(nn.Module):
    """Convolutions of both kinds (3x3, 1x1, 1-d) and a Linear: every base layer type the fast path
    takes for LoHa and LoKr (IA3: Conv2d and Linear), on layers PEFT's own code updates."""

    def __init__(self, linear: type[nn.Linear] = nn.Linear) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.seq = nn.Conv1d(8, 8, 3)
        self.lin = linear(8, 8)

    def forward(self, x: torch.Tensor) -> Any:
        hidden = self.conv2(self.conv1(x)).mean(-1)
        return self.lin(self.seq(hidden).mean(-1))


def conv_net() -> Any:
    torch.manual_seed(0)
    return ConvNet()


class OwnLinear(nn.Linear):
    """A subclass may behave differently: not a base type the fast path was verified on."""


def own_linear_net() -> Any:
    torch.manual_seed(0)
    return ConvNet(OwnLinear)


@pytest.mark.parametrize(
    ("name", "make", "factory", "options", "reason"),
    [
        (
            "saved",
            lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            tiny_llama,
            {},
            "modules_to_save and trainable tokens are handled by PEFT's auxiliary wrappers",
        ),
        (
            "lowmem",
            lambda: peft.LoKrConfig(r=4, target_modules=["q_proj"]),
            tiny_llama,
            {"low_cpu_mem_usage": True},
            "low_cpu_mem_usage=True assigns the checkpoint's tensors; not verified for LoKr",
        ),
        (
            "noff",  # PEFT fills feedforward_modules in from the model type
            lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            tiny_llama,
            {},
            "feedforward_modules=None is not on the fast path's list (it takes an expression or names)",
        ),
        (
            "own",
            lambda: peft.LoHaConfig(r=2, target_modules=["conv1", "lin"]),
            own_linear_net,
            {},
            "LoHa on a OwnLinear (lin) is not verified",
        ),
    ],
)
def test_what_the_fast_path_leaves_to_peft_ends_like_peft(
    tmp_path: Path, name: str, make: Callable[[], Any], factory: Any, options: dict[str, Any], reason: str
) -> None:
    first_config = make()
    first_config.modules_to_save = None
    first = save_seeded_adapter(first_config, tmp_path / "first", factory)
    directory = save_seeded_adapter(make(), tmp_path / name, factory, seed=2)
    if name == "noff":
        edit_config(directory, feedforward_modules=None)
    expected, actual, results = both_loops(factory, first, {name: directory}, tmp_path, **options)
    assert_same_state(end_state(expected), end_state(actual))
    assert layer_state(actual) == layer_state(expected)
    assert (results[name].loader, results[name].reason) == ("peft", reason)


@pytest.mark.parametrize("name", ["training", "bfloat16"])
def test_names_torch_s_containers_refuse_fail_as_in_peft(tmp_path: Path, name: str) -> None:
    """An adapter named like an attribute of torch's ParameterDict: PEFT's loop fails (torch refuses
    the name); the load goes to PEFT's loader, fails the same way, and leaves nothing behind."""
    first = save_seeded_adapter(peft.LoHaConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(peft.LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "x", seed=1)
    reference = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    with pytest.raises((TypeError, KeyError)) as theirs:
        reference.load_adapter(directory, name)
    model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    before = end_state(model)
    with pytest.raises(type(theirs.value)) as ours:
        fastkeys.peft.load_adapter(model, directory, name)
    assert str(ours.value) == str(theirs.value)
    assert_same_state(before, end_state(model))
    assert layer_state(model) == layer_state(peft.PeftModel.from_pretrained(tiny_llama(), first, "first"))


def test_another_method_into_the_model_fails_as_peft_fails(tmp_path: Path) -> None:
    """A LoKr adapter into a LoHa model: PEFT's loader runs (the tuner is not LoKr's) and raises
    its own error; nothing changes."""
    first = save_seeded_adapter(peft.LoHaConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(peft.LoKrConfig(r=4, target_modules=["q_proj"]), tmp_path / "x", seed=1)
    reference = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    with pytest.raises(ValueError, match="Cannot combine adapters with different peft types") as theirs:
        reference.load_adapter(directory, "x")
    model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    before = end_state(model)
    with pytest.raises(ValueError) as ours:
        fastkeys.peft.load_adapter(model, directory, "x")
    assert str(ours.value) == str(theirs.value)
    assert_same_state(before, end_state(model))


def test_an_ia3_layer_keeps_the_feedforward_flag_of_its_first_adapter(tmp_path: Path) -> None:
    """PEFT's IA3 layer reads `is_feedforward` once: a later adapter that calls the module
    feedforward fails to load in PEFT's loop (a shape mismatch); fastkeys refuses it before
    anything changes, naming the tensor."""
    first = save_seeded_adapter(
        peft.IA3Config(target_modules=["down_proj"], feedforward_modules=[]), tmp_path / "first"
    )
    directory = save_seeded_adapter(
        peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
        tmp_path / "ff",
        seed=1,
    )
    reference = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    with pytest.raises(RuntimeError, match="size mismatch"):
        reference.load_adapter(directory, "ff")
    model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    before = end_state(model)
    with pytest.raises(
        ValueError, match=r"down_proj\.ia3_l' has shape \[1, 64\], but adapter 'ff' needs \[32, 1\]"
    ):
        fastkeys.peft.load_adapter(model, directory, "ff")
    assert_same_state(before, end_state(model))


def test_an_incomplete_checkpoint_goes_through_peft_with_the_missing_keys(tmp_path: Path) -> None:
    config = peft.LoKrConfig(r=2, target_modules=["q_proj", "up_proj"])
    first = save_seeded_adapter(peft.LoKrConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(config, tmp_path / "lost", seed=1)
    lost = "base_model.model.model.layers.1.mlp.up_proj.lokr_w1"
    rewrite(directory, lambda tensors: tensors.pop(lost))
    expected = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    torch.manual_seed(5)
    expected.load_adapter(directory, "lost")
    actual = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    torch.manual_seed(5)
    result = fastkeys.peft.load_adapter(actual, directory, "lost")
    assert result.loader == "peft" and "lacks 1 of the adapter's tensors" in (result.reason or "")
    assert result.missing_keys == ["base_model.model.model.layers.1.mlp.up_proj.lokr_w1.lost"]
    assert_same_state(end_state(expected), end_state(actual))


def test_names_inside_the_method_prefix_and_many_targets(tmp_path: Path) -> None:
    """Adapter names inside the method's prefix (`hada`, `ia3`, `a`: PEFT warns, and maps keys by
    structure) load exactly; IA3 takes any number of target names (PEFT does not condense them)."""
    many = [*LLAMA_MODULES, *(f"absent_{i}" for i in range(20))]
    adapters = {
        name: save_seeded_adapter(
            peft.IA3Config(target_modules=many, feedforward_modules=["down_proj"]), tmp_path / name, seed=i
        )
        for i, name in enumerate(["ia3", "a", "l"])
    }
    first = save_seeded_adapter(
        peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]),
        tmp_path / "first",
    )
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
    assert_same(expected, actual)
    assert {result.loader for result in results.values()} == {"fastkeys"}
    first = save_seeded_adapter(peft.LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "lfirst")
    adapters = {
        name: save_seeded_adapter(
            peft.LoHaConfig(r=3, target_modules=["q_proj", "v_proj"]), tmp_path / name, seed=i
        )
        for i, name in enumerate(["hada", "w1", "l"])
    }
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
    assert_same(expected, actual)
    assert {result.loader for result in results.values()} == {"fastkeys"}


# ---------------------------------------------------------------------------------------------
# The long sweep: FASTKEYS_FULL=1.


@pytest.mark.skipif(not FULL, reason="the long generated sweep runs with FASTKEYS_FULL=1")
@pytest.mark.parametrize("method", LAYOUTS + PEFT_ROUTE)
@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("seed", range(4))
def test_long_generated_sweep(tmp_path: Path, method: str, architecture: str, seed: int) -> None:
    options = {"is_trainable": seed % 2 == 1, "autocast_adapter_dtype": seed % 3 != 2}
    run_sweep(tmp_path, method, architecture, seed=500 + seed, count=12, **options)
