"""The benchmark suite's quick mode: every contender still gives fastkeys' answer.

No timing is asserted here (these machines are shared and noisy); `make bench` measures."""

from __future__ import annotations

import pytest

from benches import suite as bench
from fastkeys.cli import demo as scenarios

# Both engines side by side, in-process: the same test under FASTKEYS_IMPLEMENTATION=python would
# repeat it (`make test-python` deselects it).
pytestmark = pytest.mark.both_engines


def test_quick_suite_runs_and_every_exact_contender_agrees() -> None:
    report = bench.run(quick=True)
    scenarios_seen = {result["scenario"] for result in report["results"]}
    assert {"seed", "serving", "dense", "group", "renaming", "headers", "import"} <= scenarios_seen
    for result in report["results"]:
        for label, agrees in result.get("agrees", {}).items():
            if not label.startswith(("floor", "PEFT")):
                assert agrees, f"{result['scenario']}: {label}"
    text = bench.format_report(report)
    assert "Targets" in text and "serving" in text


def test_a_wrong_contender_is_caught() -> None:
    keys, _incoming, lost = bench.serving_keys(3)
    contenders = {"wrong": lambda: lost[:1]}
    with pytest.raises(bench.Disagreement, match="serving: wrong disagrees"):
        bench._run_scenario("serving", len(keys), contenders, lost, {"wrong"}, 1)


def test_alternatives_are_exact_on_overlapping_names() -> None:
    """The pure-Python contenders are exact, not just fast: same answer as fastkeys where PEFT's
    substring test is wrong."""
    keys = scenarios.model_keys(2, ["default", "default_1", "default_10"])
    expected = [key for key in keys if ".default." in key]
    for contender in (
        bench.best_python,
        bench.regex_alone,
        bench.ahocorasick_rs_per_key,
        bench.pyahocorasick_per_key,
    ):
        assert contender(keys, "default") == expected, contender.__name__
    assert scenarios.peft_substring_filter(keys, "default", "lora_") != expected
