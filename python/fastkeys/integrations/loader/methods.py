"""The PEFT methods the fast path covers: one record each, holding everything that differs by method.

A record names the method's config, tuner and layer classes (PEFT's own), the config fields the
fast path was verified with and the values it takes (the allow-list: a field not listed, or a value
outside it, sends the load to PEFT's loader with the reason), the base-layer types it was verified
on, and the one function that adds an adapter to a layer that already holds the method's adapters.
Everything else the fast path does (matching, checks, the bookkeeping of PEFT's whole-model
passes, the transaction) is the same for every method. Adding a method is a record here and its
differential tests (`tests/integrations/loader/test_load_methods.py`).

For LoHa, LoKr and IA3 that function is PEFT's own tuner `_create_and_replace`, which calls the
layer's `update_layer` with the method's arguments; LoRA keeps its verified direct call (DoRA is the
one LoRA variant covered). PEFT's `_create_and_replace` wraps a module not wrapped yet, for every
method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import peft
from torch import nn

from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.peft_re import linear_time_matching

Rule = tuple[Callable[[Any], bool], str]  # (accepted?, what is accepted)


def _anything(_value: Any) -> bool:
    return True


def _unset(value: Any) -> bool:
    return value is None or value == {} or value == [] or value is False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _strings(value: Any) -> bool:
    return isinstance(value, (list, set, tuple)) and all(isinstance(item, str) for item in value)


def _targets(value: Any) -> bool:
    """An expression or names (a long list is condensed as PEFT does: `plan.condense_targets`)."""
    if isinstance(value, str):
        return value != "all-linear"
    return _strings(value) and len(value) > 0


def _token_indices(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(item) for item in value)


def _token_entry(name: Any, indices: Any) -> bool:
    return isinstance(name, str) and bool(name) and _token_indices(indices)


def _one_of(*choices: Any) -> Callable[[Any], bool]:
    # `is` first: True == 1 and False == 0, which a config must not pass off as each other
    return lambda value: any(value is c or (type(value) is type(c) and value == c) for c in choices)


_BOOL: Rule = (lambda v: isinstance(v, bool), "a bool")
_UNSET: Rule = (_unset, "unset")


def _common(peft_type: Any) -> dict[str, Rule]:
    """Fields every PEFT config has: bookkeeping PEFT keeps in the config and does not read while
    loading, and the method."""
    return {
        "task_type": (_anything, "any"),
        "peft_type": (lambda v: v == peft_type, str(getattr(peft_type, "value", peft_type))),
        "auto_mapping": (_anything, "any"),
        "peft_version": (_anything, "any"),
        "base_model_name_or_path": (_anything, "any"),
        "revision": (_anything, "any"),
        "inference_mode": (_anything, "any (set from is_trainable)"),
    }


# Target selection, the same fields and rules for every method that has them.
_SELECTION: dict[str, Rule] = {
    "target_modules": (_targets, "an expression or names"),
    "exclude_modules": (lambda v: v is None or isinstance(v, str) or _strings(v), "None, a str or names"),
    "layers_to_transform": (lambda v: v is None or _is_int(v) or isinstance(v, list), "None, an int or ints"),
    "layers_pattern": (lambda v: v is None or isinstance(v, str) or _strings(v), "None, a str or strs"),
    "rank_pattern": (lambda v: isinstance(v, dict), "a dict"),
    "alpha_pattern": (lambda v: isinstance(v, dict), "a dict"),
    # the auxiliary wrappers: PEFT's loader
    "modules_to_save": _UNSET,
}

LORA_ALLOWED: dict[str, Rule] = {
    **_common(boundary.LORA),
    **_SELECTION,
    # what the fast path reproduces
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fan_in_fan_out": (lambda v: v is False, "False"),
    "bias": (lambda v: v == "none", '"none"'),
    "use_rslora": _BOOL,
    "init_lora_weights": (
        lambda v: any(v is p or v == p for p in (True, False, "gaussian")),
        "True, False or 'gaussian'",
    ),
    "use_dora": _BOOL,
    "lora_bias": _BOOL,
    "runtime_config": (lambda v: not getattr(v, "ephemeral_gpu_offload", True), "no ephemeral GPU offload"),
    # modules already wrapped by PEFT's ModulesToSaveWrapper (`saved.py`; anything else is refused there)
    "modules_to_save": (
        lambda v: v is None or (isinstance(v, list) and _strings(v) and all(v)),
        "None or names",
    ),
    # token deltas in layers already wrapped by PEFT's TrainableTokensWrapper (`tokens.py`; anything
    # else is refused there)
    "trainable_token_indices": (
        lambda v: (
            v is None
            or _token_indices(v)
            or (isinstance(v, dict) and bool(v) and all(_token_entry(k, i) for k, i in v.items()))
        ),
        "None, token indices, or a dict of names to token indices",
    ),
    # features the fast path leaves to PEFT: accepted only unset
    **dict.fromkeys(
        (
            "megatron_config",
            "loftq_config",
            "eva_config",
            "corda_config",
            "lora_ga_config",
            "velora_config",
            "alora_invocation_tokens",
            "use_qalora",
            "monteclora_config",
            "layer_replication",
            "target_parameters",
            "use_bdlora",
            "arrow_config",
            "kasa_config",
            "ensure_weight_tying",
        ),
        _UNSET,
    ),
    # read only together with a feature above
    "megatron_core": (_anything, "any"),
    "qalora_group_size": (_anything, "any"),
}

# LoHa and LoKr (LyCORIS): the values only initialise weights that loading overwrites (init_weights),
# or are stored per layer (the dropouts).
_LYCORIS: dict[str, Rule] = {
    **_SELECTION,
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "alpha": (_is_number, "a number"),
    "rank_dropout": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "module_dropout": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "use_effective_conv2d": _BOOL,
}

LOHA_ALLOWED: dict[str, Rule] = {
    **_common(boundary.LOHA),
    **_LYCORIS,
    "init_weights": (_one_of(True, False), "True or False"),
}

LOKR_ALLOWED: dict[str, Rule] = {
    **_common(boundary.LOKR),
    **_LYCORIS,
    "decompose_both": _BOOL,
    "decompose_factor": (_is_int, "an int"),
    "rank_dropout_scale": _BOOL,
    "init_weights": (_one_of(True, False, "lycoris"), "True, False or 'lycoris'"),
}

IA3_ALLOWED: dict[str, Rule] = {
    **_common(boundary.IA3),
    "target_modules": (_targets, "an expression or names"),
    "exclude_modules": _SELECTION["exclude_modules"],
    # None: PEFT fills it in from the model type, in the config
    "feedforward_modules": (lambda v: isinstance(v, str) or _strings(v), "an expression or names"),
    "fan_in_fan_out": (lambda v: v is False, "False"),
    "init_ia3_weights": _BOOL,
    "modules_to_save": _UNSET,
}


def _selection(*names: str) -> dict[str, Rule]:
    return {name: _SELECTION[name] for name in names}


_WHOLE_SELECTION = (
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
)
_NONE_BIAS: Rule = (lambda v: v == "none", '"none"')

# HRA (a layout for Linear layers) and OFT (no layout: every layer runs PEFT's own
# `_create_and_replace`)
HRA_ALLOWED: dict[str, Rule] = {
    **_common(boundary.HRA),
    **_selection(*_WHOLE_SELECTION),
    "r": (lambda v: _is_int(v) and v > 0, "a positive int"),
    "apply_GS": _BOOL,
    "init_weights": _BOOL,
    "bias": _NONE_BIAS,
}

OFT_ALLOWED: dict[str, Rule] = {
    **_common(boundary.OFT),
    **_selection(*_WHOLE_SELECTION),
    "r": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "oft_block_size": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
    "module_dropout": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fan_in_fan_out": (lambda v: v is False, "False"),
    "bias": _NONE_BIAS,
    "init_weights": _BOOL,
    "coft": _BOOL,
    "eps": (_is_number, "a number"),
    "block_share": _BOOL,
    "use_cayley_neumann": _BOOL,
    "num_cayley_neumann_terms": (lambda v: _is_int(v) and v >= 0, "an int >= 0"),
}


# ---------------------------------------------------------------------------------------------
# Adding an adapter to a layer that already holds the method's adapters. The caller replaced the
# layer's `set_adapter` and `_move_adapter_to_device_of_base_layer` (O(adapters) passes) and
# applies their effect on the new adapter itself.


def _update_lora(tuner: Any, layer: Any, name: str, config: Any, adapter_name: str) -> None:
    """`LoraModel._create_and_replace` on an existing LoRA layer: `update_layer` with the rank and
    alpha of the module's pattern keys."""
    get_pattern_key = boundary.get_pattern_key
    with linear_time_matching():
        r_key = get_pattern_key(config.rank_pattern.keys(), name)
        alpha_key = get_pattern_key(config.alpha_pattern.keys(), name)
    layer.update_layer(
        adapter_name,
        config.rank_pattern.get(r_key, config.r),
        lora_alpha=config.alpha_pattern.get(alpha_key, config.lora_alpha),
        target_name=name,
        config=config,
    )


def _lora_layer_refusal(layer: Any, config: Any) -> str | None:
    variant = layer.resolve_lora_variant(config=config)
    if variant is not None and not type(variant).__name__.startswith("Dora"):
        return f"the LoRA variant {type(variant).__name__} is not covered"
    return None


def _update_with_peft(tuner: Any, layer: Any, name: str, config: Any, adapter_name: str) -> None:
    """The tuner's own `_create_and_replace` on an existing layer: it calls the layer's
    `update_layer` with the method's arguments (rank and alpha patterns, IA3's feedforward flag
    kept by the layer, ...), as `inject_adapter` does."""
    parent, _target, child_name = boundary.get_submodules(tuner.model, name)
    with linear_time_matching():
        tuner._create_and_replace(config, adapter_name, layer, child_name, parent, current_key=name)


def _no_refusal(_layer: Any, _config: Any) -> str | None:
    return None


# ---------------------------------------------------------------------------------------------
# Layouts: what `update_layer` adds for one adapter to an existing layer wrapping an `nn.Linear`,
# written out so that the fast path builds the entries around the loaded tensors instead of
# initialising random values that loading overwrites. Each is PEFT 0.21.2's `update_layer` for
# that case, line by line; `inject._add_direct` builds the entries (the base layer's device and
# dtype, as `_move_adapter_to_device_of_base_layer` leaves them). None: the layer is not that
# case, or PEFT raises its own error there; PEFT's own `update` runs instead.


class Layout(NamedTuple):
    """One adapter's entries in one layer, in the order `update_layer` adds them."""

    values: dict[str, Any]  # per-adapter dict attribute (`r`, `scaling`, ...) -> its value
    tensors: dict[str, tuple[int, ...]]  # ParameterDict attribute -> the new parameter's shape


def _rank_and_alpha(config: Any, name: str, alpha: Any) -> tuple[Any, Any]:
    """The module's rank and alpha: `_create_and_replace`'s pattern lookup (linear_time_matching is the
    caller's)."""
    get_pattern_key = boundary.get_pattern_key
    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), alpha)
    return r, alpha


def _linear_base(layer: Any, base: Any, linear_class: Any) -> Any:
    return base if type(layer) is linear_class and type(base) is nn.Linear else None


def _loha_layout(layer: Any, base: Any, config: Any, name: str) -> Layout | None:
    """`loha.LoHaLayer.update_layer` on a Linear."""
    base = _linear_base(layer, base, boundary.LoHaLinear)
    r, alpha = _rank_and_alpha(config, name, config.alpha)
    if base is None or not _is_int(r) or r <= 0:
        return None
    out_features, in_features = tuple(base.weight.shape)
    values = {
        "r": r,
        "alpha": alpha,
        "scaling": alpha / r,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
    }
    tensors: dict[str, tuple[int, ...]] = {
        "hada_w1_a": (out_features, r),
        "hada_w1_b": (r, in_features),
        "hada_w2_a": (out_features, r),
        "hada_w2_b": (r, in_features),
    }
    return Layout(values, tensors)


def _lokr_layout(layer: Any, base: Any, config: Any, name: str) -> Layout | None:
    """`lokr.LoKrLayer.update_layer` on a Linear: the Kronecker factors' layout (each factor whole,
    or as a product of two rank-r matrices) follows from the shapes, r and the decompose options."""
    base = _linear_base(layer, base, boundary.LoKrLinear)
    r, alpha = _rank_and_alpha(config, name, config.alpha)
    if base is None or not _is_int(r) or r <= 0:
        return None
    factorization = boundary.lokr_factorization
    in_m, in_n = factorization(base.in_features, config.decompose_factor)
    out_l, out_k = factorization(base.out_features, config.decompose_factor)
    use_w1 = not (config.decompose_both and r < max(out_l, in_m) / 2)
    use_w2 = not (r < max(out_k, in_n) / 2)
    values = {
        "r": r,
        "alpha": alpha,
        "scaling": alpha / r,
        "rank_dropout": config.rank_dropout,
        "module_dropout": config.module_dropout,
        "rank_dropout_scale": config.rank_dropout_scale,
    }
    tensors: dict[str, tuple[int, ...]] = {}
    if use_w1:
        tensors["lokr_w1"] = (out_l, in_m)
    else:
        tensors["lokr_w1_a"] = (out_l, r)
        tensors["lokr_w1_b"] = (r, in_m)
    if use_w2:
        tensors["lokr_w2"] = (out_k, in_n)
    else:
        tensors["lokr_w2_a"] = (out_k, r)
        tensors["lokr_w2_b"] = (r, in_n)
    return Layout(values, tensors)


def _ia3_layout(layer: Any, base: Any, config: Any, name: str) -> Layout | None:
    """`ia3.IA3Layer.update_layer` on a Linear: one scaling vector, over the input for a layer
    made feedforward by its first adapter, else over the output (the new config's
    feedforward_modules are not read on an existing layer)."""
    if _linear_base(layer, base, boundary.IA3Linear) is None:
        return None
    shape = (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)
    return Layout({}, {"ia3_l": shape})


def _hra_layout(layer: Any, base: Any, config: Any, name: str) -> Layout | None:
    """`hra.HRALayer.update_layer` on a Linear: the Householder vectors over the input."""
    r = config.r
    if _linear_base(layer, base, boundary.HRALinear) is None or not _is_int(r) or r <= 0:
        return None
    return Layout({"hra_r": r, "hra_apply_GS": config.apply_GS}, {"hra_u": (layer.in_features, r)})


class Method(NamedTuple):
    """One PEFT method on the fast path; see the module doc."""

    name: str
    peft_type: Any
    config: Any  # PEFT's config class (exactly: a subclass may read fields differently)
    tuner: Any  # PEFT's tuner class (exactly)
    layer: Any  # the tuner's layer class; every layer the method adds is one, from its module
    allowed: dict[str, Rule]
    bases: tuple[type[nn.Module], ...] | None  # base-layer types verified (None: any)
    # (layer, its base layer, config, module name); None: PEFT's own per-layer code everywhere
    layout: Callable[[Any, Any, Any, str], Layout | None] | None = None
    # (tuner, layer, module name, config, adapter): adds the adapter to an existing layer
    update: Callable[[Any, Any, str, Any, str], None] = _update_with_peft
    layer_refusal: Callable[[Any, Any], str | None] = _no_refusal  # why an existing layer is not covered
    low_cpu_mem_usage: bool = False  # low_cpu_mem_usage=True verified (on float32 base weights)


LORA = Method(
    name="LoRA",
    peft_type=boundary.LORA,
    config=peft.LoraConfig,
    tuner=boundary.LoraModel,
    layer=boundary.LoraLayer,
    allowed=LORA_ALLOWED,
    update=_update_lora,
    layer_refusal=_lora_layer_refusal,
    bases=None,
    low_cpu_mem_usage=True,
    layout=None,  # its quick path builds lora.Linear's matrices itself (inject._add_lora_linear)
)
LOHA = Method(
    name="LoHa",
    peft_type=boundary.LOHA,
    config=peft.LoHaConfig,
    tuner=boundary.LoHaModel,
    layer=boundary.LoHaLayer,
    allowed=LOHA_ALLOWED,
    bases=(nn.Linear, nn.Conv1d, nn.Conv2d),
    layout=_loha_layout,
)
LOKR = Method(
    name="LoKr",
    peft_type=boundary.LOKR,
    config=peft.LoKrConfig,
    tuner=boundary.LoKrModel,
    layer=boundary.LoKrLayer,
    allowed=LOKR_ALLOWED,
    bases=(nn.Linear, nn.Conv1d, nn.Conv2d),
    layout=_lokr_layout,
)
IA3 = Method(
    name="IA3",
    peft_type=boundary.IA3,
    config=peft.IA3Config,
    tuner=boundary.IA3Model,
    layer=boundary.IA3Layer,
    allowed=IA3_ALLOWED,
    bases=(nn.Linear, nn.Conv2d),
    layout=_ia3_layout,
)

HRA = Method(
    name="HRA",
    peft_type=boundary.HRA,
    config=peft.HRAConfig,
    tuner=boundary.HRAModel,
    layer=boundary.HRALayer,
    allowed=HRA_ALLOWED,
    bases=(nn.Linear,),
    layout=_hra_layout,
)
OFT = Method(
    name="OFT",
    peft_type=boundary.OFT,
    config=peft.OFTConfig,
    tuner=boundary.OFTModel,
    layer=boundary.OFTLayer,
    allowed=OFT_ALLOWED,
    bases=(nn.Linear,),
)

METHODS: dict[Any, Method] = {method.peft_type: method for method in (LORA, LOHA, LOKR, IA3, HRA, OFT)}
COVERED = "LoRA (with DoRA, rsLoRA), LoHa, LoKr, IA3, HRA and OFT"


def method_of(config: Any) -> Method | None:
    return METHODS.get(getattr(config, "peft_type", None))
