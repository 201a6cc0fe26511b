"""fastkeys.peft.set_adapter and delete_adapters against PEFT's own set_adapter / delete_adapter loop
(issue 18), on real tiny models.

The same sequence of switches and deletions runs on a PEFT-driven model and a fastkeys-driven one
that start equal; after every step the two are compared (fixtures.loading.end_state: state_dict
bitwise, modules, requires_grad, training, peft_config, active adapters of the model, the tuner and
every layer, targeted_module_names, per-layer options; plus every per-adapter dict of every LoRA
layer, the warnings, and the outputs with the adapters then active), and a later load still ends as
PEFT's does. Then: what goes to PEFT, errors, and interruptions at points spread over a whole call.
"""

from __future__ import annotations

import copy
import gc
import sys
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

import fastkeys.peft
from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.lifecycle import AdapterChangeResult
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

# Runs once, under the default implementation: set/delete never reach the engine, and the loads
# that set the models up are held equal under both by tests/integrations/loader/test_load_adapters.py.

INPUTS = torch.tensor([[1, 2, 3, 4, 5, 6]])
DELETED = "was active which is now deleted"

# name -> LoRA options (seeded values differ per adapter)
LLAMA_ADAPTERS: dict[str, dict[str, Any]] = {
    "first": {"target_modules": QV},
    "a": {"target_modules": QV},
    "a1": {"target_modules": [*QV, "k_proj"]},  # a name that starts with another one
    "b": {"target_modules": ["k_proj", "down_proj"]},  # held by other layers than `first`
    "dora": {"target_modules": QV, "use_dora": True},
    "rs": {"target_modules": ["q_proj", "o_proj"], "use_rslora": True, "layers_to_transform": [1]},
    "emb": {"target_modules": ["embed_tokens", "q_proj"]},  # a lora.Embedding
    "t": {"target_modules": ["v_proj", "up_proj"]},  # loaded with is_trainable=True
    "c": {"target_modules": ["q_proj", "up_proj"]},  # loaded after the operations
    "loha": {},  # another method: PEFT's functions
    "saved": {"target_modules": QV, "modules_to_save": ["lm_head"]},  # auxiliary wrappers
}
BERT_ADAPTERS: dict[str, dict[str, Any]] = {
    name: {"target_modules": modules}
    for name, modules in {
        "first": ["query", "value"],
        "x": ["query", "key", "dense"],
        "y": ["value"],
        "c": ["key"],
    }.items()
}


def _save(root: Path, adapters: dict[str, dict[str, Any]], factory: Callable[[], Any]) -> dict[str, Path]:
    saved = {}
    for seed, (name, options) in enumerate(adapters.items()):
        if name == "loha":
            config: Any = peft.LoHaConfig(r=4, target_modules=QV)
        else:
            config = peft.LoraConfig(r=4, lora_alpha=8, **options)
        saved[name] = save_seeded_adapter(config, root / name, factory, seed=seed)
    return saved


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _save(tmp_path_factory.mktemp("llama"), LLAMA_ADAPTERS, tiny_llama)


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _save(tmp_path_factory.mktemp("bert"), BERT_ADAPTERS, tiny_bert)


def peft_loaded(
    dirs: dict[str, Path],
    names: list[str],
    factory: Callable[[], Any] = tiny_llama,
    trainable: tuple[str, ...] = (),
    first: str = "first",
) -> Any:
    """`first`, then `names`, loaded with PEFT's loop."""
    model = peft.PeftModel.from_pretrained(factory(), dirs[first], first)
    for name in names:
        model.load_adapter(dirs[name], name, is_trainable=name in trainable)
    return model


# ---------------------------------------------------------------------------------------------
# Comparing.


def layer_entries(model: Any) -> list[tuple[str, dict[str, list[str]]]]:
    """Every per-adapter dict of every LoRA layer, by its keys (what deletion must remove)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            attributes = (*module.adapter_layer_names, *module.other_param_names, "lora_variant")
            found.append((name, {attribute: list(getattr(module, attribute)) for attribute in attributes}))
    return found


def outputs(model: Any) -> Any:
    """The logits, or the error the forward raises (PEFT's forward fails once
    `peft_model.active_adapter` names a deleted adapter)."""
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            return model(INPUTS)[0]
    except KeyError as error:
        return repr(error)


def assert_same(expected: Any, actual: Any) -> None:
    assert_same_state(end_state(expected), end_state(actual))
    assert layer_entries(actual) == layer_entries(expected)
    assert actual.active_adapters == expected.active_adapters
    ours, theirs = outputs(actual), outputs(expected)
    assert type(ours) is type(theirs)
    assert ours == theirs if isinstance(ours, str) else torch.equal(ours, theirs)


Step = tuple[str, Any]


def by_peft(model: Any, step: Step) -> None:
    """PEFT's own calls: PeftModel.set_adapter for a name, base_model.set_adapter for a list (PEFT's
    way to activate several), a delete_adapter loop."""
    what, names = step
    if what in ("set", "set_frozen"):
        frozen = what == "set_frozen"
        if isinstance(names, str):
            model.set_adapter(names, inference_mode=frozen)
        else:
            model.base_model.set_adapter(names, inference_mode=frozen)
    elif what == "delete":
        for name in [names] if isinstance(names, str) else names:
            model.delete_adapter(name)
    else:  # a user's own call, on both models
        model.base_model.set_requires_grad(names, True)


def by_fastkeys(model: Any, step: Step) -> AdapterChangeResult | None:
    what, names = step
    if what in ("set", "set_frozen"):
        return fastkeys.peft.set_adapter(model, names, inference_mode=what == "set_frozen")
    if what == "delete":
        return fastkeys.peft.delete_adapters(model, names)
    by_peft(model, step)
    return None


def recorded(call: Callable[[], Any]) -> tuple[Any, list[tuple[type[Warning], str]]]:
    """`call()` and the distinct warnings it gave, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    distinct: dict[tuple[type[Warning], str], None] = {}
    for warning in caught:
        distinct[(warning.category, str(warning.message))] = None
    return result, list(distinct)


def run_both(expected: Any, actual: Any, steps: list[Step], path: str = "fastkeys") -> None:
    assert_same(expected, actual)
    for step in steps:
        _none, peft_warnings = recorded(lambda step=step: by_peft(expected, step))  # type: ignore[misc]
        result, our_warnings = recorded(lambda step=step: by_fastkeys(actual, step))  # type: ignore[misc]
        if result is not None:
            assert result.path == path, (step, result)
        assert our_warnings == [w for w in peft_warnings if DELETED in w[1]], step
        assert_same(expected, actual)


def load_later(expected: Any, actual: Any, directory: Path, name: str) -> None:
    """A load after the operations ends as PEFT's does (both may refuse alike)."""
    try:
        expected.load_adapter(directory, name)
    except Exception as error:
        with pytest.raises(type(error)):
            fastkeys.peft.load_adapter(actual, directory, name)
    else:
        fastkeys.peft.load_adapter(actual, directory, name)
    assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# 1. Differential: sequences of switches and deletions.

SCENARIOS: dict[str, tuple[list[str], tuple[str, ...], list[Step]]] = {
    "switching": (
        ["a", "b", "dora"],
        (),
        [
            ("set", "a"),
            ("set", "b"),
            ("set", ["a", "b"]),
            ("set_frozen", "dora"),
            ("set", ["b"]),
            ("set", "first"),
            ("set_frozen", ["dora", "first"]),
            ("set", []),
            ("set", "dora"),
        ],
    ),
    "deleting_inactive_overlapping_names": (
        ["a", "a1", "b"],
        (),
        [("delete", "a"), ("set", "a1"), ("delete", ["b"]), ("set", ["a1", "first"])],
    ),
    "deleting_one_of_several_active": (
        ["a", "a1", "b"],
        (),
        [("set", ["a", "b"]), ("delete", "a"), ("set", ["a1", "b"]), ("delete", ["b", "a1"])],
    ),
    "deleting_the_only_active_where_layers_differ": (
        ["a", "b", "rs"],
        (),
        [
            ("set", "b"),
            ("delete", "b"),
            ("set", "first"),
            ("grad", "rs"),  # held from layer 1 on only
            ("set", "a"),
            ("delete", ["a", "rs"]),
            ("set", "first"),
        ],
    ),
    "deleting_the_active_one_in_a_list": (
        ["a", "rs", "dora"],
        (),
        [("set", "rs"), ("delete", ["rs", "first"]), ("set", ["a", "dora"]), ("delete", ["dora", "a"])],
    ),
    "deleting_all_but_one_then_all": (
        ["a", "a1", "b", "dora"],
        (),
        [("set", "a1"), ("delete", ["first", "a", "b", "dora"]), ("delete", "a1")],
    ),
    "trainable_and_user_grads": (
        ["a", "t", "b"],
        ("t",),
        [
            ("set", "b"),
            ("grad", "a"),
            ("set", "first"),
            ("grad", ["t", "b"]),
            ("set_frozen", "a"),
            ("delete", "t"),
            ("grad", "b"),
            ("delete", "a"),
        ],
    ),
    "embedding_layers": (
        ["emb", "a"],
        (),
        [("set", "emb"), ("set", ["emb", "a"]), ("delete", "emb"), ("set", "a")],
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sequences_end_as_peft(llama_dirs: dict[str, Path], scenario: str) -> None:
    names, trainable, steps = SCENARIOS[scenario]
    expected = peft_loaded(llama_dirs, names, trainable=trainable)
    actual = copy.deepcopy(expected)
    run_both(expected, actual, steps)
    load_later(expected, actual, llama_dirs["c"], "c")
    run_both(expected, actual, [("set", "c")])


@pytest.mark.parametrize(
    "scenario", ["deleting_the_only_active_where_layers_differ", "trainable_and_user_grads"]
)
def test_after_fastkeys_loads(llama_dirs: dict[str, Path], scenario: str) -> None:
    """The models loaded by PEFT's loop and by load_adapters (is_trainable as given), then driven."""
    names, trainable, steps = SCENARIOS[scenario]
    expected = peft_loaded(llama_dirs, names, trainable=trainable)
    actual = peft.PeftModel.from_pretrained(tiny_llama(), llama_dirs["first"], "first")
    for name in names:
        result = fastkeys.peft.load_adapter(actual, llama_dirs[name], name, is_trainable=name in trainable)
        assert result.loader == "fastkeys", result.reason
    run_both(expected, actual, steps)
    load_later(expected, actual, llama_dirs["c"], "c")


def test_bert(bert_dirs: dict[str, Path]) -> None:
    expected = peft_loaded(bert_dirs, ["x", "y"], tiny_bert)
    actual = copy.deepcopy(expected)
    steps: list[Step] = [("set", "x"), ("set", ["y", "first"]), ("delete", "first"), ("delete", ["y"])]
    run_both(expected, actual, steps)
    load_later(expected, actual, bert_dirs["c"], "c")


def test_the_fastkeys_path_runs_none_of_peft_s_passes(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No whole-model walk (named_modules visits every adapter's modules), and none of PEFT's
    set_adapter / delete_adapter, of the tuner or of a layer (a layer's visits every adapter it
    holds): what stays is one visit per base-model module and the layers' own dicts."""
    expected = peft_loaded(llama_dirs, ["a", "rs", "b"])
    actual = copy.deepcopy(expected)

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("one of PEFT's passes ran")

    steps: list[Step] = [("set", "rs"), ("set", ["a", "b"]), ("delete", "a"), ("delete", ["b", "first"])]
    for step in steps:
        with monkeypatch.context() as patched:
            for owner, name in (
                (torch.nn.Module, "named_modules"),
                (peft.tuners.tuners_utils.BaseTunerLayer, "set_adapter"),
                (peft.tuners.tuners_utils.BaseTunerLayer, "delete_adapter"),
                (peft.tuners.lora.LoraLayer, "delete_adapter"),
                (peft.tuners.tuners_utils.BaseTuner, "set_adapter"),
                (peft.tuners.tuners_utils.BaseTuner, "delete_adapter"),
            ):
                patched.setattr(owner, name, refused)
            result, _warnings = recorded(lambda step=step: by_fastkeys(actual, step))  # type: ignore[misc]
        assert result.path == "fastkeys"
        recorded(lambda step=step: by_peft(expected, step))  # type: ignore[misc]
        assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# 2. What goes to PEFT: its own functions, the same end state, the reason.


def _merged(dirs: dict[str, Path]) -> Any:
    model = peft_loaded(dirs, ["a", "b"])
    model.merge_adapter()
    return model


def _disabled(dirs: dict[str, Path]) -> Any:
    model = peft_loaded(dirs, ["a"])
    model.base_model.disable_adapter_layers()
    return model


PEFT_CASES: dict[str, tuple[Callable[[dict[str, Path]], Any], str, list[Step]]] = {
    # deleting `b` leaves `first` merged; set_adapter unmerges it (with PEFT's warning)
    "merged": (_merged, "merged", [("delete", "b"), ("set", "a")]),
    "disabled": (_disabled, "disabled", [("set", "a"), ("delete", ["a"])]),
    "modules_to_save": (
        lambda dirs: peft_loaded(dirs, ["a"], first="saved"),
        "auxiliary wrappers",
        [("set", "a"), ("set", ["saved", "a"]), ("delete", "saved")],
    ),
    "loha": (
        lambda dirs: peft_loaded(dirs, [], first="loha"),
        "LoHaModel",
        [("set", "loha"), ("delete", "loha")],
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_other_states_go_to_peft(llama_dirs: dict[str, Path], case: str) -> None:
    build, reason, steps = PEFT_CASES[case]
    expected = build(llama_dirs)
    actual = copy.deepcopy(expected)
    assert_same(expected, actual)
    for step in steps:
        _none, peft_warnings = recorded(lambda step=step: by_peft(expected, step))  # type: ignore[misc]
        result, our_warnings = recorded(lambda step=step: by_fastkeys(actual, step))  # type: ignore[misc]
        assert result.path == "peft" and reason in result.reason, result
        assert our_warnings == peft_warnings
        assert_same(expected, actual)


def test_prompt_learning_goes_to_peft() -> None:
    """Prompt learning keeps its adapters on the PeftModel itself: PEFT's functions, same end state;
    several active adapters need a tuner (PeftModel.set_adapter would fail on a list)."""

    def state(model: Any) -> Any:
        return (
            [(key, value.clone()) for key, value in model.state_dict().items()],
            [(name, parameter.requires_grad) for name, parameter in model.named_parameters()],
            list(model.peft_config),
            model.active_adapter,
        )

    def same(expected: Any, actual: Any) -> bool:
        (want, *rest), (got, *other) = state(expected), state(actual)
        return (
            rest == other
            and [k for k, _ in want] == [k for k, _ in got]
            and all(torch.equal(a, b) for (_k, a), (_j, b) in zip(want, got, strict=True))
        )

    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    expected = peft.get_peft_model(tiny_llama(), config)
    expected.add_adapter("p2", peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    actual = copy.deepcopy(expected)
    with pytest.raises(TypeError, match="several active adapters need a PEFT tuner"):
        fastkeys.peft.set_adapter(actual, ["p2"])
    for step in [("set", "p2"), ("delete", "default")]:
        _none, peft_warnings = recorded(lambda step=step: by_peft(expected, step))  # type: ignore[misc]
        result, our_warnings = recorded(lambda step=step: by_fastkeys(actual, step))  # type: ignore[misc]
        assert result.path == "peft" and "not LoraModel" in result.reason, result
        assert our_warnings == peft_warnings
        assert same(expected, actual)


@pytest.mark.parametrize(("library", "version"), [("peft", "0.99.0"), ("torch", "2.99.1+cpu")])
def test_an_unverified_version_goes_to_peft(
    llama_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, library: str, version: str
) -> None:
    expected = peft_loaded(llama_dirs, ["a"])
    actual = copy.deepcopy(expected)
    monkeypatch.setattr(sys.modules[library], "__version__", version)
    result = fastkeys.peft.set_adapter(actual, "a")
    assert result == AdapterChangeResult("peft", boundary.version_refusal())
    expected.set_adapter("a")
    assert_same(expected, actual)


# ---------------------------------------------------------------------------------------------
# 3. Errors.


def test_unknown_names_raise_as_peft_does(llama_dirs: dict[str, Path]) -> None:
    expected = peft_loaded(llama_dirs, ["a"])
    actual = copy.deepcopy(expected)
    pairs: list[tuple[Callable[[], Any], Callable[[], Any]]] = [
        (lambda: fastkeys.peft.set_adapter(actual, "zz"), lambda: expected.set_adapter("zz")),
        (lambda: fastkeys.peft.delete_adapters(actual, "zz"), lambda: expected.delete_adapter("zz")),
        (lambda: fastkeys.peft.delete_adapters(actual, ["zz"]), lambda: expected.delete_adapter("zz")),
    ]
    for ours, theirs in pairs:
        with pytest.raises(ValueError) as peft_error:
            theirs()
        with pytest.raises(ValueError) as our_error:
            ours()
        assert str(our_error.value) == str(peft_error.value)
    assert_same(expected, actual)


def test_calls_that_would_change_part_of_the_model_change_nothing(llama_dirs: dict[str, Path]) -> None:
    """PEFT's base_model.set_adapter stores an unknown name silently and its delete loop deletes the
    names before an unknown one; fastkeys checks every name first."""
    model = peft_loaded(llama_dirs, ["a", "b"])
    before = end_state(model)
    with pytest.raises(ValueError, match=r"^Adapter zz not found\.$"):
        fastkeys.peft.set_adapter(model, ["a", "zz"])
    with pytest.raises(ValueError, match=r"^Adapter zz does not exist$"):
        fastkeys.peft.delete_adapters(model, ["a", "zz", "b"])
    with pytest.raises(ValueError, match="'a' is named twice"):
        fastkeys.peft.delete_adapters(model, ["a", "b", "a"])
    assert_same_state(before, end_state(model))
    assert fastkeys.peft.delete_adapters(model, []) == AdapterChangeResult("fastkeys", None)
    assert_same_state(before, end_state(model))


def test_bad_arguments_are_named(llama_dirs: dict[str, Path]) -> None:
    model = peft_loaded(llama_dirs, ["a"])
    bad: Any = (("a",), ["a", 1], 1, {"a"})
    calls: list[tuple[Callable[[], Any], str]] = [
        (lambda: fastkeys.peft.set_adapter(model, bad[0]), "adapter_name must be a str or a list of str"),
        (lambda: fastkeys.peft.set_adapter(model, bad[1]), "adapter names must be str, not int"),
        (
            lambda: fastkeys.peft.set_adapter(model, "a", inference_mode=bad[2]),
            "inference_mode must be a bool",
        ),
        (lambda: fastkeys.peft.delete_adapters(model, bad[3]), "adapter_names must be a str or a list"),
        (lambda: fastkeys.peft.delete_adapters(model.base_model, "a"), "must be a peft.PeftModel"),
    ]
    for call, message in calls:
        with pytest.raises(TypeError, match=message):
            call()


def test_peft_errors_leave_the_model_as_it_was(llama_dirs: dict[str, Path]) -> None:
    """Deleting a merged adapter: PEFT's own ValueError, nothing changed."""
    model = _merged(llama_dirs)
    before = end_state(model)
    with pytest.raises(ValueError, match="while they are merged"):
        fastkeys.peft.delete_adapters(model, ["first", "a"])
    assert_same_state(before, end_state(model))


@pytest.mark.parametrize(
    ("build", "path"),
    [
        (lambda dirs: peft_loaded(dirs, ["a", "b"]), "fastkeys"),
        (lambda dirs: peft_loaded(dirs, ["a", "b"], first="saved"), "peft"),  # auxiliary wrappers
    ],
    ids=["fastkeys", "peft"],
)
def test_deleted_adapters_give_their_memory_back(
    llama_dirs: dict[str, Path], build: Callable[[dict[str, Path]], Any], path: str
) -> None:
    """Nothing fastkeys keeps (the transaction, the result, the warnings) holds a deleted adapter's
    modules or tensors: once collected, they are gone, the active one's included."""
    model = build(llama_dirs)
    gone = [model.active_adapter, "a"]
    held = [weakref.ref(m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in gone]
    held += [weakref.ref(p) for n, p in model.named_parameters() if set(n.split(".")) & set(gone)]
    assert len(held) > 10
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fastkeys.peft.delete_adapters(model, gone)
    assert result.path == path and any(DELETED in str(warning.message) for warning in caught)
    gc.collect()
    assert [ref() for ref in held if ref() is not None] == []
    assert set(model.peft_config) == {"b"}


# ---------------------------------------------------------------------------------------------
# 4. Interruptions: a KeyboardInterrupt at points spread over every traced line of a call.

INTERRUPTED: dict[str, tuple[Callable[[dict[str, Path]], Any], Step]] = {
    "set_adapter": (lambda dirs: peft_loaded(dirs, ["a", "b"]), ("set", ["a", "b"])),
    "delete_adapters": (lambda dirs: peft_loaded(dirs, ["a", "b", "rs"]), ("delete", ["b", "first", "rs"])),
    "peft_path": (_disabled, ("delete", ["first", "a"])),
}


@pytest.mark.parametrize("case", list(INTERRUPTED))
def test_an_interrupted_call_leaves_the_model_as_it_was_or_as_done(
    llama_dirs: dict[str, Path], case: str
) -> None:
    build, step = INTERRUPTED[case]
    model = build(llama_dirs)
    before = end_state(model)
    done = copy.deepcopy(model)
    total = warm_line_count(lambda: by_fastkeys(done, step), lambda: by_fastkeys(copy.deepcopy(model), step))
    after = end_state(done)
    interrupted = 0
    for point in spread(total, 16):
        trial = copy.deepcopy(model)
        try:
            traced_lines(lambda trial=trial: by_fastkeys(trial, step), point)  # type: ignore[misc]
        except KeyboardInterrupt:
            interrupted += 1
        state = end_state(trial)
        names = step[1] if isinstance(step[1], list) else [step[1]]
        gone = step[0] == "delete" and names[0] not in trial.peft_config
        changed = step[0] == "set" and trial.base_model.active_adapter == step[1]
        assert_same_state(after if gone or changed else before, state)
    assert interrupted >= 15, (interrupted, total)
