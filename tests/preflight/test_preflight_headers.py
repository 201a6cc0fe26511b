"""check_base from headers alone, on files written from names and shapes (no torch needed).

The shapes are those of fixtures.peft_models' tiny Llama (hidden 32, 2 layers, 4 heads, 2 KV
heads: q_proj [32, 32], v_proj [16, 32]) and of PEFT's tensors for each method; test_preflight.py
checks the same on adapters PEFT itself saves."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastkeys import check_base
from fixtures.headers import write_adapter, write_safetensors

PEFT = "base_model.model."
QV = {"self_attn.q_proj": 32, "self_attn.v_proj": 16}  # module -> out features (in: hidden)


def _base(directory: Path, hidden: int = 32) -> Path:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (64, hidden)}
    for layer in range(2):
        for module, out in {**QV, "self_attn.k_proj": 16, "self_attn.o_proj": 32}.items():
            shapes[f"model.layers.{layer}.{module}.weight"] = (out * hidden // 32, hidden)
    return write_safetensors(directory / "model.safetensors", shapes).parent


def _tensors(method: str, r: int = 4, hidden: int = 32) -> dict[str, tuple[int, ...]]:
    """PEFT's saved tensors of `method` on q_proj and v_proj of both layers."""
    per_module: dict[str, dict[str, tuple[int, ...]]] = {}
    for module, out in QV.items():
        out = out * hidden // 32
        table: dict[str, dict[str, tuple[int, ...]]] = {
            "lora": {"lora_A.weight": (r, hidden), "lora_B.weight": (out, r)},
            "dora": {
                "lora_A.weight": (r, hidden), "lora_B.weight": (out, r), "lora_magnitude_vector": (out,)
            },
            "adalora": {"lora_A": (r, hidden), "lora_B": (out, r), "lora_E": (r, 1)},
            "loha": {
                "hada_w1_a": (out, r), "hada_w1_b": (r, hidden),
                "hada_w2_a": (out, r), "hada_w2_b": (r, hidden),
            },
            "lokr": {"lokr_w1": (2, 2), "lokr_w2": (out // 2, hidden // 2)},
        }  # fmt: skip
        per_module[module] = table[method]
    return {
        f"{PEFT}model.layers.{layer}.{module}.{tensor}": shape
        for layer in range(2)
        for module, tensors in per_module.items()
        for tensor, shape in tensors.items()
    }


def _adapter(directory: Path, method: str, **config: object) -> Path:
    peft_type = "LORA" if method == "dora" else method.upper()
    settings = {"peft_type": peft_type, "target_modules": ["q_proj", "v_proj"], **config}
    return write_adapter(directory, _tensors(method), settings)


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "loha", "lokr"])
def test_clean_on_the_matching_base(method: str, tmp_path: Path) -> None:
    assert check_base(_base(tmp_path / "base"), _adapter(tmp_path / "adapter", method)) == []


@pytest.mark.parametrize("method", ["lora", "dora", "adalora", "loha", "lokr"])
def test_a_differently_sized_base(method: str, tmp_path: Path) -> None:
    findings = check_base(_base(tmp_path / "base", hidden=48), _adapter(tmp_path / "adapter", method))
    assert findings and all(f.kind == "shape" for f in findings), findings
    assert {f.key.split(".")[6] for f in findings} == {"q_proj", "v_proj"}
    assert any("base weight [48, 48]" in f.message for f in findings)


def test_the_messages_of_shape_findings(tmp_path: Path) -> None:
    base = _base(tmp_path / "base")
    tensors = _tensors("dora")
    q = f"{PEFT}model.layers.0.self_attn.q_proj"
    tensors[f"{q}.lora_magnitude_vector"] = (31,)
    tensors[f"{q}.lora_B.weight"] = (32, 5)
    adapter = write_adapter(tmp_path / "adapter", tensors, {"peft_type": "LORA"})
    messages = {f.key: f.message for f in check_base(base, adapter)}
    assert messages == {
        f"{q}.lora_magnitude_vector": "expected [32] (the base's out features), found [31]",
        f"{q}.lora_A.weight": f"the tensors of {q.removeprefix(PEFT)!r} disagree on the rank: [4, 5]",
    }


def test_lokr_factors(tmp_path: Path) -> None:
    tensors = _tensors("lokr")
    v = f"{PEFT}model.layers.1.self_attn.v_proj"
    del tensors[f"{v}.lokr_w2"]
    tensors[f"{v}.lokr_w2_a"], tensors[f"{v}.lokr_w2_b"] = (8, 2), (2, 15)
    adapter = write_adapter(tmp_path / "adapter", tensors, {"peft_type": "LOKR"})
    findings = check_base(_base(tmp_path / "base"), adapter)
    assert [(f.key, f.message) for f in findings] == [
        (f"{v}.lokr_w1", "kron(w1 [2, 2], w2 [8, 15]) is [16, 30], the base weight [16, 32]")
    ]


def test_an_embedding_adapter(tmp_path: Path) -> None:
    embed = f"{PEFT}model.embed_tokens"
    good = {f"{embed}.lora_embedding_A": (4, 64), f"{embed}.lora_embedding_B": (32, 4)}
    adapter = write_adapter(tmp_path / "adapter", good, {"peft_type": "LORA"})
    assert check_base(_base(tmp_path / "base"), adapter) == []
    bad = {**good, f"{embed}.lora_embedding_B": (64, 4)}
    adapter = write_adapter(tmp_path / "bad", bad, {"peft_type": "LORA"})
    assert [f.key for f in check_base(_base(tmp_path / "base"), adapter)] == [f"{embed}.lora_embedding_B"]


def test_a_wrong_prefix(tmp_path: Path) -> None:
    tensors = {key.replace(f"{PEFT}model.", f"{PEFT}model.model."): s for key, s in _tensors("lora").items()}
    adapter = write_adapter(
        tmp_path / "adapter", tensors, {"peft_type": "LORA", "target_modules": ["q_proj"]}
    )
    findings = check_base(_base(tmp_path / "base"), adapter)
    # One finding for the rewrite instead of one per module (and per target it leaves untrained).
    assert [f.kind for f in findings] == ["prefix"] and findings[0].key == "model."
    assert "extra prefix 'model.'" in findings[0].message
    assert "4 of 4 adapter modules exist in the base model" in findings[0].message


def test_targets(tmp_path: Path) -> None:
    tensors = {k: s for k, s in _tensors("lora").items() if "layers.1.self_attn.v_proj" not in k}
    config = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj", "nonexistent_proj"]}
    findings = check_base(_base(tmp_path / "base"), write_adapter(tmp_path / "adapter", tensors, config))
    assert {(f.kind, f.key) for f in findings} == {
        ("unmatched_target", "nonexistent_proj"),
        ("untrained_target", "model.layers.1.self_attn.v_proj"),
    }


def test_layers_to_transform(tmp_path: Path) -> None:
    tensors = {k: s for k, s in _tensors("lora").items() if ".layers.1." in k}
    base = _base(tmp_path / "base")
    config = {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}
    adapter = write_adapter(tmp_path / "adapter", tensors, config)
    assert check_base(base, adapter) == []
    adapter = write_adapter(
        tmp_path / "both",
        tensors,
        {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 1]},
    )
    assert {(f.kind, f.key) for f in check_base(base, adapter)} == {
        ("untrained_target", "model.layers.0.self_attn.q_proj"),
        ("untrained_target", "model.layers.0.self_attn.v_proj"),
    }


def test_a_config_is_needed(tmp_path: Path) -> None:
    adapter = _adapter(tmp_path / "adapter", "lora")
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(
        ValueError, match=r"adapter\: no adapter_config\.json; check_base needs the adapter's config"
    ):
        check_base(_base(tmp_path / "base"), adapter)
