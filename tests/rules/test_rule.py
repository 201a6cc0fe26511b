"""The rule, sentence by sentence (README "The rule"), as a table."""

from __future__ import annotations

import pytest

from fastkeys import filter_missing

L = "base_model.model.model.layers.3.self_attn.q_proj"
MLP = "base_model.model.model.layers.3.mlp.down_proj"

# (key, adapter_name, peft_type, relevant?)
CASES = [
    # A segment starting with the prefix, followed by exactly the adapter name.
    (f"{L}.lora_A.default.weight", "default", "lora", True),
    (f"{L}.lora_embedding_A.default", "default", "lora", True),
    (f"{L}.lora_magnitude_vector.default.weight", "default", "lora", True),  # DoRA
    (f"{L}.base_layer.weight", "default", "lora", False),
    ("base_model.model.model.embed_tokens.weight", "default", "lora", False),  # resized embeddings
    # Names that overlap: the next segment must *equal* the adapter name.
    (f"{L}.lora_A.foobar.weight", "foo", "lora", False),
    (f"{L}.lora_A.foobar.weight", "foobar", "lora", True),
    (f"{L}.lora_A.foo.weight", "foobar", "lora", False),
    (f"{L}.lora_A.default_10.weight", "default_1", "lora", False),
    (f"{L}.lora_A.default_1.weight", "default_10", "lora", False),
    (f"{L}.lora_A.default_1.weight", "default_1", "lora", True),
    # Adapter names that occur elsewhere in every key.
    (f"{L}.lora_A.default.weight", "model", "lora", False),
    (f"{L}.lora_A.model.weight", "model", "lora", True),
    (f"{L}.lora_A.default.weight", "1", "lora", False),
    ("base_model.model.model.layers.1.q_proj.lora_A.default.weight", "1", "lora", False),
    (f"{L}.lora_A.1.weight", "1", "lora", True),
    (f"{MLP}.lora_A.default.weight", "mlp", "lora", False),
    (f"{MLP}.lora_B.mlp.weight", "mlp", "lora", True),
    (f"{L}.lora_A.default.weight", "lora", "lora", False),
    (f"{L}.lora_A.lora.weight", "lora", "lora", True),
    ("base_model.model.default.q_proj.lora_A.other.weight", "default", "lora", False),
    ("base_model.model.default_block.q_proj.lora_A.default.weight", "default", "lora", True),
    # The prefix must *start* the segment: prefixes inside other prefixes and parameter names.
    (f"{L}.randlora_lambda.default", "default", "lora", False),
    (f"{L}.randlora_lambda.default", "default", "randlora", True),
    (f"{L}.poly_lora_A.default", "default", "lora", False),
    (f"{L}.poly_lora_A.default", "default", "poly", True),
    (f"{L}.supertuning_lora_A.default", "default", "lora", False),
    (f"{L}.delora_A.default", "default", "lora", False),
    (f"{L}.delora_A.default", "default", "delora", True),
    (f"{L}.vblora_logits_A.default", "default", "lora", False),
    (f"{L}.boft_R.default", "default", "oft", False),
    (f"{L}.boft_R.default", "default", "boft", True),
    (f"{L}.oft_R.default.weight", "default", "oft", True),
    (f"{L}.psoft_R.default", "default", "oft", False),
    (f"{L}.shira_weight.default", "default", "hira", False),
    (f"{L}.hira_A.default", "default", "hira", True),
    (f"{L}.pvera_lambda_b.default", "default", "vera", False),
    (f"{L}.pvera_lambda_b.default", "default", "pvera", True),
    (f"{L}.vera_lambda_b.default", "default", "vera", True),
    (f"{L}.hada_w1_a.default", "default", "loha", True),
    (f"{L}.hada_w1_a.default", "default", "lora", False),
    (f"{L}.lokr_w1.default", "default", "lokr", True),
    (f"{L}.ia3_l.default", "default", "ia3", True),
    (
        "base_model.model.model.layers.3.input_layernorm.ln_tuning_layers.default.weight",
        "default",
        "ln_tuning",
        True,
    ),
    # A module whose name starts with a prefix is not an adapter tensor unless the adapter follows.
    ("base_model.model.lora_head.weight", "default", "lora", False),
    ("base_model.model.lora_head.default", "default", "lora", True),
    # Shared tensors named exactly (VeRA, PVeRA) and their layer-level references.
    ("base_model.vera_A.default", "default", "vera", True),
    ("base_model.vera_B.default", "default", "vera", True),
    ("vera_B.default", "default", "vera", True),  # the tuner model itself: first segment
    (f"{L}.vera_A.default", "default", "vera", False),
    (f"{L}.vera_B.default", "default", "vera", False),
    ("base_model.model.vera_A.default", "default", "vera", False),
    ("base_model.vera_AB.default", "default", "vera", False),
    ("base_model.pvera_A.default", "default", "pvera", True),
    (f"{L}.pvera_B.default", "default", "pvera", False),
    ("base_model.vera_A.default", "default", "lora", False),
    # VB-LoRA, TinyLoRA, UniLoRA: model-level relevant, layer-level references harmless.
    ("base_model.vblora_vector_bank.default", "default", "vblora", True),
    (f"{L}.vblora_vector_bank.default", "default", "vblora", False),
    ("base_model.tinylora_v.default.0", "default", "tinylora", True),
    (f"{L}.tinylora_v.default.0", "default", "tinylora", False),
    (f"{L}.tinylora_A.default", "default", "tinylora", True),
    ("base_model.unilora_theta_d.default", "default", "unilora", True),
    (f"{L}.unilora_theta_d.default", "default", "unilora", False),
    (f"{L}.unilora_indices.default", "default", "unilora", True),
    # RandLoRA saves its layer-level bases: they are relevant.
    ("base_model.randlora_A.default", "default", "randlora", True),
    (f"{L}.randlora_A.default", "default", "randlora", True),
    # AdaLoRA's ranknum is never saved; prompt encoders are loaded separately.
    (f"{L}.ranknum.default", "default", "adalora", False),
    (f"{L}.lora_E.default", "default", "adalora", True),
    ("prompt_encoder.default.embedding.weight", "default", "prompt_tuning", False),
    ("prompt_encoder.default.embedding.weight", "default", None, False),
    # modules_to_save and trainable tokens belong to the adapter under every method.
    ("base_model.model.score.modules_to_save.default.weight", "default", "lora", True),
    ("base_model.model.score.modules_to_save.default.weight", "default", "prompt_tuning", True),
    ("base_model.model.score.modules_to_save.other.weight", "default", "lora", False),
    ("base_model.model.score.original_module.weight", "default", "lora", False),
    (
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "default",
        "lora",
        True,
    ),
    (
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "default",
        "trainable_tokens",
        True,
    ),
    # peft_type None: every known method.
    (f"{L}.hada_w1_a.default", "default", None, True),
    (f"{L}.boft_R.default", "default", None, True),
    (f"{L}.lora_A.other.weight", "default", None, False),
    ("base_model.vera_A.default", "default", None, True),
    (f"{L}.vera_A.default", "default", None, False),
    # Unicode adapter names.
    (f"{L}.lora_A.ädäpter.weight", "ädäpter", "lora", True),
    (f"{L}.lora_A.ädäpter.weight", "adapter", "lora", False),
    (f"{L}.lora_A.a\ud800.weight", "a\ud800", "lora", True),
    (f"{L}.lora_A.a\ud800.weight", "a\ud801", "lora", False),
]


@pytest.mark.parametrize(("key", "adapter_name", "peft_type", "relevant"), CASES)
def test_rule(key: str, adapter_name: str, peft_type: str | None, relevant: bool) -> None:
    assert filter_missing([key], adapter_name, peft_type) == ([key] if relevant else [])


def test_cases_cover_both_verdicts_for_every_overlap() -> None:
    # Guard against the table drifting to one-sided cases.
    verdicts = {relevant for *_, relevant in CASES}
    assert verdicts == {True, False}


def test_a_seed_load_keeps_only_the_lost_tensor() -> None:
    layers = [f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(4) for p in "qkvo"]
    base = [f"{layer}.base_layer.weight" for layer in layers]
    base += ["base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"]
    others = [
        f"{layer}.lora_{ab}.{name}.weight"
        for layer in layers
        for ab in "AB"
        for name in ("default_1", "default_10", "foo")
    ]
    lost = f"{layers[2]}.lora_B.default.weight"
    missing = base + others + [lost]
    assert filter_missing(missing, "default", "lora") == [lost]
    assert filter_missing(missing, "default") == [lost]
    assert filter_missing(base + others, "default", "lora") == []
    # The keys of another adapter are exactly its own.
    assert filter_missing(missing, "default_1", "lora") == [k for k in others if ".default_1." in k]
