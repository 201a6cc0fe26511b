"""filter_missing against the PEFT that runs, whatever its release (0.17 to 0.21): the ground truth
of PEFT-KEYS.md read from PEFT alone, without fastkeys' loaders.

For each method the running PEFT has, an adapter is saved, then loaded complete and once per
dropped checkpoint tensor, through `PeftModel.load_adapter` (beside an adapter of the same method)
and `PeftModel.from_pretrained`. PEFT's raw load result is recorded before PEFT filters it; the
keys that a dropped tensor makes newly missing are exactly the relevant ones, and a complete load
has none. `filter_missing` must give exactly those, with the adapter's config.

By default only the variants that tests/integrations/test_peft_integration.py does not build run (the
save_projection / save_indices settings and FRoD); `make test-compat` (scripts/compat.py) sets
FASTKEYS_COMPAT=1 and runs every method, on each supported (PEFT, transformers) pair.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fastkeys import filter_missing  # noqa: E402
from fixtures.peft_models import (  # noqa: E402
    METHOD_CONFIGS,
    QV,
    checkpoint_keys,
    save_adapter,
    tiny_llama,
    without,
)

pytestmark = pytest.mark.engine  # ground truth: verdicts under both implementations

VARIANTS: dict[str, Callable[[], Any]] = {
    "vera(save_projection=False)": lambda: peft.VeraConfig(r=4, target_modules=QV, save_projection=False),
    "pvera(save_projection=False)": lambda: peft.PveraConfig(r=4, target_modules=QV, save_projection=False),
    "randlora(save_projection=False)": lambda: peft.RandLoraConfig(
        r=4, target_modules=QV, save_projection=False
    ),
    "tinylora(save_projection=False)": lambda: peft.TinyLoraConfig(target_modules=QV, save_projection=False),
    "unilora(save_indices=True)": lambda: peft.UniLoraConfig(target_modules=QV, save_indices=True),
    "frod": lambda: peft.FrodConfig(target_modules=QV, progressbar=False),
}
# Cases with nothing version- or method-specific left to check on the pinned PEFT: only under
# `make test-compat`, with every method.
COMPAT_ONLY: dict[str, Callable[[], Any]] = {
    "frod(save_projection=False)": lambda: peft.FrodConfig(
        target_modules=QV, save_projection=False, progressbar=False
    ),
    "bone": lambda: peft.BoneConfig(r=4, target_modules=QV),  # PEFT < 0.19 (MiSS replaced it)
}
EVERY = os.environ.get("FASTKEYS_COMPAT") == "1"
CASES = {**METHOD_CONFIGS, **VARIANTS, **COMPAT_ONLY} if EVERY else VARIANTS
# Outside `make test-compat`, one loader: the other reads the same raw result through the same rule.
LOADERS = ("load_adapter", "from_pretrained") if EVERY else ("load_adapter",)


@pytest.fixture
def raw_results(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[str], list[str]]]]:
    """The (missing, unexpected) keys of every load, as `load_state_dict` gave them: PEFT's
    `load_adapter` filters the result in place afterwards."""
    from peft import peft_model

    original = getattr(peft_model, "set_peft_model_state_dict")  # noqa: B009 (not re-exported)
    seen: list[tuple[list[str], list[str]]] = []

    def recording(*args: Any, **kwargs: Any) -> Any:
        result: Any = original(*args, **kwargs)
        seen.append((list(result.missing_keys), list(result.unexpected_keys)))
        return result

    monkeypatch.setattr(peft_model, "set_peft_model_state_dict", recording)
    yield seen


def _config(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except AttributeError as error:  # a method this PEFT does not have
        pytest.skip(f"peft {peft.__version__} lacks it: {error}")


@pytest.mark.parametrize("case", list(CASES))
def test_filter_missing_is_exact_on_the_running_peft(
    case: str, raw_results: list[tuple[list[str], list[str]]], tmp_path: Path
) -> None:
    directory = save_adapter(_config(CASES[case]), tmp_path / "adapter")

    def load_adapter(path: Path) -> Any:
        model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), str(directory), "default")
        model.load_adapter(str(path), "target")
        return model

    def from_pretrained(path: Path) -> Any:
        return peft.PeftModel.from_pretrained(tiny_llama(resized=True), str(path), "target")

    wrong: list[str] = []
    checked = 0
    loaders = {"load_adapter": load_adapter, "from_pretrained": from_pretrained}
    for entry in LOADERS:
        load = loaders[entry]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's and transformers' notices, which vary by release
            model = load(directory)
            complete = raw_results[-1][0]
            config = model.peft_config["target"]
            verdict = filter_missing(complete, "target", config=config)
            if verdict:
                wrong.append(f"{entry}, complete: harmless keys kept {verdict}")
            for index, key in enumerate(checkpoint_keys(directory)):
                try:
                    load(without(directory, key, tmp_path / f"{entry}-{index}"))
                except (ValueError, KeyError):
                    continue  # PEFT refuses to load without it: nothing goes silently missing
                raw = raw_results[-1][0]
                truth = sorted(set(raw) - set(complete))
                got = sorted(filter_missing(raw, "target", config=config))
                checked += bool(truth)
                if got != truth:
                    wrong.append(f"{entry}, without {key}: kept {got}, relevant {truth}")
    assert not wrong, f"peft {peft.__version__}:\n" + "\n".join(wrong)
    assert checked, "no dropped tensor made a key go missing"


def test_the_release_comes_from_the_running_peft() -> None:
    """The rules that apply are those of the PEFT in this process (the overlay under
    `make test-compat`), read from its metadata."""
    from fastkeys.rules import versions

    assert versions.installed_peft() == peft.__version__


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_fastkeys_peft_loads_on_the_running_peft(method: str, tmp_path: Path) -> None:
    """`fastkeys.peft` works on every supported release: the fast path where it was verified,
    PEFT's own loader with the reason elsewhere, and the same verdict either way."""
    import fastkeys.peft as fkpeft
    from fastkeys.integrations.loader import boundary

    directory = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    dropped = without(directory, checkpoint_keys(directory)[0], tmp_path / "dropped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), str(directory), "default")
        complete = fkpeft.load_adapter(model, str(directory), "complete")
        assert list(complete.missing_keys) == []
        lacking = fkpeft.load_adapter(model, str(dropped), "lacking")
        assert lacking.missing_keys and all(".lacking" in key for key in lacking.missing_keys)
        many = fkpeft.load_adapters(model, {"a": str(directory), "b": str(dropped)}, progress=False)
    assert [list(result.missing_keys) == [] for result in many.values()] == [True, False]
    refusal = boundary.version_refusal()
    for result in many.values():
        if refusal is not None:  # a release the fast path was not verified on
            assert (result.loader, result.reason) == ("peft", refusal)
        elif result.loader == "peft":
            assert result.reason, "PEFT's loader runs with a reason"
