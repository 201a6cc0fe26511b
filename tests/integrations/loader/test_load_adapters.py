"""fastkeys.peft.load_adapters against PEFT's own `load_adapter` loop, on real tiny models.

Every end state is compared with the one PEFT produces: state_dict keys, values (bitwise), dtypes
and devices; module names and types; requires_grad and training flags; peft_config.to_dict();
active adapters (model, tuner, every layer); targeted_module_names; and the outputs with each adapter
active. The default slice loads a few dozen generated adapters; FASTKEYS_FULL=1 runs a larger
generated sweep (minutes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fastkeys.peft
from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.result import AdapterLoadResult
from fixtures.loading import assert_same_outputs, assert_same_state, both_loops, end_state, merged_copy
from fixtures.peft_models import save_seeded_adapter, tiny_bert, tiny_llama

FULL = os.environ.get("FASTKEYS_FULL") == "1"

pytestmark = pytest.mark.engine  # scans checkpoints, renames keys on the engine: both implementations


LLAMA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_MODULES = ["query", "key", "value", "dense"]


# ---------------------------------------------------------------------------------------------
# Generated adapters.


def generated_config(
    rng: random.Random, modules: list[str], layers_pattern: str
) -> tuple[Any, dict[str, Any]]:
    """A random LoRA config over `modules` and how to save it (dtype)."""
    chosen = rng.sample(modules, rng.randint(1, len(modules)))
    target: Any = chosen
    if rng.random() < 0.25:
        target = r".*\.(" + "|".join(chosen) + ")"
    kwargs: dict[str, Any] = {
        "r": rng.choice([1, 2, 4, 8]),
        "lora_alpha": rng.choice([1, 8, 16, 3]),
        "target_modules": target,
        "use_rslora": rng.random() < 0.3,
        "use_dora": rng.random() < 0.2,
        "lora_dropout": rng.choice([0.0, 0.0, 0.1]),
    }
    if rng.random() < 0.3:
        kwargs["rank_pattern"] = {chosen[0]: rng.choice([2, 3])}
    if rng.random() < 0.3:
        kwargs["alpha_pattern"] = {chosen[-1]: rng.choice([5, 7])}
    if rng.random() < 0.2 and isinstance(target, list):
        kwargs["layers_to_transform"] = [rng.randint(0, 1)]
        kwargs["layers_pattern"] = layers_pattern
    if rng.random() < 0.15 and isinstance(target, list) and len(chosen) > 1:
        kwargs["exclude_modules"] = [chosen[-1]]
        kwargs["target_modules"] = chosen
    if rng.random() < 0.1 and not kwargs["use_dora"]:  # PEFT refuses lora_bias with DoRA
        kwargs["lora_bias"] = True
    if rng.random() < 0.1:
        kwargs["bias"] = "lora_only"
    dtype = rng.choice([None, None, torch.float16, torch.bfloat16])
    return peft.LoraConfig(**kwargs), {"dtype": dtype, "shards": rng.choice([1, 1, 2, 3])}


ARCHITECTURES: dict[str, tuple[Callable[[], Any], list[str], str]] = {
    "llama": (tiny_llama, LLAMA_MODULES, "layers"),
    "bert": (tiny_bert, BERT_MODULES, "layer"),
}


def run_sweep(tmp_path: Path, architecture: str, seed: int, count: int, **options: Any) -> dict[str, Any]:
    factory, modules, layers_pattern = ARCHITECTURES[architecture]
    rng = random.Random(seed)
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=modules[:2]), tmp_path / "first", factory)
    adapters: dict[str, Path] = {}
    biased = False
    for index in range(count):
        config, saving = generated_config(rng, modules, layers_pattern)
        if biased:  # PEFT allows one adapter that trains biases
            config.bias = "none"
        biased = biased or config.bias != "none"
        adapters[f"a{index}"] = save_seeded_adapter(
            config, tmp_path / f"a{index}", factory, seed=seed * 100 + index, **saving
        )
    expected, actual, results = both_loops(factory, first, adapters, tmp_path, **options)
    assert_same_state(end_state(expected), end_state(actual))
    inputs = torch.tensor([[1, 5, 9, 2, 7]])
    assert_same_outputs(expected, actual, inputs)
    return results


# ---------------------------------------------------------------------------------------------
# Differential tests: the default slice.


@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("is_trainable", [False, True])
def test_generated_adapters_end_like_peft_loop(tmp_path: Path, architecture: str, is_trainable: bool) -> None:
    results = run_sweep(tmp_path, architecture, seed=7 + is_trainable, count=6, is_trainable=is_trainable)
    loaders = {name: result.loader for name, result in results.items()}
    # bias="lora_only" and a few special cases go through PEFT; the plain ones must not
    assert list(loaders.values()).count("fastkeys") >= 3, results
    for result in results.values():
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert (result.reason is None) == (result.loader == "fastkeys")


def test_global_registration_hooks_see_the_fast_path_register_through_torch(tmp_path: Path) -> None:
    """The fast path builds LoRA's leaves without torch's registration calls only when no global
    registration hook could run inside them; with one installed, torch's own calls run."""
    from torch.nn.modules import module as torch_module

    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    adapters = {
        "second": save_seeded_adapter(
            peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), tmp_path / "b"
        )
    }
    registered: list[tuple[str, str]] = []
    handles = [
        torch_module.register_module_module_registration_hook(
            lambda parent, name, child: registered.append((type(parent).__name__, name))
        ),
        torch_module.register_module_parameter_registration_hook(
            lambda owner, name, parameter: registered.append((type(owner).__name__, name))
        ),
    ]
    try:
        expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
        assert results["second"].loader == "fastkeys", results["second"].reason
        registered.clear()
        fastkeys.peft.load_adapters(actual, {"third": adapters["second"]})
    finally:
        for handle in handles:
            handle.remove()
    expected.load_adapter(merged_copy(adapters["second"], tmp_path / "merged-third"), "third")
    assert_same_state(end_state(expected), end_state(actual))
    targets = 2 * len(tiny_llama().model.layers)  # q_proj and v_proj of every layer
    assert registered.count(("ModuleDict", "third")) == 3 * targets  # dropout, A, B
    assert registered.count(("Linear", "weight")) == 2 * targets


@pytest.mark.parametrize("autocast", [True, False])
def test_half_precision_checkpoints_cast_like_peft(tmp_path: Path, autocast: bool) -> None:
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    adapters = {
        "fp16": save_seeded_adapter(
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
            tmp_path / "h",
            seed=1,
            dtype=torch.float16,
        ),
        "bf16": save_seeded_adapter(
            peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
            tmp_path / "b",
            seed=2,
            dtype=torch.bfloat16,
        ),
    }

    def half_llama() -> Any:
        return tiny_llama().to(torch.bfloat16)

    expected, actual, results = both_loops(
        half_llama, first, adapters, tmp_path, autocast_adapter_dtype=autocast
    )
    assert_same_state(end_state(expected), end_state(actual))
    dtypes = {value[0] for key, value in end_state(actual)["state_dict"].items() if ".fp16." in key}
    assert dtypes == ({torch.float32} if autocast else {torch.bfloat16})
    assert [result.loader for result in results.values()] == ["fastkeys", "fastkeys"]


def test_low_cpu_mem_usage_ends_like_peft(tmp_path: Path) -> None:
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    adapters = {
        f"x{i}": save_seeded_adapter(
            peft.LoraConfig(r=4, target_modules=["q_proj", "o_proj"]), tmp_path / f"x{i}", seed=i
        )
        for i in range(2)
    }
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path, low_cpu_mem_usage=True)
    assert_same_state(end_state(expected), end_state(actual))
    assert {result.loader for result in results.values()} == {"fastkeys"}


def test_methods_and_options_the_fast_path_leaves_to_peft(tmp_path: Path) -> None:
    """Exactness first: these go through PEFT's loader, say why, and end as PEFT's loop does."""
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "first")
    configs = {
        "all": peft.LoraConfig(r=2, target_modules="all-linear"),
        "saved": peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "later": peft.LoraConfig(r=4, target_modules=["k_proj"]),
        # last: PEFT 0.21 expects a trainable-token wrapper's tensor in every later checkpoint
        "tokens": peft.LoraConfig(r=4, target_modules=["v_proj"], trainable_token_indices=[0, 3]),
    }
    adapters = {
        name: save_seeded_adapter(c, tmp_path / name, seed=i) for i, (name, c) in enumerate(configs.items())
    }
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
    assert_same_state(end_state(expected), end_state(actual))
    assert_same_outputs(expected, actual, torch.tensor([[3, 1, 4, 1, 5]]))
    # PEFT creates the first wrapper of a module (test_load_saved_modules.py: the ones after it)
    assert results["saved"].loader == "peft"
    assert "lm_head, which is not wrapped yet" in (results["saved"].reason or "")
    assert results["tokens"].loader == "peft"
    # save_pretrained stores "all-linear" resolved to the module names, which the fast path matches
    assert results["all"].loader == "fastkeys"
    # a modules_to_save wrapper in the model: the fast path keeps its active adapter as PEFT does
    assert results["later"].loader == "fastkeys", results["later"].reason


def test_a_long_target_list_is_condensed_as_peft_condenses_it(tmp_path: Path) -> None:
    """PEFT replaces a list of 20 or more target names by the shortest suffixes that tell them from
    every other module name, and keeps that in the config; the fast path does the same. Two kinds
    of modules in every layer condense, every module condenses to its kind; one layer's modules
    cannot be told from the other layer's by a shorter suffix, and PEFT keeps that list whole. An
    adapter named `gone_3` puts that name inside every layer it targets: the next list cannot
    shorten its target `zz.gone_3` to `gone_3` any more."""
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    full = [f"model.layers.{i}.{kind}.{m}" for i in (0, 1) for kind, ms in
            (("self_attn", LLAMA_MODULES[:4]), ("mlp", LLAMA_MODULES[4:])) for m in ms]  # fmt: skip
    gone = [f"gone_{i}" for i in range(16) if i != 3] + ["zz.gone_3"]
    qv = [name for name in full if name.endswith(("q_proj", "v_proj"))] + gone
    lists = {
        "qv": qv,
        "layer0": [name for name in full if ".0." in name] + [f"model.gone.{i}.up_proj" for i in range(13)],
        "all": [*full, *(f"x{i}" for i in range(6))],
        "gone_3": qv,
        "after": qv,
    }
    adapters = {
        name: save_seeded_adapter(peft.LoraConfig(r=2, target_modules=names), tmp_path / name, seed=i)
        for i, (name, names) in enumerate(lists.items())
    }
    for name, directory in adapters.items():  # saved condensed: the whole list again, as diffusers has it
        config = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": lists[name]}))
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
    assert {name: (r.loader, r.reason) for name, r in results.items()} == {
        name: ("fastkeys", None) for name in adapters
    }
    assert_same_state(end_state(expected), end_state(actual))
    kept = {name: actual.peft_config[name].target_modules for name in adapters}
    short = {"q_proj", "v_proj", *gone[:-1]}
    assert kept == {
        "qv": {*short, "gone_3"},
        "layer0": set(lists["layer0"]),
        "all": {*LLAMA_MODULES, *(f"x{i}" for i in range(6))},
        "gone_3": {*short, "gone_3"},
        "after": {*short, "zz.gone_3"},
    }
    # every method but IA3 is condensed the same way (LoHa's own layer code runs on each target)
    first = save_seeded_adapter(peft.LoHaConfig(r=2, target_modules=["q_proj"]), tmp_path / "loha-first")
    loha = save_seeded_adapter(peft.LoHaConfig(r=2, target_modules=qv), tmp_path / "loha")
    config = json.loads((loha / "adapter_config.json").read_text())
    (loha / "adapter_config.json").write_text(json.dumps({**config, "target_modules": qv}))
    expected, actual, results = both_loops(tiny_llama, first, {"loha": loha}, tmp_path)
    assert (results["loha"].loader, actual.peft_config["loha"].target_modules) == (
        "fastkeys",
        {*short, "gone_3"},
    )
    assert_same_state(end_state(expected), end_state(actual))


def test_the_names_condensing_reads_are_named_modules_own() -> None:
    """`plan._names_ending_in` against `named_modules()`: a module reached under two names (tied
    embeddings, a module registered twice) is named once, by its first name in the walk."""
    from fastkeys.integrations.loader import plan

    model = tiny_llama()
    model.lm_head = model.model.embed_tokens  # tied: the second name is not yielded
    model.model.layers[1].mlp.again = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.again = model.model.layers[1].mlp.up_proj
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "up_proj"]))
    layers: Any = model.get_submodule("base_model.model.model.layers")
    # a leaf of a container whose children are all leaves (visited in place), met first elsewhere
    layers[0].self_attn.early = layers[1].self_attn.q_proj.lora_A["default"]
    layers[1].mlp.late = layers[0].self_attn.q_proj.lora_B["default"]  # ... and met first there
    lasts = (
        {"q_proj", "lm_head", "embed_tokens"},
        {"again", "default", "up_proj", "early", "late"},
        {"none"},
        {"", "q_proj"},  # "" is the root's name, which PEFT counts among the other names too
    )
    for last in lasts:
        expected = [name for name, _m in model.named_modules() if name.rpartition(".")[2] in last]
        assert plan._names_ending_in(model, last) == expected, last


def test_other_methods_go_through_peft(tmp_path: Path) -> None:
    """LoHa, LoKr, IA3, HRA and OFT have their own fast path (test_load_methods.py); a method without
    one goes through PEFT's loader and says so."""
    config = peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])
    first = save_seeded_adapter(config, tmp_path / "first")
    adapters = {"vera": save_seeded_adapter(config, tmp_path / "vera", seed=3, shards=2)}
    expected, actual, results = both_loops(tiny_llama, first, adapters, tmp_path)
    assert_same_state(end_state(expected), end_state(actual))
    assert results["vera"].loader == "peft"
    assert results["vera"].reason == (
        "the fast path covers LoRA (with DoRA, rsLoRA), LoHa, LoKr, IA3, HRA and OFT; this is VERA"
    )


def test_incomplete_checkpoint_goes_through_peft_with_the_missing_keys(tmp_path: Path) -> None:
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(
        peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "lost", seed=1
    )
    tensors = load_file(directory / "adapter_model.safetensors")
    lost = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    del tensors[lost]
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    model = peft.PeftModel.from_pretrained(tiny_llama(), first, "first")
    result = fastkeys.peft.load_adapter(model, directory, "lost")
    assert result.loader == "peft" and "lacks 1 of the adapter's tensors" in (result.reason or "")
    assert result.missing_keys == ["base_model.model.model.layers.1.self_attn.q_proj.lora_B.lost.weight"]


def test_adapter_names_that_are_module_names_go_through_peft(tmp_path: Path) -> None:
    first = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "first")
    directory = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj"]), tmp_path / "x", seed=1)
    names = {"mlp": tmp_path / "x", "1": tmp_path / "x", "fine": tmp_path / "x"}
    del directory
    expected, actual, results = both_loops(tiny_llama, first, names, tmp_path)
    assert_same_state(end_state(expected), end_state(actual))
    assert [results[name].loader for name in names] == ["peft", "peft", "fastkeys"]
    assert "segment of the model's parameter names" in (results["mlp"].reason or "")


# ---------------------------------------------------------------------------------------------
# The index stays valid as adapters come and go.


def test_index_survives_deletes_and_model_surgery(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    first = save_seeded_adapter(config, tmp_path / "first")
    directory = save_seeded_adapter(config, tmp_path / "x", seed=1)
    wider = save_seeded_adapter(peft.LoraConfig(r=2, target_modules=["up_proj"]), tmp_path / "w", seed=2)
    models: list[Any] = [peft.PeftModel.from_pretrained(tiny_llama(), first, "first") for _ in range(2)]
    for step, model in enumerate(models):

        def load(path: Path, name: str, model: Any = model, step: int = step) -> None:
            if step == 0:
                model.load_adapter(path, name)
            else:
                fastkeys.peft.load_adapter(model, path, name)

        load(directory, "one")
        model.delete_adapter("one")
        load(directory, "two")
        # a module replaced by hand: the index must notice and not use the old module
        torch.manual_seed(5)
        model.base_model.model.model.layers[0].mlp.up_proj = torch.nn.Linear(32, 64)
        load(wider, "three")
        # replaced behind torch's back (no registration hook fires): the index must still notice
        torch.manual_seed(6)
        model.base_model.model.model.layers[1].mlp._modules["up_proj"] = torch.nn.Linear(32, 64)
        load(wider, "four")
    assert_same_state(end_state(models[0]), end_state(models[1]))


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints and checkpoints that lie: clear errors, and the model as it was.


def fresh_model_with_first(tmp_path: Path) -> Any:
    first = tmp_path / "first"
    if not first.exists():
        save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), first)
    return peft.PeftModel.from_pretrained(tiny_llama(), first, "first")


def sharded(tmp_path: Path, name: str, config: Any | None = None) -> Path:
    config = config or peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj"])
    return save_seeded_adapter(config, tmp_path / name, seed=11, shards=3)


def test_sharded_checkpoint_loads_like_the_merged_one(tmp_path: Path) -> None:
    directory = sharded(tmp_path, "sharded")
    assert not (directory / "adapter_model.safetensors").exists()
    expected = fresh_model_with_first(tmp_path)
    expected.load_adapter(merged_copy(directory, tmp_path / "merged"), "s")
    actual = fresh_model_with_first(tmp_path)
    result = fastkeys.peft.load_adapter(actual, directory, "s")
    assert result == AdapterLoadResult([], [], "fastkeys", None, [])
    assert_same_state(end_state(expected), end_state(actual))


def test_a_hugging_face_cache_snapshot_loads(tmp_path: Path) -> None:
    """The hub cache keeps a snapshot's files as links into the repository's blobs/: inside the
    checkpoint for fastkeys (docs/hostile.md), so such an adapter loads like its plain copy."""
    directory = sharded(tmp_path, "plain")
    repository = tmp_path / "models--someone--adapter"
    snapshot = repository / "snapshots" / "0123abc"
    (repository / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for number, file in enumerate(sorted(directory.iterdir())):
        blob = repository / "blobs" / f"blob{number}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    expected = fresh_model_with_first(tmp_path)
    fastkeys.peft.load_adapter(expected, directory, "s")
    actual = fresh_model_with_first(tmp_path)
    result = fastkeys.peft.load_adapter(actual, snapshot, "s")
    assert result == AdapterLoadResult([], [], "fastkeys", None, [])
    assert_same_state(end_state(expected), end_state(actual))


def assert_untouched(model: Any, before: dict[str, Any], name: str) -> None:
    assert name not in model.peft_config
    assert_same_state(before, end_state(model))


def test_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    directory = sharded(tmp_path, "liar")
    index_file = directory / "adapter_model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    key = min(name for name, shard in index["weight_map"].items() if shard.startswith("adapter_model-00001"))
    index["weight_map"][key] = "adapter_model-00003-of-00003.safetensors"
    index_file.write_text(json.dumps(index))
    model = fresh_model_with_first(tmp_path)
    before = end_state(model)
    with pytest.raises(ValueError) as caught:
        fastkeys.peft.load_adapter(model, directory, "liar")
    assert str(caught.value) == (
        f"the index lists tensor {key!r} in {directory / 'adapter_model-00003-of-00003.safetensors'}, "
        f"but it is in {directory / 'adapter_model-00001-of-00003.safetensors'}"
    )
    assert_untouched(model, before, "liar")


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    directory = sharded(tmp_path, "gone")
    (directory / "adapter_model-00002-of-00003.safetensors").unlink()
    model = fresh_model_with_first(tmp_path)
    before = end_state(model)
    with pytest.raises(FileNotFoundError, match=r"adapter_model-00002-of-00003\.safetensors"):
        fastkeys.peft.load_adapter(model, directory, "gone")
    assert_untouched(model, before, "gone")


def test_shard_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = sharded(tmp_path, "escape")
    outside = tmp_path / "outside.safetensors"
    shutil.move(directory / "adapter_model-00001-of-00003.safetensors", outside)
    index_file = directory / "adapter_model.safetensors.index.json"
    text = index_file.read_text().replace(
        "adapter_model-00001-of-00003.safetensors", "../outside.safetensors"
    )
    index_file.write_text(text)
    model = fresh_model_with_first(tmp_path)
    before = end_state(model)
    with pytest.raises(ValueError, match=r"'\.\./outside\.safetensors' lies outside the checkpoint"):
        fastkeys.peft.load_adapter(model, directory, "escape")
    assert_untouched(model, before, "escape")


@pytest.mark.parametrize("path", ["fastkeys", "peft"])
def test_shape_that_does_not_fit_the_module(tmp_path: Path, path: str) -> None:
    """A tensor of the wrong shape: an error naming the file and the tensor, nothing injected
    (on the fast path) and everything undone (on PEFT's path, here forced by modules_to_save)."""
    extra: dict[str, Any] = {"modules_to_save": ["lm_head"]} if path == "peft" else {}
    directory = sharded(
        tmp_path, "wrong", peft.LoraConfig(r=4, target_modules=["q_proj", "up_proj"], **extra)
    )
    index = json.loads((directory / "adapter_model.safetensors.index.json").read_text())
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"
    shard = directory / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(4, 31)
    save_file(tensors, shard, metadata={"format": "pt"})
    model = fresh_model_with_first(tmp_path)
    before = end_state(model)
    error = ValueError if path == "fastkeys" else RuntimeError
    with pytest.raises(error, match=r"up_proj\.lora_A") as caught:
        fastkeys.peft.load_adapter(model, directory, "wrong")
    if path == "fastkeys":
        assert str(caught.value) == (
            f"{shard}: tensor '{key}' has shape [4, 31], but adapter 'wrong' needs [4, 32] there"
        )
    assert_untouched(model, before, "wrong")


def test_failure_in_the_middle_keeps_the_adapters_before_it(tmp_path: Path) -> None:
    good = save_seeded_adapter(peft.LoraConfig(r=4, target_modules=["o_proj"]), tmp_path / "good", seed=1)
    broken = sharded(tmp_path, "broken")
    (broken / "adapter_model-00001-of-00003.safetensors").unlink()
    model = fresh_model_with_first(tmp_path)
    reference = fresh_model_with_first(tmp_path)
    reference.load_adapter(good, "good")
    with pytest.raises(FileNotFoundError):
        fastkeys.peft.load_adapters(model, {"good": good, "broken": broken, "never": good})
    assert list(model.peft_config) == ["first", "good"]
    assert_same_state(end_state(reference), end_state(model))


# ---------------------------------------------------------------------------------------------
# Arguments, errors, progress.


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    model = fresh_model_with_first(tmp_path)
    with pytest.raises(TypeError, match=r"peft_model must be a peft\.PeftModel, not LlamaForCausalLM"):
        fastkeys.peft.load_adapters(tiny_llama(), {})
    with pytest.raises(
        TypeError, match="adapters must map adapter names to checkpoint directories, not list"
    ):
        fastkeys.peft.load_adapters(model, [tmp_path])  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="adapter 'x': no such checkpoint directory"):
        fastkeys.peft.load_adapters(model, {"x": tmp_path / "nowhere"})
    with pytest.raises(TypeError, match="adapter 'x': the checkpoint must be a directory path, not int"):
        fastkeys.peft.load_adapters(model, {"x": 3})  # type: ignore[dict-item]
    assert list(model.peft_config) == ["first"]


def test_progress_callback_and_quiet_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = save_seeded_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "p", seed=1)
    model = fresh_model_with_first(tmp_path)
    calls: list[tuple[int, int, str]] = []
    fastkeys.peft.load_adapters(
        model,
        {"p1": directory, "p2": directory},
        progress=lambda done, total, name: calls.append((done, total, name)),
    )
    assert calls == [(1, 2, "p1"), (2, 2, "p2")]
    fastkeys.peft.load_adapters(model, {f"q{i}": directory for i in range(5)})  # stderr is not a terminal
    assert capsys.readouterr().err == ""
    fastkeys.peft.load_adapters(model, {f"r{i}": directory for i in range(2)}, progress=True)
    err = capsys.readouterr().err
    assert "loading adapters [" in err and "2/2" in err and err.endswith("\n")


def test_raw_results_keep_peft_loader(tmp_path: Path) -> None:
    """Inside fastkeys.peft._raw_results the caller wants torch's raw result: PEFT's loader runs."""
    directory = save_seeded_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "raw", seed=1)
    model = fresh_model_with_first(tmp_path)
    with boundary.recorded_results() as records:
        result = fastkeys.peft.load_adapter(model, directory, "raw")
    assert result.loader == "peft" and result.reason == "the raw load result was requested"
    assert len(records) == 1 and records[0].unexpected_keys == []


def test_from_pretrained_reads_sharded_adapters(tmp_path: Path) -> None:
    directory = sharded(tmp_path, "first-sharded")
    expected = peft.PeftModel.from_pretrained(tiny_llama(), merged_copy(directory, tmp_path / "m"), "default")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = fastkeys.peft.from_pretrained(tiny_llama(), str(directory))
    assert not [w for w in caught if isinstance(w.message, fastkeys.MissingAdapterKeysWarning)]
    assert_same_state(end_state(expected), end_state(actual))


# ---------------------------------------------------------------------------------------------
# The long sweep: FASTKEYS_FULL=1.


@pytest.mark.skipif(not FULL, reason="the long generated sweep runs with FASTKEYS_FULL=1")
@pytest.mark.parametrize("architecture", ["llama", "bert"])
@pytest.mark.parametrize("seed", range(6))
def test_long_generated_sweep(tmp_path: Path, architecture: str, seed: int) -> None:
    options = {"is_trainable": seed % 2 == 1, "autocast_adapter_dtype": seed % 3 != 2}
    run_sweep(tmp_path, architecture, seed=100 + seed, count=16, **options)
