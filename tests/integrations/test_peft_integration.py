"""fastkeys on real PEFT models: the ground truth of PEFT-KEYS.md, for every method.

For a saved adapter loaded into a model whose embeddings were resized after saving (and, for
load_adapter, with another adapter already in place), every missing key torch reports is harmless:
the verdict must be empty. With one checkpoint tensor dropped, the keys that become newly missing
are exactly the relevant ones: the verdict must equal them. Checked through
fastkeys.peft.load_adapter, fastkeys.peft.from_pretrained and filter_missing on the raw result.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import fastkeys.peft as fkpeft  # noqa: E402
from fastkeys import MissingAdapterKeysWarning, filter_missing  # noqa: E402
from fastkeys.integrations.loader import boundary  # noqa: E402
from fixtures.peft_models import (  # noqa: E402
    METHOD_CONFIGS,
    TRICKY_NAMES,
    PeftSurvey,
    checkpoint_keys,
    load_or_refusal,
    peft_load_adapter_filter,
    pretrained_load,
    raw_load,
    save_adapter,
    tiny_bert,
    tiny_llama,
    tricky_lora_config,
    without,
)

pytest_plugins = ["tests.peft_survey"]  # the `peft_survey` fixture
pytestmark = pytest.mark.engine  # ground truth: verdicts under both implementations


# The methods whose warnings are checked below, and those whose copy of PEFT's filter is: the
# adapters saved once per module (the ground truth reads the session survey's own).
WARNED = ["lora", "vera", "vblora", "tinylora", "unilora", "lora+modules_to_save"]
FILTERED = ["lora", "vera", "vblora", "tinylora", "unilora", "boft"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_adapter(METHOD_CONFIGS[name](), root / name.replace("+", "_"))
        for name in {*WARNED, *FILTERED}
    }


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_ground_truth_every_method(method: str, peft_survey: PeftSurvey) -> None:
    # load_adapter: the session's survey (the loads of the docs' PEFT table), raw_load(path, "target",
    # {"default": directory}) of the complete checkpoint and of each one-tensor-short copy (PEFT
    # cannot mix methods in one model: the adapter already in place is of the same method).
    # from_pretrained: loaded here, from the same copies.
    survey = peft_survey.method(method)
    directory = survey.directory
    config = fkpeft_config(directory)
    loads: dict[str, tuple[tuple[list[str], Any], dict[str, tuple[list[str], Any] | None]]] = {
        "load_adapter": (survey.complete, survey.dropped),
        "from_pretrained": (
            pretrained_load(directory, "target"),
            {key: load_or_refusal(pretrained_load, path, "target") for key, path in survey.copies.items()},
        ),
    }
    for entry, ((reported, complete), dropped) in loads.items():
        assert complete.missing_keys, "torch reports the base model's keys as missing"
        assert list(reported) == [], f"{method} via {entry}: harmless keys reported: {reported}"
        assert filter_missing(complete, "target", config=config).missing_keys == []
        checked = 0
        for key, loaded in dropped.items():
            if loaded is None:
                continue  # PEFT itself refuses to load without this tensor: nothing goes silently missing
            reported, raw = loaded
            newly_missing = sorted(set(raw.missing_keys) - set(complete.missing_keys))
            assert sorted(reported) == newly_missing, f"{method} via {entry}: dropped {key}"
            assert sorted(filter_missing(raw, "target", config=config).missing_keys) == newly_missing
            checked += bool(newly_missing)
        assert checked, f"{method} via {entry}: no dropped tensor made a key go missing"


def fkpeft_config(directory: Path) -> Any:
    return peft.PeftConfig.from_pretrained(str(directory))


@pytest.mark.parametrize("method", WARNED)
def test_from_pretrained_warns_once_exactly_when_relevant(
    method: str, saved: dict[str, Path], tmp_path: Path
) -> None:
    directory = saved[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fkpeft.from_pretrained(tiny_llama(resized=True), str(directory), "default")
    assert isinstance(model, peft.PeftModel)
    assert [w for w in caught if issubclass(w.category, MissingAdapterKeysWarning)] == []
    assert not [w for w in caught if "Found missing adapter keys" in str(w.message)]

    key = checkpoint_keys(directory)[0]  # an adapter tensor PEFT does not refuse to lose
    dropped = without(directory, key, tmp_path / "dropped")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with boundary.recorded_results() as records:
            fkpeft.from_pretrained(tiny_llama(resized=True), str(dropped), "default")
    ours = [w for w in caught if issubclass(w.category, MissingAdapterKeysWarning)]
    assert len(ours) == 1
    assert not [w for w in caught if "Found missing adapter keys" in str(w.message)]
    message = str(ours[0].message)
    assert "adapter 'default'" in message
    # The complete load's raw result, to name exactly what went missing.
    with boundary.recorded_results() as complete_records:
        fkpeft.from_pretrained(tiny_llama(resized=True), str(directory), "default")
    newly = sorted(set(records[-1].missing_keys) - set(complete_records[-1].missing_keys))
    assert f"{len(newly)} of its tensors are missing" in message
    for missing_key in newly[:5]:
        assert missing_key in message


# Names that PEFT's substring filter confuses with other adapters or with module names here.
TRIPS_PEFT = {"foo", "default_1", "model", "1", "mlp", "lora"}


@pytest.fixture(scope="module")
def lora_with_mlp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(tricky_lora_config(), tmp_path_factory.mktemp("tricky") / "lora")


@pytest.mark.parametrize("target", TRICKY_NAMES)
def test_overlapping_adapter_names(target: str, lora_with_mlp: Path, tmp_path: Path) -> None:
    directory = lora_with_mlp
    existing = {name: directory for name in TRICKY_NAMES if name != target}
    verdict, complete = raw_load(directory, target, existing)
    assert verdict == []
    # PEFT's own filter gets these wrong: the raw result holds the other adapters' keys.
    from fastkeys.cli.demo import peft_substring_filter

    assert bool(peft_substring_filter(complete.missing_keys, target, "lora_")) == (target in TRIPS_PEFT)

    key = checkpoint_keys(directory)[1]
    dropped = without(directory, key, tmp_path / "dropped")
    verdict, raw = raw_load(dropped, target, existing)
    newly = sorted(set(raw.missing_keys) - set(complete.missing_keys))
    assert len(newly) == 1
    assert verdict == newly


def test_second_architecture_bert_classifier(tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS")
    directory = save_adapter(config, tmp_path / "bert", model_factory=tiny_bert)
    keys = checkpoint_keys(directory)
    assert any("classifier" in key for key in keys), "the classification head is saved (modules_to_save)"

    def load(path: Path) -> tuple[Any, Any]:
        model = peft.PeftModel.from_pretrained(tiny_bert(), directory, "default")
        with boundary.recorded_results() as records:
            verdict = fkpeft.load_adapter(model, str(path), "default_1")
        return verdict, records[-1]

    verdict, complete = load(directory)
    assert verdict.missing_keys == []
    checked = 0
    for index, key in enumerate(keys):
        loaded = load_or_refusal(load, without(directory, key, tmp_path / f"d{index}"))
        if loaded is None:
            assert "classifier" in key  # PEFT 0.21 raises KeyError for a lost modules_to_save tensor
            continue
        verdict, raw = loaded
        newly = sorted(set(raw.missing_keys) - set(complete.missing_keys))
        assert sorted(verdict.missing_keys) == newly
        checked += bool(newly)
    assert checked


def test_filter_load_result_names_a_missing_adapter(saved: dict[str, Path]) -> None:
    model = peft.PeftModel.from_pretrained(tiny_llama(), saved["lora"], "default")
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; it has \['default'\]"):
        fkpeft.filter_load_result(model, None, "nope")
    with pytest.raises(TypeError, match="must be a PEFT model"):
        fkpeft.filter_load_result(object(), None, "default")


def test_a_peft_without_the_internal_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import peft_model

    monkeypatch.delattr(peft_model, "set_peft_model_state_dict")
    with pytest.raises(
        RuntimeError, match=r"relies on peft\.peft_model\.set_peft_model_state_dict, which peft \S+"
    ):
        fkpeft.load_adapter(object(), "x", "default")


def test_one_recorder_under_every_name_peft_exposes() -> None:
    """PEFT's loader, diffusers and transformers 4.57 call set_peft_model_state_dict by three names:
    one wrapper records for all of them."""
    import peft.utils
    from peft.utils import save_and_load

    boundary.install()
    wrapper = getattr(peft.peft_model, "set_peft_model_state_dict")  # noqa: B009  (not re-exported)
    assert wrapper is peft.set_peft_model_state_dict is peft.utils.set_peft_model_state_dict
    assert wrapper.__wrapped__ is save_and_load.set_peft_model_state_dict  # type: ignore[attr-defined]


def test_recording_is_a_pass_through_outside_fastkeys(saved: dict[str, Path]) -> None:
    boundary.install()  # installs the recorder
    model = peft.PeftModel.from_pretrained(tiny_llama(), saved["lora"], "default")
    result = model.load_adapter(saved["lora"], "other")
    # PEFT's own (filtered) behaviour is unchanged when fastkeys is not asked: its substring rule
    # keeps nothing here because no key holds "other" but the other adapter's.
    assert result.missing_keys == []
    assert "other" in model.peft_config


@pytest.mark.parametrize("method", FILTERED)
def test_the_copy_of_peft_filter_is_faithful(method: str, saved: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's own load_adapter result equals our copy of its filter applied to the raw result."""
    directory = saved[method]
    for index, key in enumerate([None, *checkpoint_keys(directory)[:3]]):
        path = directory if key is None else without(directory, key, tmp_path / f"d{index}")
        model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), directory, "default")
        try:
            with boundary.recorded_results() as records:
                boundary.install()
                peft_result = model.load_adapter(str(path), "default_1")
        except (ValueError, KeyError):
            continue
        peft_type = model.peft_config["default_1"].peft_type.value
        assert peft_result.missing_keys == peft_load_adapter_filter(
            records[-1].missing_keys, "default_1", peft_type
        )


def test_load_adapter_passes_peft_arguments_through(saved: dict[str, Path]) -> None:
    """Same arguments and side effects as PeftModel.load_adapter: config, trainability, meta-device
    loading."""
    model = peft.PeftModel.from_pretrained(tiny_llama(resized=True), saved["lora"], "default")
    result = fkpeft.load_adapter(
        model, str(saved["lora"]), "trained", is_trainable=True, low_cpu_mem_usage=True
    )
    assert result.missing_keys == []
    assert model.peft_config["trained"].inference_mode is False
    trained = [p for n, p in model.named_parameters() if ".trained." in n]
    assert trained and all(p.requires_grad for p in trained)
    assert all(p.device.type == "cpu" for p in trained)
    frozen = fkpeft.load_adapter(model, str(saved["lora"]), "frozen")
    assert frozen.missing_keys == []
    assert model.peft_config["frozen"].inference_mode is True
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)
