"""What the fast path will do for one adapter, decided before the model changes.

The targets come from PEFT's own matcher (`_check_target_module_exists`) run over the model index,
with config expressions matched in linear time (`peft_re.linear_time_matching`). Targets that are
plain LoRA `Linear` layers already need only two new matrices, whose keys and shapes are known up
front; the others (every target of the other methods) go through PEFT's own per-layer code
(`inject.py`). The checkpoint is checked against the plan before anything changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from fastkeys.checkpoints.scan import Checkpoint
from fastkeys.integrations.loader import boundary
from fastkeys.integrations.loader.index import ModelIndex
from fastkeys.integrations.loader.methods import LORA, Layout, Method
from fastkeys.integrations.loader.peft_re import linear_time_matching
from fastkeys.rules.matching import insert_adapter_name
from fastkeys.rules.records import MODEL_PREFIX as MODEL_PREFIX  # inject.py imports it from here


class Options(NamedTuple):
    """A load's options that the fast paths take (`torch_device` goes to PEFT: `policy`)."""

    is_trainable: bool
    autocast_adapter_dtype: bool
    low_cpu_mem_usage: bool


class Refused(Exception):
    """The fast path cannot reproduce PEFT exactly for this load; the message is the reason."""


class Plan(NamedTuple):
    targets: list[str]
    quick: dict[str, tuple[int, float]]  # plain LoRA Linear targets: (r, alpha)
    direct: dict[str, Layout]  # other methods' existing Linear layers: the new entries
    expected: dict[str, tuple[int, ...]]  # model key -> shape, for the quick and direct targets
    by_model_key: dict[str, str]  # model key -> checkpoint tensor name


def condense_targets(tuner: Any, config: Any) -> None:
    """What PEFT's `inject_adapter` does to a long `target_modules` list before matching: with
    `MIN_TARGET_MODULES_FOR_OPTIMIZATION` names or more (diffusers' configs read off a file list
    every module), it keeps the shortest suffixes that still tell the targets from every other
    module name, by PEFT's own `_find_minimal_target_modules`, and stores them in the config. IA3
    is left as it is, as PEFT leaves it.

    PEFT's other names are every name `named_modules()` yields, tuner internals included (an
    adapter named like a target's last segment changes the answer). PEFT only asks whether a
    suffix of a target is a suffix of another name, which needs the other name to end in a
    target's last segment: only those are passed, the same answer from a walk that builds no name
    for the rest (`_names_ending_in`)."""
    targets = config.target_modules
    if (
        not isinstance(targets, (list, set))
        or len(targets) < boundary.MIN_TARGET_MODULES_FOR_OPTIMIZATION
        or config.peft_type == boundary.IA3
    ):
        return
    named = set(targets)
    suffixes = tuple("." + suffix for suffix in targets)
    last = {target.rpartition(".")[2] for target in targets}
    others = [
        name
        for name in _names_ending_in(tuner.model, last)
        if name not in named and not name.endswith(suffixes)
    ]
    condensed = boundary.find_minimal_target_modules(targets, others)
    if len(condensed) < len(targets):
        config.target_modules = condensed


def _names_ending_in(model: nn.Module, last: set[str]) -> list[str]:
    """The names `model.named_modules()` yields (its preorder walk, a module reached twice named
    once; the root is "") whose last segment is in `last`; a name is built only for those. The
    children of a module whose children are all leaves (the per-adapter containers, nearly all of
    a model holding many adapters) are visited in place, in order: the walk's order, without a
    stack entry each."""
    found: list[str] = []
    memo: set[int] = set()

    def name(entry: Any) -> str:  # entry: (module, its key in its parent, the parent's entry)
        keys = []
        while entry[2] is not None:
            keys.append(entry[1])
            entry = entry[2]
        return ".".join(reversed(keys))

    stack: list[tuple[nn.Module, str, Any]] = [(model, "", None)]
    while stack:
        entry = stack.pop()
        module, key, _parent = entry
        if id(module) in memo:
            continue
        memo.add(id(module))
        if key in last:  # the root's name is "" (a target ending in "." has that last segment)
            found.append(name(entry))
        children = module._modules
        if not children:
            continue
        if all(child is None or not child._modules for child in children.values()):
            for child_key, child in children.items():
                if child is not None and id(child) not in memo:
                    memo.add(id(child))
                    if child_key in last:
                        found.append(name((child, child_key, entry)))
            continue
        stack.extend(reversed([(child, k, entry) for k, child in children.items() if child is not None]))
    return found


def selected(tuner: Any, config: Any, index: ModelIndex) -> list[str]:
    """The module names PEFT's matcher selects and does not exclude, in PEFT's order."""
    excluded = boundary.ExcludedModule
    with linear_time_matching():
        return [
            name
            for name in index.modules
            if (result := tuner._check_target_module_exists(config, name))
            and not isinstance(result, excluded)
        ]


def make_plan(
    tuner: Any,
    config: Any,
    index: ModelIndex,
    checkpoint: Checkpoint,
    adapter_name: str,
    method: Method,
    *,
    low_cpu_mem_usage: bool,
    saved: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    targets: list[str] | None = None,
    stored_under: str | None = None,
) -> Plan:
    """`saved`: the modules_to_save copies' tensors (`saved.py`), model key -> (checkpoint name,
    shape), whose names PEFT maps itself, before its renaming; `targets`: `selected`'s, if known.
    `stored_under`: the checkpoint holds the model's own module paths under this prefix
    (diffusers' layout; its other tensors are ignored) and PEFT injects into the modules those
    names (`inject_adapter_in_model(..., state_dict=)`): Refused unless they are the targets."""
    if targets is None:
        targets = selected(tuner, config, index)
    if not targets:
        raise Refused("the config matches no module (PEFT raises its own error)")
    if low_cpu_mem_usage and not method.low_cpu_mem_usage:
        raise Refused(
            f"low_cpu_mem_usage=True assigns the checkpoint's tensors; not verified for {method.name}"
        )
    bases: dict[str, Any] = {}
    for name in targets:
        module = index.modules[name]
        base = module.get_base_layer() if isinstance(module, boundary.BaseTunerLayer) else module
        bases[name] = base
        if method.bases is not None and type(base) not in method.bases:
            raise Refused(f"{method.name} on a {type(base).__name__} ({name}) is not verified")
        if low_cpu_mem_usage:
            weight = getattr(base, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dtype != torch.float32:
                raise Refused(
                    "low_cpu_mem_usage=True rounds adapter weights through the base layer's dtype; "
                    f"{name} is not float32"
                )
    quick: dict[str, tuple[int, float]] = {}
    expected: dict[str, tuple[int, ...]] = {}
    plain = method is LORA and not (config.use_dora or config.lora_bias)
    get_pattern_key = boundary.get_pattern_key
    direct: dict[str, Layout] = {}
    with linear_time_matching():
        for name in targets:
            layer = index.modules[name]
            if method.layout is not None:
                layout = method.layout(layer, bases[name], config, name)
                if layout is not None:
                    direct[name] = layout
                    prefix = f"{MODEL_PREFIX}{name}."
                    for attribute, shape in layout.tensors.items():
                        expected[f"{prefix}{attribute}.{adapter_name}"] = shape
                continue
            if not (plain and type(layer) is boundary.LoraLinear and not hasattr(layer, "lora_arrow")):
                continue
            r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
            alpha = config.alpha_pattern.get(
                get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha
            )
            if not isinstance(r, int) or r <= 0:
                continue  # PEFT's update_layer raises its own error
            quick[name] = (r, alpha)
            prefix = f"{MODEL_PREFIX}{name}."
            expected[f"{prefix}lora_A.{adapter_name}.weight"] = (r, layer.in_features)
            expected[f"{prefix}lora_B.{adapter_name}.weight"] = (layer.out_features, r)
    saved = saved or {}
    stored = {name for name, _shape in saved.values()}
    names = [name for name in checkpoint if name not in stored]
    keys = names
    if stored_under is not None:
        names = [name for name in names if name.startswith(stored_under)]
        paths = [name[len(stored_under) :] for name in names]
        named = {path.rsplit(f".{tuner.prefix}", 1)[0] for path in paths}
        if named != set(targets):
            raise Refused(
                "the state dict names other modules than the config targets (PEFT injects by the "
                "state dict and warns)"
            )
        keys = [MODEL_PREFIX + path for path in paths]
    by_model_key = dict(zip(insert_adapter_name(keys, adapter_name, config.peft_type), names, strict=True))
    for key, (name, shape) in saved.items():
        if key in by_model_key:
            raise Refused(f"the checkpoint holds {key} both as it is and as a module to save")
        if name in checkpoint:  # else check_checkpoint reports it missing
            by_model_key[key] = name
        expected[key] = shape
    return Plan(targets, quick, direct, expected, by_model_key)


def check_checkpoint(
    checkpoint: Checkpoint, plan: Plan, expected: dict[str, tuple[int, ...]], adapter_name: str
) -> None:
    """Every tensor the adapter needs is in the checkpoint with its shape, and nothing else is:
    Refused (for PEFT's loader to handle) or ValueError naming the file and the tensor."""
    by_model_key = plan.by_model_key
    missing = [key for key in expected if key not in by_model_key]
    if missing:
        raise Refused(f"the checkpoint lacks {len(missing)} of the adapter's tensors (e.g. {missing[0]})")
    unexpected = [by_model_key[key] for key in by_model_key if key not in expected]
    if unexpected:
        raise Refused(
            f"the checkpoint holds {len(unexpected)} tensors outside the adapter's modules "
            f"(e.g. {unexpected[0]})"
        )
    for key, shape in expected.items():
        found = checkpoint[by_model_key[key]]
        if tuple(found.shape) != shape:
            raise ValueError(
                f"{found.file}: tensor {by_model_key[key]!r} has shape {list(found.shape)}, "
                f"but adapter {adapter_name!r} needs {list(shape)} there"
            )
