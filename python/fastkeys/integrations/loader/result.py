"""The result of loading one adapter (imports neither torch nor peft: `fastkeys.peft` re-exports it)."""

from __future__ import annotations

from typing import NamedTuple

FAST = "fastkeys"
PEFT = "peft"
TRANSFORMERS = "transformers"
DIFFUSERS = "diffusers"


class AdapterLoadResult(NamedTuple):
    """What loading one adapter did.

    `missing_keys`: fastkeys' verdict (the adapter's tensors the checkpoint lacks);
    `unexpected_keys`: the checkpoint's tensors the model has no place for;
    `loader`: "fastkeys" (the per-adapter path), "peft" (PEFT's own loader) or "transformers"
    (transformers' `load_adapter`, for `fastkeys.transformers.load_adapters`) or "diffusers"
    (diffusers' `load_lora_adapter`, for `fastkeys.diffusers.load_adapters`);
    `reason`: why the library's loader ran (None on the fast path);
    `base_weights_written`: the base model's weights the load changed (the embeddings a
    `save_embedding_layers` checkpoint carries, what a special initialisation rewrites), by name
    in the base model; empty for an adapter that leaves the base model as it was."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    loader: str
    reason: str | None
    base_weights_written: list[str]
