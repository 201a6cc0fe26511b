"""filter_missing and KeyMatcher as a caller sees them: inputs, outputs, errors."""

from __future__ import annotations

import collections
import dataclasses
import enum
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastkeys
from fastkeys import KeyMatcher, filter_missing

LORA_A = "base_model.model.layers.0.q_proj.lora_A.default.weight"
LORA_B = "base_model.model.layers.0.q_proj.lora_B.default.weight"
OTHER = "base_model.model.layers.0.q_proj.lora_A.other.weight"
BASE = "base_model.model.layers.0.q_proj.base_layer.weight"
KEYS = [BASE, LORA_A, OTHER, LORA_B]


class Loaded(collections.namedtuple("Loaded", ["missing_keys", "unexpected_keys"])):
    """Stands for torch's _IncompatibleKeys: a namedtuple subclass."""


def test_returns_a_list_in_input_order_of_the_callers_own_objects() -> None:
    keys = [f"{BASE}", "x." + LORA_B, "".join(["base_model.", LORA_A[len("base_model.") :]])]
    kept = filter_missing(keys)
    assert kept == keys[1:]
    assert all(a is b for a, b in zip(kept, keys[1:], strict=True))


@pytest.mark.parametrize(
    "make",
    [tuple, iter, lambda keys: (k for k in keys), lambda keys: dict.fromkeys(keys).keys()],
    ids=["tuple", "iterator", "generator", "dict_keys"],
)
def test_accepts_any_iterable_of_str(make: collections.abc.Callable[[list[str]], object]) -> None:
    assert filter_missing(make(KEYS)) == [LORA_A, LORA_B]


def test_str_subclasses_are_keys() -> None:
    class Key(str):
        pass

    key = Key(LORA_A)
    (kept,) = filter_missing([key])
    assert kept is key


def test_load_result_namedtuple_keeps_its_type_and_unexpected_keys() -> None:
    result = Loaded(missing_keys=list(KEYS), unexpected_keys=["surprise"])
    filtered = filter_missing(result)
    assert type(filtered) is Loaded
    assert filtered.missing_keys == [LORA_A, LORA_B]
    assert filtered.unexpected_keys == ["surprise"]
    assert result.missing_keys == KEYS, "the caller's result is not modified"


def test_load_result_dataclass_and_plain_object() -> None:
    @dataclasses.dataclass
    class Result:
        missing_keys: list[str]
        unexpected_keys: list[str]

    filtered = filter_missing(Result(list(KEYS), []))
    assert isinstance(filtered, Result)
    assert filtered.missing_keys == [LORA_A, LORA_B]

    class Plain:
        def __init__(self) -> None:
            self.missing_keys = tuple(KEYS)
            self.note = "kept"

    plain = Plain()
    out = filter_missing(plain)
    assert isinstance(out, Plain) and out is not plain
    assert out.missing_keys == (LORA_A, LORA_B) and out.note == "kept"
    assert plain.missing_keys == tuple(KEYS)


@pytest.mark.torch
def test_torch_load_result() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    model = nn.ModuleDict(
        {
            "q_proj": nn.ModuleDict(
                {
                    "lora_A": nn.ModuleDict(
                        {"default": nn.Linear(2, 2, bias=False), "other": nn.Linear(2, 2, bias=False)}
                    )
                }
            )
        }
    )
    model.add_module("embed", nn.Embedding(4, 2))
    result = model.load_state_dict({"q_proj.lora_A.other.weight": torch.zeros(2, 2)}, strict=False)
    filtered = filter_missing(result, "default", "lora")
    assert type(filtered) is type(result)
    assert filtered.missing_keys == ["q_proj.lora_A.default.weight"]
    assert filtered.unexpected_keys == result.unexpected_keys


@pytest.mark.parametrize("name", ["lora", "LORA", "LoRa", "Lora"])
def test_peft_type_in_any_case(name: str) -> None:
    assert filter_missing(["m.lora_A.default", "m.hada_w1_a.default"], peft_type=name) == ["m.lora_A.default"]


def test_peft_type_enum_member() -> None:
    class PeftType(str, enum.Enum):  # how peft.PeftType is defined
        LOHA = "LOHA"

    assert filter_missing(["m.lora_A.default", "m.hada_w1_a.default"], peft_type=PeftType.LOHA) == [
        "m.hada_w1_a.default"
    ]


def test_unknown_peft_type_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown peft_type 'lorra'; known methods: .*\bloha\b.*\blora\b"):
        filter_missing(KEYS, peft_type="lorra")
    with pytest.raises(TypeError, match="peft_type must be"):
        filter_missing(KEYS, peft_type=3)


def test_config_dict_and_object() -> None:
    keys = ["m.lora_A.default", "m.hada_w1_a.default"]
    assert filter_missing(keys, config={"peft_type": "LOHA", "r": 8}) == ["m.hada_w1_a.default"]

    class Config:
        peft_type = "LORA"

    assert filter_missing(keys, config=Config()) == ["m.lora_A.default"]
    assert filter_missing(keys, peft_type="lora", config=Config()) == ["m.lora_A.default"]
    with pytest.raises(ValueError, match="contradicts the config's peft_type 'loha'"):
        filter_missing(keys, peft_type="lora", config={"peft_type": "LOHA"})
    with pytest.raises(ValueError, match="no 'peft_type'"):
        filter_missing(keys, config={"r": 8})
    with pytest.raises(TypeError, match="config must be a PEFT config"):
        filter_missing(keys, config=42)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ([LORA_A, b"bytes.key"], "keys[1] must be str, not bytes"),
        ([LORA_A, LORA_B, None], "keys[2] must be str, not NoneType"),
        ((7,), "keys[0] must be str, not int"),
        (LORA_A, "keys must be an iterable of str, not a single str"),
        (b"x", "keys must be an iterable of str, not a single bytes"),
        (42, "keys must be an iterable of str, not int"),
    ],
)
def test_non_str_keys_are_type_errors_naming_the_culprit(keys: object, message: str) -> None:
    with pytest.raises(TypeError) as error:
        filter_missing(keys)
    assert str(error.value) == message


def test_an_iterable_that_raises_midway_propagates_unchanged() -> None:
    class Boom(Exception):
        pass

    def keys() -> Iterator[str]:
        yield LORA_A
        raise Boom("midway")

    with pytest.raises(Boom, match="midway"):
        filter_missing(keys())


@pytest.mark.parametrize(
    ("adapter_name", "error", "message"),
    [
        ("", ValueError, "adapter_name must not be empty"),
        ("a.b", ValueError, "adapter_name 'a.b' contains a dot"),
        (None, TypeError, "adapter_name must be str, not NoneType"),
        (b"default", TypeError, "adapter_name must be str, not bytes"),
    ],
)
def test_bad_adapter_name(adapter_name: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        filter_missing(KEYS, adapter_name)  # type: ignore[call-overload]


def test_empty_input_and_empty_keys() -> None:
    assert filter_missing([]) == []
    assert filter_missing(["", ".", "..", "default", ".default", "lora_A.", "lora_A.default."]) == [
        "lora_A.default."
    ]


def test_key_matcher_filter_and_group() -> None:
    matcher = KeyMatcher(["lora_"], ["default", "other", "unused"])
    assert matcher.filter(KEYS) == [LORA_A, OTHER, LORA_B]
    groups = matcher.group(KEYS)
    assert groups == {"default": [LORA_A, LORA_B], "other": [OTHER], "unused": []}
    assert list(groups) == ["default", "other", "unused"]
    assert groups["default"][0] is LORA_A


def test_key_matcher_any_adapter_groups_by_name() -> None:
    matcher = KeyMatcher(["lora_"])
    assert matcher.group(KEYS) == {"default": [LORA_A, LORA_B], "other": [OTHER]}
    assert matcher.filter(KEYS) == [LORA_A, OTHER, LORA_B]


def test_key_matcher_repeated_adapter_names() -> None:
    matcher = KeyMatcher(["lora_"], ["other", "default", "other"])
    assert matcher.group(KEYS) == {"other": [OTHER], "default": [LORA_A, LORA_B]}


def test_key_matcher_exact_shared_and_ignore() -> None:
    matcher = KeyMatcher(
        ["vera_lambda_"], ["default"], exact=["vera_A"], shared=["vera_A"], ignore=[r"layers\.1\."]
    )
    keys = [
        "base_model.vera_A.default",
        "base_model.model.layers.0.q.vera_A.default",
        "base_model.model.layers.0.q.vera_lambda_b.default",
        "base_model.model.layers.1.q.vera_lambda_b.default",
    ]
    assert matcher.filter(keys) == [keys[0], keys[2]]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"prefixes": "lora_"},
            TypeError,
            r"prefixes must be an iterable of str, not a single str: write \['lora_'\]",
        ),
        ({"prefixes": 5}, TypeError, "prefixes must be an iterable of str, not int"),
        ({"prefixes": ["lora_", 1]}, TypeError, r"prefixes\[1\] must be str, not int"),
        ({"prefixes": [""]}, ValueError, r"prefixes\[0\] must not be empty"),
        ({"prefixes": ["lora.A"]}, ValueError, r"prefixes\[0\] 'lora.A' contains a dot"),
        (
            {"prefixes": ["x"], "adapter_names": "default"},
            TypeError,
            "adapter_names must be an iterable of str",
        ),
        (
            {"prefixes": ["x"], "adapter_names": ["a", ""]},
            ValueError,
            r"adapter_names\[1\] must not be empty",
        ),
        (
            {"prefixes": ["x"], "adapter_names": ["a.b"]},
            ValueError,
            r"adapter_names\[0\] 'a.b' contains a dot",
        ),
        ({"prefixes": ["x"], "exact": [b"x"]}, TypeError, r"exact\[0\] must be str, not bytes"),
        ({"prefixes": ["x"], "shared": ["a.b"]}, ValueError, r"shared\[0\] 'a.b' contains a dot"),
        ({"prefixes": ["x"], "ignore": "x"}, TypeError, r"write ignore=\['x'\]"),
        ({"prefixes": ["x"], "ignore": ["(?=x)"]}, ValueError, r"ignore\[0\] '\(\?=x\)'.*lookaround"),
    ],
)
def test_key_matcher_bad_arguments(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        KeyMatcher(**kwargs)  # type: ignore[arg-type]


def test_one_matcher_shared_by_eight_threads() -> None:
    matcher = KeyMatcher(["lora_"], [f"a{i}" for i in range(8)])
    per_thread = {i: [f"m.{j}.lora_A.a{(i + j) % 8}.weight" for j in range(2000)] for i in range(8)}
    expected = {i: [k for k in keys if f".a{i}." in k] for i, keys in per_thread.items()}
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        for _ in range(20):
            results[i] = matcher.group(per_thread[i])[f"a{i}"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == expected


def test_filter_missing_reuses_its_compiled_matcher() -> None:
    from fastkeys.rules import matching

    filter_missing(KEYS, "reuse_me")
    before = matching._matcher_for.cache_info().hits
    filter_missing(KEYS, "reuse_me")
    assert matching._matcher_for.cache_info().hits == before + 1


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )


# What `import fastkeys` must not load: the heavy libraries fastkeys works beside (seconds each).
# The standard library is not policed here: the import's time is measured, against the bare
# interpreter's start in the same run, by the benchmark suite (`make bench`, "import").
IMPORT_FORBIDDEN = ("torch", "peft", "transformers", "diffusers", "numpy", "safetensors")


def test_import_and_filtering_bring_none_of_the_heavy_libraries() -> None:
    done = _run(
        "import sys, fastkeys; fastkeys.filter_missing(['a.lora_A.default']);"
        "fastkeys.filter_missing(['a.lora_A.default'], 'default', 'lora');"
        f"print(sorted(m for m in {IMPORT_FORBIDDEN!r} if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_version_comes_from_cargo_toml() -> None:
    cargo = (Path(__file__).parents[1] / "Cargo.toml").read_text(encoding="utf-8")
    found = re.search(r'^version = "([^"]+)"$', cargo, re.M)  # the [package] table comes first
    assert found is not None and fastkeys.__version__ == found.group(1)


BLOCK_NATIVE = (
    "import sys, importlib.abc\n"
    "class Block(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'fastkeys._native': raise ImportError('blocked for the test')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def test_implementation_switch() -> None:
    forced = _run(BLOCK_NATIVE + "import fastkeys", FASTKEYS_IMPLEMENTATION="rust")
    assert forced.returncode != 0
    assert "FASTKEYS_IMPLEMENTATION=rust, but the compiled extension" in forced.stderr
    fallback = _run(
        BLOCK_NATIVE + "import fastkeys; print(fastkeys.IMPLEMENTATION)", FASTKEYS_IMPLEMENTATION=""
    )
    assert fallback.stdout.strip() == "python", fallback.stderr
    python = _run("import fastkeys; print(fastkeys.IMPLEMENTATION)", FASTKEYS_IMPLEMENTATION="python")
    assert python.stdout.strip() == "python", python.stderr
    bad = _run("import fastkeys", FASTKEYS_IMPLEMENTATION="fortran")
    assert "must be 'rust', 'python' or unset" in bad.stderr


def test_public_names() -> None:
    assert set(fastkeys.__all__) >= {"filter_missing", "KeyMatcher", "IMPLEMENTATION", "METHODS"}
    assert fastkeys.IMPLEMENTATION in ("rust", "python")
