"""The two implementations agree: hypothesis drives both cores with the same arguments."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastkeys import filter_missing
from fastkeys.engine import pure as _pure
from fastkeys.engine.contract import Engine, Matcher
from fastkeys.rules.expressions import translate
from tests.conftest import examples

try:
    from fastkeys import _native
except ImportError:  # pragma: no cover - only in a fallback-only install
    if os.environ.get("FASTKEYS_IMPLEMENTATION") != "python":
        raise
    pytest.skip("the compiled extension is not built; the native run covers this", allow_module_level=True)

# The tests marked `both_engines` call both engines side by side, in-process: the same tests under
# FASTKEYS_IMPLEMENTATION=python would repeat them (`make test-python` deselects them). The one
# that reads the running engine (`filter_missing`) runs under both.
both_engines = pytest.mark.both_engines

WORDS = [
    "base_model",
    "model",
    "layers",
    "0",
    "1",
    "10",
    "q_proj",
    "mlp",
    "default",
    "default_1",
    "default_10",
    "foo",
    "foobar",
    "lora",
    "lora_A",
    "lora_B",
    "randlora_A",
    "poly_lora_A",
    "boft_R",
    "oft_R",
    "vera_A",
    "vera_lambda_b",
    "pvera_A",
    "vblora_vector_bank",
    "tinylora_v",
    "unilora_theta_d",
    "modules_to_save",
    "trainable_tokens_delta",
    "weight",
    "ädäpter",
    "a\ud800",
    "\ufffd",
    "",
    "x y",
    "Ω",
]
SEGMENT = st.one_of(
    st.sampled_from(WORDS), st.text(alphabet=st.characters(exclude_characters="."), max_size=6)
)
KEY = st.lists(SEGMENT, min_size=1, max_size=9).map(".".join)
NAME = st.one_of(
    st.sampled_from([w for w in WORDS if w]),
    st.text(alphabet=st.characters(exclude_characters="."), min_size=1, max_size=5),
)
# PEFT's root most of the time, else any segment (`model`, `ä`, `a\ud800`, a random one).
ROOT = st.one_of(st.just("base_model"), NAME)
# Expressions from a grammar both engines accept, mixing the constructs that need translation.
ATOM = st.sampled_from(
    [
        "a",
        "lora",
        r"\.",
        ".",
        r"\d",
        r"\w",
        r"\s",
        r"\D",
        "[a-z]",
        "[^.]",
        r"[\d_]",
        "ä",
        "Ω",
        "_",
        r"\b",
        "^",
        "$",
        r"\A",
        r"\Z",
        "(?i:LORA)",
        "(?s:.)",
        r"\{",
        "x{,2}",
        "[.]",
    ]
)
PATTERN = st.lists(
    st.tuples(ATOM, st.sampled_from(["", "*", "+", "?", "{1,2}", "*?"])), min_size=1, max_size=4
).map(lambda parts: "".join(_quantified(atom, q) for atom, q in parts))


def _quantified(atom: str, quantifier: str) -> str:
    if not quantifier or atom in ("^", "$", r"\A", r"\Z", r"\b"):
        return atom
    return f"(?:{atom}){quantifier}"


def build(
    module: Engine,
    prefixes: list[str],
    adapters: list[str] | None,
    exact: list[str],
    shared: list[str],
    ignore: tuple[list[str], list[str]],
    wrappers: list[str] | None = None,
    suffixes: dict[str, str] | None = None,
    root: str = "base_model",
) -> Matcher:
    patterns = ignore[0] if module is _native else ignore[1]
    pairs = list((suffixes or {}).items())
    return module.KeyMatcher(prefixes, adapters, exact, shared, root, patterns, wrappers or [], pairs)


@both_engines
@settings(max_examples=examples(400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    keys=st.lists(KEY, max_size=30),
    prefixes=st.lists(NAME, max_size=4),
    adapters=st.one_of(st.none(), st.lists(NAME, max_size=12)),
    exact=st.lists(NAME, max_size=2),
    shared=st.lists(NAME, max_size=2),
    ignore=st.lists(PATTERN, max_size=2),
    root=ROOT,
    rooted=st.lists(st.tuples(st.sampled_from(["", "shared"]), KEY), max_size=6),
)
def test_cores_agree(
    keys: list[str],
    prefixes: list[str],
    adapters: list[str] | None,
    exact: list[str],
    shared: list[str],
    ignore: list[str],
    root: str,
    rooted: list[tuple[str, str]],
) -> None:
    # Keys under the root too, some with a shared segment right after it (the model level).
    keys = keys + [
        f"{root}.{shared[0]}.{tail}" if kind and shared else f"{root}.{tail}" for kind, tail in rooted
    ]
    translated = translate(ignore)
    native = build(_native, prefixes, adapters, exact, shared, translated, root=root)
    pure = build(_pure, prefixes, adapters, exact, shared, translated, root=root)
    assert native.filter(keys) == pure.filter(keys)
    assert native.group(keys) == pure.group(keys)
    # Same order of groups too.
    assert list(native.group(keys)) == list(pure.group(keys))


@both_engines
@settings(max_examples=examples(300), deadline=None)
@given(key=KEY, pattern=PATTERN)
def test_ignore_expressions_agree(key: str, pattern: str) -> None:
    for_rust, for_python = translate([pattern])
    native = _native.KeyMatcher([], None, ["x"], [], "base_model", for_rust, [], [])
    pure = _pure.KeyMatcher([], None, ["x"], [], "base_model", for_python, [], [])
    probe = f"x.{key}"  # always matches "x" exactly, so only the expression decides
    assert native.filter([probe]) == pure.filter([probe])


@settings(max_examples=examples(200), deadline=None)
@given(
    keys=st.lists(KEY, max_size=20),
    adapter=NAME,
    peft_type=st.sampled_from([None, "lora", "vera", "tinylora"]),
)
def test_filter_missing_agrees_with_a_direct_reading_of_the_rule(
    keys: list[str], adapter: str, peft_type: str | None
) -> None:
    from fastkeys.rules import records as tuners

    if "." in adapter:
        return
    prefixes, exact, shared, _suffixes = tuners.patterns(tuners.resolve(peft_type))

    def relevant(key: str) -> bool:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            hit = parts[i].startswith(prefixes) or parts[i] in exact
            model_level = i == 0 or (i == 1 and parts[0] == tuners.MODEL_ROOT)
            if hit and parts[i + 1] == adapter and (model_level or parts[i] not in shared):
                return True
        return False

    assert filter_missing(keys, adapter, peft_type) == [k for k in keys if relevant(k)]


@both_engines
def test_errors_agree() -> None:
    for module in (_native, _pure):
        matcher = module.KeyMatcher(["lora_"], None, [], [], "base_model", [], [], [])
        with pytest.raises(TypeError, match=r"^keys\[1\] must be str, not bytes$"):
            matcher.filter(["a", b"b"])
        with pytest.raises(TypeError, match=r"^keys must be an iterable of str, not int$"):
            matcher.group(3)


class _Str(str):
    def __repr__(self) -> str:
        return "not asked"


ONE_SEGMENT = "root must be one segment, non-empty and without a dot, not "


@both_engines
@pytest.mark.parametrize(
    ("root", "error", "message"),
    [
        ("", ValueError, ONE_SEGMENT + "''"),
        ("base_model.model", ValueError, ONE_SEGMENT + "'base_model.model'"),
        (_Str("a.b"), ValueError, ONE_SEGMENT + "'a.b'"),
        ("a\ud800.", ValueError, ONE_SEGMENT + "'a\\ud800.'"),
        (b"base_model", TypeError, "root must be str, not bytes"),
        (None, TypeError, "root must be str, not NoneType"),
    ],
)
def test_root_errors_agree(root: object, error: type[Exception], message: str) -> None:
    """The root is checked by both engines, first (the prefix here is bad too), with one message."""
    for module in (_native, _pure):
        with pytest.raises(error) as raised:
            module.KeyMatcher([""], None, [], [], root, [], [], [])
        assert str(raised.value) == message, module


@both_engines
@pytest.mark.parametrize("module", [_native, _pure])
def test_the_model_level_follows_the_root(module: Engine) -> None:
    matcher = module.KeyMatcher([], ["default"], ["vera_A"], ["vera_A"], "tuner", [], [], [])
    keys = [
        "tuner.vera_A.default",
        "vera_A.default",
        "tuner.model.q.vera_A.default",
        "base_model.vera_A.default",
        "tuners.vera_A.default",
    ]
    assert matcher.filter(keys) == ["tuner.vera_A.default", "vera_A.default"]


@both_engines
@settings(max_examples=examples(300), deadline=None)
@given(
    keys=st.lists(KEY, max_size=20),
    prefixes=st.lists(NAME, max_size=3),
    adapters=st.lists(NAME, min_size=1, max_size=12),
    exact=st.lists(NAME, max_size=2),
    wrappers=st.lists(NAME, max_size=2),
    suffixes=st.dictionaries(NAME, NAME, max_size=2),
)
def test_renaming_agrees(
    keys: list[str],
    prefixes: list[str],
    adapters: list[str],
    exact: list[str],
    wrappers: list[str],
    suffixes: dict[str, str],
) -> None:
    # Wrapper and suffixed segments are drawn from the same words as the keys' segments, so
    # that they occur in keys.
    native = build(_native, prefixes, adapters, exact, [], ([], []), wrappers, suffixes)
    pure = build(_pure, prefixes, adapters, exact, [], ([], []), wrappers, suffixes)
    assert native.insert_adapter_name(keys, adapters[0]) == pure.insert_adapter_name(keys, adapters[0])
    assert native.remove_adapter_name(keys) == pure.remove_adapter_name(keys)
    # the span the name goes after, in characters (non-ASCII keys included)
    located = native.locate(keys)
    assert located == pure.locate(keys)
    for key, span, inserted in zip(keys, located, pure.insert_adapter_name(keys, adapters[0]), strict=True):
        if span is None:
            assert inserted is key
        else:
            assert inserted.startswith(key[: span[1]] + "." + adapters[0])
