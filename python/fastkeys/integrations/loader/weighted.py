"""LoRA's `add_weighted_adapter` at the cost of the layers it writes.

PEFT's `LoraModel.add_weighted_adapter` registers a config derived from the first adapter's, injects
the new adapter with `inject_adapter` (a walk over every module, the internals of every adapter's
layers included, and the random initialisation of matrices it then overwrites), freezes it with a
substring test over every parameter name, and walks every module once more to write, per LoRA layer,
the combination of the adapters given (PEFT's own per-layer functions: concatenation, task
arithmetic, TIES, magnitude pruning, with or without an SVD). Its cost grows with model x adapters.

Here, for a model and arguments on the allow-list (`_refusal`), the combination of each target layer
is computed first by the same per-layer code (nothing changes if it raises), then the new adapter's
matrices are built around it as a fast load builds a loaded adapter's (`inject._add_lora_linear`),
with the bookkeeping `inject_adapter` does for an adapter that is not active: the active list stored
in every layer, `targeted_module_names`, the config registered, nothing made trainable. Anything
else runs PEFT's own function; either way all or nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import warnings
from typing import Any

import torch

from fastkeys.integrations.loader import boundary, lifecycle, policy
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.inject import _add_lora_linear, _extend_unique, _record_lora
from fastkeys.integrations.loader.leaves import Leaves
from fastkeys.integrations.loader.lifecycle import AdapterChangeResult
from fastkeys.integrations.loader.plan import selected
from fastkeys.integrations.loader.result import FAST
from fastkeys.integrations.loader.transaction import Transaction

# Deterministic combinations, verified against PEFT's; the dare_* ones draw random numbers, which
# PEFT's random initialisation of the new matrices (skipped here) would have moved.
VERIFIED_COMBINATIONS = (
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)
# PEFT's own rank rule for these (`_check_add_weighted_adapter`): every adapter's rank must be equal
_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")


def add_weighted_adapter(
    peft_model: Any,
    adapters: Any,
    weights: Any,
    adapter_name: Any,
    combination_type: Any = None,
    **options: Any,
) -> AdapterChangeResult:
    """`peft_model.add_weighted_adapter(adapters, weights, adapter_name, combination_type, ...)`:
    `options` are PEFT's (svd_rank, svd_clamp, svd_full_matrices, svd_driver, density,
    majority_sign_method), passed on as they are; `combination_type=None` is the tuner's default
    (LoRA's: "svd")."""
    lifecycle._check_model(peft_model)
    tuner = peft_model.base_model

    def peft_call() -> None:
        given = {} if combination_type is None else {"combination_type": combination_type}
        tuner.add_weighted_adapter(adapters, weights, adapter_name, **given, **options)

    reason = lifecycle.tuner_refusal(tuner)  # before the index: another tuner may have no .model
    if reason is not None:
        return lifecycle._with_peft(peft_model, reason, peft_call)
    if isinstance(adapter_name, str) and adapter_name in peft_model.peft_config:
        # PEFT's function returns without a word; the model is left as it is
        warnings.warn(
            f"an adapter named {adapter_name!r} exists; add_weighted_adapter changed nothing (as PEFT's)",
            UserWarning,
            stacklevel=3,
        )
        return AdapterChangeResult(FAST, None)
    index = ModelIndex(tuner.model)
    combination = "svd" if combination_type is None else combination_type  # LoraModel's default
    decided = _refusal(peft_model, index, adapters, weights, adapter_name, combination, options)
    if isinstance(decided, str):
        return lifecycle._with_peft(peft_model, decided, peft_call)
    config, rank, targets = decided
    # every combination first, by PEFT's per-layer code: if one raises, nothing has changed
    combined = {
        name: _combine(tuner, index.modules[name], adapters, weights, combination, rank, options)
        for name in targets
    }
    for name, (weight_a, weight_b) in combined.items():
        layer = index.modules[name]
        if weight_a.shape != (rank, layer.in_features) or weight_b.shape != (layer.out_features, rank):
            # PEFT's modules would keep the new rank as their size around these
            return lifecycle._with_peft(peft_model, f"{name}: the combination is not {rank} wide", peft_call)
    tx = Transaction()
    try:
        with torch.no_grad():
            _add(peft_model, index, tx, adapter_name, config, rank, combined)
    except BaseException:
        tx.roll_back()
        raise
    return AdapterChangeResult(FAST, None)


def _refusal(
    peft_model: Any,
    index: ModelIndex,
    adapters: Any,
    weights: Any,
    adapter_name: Any,
    combination_type: Any,
    options: dict[str, Any],
) -> str | tuple[Any, int, list[str]]:
    """Why PEFT's own function runs (its errors included), or the new adapter's config, rank and
    target layers."""
    tuner = peft_model.base_model
    configs = peft_model.peft_config
    if (
        not isinstance(adapters, list)
        or not adapters
        or not all(isinstance(name, str) and name in configs for name in adapters)
    ):
        return "adapters is not a list of the model's adapter names (PEFT's own checks)"
    if not isinstance(weights, list) or len(weights) != len(adapters):
        return "weights is not a list as long as adapters"
    if not all(type(weight) in (int, float) for weight in weights):
        return "a weight is not an int or a float"
    if not isinstance(adapter_name, str) or not adapter_name:
        return "adapter_name is not a non-empty str"
    if combination_type not in VERIFIED_COMBINATIONS:
        return f"combination_type={combination_type!r} is not one the fast path was verified with"
    unknown = set(options) - {
        "svd_rank",
        "svd_clamp",
        "svd_full_matrices",
        "svd_driver",
        "density",
        "majority_sign_method",
    }
    if unknown:
        return f"options PEFT's add_weighted_adapter may not take: {sorted(unknown)}"
    for name in adapters:
        reason = policy.config_refusal(configs[name])
        if reason is not None:
            return f"adapter {name!r}: {reason}"
    combination = "linear" if len(adapters) == 1 else combination_type
    ranks = [
        config.r if not config.rank_pattern else max(config.r, *config.rank_pattern.values())
        for config in (configs[name] for name in adapters)
    ]
    if combination in _SAME_RANK:
        if len(set(ranks)) != 1:
            return "the adapters' ranks differ (PEFT raises its own error)"
        rank = ranks[0]
    elif combination == "cat":
        rank = sum(ranks)
    else:
        svd_rank = options.get("svd_rank")
        if svd_rank is not None and (type(svd_rank) is not int or svd_rank <= 0):
            return "svd_rank is not a positive int"
        rank = svd_rank or max(ranks)
    kinds = {type(configs[name].target_modules) for name in adapters}
    if kinds == {str}:
        target_modules: Any = "|".join(f"({configs[name].target_modules})" for name in adapters)
    elif kinds == {set}:
        target_modules = functools.reduce(operator.or_, (configs[name].target_modules for name in adapters))
    else:
        return "the adapters' target_modules are not all sets or all strings (PEFT's own error)"
    try:
        config = dataclasses.replace(
            configs[adapters[0]],
            r=rank,
            lora_alpha=rank,
            target_modules=target_modules,
            alpha_pattern={},
            rank_pattern={},
        )
    except Exception as error:  # PEFT's replace raises the same
        return f"the new config is refused by PEFT ({type(error).__name__})"
    reason = (
        policy.config_refusal(config)
        or policy.model_refusal(peft_model, adapter_name, index, config)
        or lifecycle.layer_refusal(tuner, list(index.layers.items()), index.auxiliary)
    )
    if reason is not None:
        return reason
    if config.use_dora or config.lora_bias:
        return "the new adapter would keep values of PEFT's random initialisation (DoRA, lora_bias)"
    # PEFT's _freeze_adapter freezes every parameter whose name contains the new name
    segments = index.segments | set(configs)
    if any(adapter_name in segment for segment in segments):
        return f"{adapter_name!r} is part of a name in the model, which PEFT's _freeze_adapter would freeze"
    targets = selected(tuner, config, index)
    if not targets:
        return "the new config matches no module (PEFT raises its own error)"
    for name in targets:
        layer = index.modules[name]
        if type(layer) is not boundary.LoraLinear or hasattr(layer, "lora_arrow"):
            return f"{name} is a {type(layer).__name__}, not a lora.Linear"
        base = layer.get_base_layer()
        if type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32:
            return f"{name} does not wrap a float32 nn.Linear"
        held = [adapter for adapter in adapters if adapter in layer.lora_A]
        if not held:
            return f"{name} holds none of the adapters (PEFT raises its own error)"
        for adapter in held:
            for weight in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                if weight.dtype != torch.float32 or weight.device != base.weight.device:
                    # PEFT's combinations keep the adapters' dtype; the new matrices here take the base's
                    return f"{name}: adapter {adapter!r} is not float32 on the base layer's device"
        if rank > min(layer.in_features, layer.out_features) and combination != "cat":
            # PEFT's matrices keep the new rank as their size; a combination narrower than that does not
            return f"{name}: the new rank {rank} exceeds the layer's sides"
        if combination == "cat" and sum(layer.r[adapter] for adapter in held) != rank:
            # PEFT zeroes its random initialisation (`* 0.0`): the rows cat leaves keep the signs of
            # random numbers (-0.0)
            return f"{name} holds only some of the adapters, whose padding PEFT leaves as signed zeros"
        if combination in _SAME_RANK and any(layer.r[adapter] != rank for adapter in held):
            return f"{name}: an adapter's rank there is not {rank} (rank_pattern)"
    model_config = getattr(tuner.model, "config", None)
    if getattr(model_config, "tie_word_embeddings", False) and any(
        name.rpartition(".")[2] in boundary.EMBEDDING_LAYER_NAMES for name in targets
    ):
        return "the model ties its embeddings and the new adapter targets one (PEFT warns, and may tie)"
    return config, rank, targets


def _combine(
    tuner: Any,
    layer: Any,
    adapters: list[str],
    weights: list[float],
    combination_type: str,
    rank: int,
    options: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The new adapter's (A, B) in `layer`, as PEFT's add_weighted_adapter writes them."""
    combination = "linear" if len(adapters) == 1 else combination_type
    if combination == "cat":
        # PEFT zeroes its fresh matrices (`* 0.0`) and writes the concatenation into their first rows
        # and columns
        # (PEFT's matrices are on the base layer's device, in its dtype: float32, checked)
        weight = layer.get_base_layer().weight
        new_a = torch.zeros((rank, layer.in_features), dtype=weight.dtype, device=weight.device)
        new_b = torch.zeros((layer.out_features, rank), dtype=weight.dtype, device=weight.device)
        loras_a, loras_b = [], []
        for adapter, weight in zip(adapters, weights, strict=True):
            if adapter in layer.lora_A:
                loras_a.append(layer.lora_A[adapter].weight.data * weight * layer.scaling[adapter])
                loras_b.append(layer.lora_B[adapter].weight.data)
        cat_a, cat_b = torch.cat(loras_a, dim=0), torch.cat(loras_b, dim=1)
        new_a[: cat_a.shape[0], :] = cat_a
        new_b[:, : cat_b.shape[1]] = cat_b
        return new_a, new_b
    density = options.get("density")
    sign = options.get("majority_sign_method", "total")
    if combination.endswith("svd"):
        a, b = tuner._svd_generalized_task_arithmetic_weighted_adapter(
            combination,
            adapters,
            weights,
            rank,
            layer,
            None,  # the new matrices: read by PEFT for convolutions only
            None,
            density,
            sign,
            options.get("svd_clamp"),
            full_matrices=options.get("svd_full_matrices", True),
            driver=options.get("svd_driver"),
        )
        return a, b
    a, b = tuner._generalized_task_arithmetic_weighted_adapter(
        combination, adapters, weights, layer, density, sign
    )
    return a, b


def _add(
    peft_model: Any,
    index: ModelIndex,
    tx: Transaction,
    adapter_name: str,
    config: Any,
    rank: int,
    combined: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """What inject_adapter and the writes after it leave: the new adapter, not active, frozen."""
    tuner = peft_model.base_model
    active = list(tuner.active_adapters)
    tx.record(tuner, adapter_name)
    peft_model.peft_config[adapter_name] = config
    tuner._check_new_adapter_config(config)
    leaves = Leaves()
    for name, (weight_a, weight_b) in combined.items():
        layer = index.modules[name]
        _record_lora(tx, layer, adapter_name)
        _add_lora_linear(layer, adapter_name, rank, rank, config, weight_a, weight_b, True, leaves)
    for layer in index.layers.values():
        tx.record_attributes(layer, ("_active_adapter",))
        vars(layer)["_active_adapter"] = list(active)
    tuner.active_adapter = list(active)
    # PEFT's list of injected modules (every target holds an adapter already: listed, unless the
    # list was changed by hand)
    _extend_unique(tuner.targeted_module_names, list(combined))
