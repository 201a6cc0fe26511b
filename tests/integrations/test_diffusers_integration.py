"""fastkeys.diffusers on real diffusers models: the ground truth of PEFT-KEYS.md through
diffusers' own `load_lora_adapter`.

A tiny UNet2DConditionModel and a tiny SD3 transformer (MMDiT), built from configs, each already
holding LoRA adapters with overlapping names, load one more. The complete checkpoint: the verdict
must be empty. A copy that lost one tensor: the verdict must be exactly the keys that became newly
missing. The default run drops a few representative tensors per case; FASTKEYS_FULL=1 drops each
tensor in turn.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
from safetensors.torch import load_file

pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")

import fastkeys.diffusers as fkd  # noqa: E402
from fastkeys import MissingAdapterKeysWarning  # noqa: E402
from fixtures.peft_models import (  # noqa: E402
    DIFFUSERS_FILE,
    LOADER_NAMES,
    diffusers_load,
    fastkeys_diffusers_load,
    loader_survey,
    save_diffusers_lora,
    save_sd_pipeline_lora,
    tiny_sd3_transformer,
    tiny_sd_pipeline,
    tiny_unet,
    without_tensor,
)

# diffusers loads a pipeline's text encoder through transformers' load_adapter (4.57 or 5.x)
TRANSFORMERS_4 = int(pytest.importorskip("transformers").__version__.split(".")[0]) == 4

pytestmark = pytest.mark.engine  # fastkeys' verdicts come from the engine: both implementations

FULL = os.environ.get("FASTKEYS_FULL") == "1"
MODELS: dict[str, Callable[[], Any]] = {"unet": tiny_unet, "sd3-transformer": tiny_sd3_transformer}


def representative(keys: list[str]) -> list[str]:
    """The first, a middle and the last tensor (every one with FASTKEYS_FULL=1)."""
    return keys if FULL else sorted({keys[0], keys[len(keys) // 2], keys[-1]})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {name: save_diffusers_lora(make, root / name) for name, make in MODELS.items()}


def with_adapters(model_name: str, directory: Path, names: list[str]) -> Any:
    model = MODELS[model_name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            model.load_lora_adapter(
                str(directory), adapter_name=name, prefix=None, weight_name=DIFFUSERS_FILE
            )
    return model


# The UNet is the slow one (64 tensors, a deep module tree): one name in the default run.
CASES = [
    (model, name)
    for model in MODELS
    for name in LOADER_NAMES
    if FULL or name in (["foo"] if model == "unet" else ["foo", "default_1", "lora", "model"])
]


@pytest.mark.parametrize(("model_name", "adapter_name"), CASES)
def test_ground_truth_beside_overlapping_names(
    model_name: str, adapter_name: str, saved: dict[str, Path], tmp_path: Path
) -> None:
    directory = saved[model_name]
    others = [name for name in LOADER_NAMES if name != adapter_name]
    base = with_adapters(model_name, directory, others)
    counts = loader_survey(
        base,
        diffusers_load,
        fastkeys_diffusers_load,
        directory,
        DIFFUSERS_FILE,
        adapter_name,
        tmp_path,
        representative,
    )
    for key, verdict, truth in counts["cases"]:
        assert verdict == truth, f"{model_name}, adapter {adapter_name!r}, dropped {key}"
        assert key == "complete" or truth, f"dropping {key} made no key go missing"
    assert counts["dropped_fastkeys"] == counts["tensors"] >= 3


def test_foo_beside_foobar(saved: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """diffusers blames `foo` for `foobar`'s tensors; fastkeys does not, and its own warning sees
    only the tensor that is really missing."""
    directory = saved["unet"]
    assert len(diffusers_load(with_adapters("unet", directory, ["foobar"]), directory, "foo")) == 64
    key = sorted(load_file(directory / DIFFUSERS_FILE))[0]
    dropped = without_tensor(directory, DIFFUSERS_FILE, key, tmp_path / "dropped")
    model = with_adapters("unet", directory, ["foobar"])
    logger = logging.getLogger("diffusers.utils.peft_utils")
    logger.addHandler(caplog.handler)
    caplog.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fkd.load_lora_adapter(
                model, str(dropped), "foo", prefix=None, weight_name=DIFFUSERS_FILE
            )
    finally:
        logger.removeHandler(caplog.handler)
    expected = key.replace(".lora_A.", ".lora_A.foo.").replace(".lora_B.", ".lora_B.foo.")
    assert result.missing_keys == [expected] and result.unexpected_keys == []
    ours = [w.message for w in caught if isinstance(w.message, MissingAdapterKeysWarning)]
    assert len(ours) == 1 and ours[0].missing_keys == [expected] and ours[0].adapter_name == "foo"
    assert {record.getMessage() for record in caplog.records} == {
        f"Loading adapter weights from state_dict led to missing keys in the model: {expected}."
    }
    assert set(model.peft_config) == {"foobar", "foo"}


def test_name_chosen_by_diffusers(saved: dict[str, Path]) -> None:
    model = with_adapters("unet", saved["unet"], [])
    fkd.load_lora_adapter(model, str(saved["unet"]), prefix=None, weight_name=DIFFUSERS_FILE)
    result = fkd.load_lora_adapter(model, str(saved["unet"]), prefix=None, weight_name=DIFFUSERS_FILE)
    assert list(model.peft_config) == ["default_0", "default_1"] and result.missing_keys == []


def test_nothing_loaded_under_the_prefix_is_none(saved: dict[str, Path]) -> None:
    model = with_adapters("unet", saved["unet"], [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            fkd.load_lora_adapter(model, str(saved["unet"]), "x", prefix="unet", weight_name=DIFFUSERS_FILE)
            is None
        )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="adapter_name"):
        fkd.load_lora_adapter(tiny_unet(), "unused", "a.b")
    with pytest.raises(TypeError, match=r"model must be a diffusers model with LoRA support .*, not list"):
        fkd.load_lora_adapter([], "unused")
    with pytest.raises(
        TypeError, match=r"pipeline must be a diffusers pipeline .*, not UNet2DConditionModel"
    ):
        fkd.load_lora_weights(tiny_unet(), "unused")


def test_missing_internal_is_a_runtime_error_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import peft

    monkeypatch.delattr(peft, "set_peft_model_state_dict")
    with pytest.raises(RuntimeError, match=rf"peft.set_peft_model_state_dict.*peft {peft.__version__}"):
        fkd.load_lora_adapter(tiny_unet(), "unused")


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_unet()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r'pip install "fastkeys\[diffusers\]"'):
        fkd.load_lora_adapter(model, "unused")


def pipeline_load(pipeline: Any, path: str, adapter_name: str, **kwargs: Any) -> Any:
    """diffusers' own `load_lora_weights`, called as `fkd.load_lora_weights` is."""
    return pipeline.load_lora_weights(path, adapter_name=adapter_name, **kwargs)


def test_pipeline_unet_and_text_encoder(tmp_path: Path) -> None:
    """`load_lora_weights` on a pipeline: the UNet through diffusers, the text encoder through
    transformers; each component's verdict against the ground truth, beside `foobar`."""
    from fastkeys.integrations import recorder

    directory = save_sd_pipeline_lora(tmp_path / "lora")
    keys = sorted(load_file(directory / DIFFUSERS_FILE))
    picks = [
        next(k for k in keys if k.startswith("unet.")),
        next(k for k in keys if k.startswith("text_encoder.")),
    ]
    complete: dict[str, list[str]] = {}
    for dropped in [None, *picks]:
        path = (
            directory
            if dropped is None
            else without_tensor(directory, DIFFUSERS_FILE, dropped, tmp_path / "d")
        )
        if TRANSFORMERS_4 and dropped is not None and dropped.startswith("text_encoder."):
            # transformers 4.57 leaves the missing tensor on the meta device (diffusers loads with
            # low_cpu_mem_usage) and diffusers' `text_encoder.to(...)` then fails: fastkeys keeps it
            for load in (pipeline_load, fkd.load_lora_weights):
                pipeline = tiny_sd_pipeline()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    pipeline_load(pipeline, str(directory), "foobar", weight_name=DIFFUSERS_FILE)
                    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
                        load(pipeline, str(path), "foo", weight_name=DIFFUSERS_FILE)
            continue
        pipeline = tiny_sd_pipeline()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline.load_lora_weights(str(directory), adapter_name="foobar", weight_name=DIFFUSERS_FILE)
            with recorder.loading(None) as outer:
                results = fkd.load_lora_weights(pipeline, str(path), "foo", weight_name=DIFFUSERS_FILE)
        raw = {name: outer.result_for(getattr(pipeline, name)).raw_missing for name in results}  # type: ignore[union-attr]
        assert set(results) == {"unet", "text_encoder"}
        if dropped is None:
            complete = raw
        truth = {name: sorted(set(raw[name]) - set(complete[name])) for name in results}
        assert {name: sorted(result.missing_keys) for name, result in results.items()} == truth
        assert sum(map(len, truth.values())) == (dropped is not None)
        ours = [w.message for w in caught if isinstance(w.message, MissingAdapterKeysWarning)]
        assert [w.missing_keys for w in ours] == (
            [[*truth["unet"], *truth["text_encoder"]]] if dropped else []
        )


def test_a_load_fastkeys_did_not_see_is_a_runtime_error(
    saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If diffusers stops loading through peft.set_peft_model_state_dict, the adapter is loaded but
    fastkeys has no result: that is an error naming the version, not a silent None."""
    import peft

    model = with_adapters("unet", saved["unet"], [])
    fkd.load_lora_adapter(
        model, str(saved["unet"]), "first", prefix=None, weight_name=DIFFUSERS_FILE
    )  # installs
    unwrapped = peft.set_peft_model_state_dict.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(peft, "set_peft_model_state_dict", unwrapped)
    from fastkeys.integrations import recorder

    monkeypatch.setattr(recorder, "install_peft", lambda: None)
    with pytest.raises(
        RuntimeError, match=rf"set_peft_model_state_dict, which diffusers {diffusers.__version__}"
    ):
        fkd.load_lora_adapter(model, str(saved["unet"]), "second", prefix=None, weight_name=DIFFUSERS_FILE)
    assert set(model.peft_config) == {"first", "second"}
