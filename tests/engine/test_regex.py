"""The linear-time engines: `fastkeys.engine.pure.regex.Regex` (the fallback's Pike VM and lazy
DFA) answers as Python's `re` on the expressions `translate` accepts, and as Rust's `regex` (`_native.Regex`),
for `search` and for the group that `layers_pattern` reads."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkeys.engine.pure import regex as _pure_regex
from fastkeys.rules.expressions import translate
from tests.conftest import examples
from tests.engine.test_differential import KEY, PATTERN

# Both engines side by side, in-process: the same test under FASTKEYS_IMPLEMENTATION=python would
# repeat it (`make test-python` deselects it).
pytestmark = pytest.mark.both_engines

# Characters whose case differs between `re`'s and `regex`'s (?i): ASCII folding keeps them apart.
CASE_PAIRS = "kK\u212asS\u017fiI\u0130\u0131\u00df\u1e9e\u03a9\u03c9\u2126"
FOLDED = st.text(alphabet=st.sampled_from(CASE_PAIRS + ".x"), max_size=8)
LAYERS = ("^(?:(?:^|.*?\\.){}\\.([0-9]+)\\.)", "\\A(?:(?:\\A|.*?\\.){}\\.([0-9]+)\\.)")


def _native() -> object:
    return pytest.importorskip("fastkeys._native")


@settings(max_examples=examples(150), deadline=None)
@given(key=KEY, pattern=PATTERN)
def test_search_answers_as_re(key: str, pattern: str) -> None:
    (for_python,) = translate([pattern])[1]
    assert _pure_regex.Regex(for_python).search(key) == (re.search(for_python, key) is not None)


@settings(max_examples=examples(150), deadline=None)
@given(key=KEY, pattern=PATTERN)
def test_search_answers_as_the_native_engine(key: str, pattern: str) -> None:
    native = _native()
    (for_rust,), (for_python,) = translate([pattern])
    assert _pure_regex.Regex(for_python).search(key) == native.Regex(for_rust).search(key)  # type: ignore[attr-defined]


@settings(max_examples=examples(150), deadline=None)
@given(
    key=FOLDED, pattern=st.lists(st.sampled_from(["k", "s", "i", "I", "[a-z]", "[^k]", "x", "."]), max_size=3)
)
def test_case_insensitive_expressions_agree(key: str, pattern: list[str]) -> None:
    native = _native()
    (for_rust,), (for_python,) = translate(["(?i)" + "".join(pattern)])
    assert _pure_regex.Regex(for_python).search(key) == native.Regex(for_rust).search(key)  # type: ignore[attr-defined]


@settings(max_examples=examples(150), deadline=None)
@given(
    segments=st.lists(st.sampled_from(["model", "layers", "h", "3", "12", "q_proj", "x1"]), max_size=7),
    pattern=st.sampled_from(["layers", "h", "layers|h", "(?:layers|h)", "lay.*", "[a-z]+", "h?"]),
)
def test_the_layer_index_group_answers_as_re_and_as_the_native_engine(
    segments: list[str], pattern: str
) -> None:
    name = ".".join(segments)
    (for_rust,), (for_python,) = translate([pattern])
    found = re.match(f"(?:^|.*?\\.){for_python}\\.([0-9]+)\\.", name)  # as PEFT writes it
    expected = found.group(1) if found else None
    assert _pure_regex.Regex(LAYERS[1].format(for_python)).group(name) == expected
    native = _native()
    assert native.Regex(LAYERS[0].format(for_rust)).group(name) == expected  # type: ignore[attr-defined]


def test_a_full_dfa_cache_starts_afresh_with_the_same_answers() -> None:
    (for_python,) = translate([r"(?:[a-z]\d){1,40}x"])[1]
    engine = _pure_regex.Regex(for_python)
    keys = ["".join(f"{chr(97 + (i * j) % 26)}{j % 10}" for j in range(i % 40)) + "x" for i in range(3000)]
    assert [engine.search(key) for key in keys] == [re.search(for_python, key) is not None for key in keys]
    assert len(engine._dfa.states) <= _pure_regex._CACHE + 1
