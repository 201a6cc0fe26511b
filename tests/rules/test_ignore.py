"""User ignore expressions: what they drop, and the syntax both engines must read alike."""

from __future__ import annotations

import pytest

from fastkeys import KeyMatcher, filter_missing

EMBED = "base_model.model.embed_tokens.lora_embedding_A.default"
Q = "base_model.model.layers.0.q_proj.lora_A.default.weight"
K = "base_model.model.layers.12.k_proj.lora_A.default.weight"


def test_ignore_drops_matching_keys_searched_anywhere() -> None:
    assert filter_missing([EMBED, Q, K], ignore=["embed_tokens"]) == [Q, K]
    assert filter_missing([EMBED, Q, K], ignore=[r"layers\.\d+\.q_proj", "^base_model.model.embed"]) == [K]
    assert filter_missing([EMBED, Q, K], ignore=[]) == [EMBED, Q, K]
    assert filter_missing([EMBED, Q, K], ignore=(p for p in ["k_proj"])) == [EMBED, Q]


@pytest.mark.parametrize(
    ("pattern", "key", "dropped"),
    [
        (r"\.weight$", Q, True),
        (r"\.weight$", Q + "\n", False),  # Python's $ would match before a final newline; Rust's not
        (r"\.weight\Z", Q, True),
        (r"layers\.\d\d\.", K, True),
        (r"layers\.\d\d\.", K.replace("12", "١٢"), False),  # \d is ASCII in both engines
        (r"\w+_proj", Q, True),
        (r"(?i)LORA_A", Q, True),
        (r"LORA_A", Q, False),
        (r"(?P<layer>layers)\.0", Q, True),
        (r"x{,3}q_proj", Q, True),
        (r"q_proj{", Q, False),  # a brace that starts no repetition is a literal
        (r"\bq_proj\b", Q, True),
        (r"[\d_]+proj", Q, True),
        (r"[^.]*\.lora", Q, True),
    ],
)
def test_ignore_semantics(pattern: str, key: str, dropped: bool) -> None:
    assert filter_missing([key], ignore=[pattern]) == ([] if dropped else [key])


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(?=lora)", "lookaround"),
        ("(?<!x)lora", "lookaround"),
        (r"(a)\1", "back-references"),
        ("(?P<a>x)(?P=a)", "back-references"),
        ("(?(1)a|b)", "conditional"),
        ("(?>a)", "atomic"),
        ("a++", "possessive"),
        ("a{2}+", "possessive"),
        ("(?#note)", "comments"),
        ("(?x) a", "flag 'x'"),
        ("(?m)^a", "flag 'm'"),
        (r"\p{L}", r"escape \\p"),
        (r"\N{DASH}", r"escape \\N"),
        (r"\0", "octal"),
        ("[[:alpha:]]", "nested sets"),
        ("[a&&b]", "set operation"),
        ("[a--b]", "set operation"),
        (r"[\W]", r"\\W inside"),
        (r"[\b]", r"\\b is not supported inside"),
        ("\ud800", "lone surrogates"),
        (r"\ud800", "lone surrogates"),
        ("\ufffd", "U\\+FFFD"),
        (r"[\uf000-\uffff]", "range covering"),
        ("a{5000}", "above 1000"),
        ("(a", "missing \\)"),
        ("a**", "multiple repeat"),
        ("[z-a]", "reversed"),
        ("x\\", "lone backslash"),
        (r"\x4", "hex digits"),
    ],
)
def test_refused_syntax_names_the_expression(pattern: str, reason: str) -> None:
    with pytest.raises(
        ValueError, match=r"ignore\[1\] .* is not an expression fastkeys accepts: .*" + reason
    ):
        KeyMatcher(["lora_"], ["default"], ignore=["ok", pattern])


@pytest.mark.parametrize(
    ("ignore", "message"),
    [
        ("embed", r"not a single str: write ignore=\['embed'\]"),
        (3, "ignore must be an iterable of str, not int"),
        (["ok", 3], r"ignore\[1\] must be str, not int"),
        ([["nested"]], r"ignore\[0\] must be str, not list"),
    ],
)
def test_ignore_type_errors(ignore: object, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        filter_missing([Q], ignore=ignore)  # type: ignore[call-overload]
