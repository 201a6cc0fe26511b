"""fastkeys.transformers on real transformers models: the ground truth of PEFT-KEYS.md through
transformers' own `model.load_adapter`.

A tiny Llama whose embeddings were resized after the adapter was saved, and a tiny BERT, each
already holding LoRA adapters with overlapping names, load one more. The complete checkpoint: the
verdict must be empty. A copy that lost one tensor: the verdict must be exactly the keys that
became newly missing. The default run drops a few representative tensors per case;
FASTKEYS_FULL=1 drops each tensor in turn.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import fastkeys.transformers as fkt  # noqa: E402
from fastkeys import MissingAdapterKeysWarning  # noqa: E402
from fixtures.peft_models import (  # noqa: E402
    LOADER_NAMES,
    METHOD_CONFIGS,
    bert_lora_config,
    fastkeys_transformers_load,
    loader_survey,
    save_adapter,
    tiny_bert,
    tiny_llama,
    transformers_load,
    tricky_lora_config,
    without,
)

pytestmark = pytest.mark.engine  # fastkeys' verdicts come from the engine: both implementations

FULL = os.environ.get("FASTKEYS_FULL") == "1"
FILE = "adapter_model.safetensors"
# transformers 4.57 loads adapters through PEFT's set_peft_model_state_dict, returns None and logs
# the missing keys that hold "lora_" and the adapter name; 5.x loads through _load_pretrained_model
# and returns the keys that hold the adapter name or the method's. Where they differ, each test
# asserts the behaviour of the version it runs on.
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) == 4

MODELS: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "llama-resized": (lambda: tiny_llama(resized=True), tricky_lora_config),
    "bert": (tiny_bert, bert_lora_config),
}


def representative(keys: list[str]) -> list[str]:
    """The first, a middle and the last tensor (every one with FASTKEYS_FULL=1)."""
    return keys if FULL else sorted({keys[0], keys[len(keys) // 2], keys[-1]})


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_adapter(make_config(), root / name, model_factory=make_model)
        for name, (make_model, make_config) in MODELS.items()
    }


def with_adapters(model_name: str, directory: Path, names: list[str]) -> Any:
    model = MODELS[model_name][0]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            model.load_adapter(str(directory), adapter_name=name)
    return model


# BERT is the slower one: one name in the default run.
CASES = [
    (model, name)
    for model in MODELS
    for name in LOADER_NAMES
    if FULL or name in (["foo"] if model == "bert" else ["foo", "default_1", "lora", "model"])
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
        transformers_load,
        fastkeys_transformers_load,
        directory,
        FILE,
        adapter_name,
        tmp_path,
        representative,
    )
    for key, verdict, truth in counts["cases"]:
        assert verdict == truth, f"{model_name}, adapter {adapter_name!r}, dropped {key}"
        assert key == "complete" or truth, f"dropping {key} made no key go missing"
    assert counts["dropped_fastkeys"] == counts["tensors"] >= 3


# PEFT's inject_adapter_in_model (which transformers calls) refuses methods with state shared on the
# tuner; DoRA is checked on its own below.
REFUSED_BY_INJECT = {"vera", "pvera", "vblora", "tinylora", "unilora"}
METHODS = [
    method
    for method in METHOD_CONFIGS
    if method not in REFUSED_BY_INJECT | {"dora"}
    and (FULL or method in {"adalora", "loha", "ia3", "randlora", "lora+modules_to_save", "trainable_tokens"})
]


@pytest.fixture(scope="module")
def methods_saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    return {
        method: save_adapter(METHOD_CONFIGS[method](), root / method.replace("+", "_"))
        for method in [*METHODS, "dora"]
    }


@pytest.mark.parametrize("method", METHODS)
def test_ground_truth_per_method(method: str, methods_saved: dict[str, Path], tmp_path: Path) -> None:
    """Every method transformers can load, beside an adapter of the same method (the verdict uses
    the method of `model.peft_config[adapter_name]`)."""
    directory = methods_saved[method]
    base = with_adapters("llama-resized", directory, ["default"])
    drop = representative
    if TRANSFORMERS_4 and method == "lora+modules_to_save":
        # transformers 4.57 loads through PEFT's set_peft_model_state_dict, which raises KeyError for
        # a checkpoint without the modules_to_save tensor: fastkeys leaves that error as it is
        norm = "base_model.model.model.norm.weight"
        short = without(directory, norm, tmp_path / "short")
        for load in (transformers_load, fastkeys_transformers_load):
            with pytest.raises(KeyError, match=r"model\.norm\.weight"):
                load(with_adapters("llama-resized", directory, ["default"]), short, "target")
        drop = lambda keys: [key for key in representative(keys) if key != norm]  # noqa: E731
    counts = loader_survey(
        base,
        transformers_load,
        fastkeys_transformers_load,
        directory,
        FILE,
        "target",
        tmp_path,
        drop,
    )
    # Some checkpoint tensors are not needed by the load (RandLoRA's shared bases, SHiRA's indices):
    # nothing goes missing without them, and the verdict must say so.
    assert all(verdict == truth for _, verdict, truth in counts["cases"]), counts["cases"]
    assert any(truth for _, _, truth in counts["cases"])


def test_dora_magnitudes_that_transformers_does_not_load(methods_saved: dict[str, Path]) -> None:
    """transformers 5.24 with peft 0.21.2 leaves DoRA's magnitude vectors unloaded (they come back
    as unexpected `...lora_magnitude_vector.target` keys, and the model keeps their init values).
    fastkeys reports exactly those tensors; transformers reports them among 12 of the other adapter.
    transformers 4.57 loads them (through PEFT's own loader), and nothing is missing."""
    import torch
    from safetensors.torch import load_file

    directory = methods_saved["dora"]
    magnitudes = {
        f"model.layers.{layer}.self_attn.{proj}.lora_magnitude_vector.target.weight"
        for layer in (0, 1)
        for proj in ("q_proj", "v_proj")
    }
    plain = with_adapters("llama-resized", directory, ["default"])
    library = transformers_load(plain, directory, "target")
    model = with_adapters("llama-resized", directory, ["default"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = fkt.load_adapter(model, str(directory), "target")
    ours = [w.message for w in caught if isinstance(w.message, MissingAdapterKeysWarning)]
    saved = load_file(directory / FILE)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    loaded = model.state_dict()["model.layers.0.self_attn.q_proj.lora_magnitude_vector.target.weight"]
    if TRANSFORMERS_4:
        assert library == set() and info.missing_keys == set() and not ours
        assert torch.equal(saved[key], loaded), "loaded: nothing to report"
        return
    assert library > magnitudes
    assert info.missing_keys == magnitudes
    assert {key.removesuffix(".weight") for key in magnitudes} <= info.unexpected_keys
    assert len(ours) == 1 and set(ours[0].missing_keys) == magnitudes
    assert not torch.equal(saved[key], loaded), "really not loaded: the warning is right"


def test_second_adapter_the_issue_scenario(saved: dict[str, Path]) -> None:
    """The issue as filed: transformers 5.x reports every tensor of the first adapter as missing
    (4.57 only those of an adapter whose name holds the new one's, as `foobar` beside `foo`)."""
    directory = saved["llama-resized"]
    plain = with_adapters("llama-resized", directory, ["first"])
    reported = transformers_load(plain, directory, "second")
    assert len(reported) == (0 if TRANSFORMERS_4 else 12), "transformers' false report"
    model = with_adapters("llama-resized", directory, ["first"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = fkt.load_adapter(model, str(directory), adapter_name="second")
    assert info.missing_keys == set()
    # transformers 4.57's load_adapter returns None: fastkeys returns torch's load result
    shape = "_IncompatibleKeys" if TRANSFORMERS_4 else "LoadStateDictInfo"
    assert type(info).__name__ == shape and info.unexpected_keys == set()
    assert not [w for w in caught if isinstance(w.message, MissingAdapterKeysWarning)]
    assert set(model.peft_config) == {"first", "second"}, "the adapter is loaded as transformers loads it"


def test_warns_once_naming_the_missing_tensors(saved: dict[str, Path], tmp_path: Path) -> None:
    directory = saved["llama-resized"]
    dropped = without(directory, "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight", tmp_path)
    model = with_adapters("llama-resized", directory, ["foobar"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = fkt.load_adapter(model, str(dropped), "foo")
    ours = [w.message for w in caught if isinstance(w.message, MissingAdapterKeysWarning)]
    expected = "model.layers.1.self_attn.v_proj.lora_B.foo.weight"
    assert info.missing_keys == {expected}
    assert len(ours) == 1 and ours[0].adapter_name == "foo" and ours[0].missing_keys == [expected]
    assert str(ours[0]) == (
        f"adapter 'foo': 1 of its tensors are missing from the checkpoint at {dropped}: {expected}"
    )


def test_load_report_shows_only_the_really_missing(
    saved: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = saved["llama-resized"]
    dropped = without(directory, "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", tmp_path)
    model = with_adapters("llama-resized", directory, ["first"])
    logger = transformers.utils.logging.get_logger("transformers.integrations.peft")
    logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fkt.load_adapter(model, str(dropped), "second")
    finally:
        logger.removeHandler(caplog.handler)
    # transformers 5.x prints a LOAD REPORT with MISSING rows, 4.57 a warning naming the keys
    heading = "led to missing keys" if TRANSFORMERS_4 else "LOAD REPORT"
    report = "\n".join(record.getMessage() for record in caplog.records if heading in record.getMessage())
    assert "q_proj.lora_A.second.weight" in report and ("MISSING" in report or TRANSFORMERS_4)
    assert ".first." not in report, "the first adapter's tensors are not reported"


def test_plain_transformers_loads_are_untouched(saved: dict[str, Path]) -> None:
    directory = saved["llama-resized"]
    fkt.load_adapter(with_adapters("llama-resized", directory, []), str(directory), "warmup")  # installs
    # both versions' filters report the tensors of `foobar` when `foo` loads beside it
    model = with_adapters("llama-resized", directory, ["foobar"])
    assert len(transformers_load(model, directory, "foo")) == 12


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="adapter_name"):
        fkt.load_adapter(tiny_llama(), "unused", "a.b")
    with pytest.raises(TypeError, match=r"model must be a transformers model with PEFT support .*, not dict"):
        fkt.load_adapter({}, "unused")


def test_a_failed_load_raises_transformers_error(tmp_path: Path) -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="adapter model file not found"):
        fkt.load_adapter(model, str(tmp_path), "x")
    assert not getattr(model, "peft_config", {}), "nothing was added"


def test_missing_internal_is_a_runtime_error_naming_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    if TRANSFORMERS_4:
        import peft.utils

        monkeypatch.delattr(peft.utils, "set_peft_model_state_dict")
        match = rf"peft\.utils\.set_peft_model_state_dict, which peft {peft.__version__}"
    else:
        from transformers.modeling_utils import PreTrainedModel

        monkeypatch.delattr(PreTrainedModel, "_load_pretrained_model")
        match = rf"_load_pretrained_model.*transformers {transformers.__version__}"
    with pytest.raises(RuntimeError, match=match):
        fkt.load_adapter(tiny_llama(), "unused")


def test_a_load_fastkeys_did_not_see_is_a_runtime_error(
    saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If load_adapter stops loading through the recorded function, the adapter is loaded but
    fastkeys has no result: an error naming the version, not transformers' answer."""
    import peft.utils
    from transformers.modeling_utils import PreTrainedModel

    from fastkeys.integrations import recorder

    directory = saved["llama-resized"]
    fkt.load_adapter(with_adapters("llama-resized", directory, []), str(directory), "warmup")  # installs
    wrapped: Any
    if TRANSFORMERS_4:
        wrapped = peft.utils.set_peft_model_state_dict
        monkeypatch.setattr(peft.utils, "set_peft_model_state_dict", wrapped.__wrapped__)
    else:
        wrapped = vars(PreTrainedModel)["_load_pretrained_model"].__func__
        monkeypatch.setattr(PreTrainedModel, "_load_pretrained_model", staticmethod(wrapped.__wrapped__))
    monkeypatch.setattr(recorder, "install_transformers", lambda: None)
    model = with_adapters("llama-resized", directory, [])
    with pytest.raises(
        RuntimeError, match=rf"load_adapter loading through .*transformers {transformers.__version__}"
    ):
        fkt.load_adapter(model, str(directory), "x")
    assert set(model.peft_config) == {"x"}


@pytest.mark.parametrize("release", ["4.56.2", "5.0.0", "6.0.0"])
def test_a_release_outside_the_range_is_a_runtime_error(
    release: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transformers, "__version__", release)
    with pytest.raises(
        RuntimeError,
        match=rf"^fastkeys.transformers supports transformers 4\.57 and 5\.24 to 5\.x "
        rf"\(tested with transformers "
        rf"4\.57\.6, 5\.24\), not {release}; use fastkeys\.filter_missing",
    ):
        fkt.load_adapter(tiny_llama(), "unused")


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "fastkeys\[transformers\]"'):
        fkt.load_adapter(tiny_llama(), "unused")


def test_import_loads_no_library() -> None:
    code = (
        "import sys, fastkeys, fastkeys.transformers, fastkeys.diffusers\n"
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"
    plain = (
        "import sys, fastkeys\n"
        "print([m for m in ('fastkeys.transformers', 'fastkeys.diffusers') if m in sys.modules])"
    )
    assert (
        subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True).stdout
        == "[]\n"
    )


def test_no_verdict_raises_after_transformers_finished(
    saved: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verdict that cannot be made (here: forced) is raised after the load, not inside it, so the
    model is not left half loaded."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("unknown peft_type 'NEW'")

    directory = saved["llama-resized"]
    model = with_adapters("llama-resized", directory, [])
    from fastkeys.integrations import recorder

    monkeypatch.setattr(recorder, "filter_missing", refuse)
    with pytest.raises(ValueError, match="unknown peft_type 'NEW'"):
        fkt.load_adapter(model, str(directory), "x")
    assert set(model.peft_config) == {"x"} and not model.training, "transformers finished the load"
