"""Rules that hold only on some PEFT releases (records.Harmless), the release they are read for
(fastkeys.rules.versions), and FRoD's per-category tensors. No torch: the ground truth behind
each rule is tests/integrations/test_peft_versions.py, run on every release by `make test-compat`."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, cast

import pytest

from fastkeys import filter_missing
from fastkeys.rules import records as tuners
from fastkeys.rules import versions

VERA = ["base_model.vera_A.t", "base_model.vera_B.t", "m.q.vera_lambda_b.t", "m.q.vera_A.t"]
UNILORA = ["m.q.unilora_indices_A.t", "m.q.unilora_scales_B.t", "base_model.unilora_theta_d.t"]
TINYLORA = ["m.q.tinylora_P.t", "m.q.tinylora_A.t", "m.q.tinylora_v.t.0"]


@pytest.mark.parametrize(
    ("text", "release"),
    [("0.21.2", (0, 21, 2)), ("0.21.0.dev0", (0, 21, 0)), ("0.18.1.dev0@3f2a1b", (0, 18, 1)),
     ("1.0rc1", (1, 0)), (" 0.20 ", (0, 20))],
)  # fmt: skip
def test_a_release_is_its_leading_numbers(text: str, release: tuple[int, ...]) -> None:
    assert versions.parse(text) == release


def test_a_release_that_is_no_version_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"peft_version must be a version string such as '0\.21\.0', not 'x1'"
    ):
        filter_missing([], "t", peft_version="x1")
    with pytest.raises(TypeError, match=r"peft_version must be a version string .* not tuple"):
        filter_missing([], "t", peft_version=cast(Any, (0, 20)))


@pytest.mark.parametrize("text", ["0..21", "0.-1", "0,21", "0x21", "1e9", "0", "9" * 30])
def test_malformed_text_is_no_old_release(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stranger's config saying "0..21" must not read as release 0 (whose rules drop VeRA's
    projections): as an argument it is refused, from a config or the installed PEFT it counts as
    unknown (the newest rules)."""
    with pytest.raises(ValueError, match="peft_version must be a version string"):
        filter_missing(VERA, "t", "vera", peft_version=text)
    monkeypatch.setattr(versions, "installed_peft", lambda: None)
    assert filter_missing(VERA, "t", config={"peft_type": "VERA", "peft_version": text}) == VERA[:3]
    monkeypatch.setattr(versions, "installed_peft", lambda: text)
    assert filter_missing(VERA, "t", "vera") == VERA[:3]


@pytest.mark.parametrize("release", ["0.17.1", "0.18.1", "0.19.1", "0.20.0"])
def test_before_021_vera_projections_never_load_and_are_harmless(release: str) -> None:
    assert filter_missing(VERA, "t", "vera", peft_version=release) == ["m.q.vera_lambda_b.t"]
    pvera = [key.replace("vera", "pvera") for key in VERA]
    assert filter_missing(pvera, "t", "pvera", peft_version=release) == ["m.q.pvera_lambda_b.t"]


@pytest.mark.parametrize("release", ["0.21.0", "0.21.2", "0.22.0.dev0", "1.0"])
def test_from_021_vera_projections_matter(release: str) -> None:
    assert filter_missing(VERA, "t", "vera", peft_version=release) == VERA[:3]


def test_every_method_at_once_follows_the_release() -> None:
    assert filter_missing(VERA, "t", peft_version="0.20.0") == ["m.q.vera_lambda_b.t"]
    assert filter_missing(VERA, "t", peft_version="0.21.0") == VERA[:3]


@pytest.mark.parametrize(
    ("config", "release", "kept"),
    [
        ({"peft_type": "UNILORA", "save_indices": False}, "0.20.0", UNILORA[2:]),
        ({"peft_type": "UNILORA", "save_indices": True}, "0.20.0", UNILORA),
        ({"peft_type": "UNILORA"}, "0.20.0", UNILORA),  # the flag unknown: they may matter
        ({"peft_type": "UNILORA", "save_indices": False}, "0.21.0", UNILORA),
    ],
)
def test_unilora_indices_before_021_depend_on_save_indices(
    config: dict[str, object], release: str, kept: list[str]
) -> None:
    assert filter_missing(UNILORA, "t", config=config, peft_version=release) == kept


def test_tinylora_projections_before_021_depend_on_save_projection() -> None:
    off = {"peft_type": "TINYLORA", "save_projection": False}
    assert filter_missing(TINYLORA, "t", config=off, peft_version="0.19.1") == TINYLORA[1:2]
    assert filter_missing(TINYLORA, "t", config=off, peft_version="0.21.2") == TINYLORA[:2]
    on = {"peft_type": "TINYLORA", "save_projection": True}
    assert filter_missing(TINYLORA, "t", config=on, peft_version="0.19.1") == TINYLORA[:2]
    # Without a config, the flag is unknown: the projections may matter.
    assert filter_missing(TINYLORA, "t", "tinylora", peft_version="0.19.1") == TINYLORA[:2]


def test_a_harmless_segment_of_another_adapter_stays_out() -> None:
    keys = ["base_model.vera_A.t", "base_model.vera_A.u", "m.q.vera_lambda_b.u"]
    assert filter_missing(keys, "u", "vera", peft_version="0.20.0") == ["m.q.vera_lambda_b.u"]
    assert filter_missing(keys, "u", "vera", peft_version="0.21.0") == keys[1:]


class _Config:
    peft_type = "VERA"

    def __init__(self, peft_version: str | None) -> None:
        self.peft_version = peft_version


def test_the_release_is_the_argument_then_the_installed_peft_then_the_config(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(versions, "installed_peft", lambda: "0.20.0")
    saved_new = {"peft_type": "VERA", "peft_version": "0.21.2"}
    # The installed PEFT loads the adapter: its release counts, not the one that saved it.
    assert filter_missing(VERA, "t", config=saved_new) == ["m.q.vera_lambda_b.t"]
    assert filter_missing(VERA, "t", config=saved_new, peft_version="0.21.0") == VERA[:3]
    monkeypatch.setattr(versions, "installed_peft", lambda: None)
    assert filter_missing(VERA, "t", config=saved_new) == VERA[:3]
    assert filter_missing(VERA, "t", config={**saved_new, "peft_version": "0.19.1"}) == VERA[2:3]
    assert filter_missing(VERA, "t", config=_Config("0.18.1")) == VERA[2:3]
    # Nothing to go by (or a config's version that is none): the newest rules.
    assert filter_missing(VERA, "t", "vera") == VERA[:3]
    assert filter_missing(VERA, "t", config={**saved_new, "peft_version": "main"}) == VERA[:3]


def test_the_release_is_read_only_when_a_rule_could_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    def unread() -> str:
        raise AssertionError("the release was looked up")

    monkeypatch.setattr(versions, "installed_peft", unread)
    assert filter_missing(["m.q.lora_A.t.weight", "m.q.weight"], "t") == ["m.q.lora_A.t.weight"]
    assert filter_missing(VERA[2:], "t", "vera") == VERA[2:3]
    with pytest.raises(AssertionError, match="looked up"):
        filter_missing(VERA, "t", "vera")


def test_a_vera_load_imports_no_metadata_unless_a_rule_could_apply() -> None:
    code = (
        "import sys, fastkeys;"
        "fastkeys.filter_missing(['m.q.vera_lambda_b.t', 'm.q.weight'], 't', 'vera');"
        "print('importlib.metadata' in sys.modules, 'peft' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


# FRoD keeps its projections once per category of layer: `base_model.frod_V.<category>.<name>`.
FROD = [
    "base_model.frod_V.self_attn_q_proj.t",
    "base_model.frod_s_indices.self_attn_q_proj.t",
    "base_model.model.m.q.weight",
    "base_model.frod_s_size.self_attn_v_proj.t",
    "base_model.model.m.q.frod_lambda_l.t",
    "base_model.frod_V.self_attn_q_proj.u",  # another adapter's
    "base_model.model.m.frod_V.c.t",  # not at model level
    "base_model.frod_V.self_attn_q_proj.t.extra",
]


@pytest.mark.parametrize("peft_type", ["frod", None])
def test_frod_per_category_projections_matter_in_input_order(peft_type: str | None) -> None:
    assert filter_missing(FROD, "t", peft_type) == [FROD[0], FROD[1], FROD[3], FROD[4]]
    assert filter_missing(iter(FROD), "t", peft_type) == [FROD[0], FROD[1], FROD[3], FROD[4]]
    assert filter_missing(FROD, "u", peft_type) == [FROD[5]]
    assert filter_missing(["frod_V.c.t", "frod_V.c.u"], "t", peft_type) == ["frod_V.c.t"]


def test_frod_per_category_projections_follow_ignore() -> None:
    assert filter_missing(FROD, "t", "frod", ignore=[r"frod_s_"]) == [FROD[0], FROD[4]]


def test_a_method_without_per_category_tensors_keeps_none_of_them() -> None:
    assert filter_missing(FROD, "t", "lora") == []


def test_every_harmless_rule_names_its_methods_own_tensors() -> None:
    for method in tuners.METHODS.values():
        for rule in method.harmless:
            assert rule.since is not None or rule.until is not None, (method.name, rule)
            for segment in rule.segments:
                assert segment.startswith(method.prefix) or segment in method.exact, (method.name, segment)
        for segment in method.per_category:
            assert segment.startswith(method.prefix), (method.name, segment)


def test_a_rule_holds_from_since_to_until() -> None:
    rule = tuners.Harmless(("x_A",), since=(0, 19), until=(0, 21))
    assert [rule.holds(r) for r in [(0, 18, 9), (0, 19), (0, 20, 5), (0, 21), None]] == [
        False, True, True, False, False,
    ]  # fmt: skip
    assert tuners.Harmless(("x_A",), since=(0, 19)).holds(None)
    assert rule == tuners.Harmless(("x_A",), since=(0, 19), until=(0, 21)) and "until=(0, 21)" in repr(rule)
