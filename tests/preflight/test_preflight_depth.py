"""check_base beyond names: prefix rewrites anywhere in the key (a vision-language layout built from a
config, torch.compile, DDP, renamed wrappers), degenerate tensors, tensor values (untrained,
non-finite) in every dtype, coverage, and many adapters at once. Adapters are made by real PEFT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file, save_file  # noqa: E402

from fastkeys import check_base  # noqa: E402
from fastkeys.cli import main as cli  # noqa: E402
from fastkeys.preflight.checks import BaseCheck, Coverage, check_many  # noqa: E402
from fixtures.peft_models import METHOD_CONFIGS, save_adapter, tiny_llama, tiny_llava  # noqa: E402

pytestmark = pytest.mark.engine  # fastkeys' verdicts come from the engine: both implementations

QV = ["q_proj", "v_proj"]


def _save_state(state: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_state(tiny_llama().state_dict(), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapter(METHOD_CONFIGS["lora"](), tmp_path_factory.mktemp("lora") / "adapter")


def _rewrite_adapter(adapter: Path, target: Path, old: str, new: str) -> Path:
    shutil.copytree(adapter, target)
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k.replace(old, new, 1): v for k, v in tensors.items()}, target / "adapter_model.safetensors")
    return target


# --- prefix rewrites ---------------------------------------------------------------------------


def test_a_text_lora_on_a_vision_language_model_gets_one_prefix_finding(lora: Path, tmp_path: Path) -> None:
    base = _save_state(tiny_llava().state_dict(), tmp_path / "llava")
    findings = check_base(base, lora)
    prefix = [f for f in findings if f.kind == "prefix"]
    assert [(f.kind, f.key) for f in prefix] == [("prefix", "language_model.")]
    assert prefix[0].message.startswith(
        "the adapter's keys lack 'language_model.' after 'model.': rewritten, 4 of 4 adapter modules "
        "exist in the base model (e.g. 'model.layers.0.self_attn.q_proj' -> "
        "'model.language_model.layers.0.self_attn.q_proj')"
    )
    assert "no single rewrite" not in prefix[0].message
    # No finding per key; what is left is true of this config on this model: the vision tower
    # has q_proj and v_proj too, and PEFT would adapt them afresh.
    assert {(f.kind, f.key) for f in findings if f.kind != "prefix"} == {
        ("untrained_target", "model.vision_tower.encoder.layers.0.self_attn.q_proj"),
        ("untrained_target", "model.vision_tower.encoder.layers.0.self_attn.v_proj"),
    }
    assert findings.coverage == Coverage(4, 2, {"q_proj": 2, "v_proj": 2})


def test_an_adapter_made_on_the_vision_language_model_fits_it(tmp_path: Path) -> None:
    base = _save_state(tiny_llava().state_dict(), tmp_path / "llava")
    config = peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    adapter = save_adapter(config, tmp_path / "adapter", model_factory=tiny_llava)
    findings = check_base(base, adapter)
    assert findings == []
    assert findings.coverage == Coverage(4, 2, {"q_proj": 2, "v_proj": 2})


def test_torch_compile_prefix_is_found(lora: Path, tmp_path: Path) -> None:
    compiled = torch.compile(tiny_llama())  # compiles lazily: only the wrapper is built here
    state = compiled.state_dict()
    assert next(iter(state)).startswith("_orig_mod.")
    findings = check_base(_save_state(state, tmp_path / "compiled"), lora)
    assert [(f.kind, f.key) for f in findings] == [("prefix", "_orig_mod.")]
    assert "lack '_orig_mod.' at the start: rewritten, 4 of 4" in findings[0].message
    # Past the rewrite, shapes are checked against the base modules it leads to.
    wider = torch.compile(tiny_llama(hidden_size=48)).state_dict()
    findings = check_base(_save_state(wider, tmp_path / "wider"), lora)
    assert [f.kind for f in findings] == ["prefix"] + ["shape"] * 8
    assert "for a base weight [48, 48]" in findings[1].message


def test_ddp_module_prefix_and_a_renamed_wrapper(lora: Path, llama_base: Path, tmp_path: Path) -> None:
    ddp = _rewrite_adapter(lora, tmp_path / "ddp", "base_model.model.", "base_model.model.module.")
    findings = check_base(llama_base, ddp)
    assert [(f.kind, f.key) for f in findings] == [("prefix", "module.")]
    assert "carry an extra prefix 'module.': rewritten, 4 of 4" in findings[0].message
    renamed = _rewrite_adapter(
        lora, tmp_path / "renamed", "base_model.model.model.", "base_model.model.decoder."
    )
    findings = check_base(llama_base, renamed)
    assert [(f.kind, f.key) for f in findings] == [("prefix", "decoder. -> model.")]
    assert "have 'decoder.' where the base has 'model.'" in findings[0].message


def test_a_rewrite_that_fixes_only_some_says_so(lora: Path, llama_base: Path, tmp_path: Path) -> None:
    adapter = _rewrite_adapter(lora, tmp_path / "mixed", "base_model.model.", "base_model.model.module.")
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {
        k.replace("layers.1.self_attn.v_proj", "layers.1.self_attn.w_proj"): v for k, v in tensors.items()
    }
    save_file(tensors, adapter / "adapter_model.safetensors")
    findings = check_base(llama_base, adapter)
    assert [(f.kind, f.key) for f in findings] == [
        ("prefix", "module."),
        ("missing_module", "base_model.model.module.model.layers.1.self_attn.w_proj.lora_A.weight"),
        ("untrained_target", "model.layers.1.self_attn.v_proj"),
    ]
    assert findings[0].message.endswith("; no single rewrite fixes the other 1")
    assert "rewritten, 3 of 4" in findings[0].message


# --- degenerate tensors (headers only) ---------------------------------------------------------


def test_empty_and_one_dimensional_tensors_are_degenerate(
    lora: Path, llama_base: Path, tmp_path: Path
) -> None:
    adapter = shutil.copytree(lora, tmp_path / "zero3")
    tensors = load_file(adapter / "adapter_model.safetensors")
    empty = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    flat = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[empty] = torch.empty(0)  # what ZeRO-3 saves for a parameter it did not gather
    tensors[flat] = tensors[flat].flatten()
    save_file(tensors, adapter / "adapter_model.safetensors")
    findings = check_base(llama_base, adapter)
    assert [tuple(f) for f in findings] == [
        ("degenerate", empty, "shape [0] holds no values (a zero-size dimension); expected [r, 32]"),
        ("degenerate", flat, "shape [64] has 1 dimension(s), lora_B needs 2: expected [16, r]"),
    ]


@pytest.mark.parametrize("method", ["loha", "vera"])
def test_degenerate_in_other_methods(method: str, llama_base: Path, tmp_path: Path) -> None:
    adapter = save_adapter(METHOD_CONFIGS[method](), tmp_path / "adapter")
    tensors = load_file(adapter / "adapter_model.safetensors")
    victim = next(k for k in tensors if "hada_w1_a" in k or "vera_lambda_b" in k)
    tensors[victim] = (
        tensors[victim].reshape(1, -1) if tensors[victim].dim() == 1 else tensors[victim].flatten()
    )
    save_file(tensors, adapter / "adapter_model.safetensors")
    findings = check_base(llama_base, adapter)
    assert [(f.kind, f.key) for f in findings] == [("degenerate", victim)]


# --- values: untrained and non-finite ----------------------------------------------------------


def _fresh_adapter(method: str, directory: Path) -> Path:
    """Saved straight after get_peft_model: PEFT's own initialisation, never trained."""
    model = peft.get_peft_model(tiny_llama(), METHOD_CONFIGS[method]())
    model.save_pretrained(directory)
    return directory


# FASTKEYS_FULL=1 runs every method with a zero-initialised factor; by default a slice of three.
UNTRAINED = (
    ["lora", "adalora", "loha", "lokr", "vera", "hira", "delora"]
    if os.environ.get("FASTKEYS_FULL") == "1"
    else ["lora", "loha", "vera"]
)


@pytest.mark.parametrize("method", UNTRAINED)
def test_an_adapter_at_peft_init_is_untrained(method: str, llama_base: Path, tmp_path: Path) -> None:
    fresh = _fresh_adapter(method, tmp_path / "fresh")
    assert [f.kind for f in check_base(llama_base, fresh)] == []  # headers cannot tell
    findings = check_base(llama_base, fresh, values=True)
    assert [f.kind for f in findings] == ["untrained"]
    assert findings[0].message.startswith("every adapted module (4) has an all-zero ")
    assert "the adapter changes nothing" in findings[0].message
    trained = save_adapter(METHOD_CONFIGS[method](), tmp_path / "trained")
    assert check_base(llama_base, trained, values=True) == []


def test_dora_magnitude_alone_changes_the_model(llama_base: Path, tmp_path: Path) -> None:
    # lora_B at zero, but DoRA's magnitude vector rescales the weight on its own: not untrained.
    assert check_base(llama_base, _fresh_adapter("dora", tmp_path / "dora"), values=True) == []


def test_some_modules_untrained_and_non_finite(lora: Path, llama_base: Path, tmp_path: Path) -> None:
    adapter = shutil.copytree(lora, tmp_path / "partly")
    tensors = load_file(adapter / "adapter_model.safetensors")
    zeroed = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    poisoned = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    tensors[zeroed] = torch.zeros_like(tensors[zeroed])
    tensors[poisoned][1, 2] = float("nan")
    save_file(tensors, adapter / "adapter_model.safetensors")
    findings = check_base(llama_base, adapter, values=True)
    assert [tuple(f) for f in findings] == [
        ("untrained", zeroed, "1 of 4 adapted modules have an all-zero lora_B: they change nothing"),
        ("non_finite", poisoned, "the tensor holds NaN or infinity"),
    ]


LOW_PRECISION = [torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_values_in_low_precision_adapters(dtype: Any, lora: Path, llama_base: Path, tmp_path: Path) -> None:
    adapter = shutil.copytree(lora, tmp_path / "cast")
    tensors = {k: v.to(dtype) for k, v in load_file(lora / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    assert check_base(llama_base, adapter, values=True) == []
    inf = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    # float8_e4m3fn has no infinity (a cast saturates): NaN there.
    bad = float("nan") if dtype == torch.float8_e4m3fn else float("-inf")
    tensors[inf] = tensors[inf].float().fill_(bad).to(dtype)
    zero = {k: torch.zeros_like(v) if ".lora_B." in k and k != inf else v for k, v in tensors.items()}
    save_file(zero, adapter / "adapter_model.safetensors")
    findings = check_base(llama_base, adapter, values=True)
    assert [(f.kind, f.key) for f in findings] == [
        ("untrained", "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"),
        ("non_finite", inf),
    ]
    assert findings[0].message.startswith("3 of 4 adapted modules")


# --- coverage and many adapters ----------------------------------------------------------------


def test_coverage_counts_modules_layers_and_kinds(llama_base: Path, tmp_path: Path) -> None:
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], layers_to_transform=[1])
    adapter = save_adapter(config, tmp_path / "adapter")
    check = check_base(llama_base, adapter)
    assert isinstance(check, BaseCheck) and check == []
    # Kinds in file order (PEFT saves keys sorted: mlp before self_attn).
    assert check.coverage == Coverage(3, 1, {"gate_proj": 1, "q_proj": 1, "v_proj": 1})
    assert check.verdict("llama") == f"{adapter} fits llama: 3 modules (gate_proj, q_proj, v_proj) in 1 layer"


def test_many_adapters_in_one_call(lora: Path, llama_base: Path, tmp_path: Path) -> None:
    wide = save_adapter(
        METHOD_CONFIGS["lora"](), tmp_path / "wide", model_factory=lambda: tiny_llama(hidden_size=48)
    )
    absent = tmp_path / "absent"
    # Same names as `lora`, another config: header verdicts are shared only between true twins.
    wider_targets = shutil.copytree(lora, tmp_path / "wider-targets")
    config = json.loads((lora / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    (wider_targets / "adapter_config.json").write_text(json.dumps(config))
    checks = check_many(llama_base, [lora, wide, lora, wider_targets])
    assert all(isinstance(c, list) for c in checks)
    assert [len(c) for c in checks] == [0, 8, 0, 2] and checks[1][0].kind == "shape"  # type: ignore[arg-type,index]
    assert {f.kind for f in checks[3]} == {"untrained_target"}  # type: ignore[union-attr]
    assert [c.adapter for c in checks] == [str(lora), str(wide), str(lora), str(wider_targets)]  # type: ignore[union-attr]
    assert [check_base(llama_base, one) for one in (lora, wide)] == checks[:2]
    with pytest.raises(FileNotFoundError, match="absent"):
        check_base(llama_base, absent)
    with pytest.raises(TypeError, match="check_many"):
        check_base(llama_base, [lora])  # type: ignore[arg-type]
    answers = check_many(llama_base, [absent, lora])
    assert isinstance(answers[0], FileNotFoundError) and answers[1] == []


def test_cli_checks_many_adapters(
    lora: Path, llama_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fresh = _fresh_adapter("lora", tmp_path / "fresh")
    argv = ["check", str(llama_base), str(lora), str(fresh), str(tmp_path / "absent")]
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert f"fastkeys check: {tmp_path / 'absent'}: No such file or directory" in captured.err
    lines = captured.out.splitlines()
    assert lines[0].split() == ["adapter", "verdict", "modules", "layers", "findings"]
    assert lines[1].split() == [str(lora), "fits", "4", "2", "-"]
    assert lines[2].split() == [str(fresh), "fits", "4", "2", "-"]
    assert lines[3].split()[:2] == [str(tmp_path / "absent"), "unusable"]
    assert lines[4] == "2 fits, 1 unusable (3 adapters)"
    assert cli.main([*argv[:-1], "--values"]) == 1
    out = capsys.readouterr().out
    assert f"{fresh}  findings        4       2  untrained: 1" in out
    assert f"1 finding(s) for {fresh} on {llama_base}: 4 modules (q_proj, v_proj) in 2 layers" in out
    assert cli.main([*argv[:-1], "--values", "--json"]) == 1
    reports = json.loads(capsys.readouterr().out)
    assert [(r["adapter"], r["status"], [f["kind"] for f in r["findings"]]) for r in reports] == [
        (str(lora), 0, []),
        (str(fresh), 1, ["untrained"]),
    ]
