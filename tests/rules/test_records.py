"""Each PEFT method is one record in `fastkeys.rules.records`; everything else reads it. No torch needed.

The PEFT-facing checks of the table (prefixes and flags against the installed PEFT) are in
tests/rules/test_tuners.py; these check that the records are consistent and that a new record is all a new
method needs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastkeys import KeyMatcher, check_base, filter_missing, insert_adapter_name, remove_adapter_name
from fastkeys.cli.main import _methods_found
from fastkeys.rules import records as tuners
from fixtures.headers import write_adapter, write_safetensors


@pytest.mark.parametrize("method", list(tuners.METHODS.values()), ids=list(tuners.METHODS))
def test_every_rule_of_a_record_names_the_records_own_tensors(method: tuners.Method) -> None:
    """A shared name, a suffixed segment, a shape rule or a Kronecker factor that the method's
    own selection (prefix or exact names) does not take would never apply."""
    named = [
        *method.shared,
        *(segment for segment, _parameter in method.suffixes),
        *method.shapes,
        *method.embedding_shapes,
        *(method.kronecker or ()),
    ]
    for name in named:
        assert name.startswith(method.prefix) or name in method.exact, (method.name, name)
    for shape in [*method.shapes.values(), *method.embedding_shapes.values()]:
        assert all(dim in ("out", "in", "r") or isinstance(dim, int) for dim in shape), shape


def test_shared_copies_are_every_records_shared_names() -> None:
    assert set(tuners.SHARED_COPIES) == {name for m in tuners.METHODS.values() for name in m.shared}
    assert {"vera_A", "vblora_vector_bank", "tinylora_v"} <= set(tuners.SHARED_COPIES)


def test_patterns_collect_the_chosen_records() -> None:
    prefixes, exact, shared, suffixes = tuners.patterns(tuners.resolve("vera"))
    assert (prefixes, shared, suffixes) == (("vera_lambda_",), ("vera_A", "vera_B"), ())
    assert exact == ("vera_A", "vera_B", *tuners.ALWAYS)
    assert tuners.patterns(tuners.resolve("lora"))[3] == (("lora_magnitude_vector", "weight"),)
    every = tuners.patterns(None)
    assert "prompt_tuning_" not in every[0] and "lora_" in every[0]


@pytest.fixture
def new_method(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuners.Method]:
    """A method PEFT does not have, added as one record and nothing else."""
    method = tuners.Method(
        "mymethod",
        "mym_",
        exact=("mybank",),
        shared=("mybank",),
        suffixes=(("mym_scale", "weight"),),
        shapes={"mym_down": ("r", "in"), "mym_up": ("out", "r")},
    )
    monkeypatch.setitem(tuners.METHODS, "mymethod", method)
    # The table is a constant in the source; the cache of its patterns knows it as such.
    tuners._patterns.cache_clear()
    yield method
    monkeypatch.undo()
    tuners._patterns.cache_clear()


def test_a_new_record_is_all_a_new_method_needs(new_method: tuners.Method) -> None:
    # Selection, with the shared bank saved at model level and its layer references not.
    missing = [
        "base_model.mybank.x",
        "base_model.model.q.mybank.x",
        "base_model.model.q.mym_down.x.weight",
        "base_model.model.q.mym_down.other.weight",
        "base_model.model.q.lora_A.x.weight",
    ]
    assert filter_missing(missing, "x", "mymethod") == [missing[0], missing[2]]
    # Renames, both ways, with the record's suffix rule.
    saved = ["m.q.mym_scale", "m.q.mym_down.weight", "m.q.base_layer.weight"]
    model = ["m.q.mym_scale.x.weight", "m.q.mym_down.x.weight", "m.q.base_layer.weight"]
    assert insert_adapter_name(saved, "x", "mymethod") == model
    assert remove_adapter_name(model, "x", "mymethod") == saved
    # The CLI's method count finds it, and its exact name too.
    assert _methods_found(["m.q.mym_down.weight", "m.q.mym_up.x.weight", "base_model.mybank"]) == {
        "mymethod": 3
    }


def test_a_new_records_shapes_are_checked(
    new_method: tuners.Method, tmp_path: pytest.TempPathFactory
) -> None:
    base = tmp_path / "base.safetensors"  # type: ignore[operator]
    write_safetensors(base, {"model.q.weight": (16, 8)})
    adapter = write_adapter(
        tmp_path / "adapter",  # type: ignore[operator]
        {
            "base_model.model.model.q.mym_down.weight": (4, 8),
            "base_model.model.model.q.mym_up.weight": (15, 4),
        },
        {"peft_type": "MYMETHOD"},
    )
    findings = check_base(base, adapter)
    assert [(f.kind, f.key) for f in findings] == [("shape", "base_model.model.model.q.mym_up.weight")]
    assert "expected [16, r] for a base weight [16, 8], found [15, 4]" in findings[0].message


def test_the_method_count_takes_exact_names_and_the_last_tensor_segment() -> None:
    keys = [
        "base_model.vera_A",  # an exact name: the old segment rule of the CLI missed these
        "base_model.model.q.vera_lambda_b",
        "m.q.randlora_A.weight",  # not `lora_`
        "m.lora_block.q.lora_A.default.weight",  # a module named like a prefix
        "m.q.lora_magnitude_vector.default.weight",  # DoRA, in its model form
        "m.score.modules_to_save.default.weight",  # a saved module: no method's tensor
        "m.q.base_layer.weight",
    ]
    assert _methods_found(keys) == {"vera": 2, "lora/adalora": 2, "randlora": 1}


def test_a_matcher_renames_only_with_the_rules_it_is_given() -> None:
    model = ["m.q.lora_magnitude_vector.x.weight", "m.score.modules_to_save.x.weight"]
    plain = KeyMatcher(["lora_"], ["x"], exact=["modules_to_save"])
    assert plain.remove_adapter_name(model) == [
        "m.q.lora_magnitude_vector.weight",
        "m.score.modules_to_save.weight",
    ]
    ruled = KeyMatcher(
        ["lora_"],
        ["x"],
        exact=["modules_to_save"],
        wrappers=["modules_to_save"],
        suffixes={"lora_magnitude_vector": "weight"},
    )
    assert ruled.remove_adapter_name(model) == ["m.q.lora_magnitude_vector", "m.score.weight"]
    assert ruled.insert_adapter_name(["m.q.lora_magnitude_vector", "m.score.weight"], "x") == [
        "m.q.lora_magnitude_vector.x.weight",
        "m.score.weight",  # a wrapped module's checkpoint key does not show the wrapper
    ]


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"wrappers": "modules_to_save"}, TypeError, "wrappers must be an iterable of str, not a single str"),
        ({"wrappers": ["a.b"]}, ValueError, "wrappers[0] 'a.b' contains a dot"),
        (
            {"suffixes": ["weight"]},
            TypeError,
            "suffixes must map a segment to a parameter name (a dict), not list",
        ),
        ({"suffixes": {"m": ""}}, ValueError, "suffixes['m'] must not be empty"),
        ({"suffixes": {"a.b": "weight"}}, ValueError, "a suffixes key 'a.b' contains a dot"),
        ({"suffixes": {1: "weight"}}, TypeError, "a suffixes key must be str, not int"),
    ],
)
def test_bad_rename_rules_are_refused(
    arguments: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as raised:
        KeyMatcher(["lora_"], **arguments)  # type: ignore[arg-type]
    assert str(raised.value).startswith(message)
