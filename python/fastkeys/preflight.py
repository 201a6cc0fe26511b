"""Checks that find a broken adapter before any tensor is read: `check_adapter`, `check_base`."""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable

from . import tuners
from .checkpoint import Checkpoint, scan
from .matching import filter_missing, insert_adapter_name

__all__ = ["AdapterCheck", "Finding", "check_adapter", "check_base"]

AdapterCheck = collections.namedtuple("AdapterCheck", ["missing_keys", "unexpected_keys"])
AdapterCheck.__doc__ = """What loading would report: the adapter-relevant missing keys and the
unexpected keys (in their model form), like torch's `_IncompatibleKeys` after fastkeys' filter."""

_PEFT_PREFIX = "base_model.model."


def _checkpoint_keys(
    checkpoint: Checkpoint | str | os.PathLike[str] | Iterable[str],
) -> tuple[list[str], object]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = scan(checkpoint)
    if isinstance(checkpoint, Checkpoint):
        config = checkpoint.adapter_config
        return list(checkpoint), config.get("peft_type") if config else None
    return list(checkpoint), None


def check_adapter(
    model_keys: Iterable[str],
    checkpoint: Checkpoint | str | os.PathLike[str] | Iterable[str],
    adapter_name: str = "default",
    peft_type: object = None,
) -> AdapterCheck:
    """The missing keys that matter and the unexpected keys that loading `checkpoint` as
    `adapter_name` into a model with `model_keys` would produce, from names alone.

    `model_keys` are the model's state-dict keys with the adapter already added (as PEFT's
    `load_adapter` has them when it loads). `checkpoint` is a scanned Checkpoint, a path to scan or
    the checkpoint's keys. `peft_type` defaults to the checkpoint's adapter_config.json."""
    keys, configured = _checkpoint_keys(checkpoint)
    method = peft_type if peft_type is not None else configured
    model = list(model_keys)
    present = set(model)
    if not any(key.startswith(_PEFT_PREFIX) for key in model):
        # Adapters injected into a bare model: PEFT drops the wrapper prefix from the checkpoint.
        keys = [key.removeprefix(_PEFT_PREFIX) for key in keys]
    loaded: set[str] = set()
    unexpected: list[str] = []
    for key, mapped in zip(keys, insert_adapter_name(keys, adapter_name, method), strict=True):
        if mapped not in present:
            # modules_to_save: `M.weight` in the checkpoint is `M.modules_to_save.<name>.weight`.
            module, _, parameter = key.rpartition(".")
            wrapped = f"{module}.modules_to_save.{adapter_name}.{parameter}" if module else ""
            if wrapped in present:
                mapped = wrapped
        if mapped in present:
            loaded.add(mapped)
        else:
            unexpected.append(mapped)
    missing = [key for key in model if key not in loaded]
    return AdapterCheck(filter_missing(missing, adapter_name, method), unexpected)


Finding = collections.namedtuple("Finding", ["kind", "key", "message"])
Finding.__doc__ = """One problem `check_base` found: `kind` (missing_module, shape, unmatched_target,
untrained_target, prefix), the key or name it concerns, and what was expected."""

# An adapter "name" no key holds: insert_adapter_name marks where each tensor segment ends.
_MARK = "\x00"


def _adapter_modules(keys: list[str], method: object) -> dict[str, dict[str, str]]:
    """module -> {tensor segment: checkpoint key}, with the tensor segment found as
    insert_adapter_name finds it; keys with none are saved modules (modules_to_save), listed under
    their own module with the tensor segment ''."""
    modules: dict[str, dict[str, str]] = {}
    for key, marked in zip(keys, insert_adapter_name(keys, _MARK, method), strict=True):
        if marked is key:
            module, _, _ = key.removeprefix(_PEFT_PREFIX).rpartition(".")
            modules.setdefault(module, {})[""] = key
        else:
            module, _, tensor = marked.partition("." + _MARK)[0].removeprefix(_PEFT_PREFIX).rpartition(".")
            modules.setdefault(module, {})[tensor] = key
    return modules


def _selects(target: object, name: str) -> bool:
    """PEFT's rule: a string is `re.fullmatch`ed against the module name (here by the linear
    engine, so that a hostile `(.+)+X` costs linear time), a list entry matches a whole
    dotted suffix."""
    from ._patterns import linear

    if isinstance(target, str):
        return linear(target, "target_modules", (r"^(?:{})$", r"\A(?:{})\Z")).search(name)
    if not isinstance(target, (list, tuple, set, frozenset)) or not all(isinstance(t, str) for t in target):
        raise ValueError(f"target_modules must be a str or a list of str, not {type(target).__name__}")
    return any(name == t or name.endswith("." + t) for t in target)


def _linear_like(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return last != "lm_head" and "embed" not in last and last not in ("wte", "wpe")


def _prefix_hint(unmatched: list[str], base_modules: set[str]) -> Finding | None:
    """A wrong key prefix: stripping leading segments from the adapter's module names, or adding
    the base's, makes them match."""
    for module in unmatched[:1]:
        segments = module.split(".")
        for cut in range(1, len(segments)):
            if ".".join(segments[cut:]) in base_modules:
                extra = ".".join(segments[:cut]) + "."
                fixed = sum(m.startswith(extra) and m[len(extra) :] in base_modules for m in unmatched)
                return Finding(
                    "prefix",
                    extra,
                    f"the adapter's keys carry an extra prefix {extra!r}: without it {fixed} of "
                    f"{len(unmatched)} missing modules exist in the base model",
                )
        for base in base_modules:
            if base.endswith("." + module):
                extra = base[: -len(module)]
                fixed = sum(extra + m in base_modules for m in unmatched)
                return Finding(
                    "prefix",
                    extra,
                    f"the adapter's keys lack the prefix {extra!r}: with it {fixed} of "
                    f"{len(unmatched)} missing modules exist in the base model",
                )
    return None


def check_base(
    base: Checkpoint | str | os.PathLike[str], adapter: Checkpoint | str | os.PathLike[str]
) -> list[Finding]:
    """Does this adapter fit this base model? From headers and adapter_config.json alone.

    `base` is the model's checkpoint (file, index or directory); `adapter` a directory with
    `adapter_config.json`. Every adapter module must exist in the base; for LoRA-family adapters
    (lora, DoRA, adalora, loha, lokr) shapes must agree with the base weight (`lora_A` is
    `[r, in]`, `lora_B` `[out, r]` for a Linear `[out, in]`); each of `target_modules` must match
    a base module; and every base module they select must have weights in the adapter."""
    base_ckpt = base if isinstance(base, Checkpoint) else scan(base)
    adapter_ckpt = adapter if isinstance(adapter, Checkpoint) else scan(adapter)
    config = adapter_ckpt.adapter_config
    if not config:
        raise ValueError(
            f"{adapter_ckpt.path}: no adapter_config.json; check_base needs the adapter's config"
        )
    method = tuners.resolve(config.get("peft_type"))
    weights = {
        name[: -len(".weight")]: tensor.shape
        for name, tensor in base_ckpt.items()
        if name.endswith(".weight")
    }
    findings: list[Finding] = []
    modules = _adapter_modules(list(adapter_ckpt), config.get("peft_type"))
    # Model-level tensors (`base_model.vera_A`) belong to the tuner, not to a base module.
    unmatched = [module for module in modules if module not in ("", "base_model") and module not in weights]
    for module in unmatched:
        key = next(iter(modules[module].values()))
        findings.append(Finding("missing_module", key, f"no module {module!r} in the base model"))
    hint = _prefix_hint(unmatched, set(weights))
    if hint is not None:
        findings.insert(0, hint)
    for module, tensors in modules.items():
        if module not in weights:
            continue
        findings += _shape_findings(module, tensors, weights[module], adapter_ckpt, method)
    targets = config.get("target_modules")
    if targets:
        findings += _target_findings(targets, config, weights, modules)
    return findings


def _shape_findings(
    module: str,
    tensors: dict[str, str],
    base_shape: tuple[int, ...],
    adapter: Checkpoint,
    method: tuners.Method | None,
) -> list[Finding]:
    findings = []
    if "" in tensors:  # a saved copy of the module (modules_to_save)
        saved = adapter[tensors[""]].shape
        if tensors[""].endswith(".weight") and saved != base_shape:
            findings.append(
                Finding(
                    "shape", tensors[""], f"saved module has shape {list(saved)}, the base {list(base_shape)}"
                )
            )
    # The method's record says which tensors have known shapes (the LoRA family's).
    if method is None or not (method.shapes or method.kronecker) or len(base_shape) != 2:
        return findings
    out, inp = base_shape
    # Only an embedding-specific tensor name tells an Embedding from a Linear.
    is_embedding = any(name in method.embedding_shapes and name not in method.shapes for name in tensors)
    rules = method.embedding_shapes if is_embedding else method.shapes
    if is_embedding:
        out, inp = inp, out  # Embedding weight is [num_embeddings, dim]
    ranks: set[int] = set()
    for name, key in tensors.items():
        rule = rules.get(name)
        shape = adapter[key].shape
        if rule is not None and len(rule) == 1:  # a vector over the base's out features (DoRA)
            if shape != (out,):
                findings.append(
                    Finding("shape", key, f"expected [{out}] (the base's out features), found {list(shape)}")
                )
            continue
        if rule is None or len(shape) != 2:
            continue
        dims: dict[str | int, str | int] = {"out": out, "in": inp}
        expected = [dims.get(want, want) for want in rule]
        for size, want in zip(shape, expected, strict=True):
            if want == "r":
                ranks.add(size)
        if any(want != "r" and size != want for size, want in zip(shape, expected, strict=True)):
            shown = ", ".join(str(want) for want in expected)
            findings.append(
                Finding(
                    "shape",
                    key,
                    f"expected [{shown}] for a base weight {list(base_shape)}, found {list(shape)}",
                )
            )
    if method.kronecker is not None:
        findings += _lokr_findings(tensors, adapter, out, inp, method.kronecker)
    if len(ranks) > 1:
        key = next(iter(tensors.values()))
        findings.append(
            Finding("shape", key, f"the tensors of {module!r} disagree on the rank: {sorted(ranks)}")
        )
    return findings


def _lokr_findings(
    tensors: dict[str, str], adapter: Checkpoint, out: int, inp: int, factors: tuple[str, str]
) -> list[Finding]:
    """LoKr: kron(w1, w2) must be [out, in]; w1 is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`, likewise
    w2 (the factor names come from the method's record)."""

    def factor(name: str) -> tuple[int, int] | None:
        if name in tensors:
            shape = adapter[tensors[name]].shape
            return (shape[0], shape[1]) if len(shape) == 2 else None
        if f"{name}_a" in tensors and f"{name}_b" in tensors:
            a, b = adapter[tensors[f"{name}_a"]].shape, adapter[tensors[f"{name}_b"]].shape
            return (a[0], b[-1]) if len(a) == 2 and len(b) == 2 else None
        return None

    w1, w2 = factor(factors[0]), factor(factors[1])
    if w1 is None or w2 is None:
        return []
    if (w1[0] * w2[0], w1[1] * w2[1]) == (out, inp):
        return []
    key = next(v for k, v in tensors.items() if k.startswith(factors[0]))
    return [
        Finding(
            "shape",
            key,
            f"kron(w1 {list(w1)}, w2 {list(w2)}) is [{w1[0] * w2[0]}, {w1[1] * w2[1]}], "
            f"the base weight [{out}, {inp}]",
        )
    ]


def _in_layers(config: dict[str, object], name: str) -> bool:
    """PEFT's `layers_to_transform`/`layers_pattern` for list targets: the module's layer index
    (the first numbered segment, or the one after a `layers_pattern`) must be listed."""
    from ._patterns import engine, linear

    wanted = config.get("layers_to_transform")
    if wanted is None or wanted == []:
        return True
    patterns = config.get("layers_pattern") or []
    if isinstance(patterns, str):
        patterns = [patterns]
    # PEFT's expressions, run by the linear engine; group 1 is the index (`\d` is ASCII here).
    found = None
    if not patterns:
        found = engine(r"^.*?\.[^.]*\.([0-9]+)\.", r"\A.*?\.[^.]*\.([0-9]+)\.").group(name)
    for pattern in patterns:  # type: ignore[attr-defined]
        # Spliced in ungrouped, as PEFT does: `a|b` there splits the whole expression.
        # `re.match` anchors every alternative: the whole is wrapped in `^(?:...)`.
        template = (r"^(?:(?:^|.*?\.){}\.([0-9]+)\.)", r"\A(?:(?:\A|.*?\.){}\.([0-9]+)\.)")
        found = linear(pattern, "layers_pattern", template).group(name)
        if found is not None:
            break
    if found is None:
        return False
    index = int(found)
    return index == wanted if isinstance(wanted, int) else index in wanted  # type: ignore[operator]


def _target_findings(
    targets: object,
    config: dict[str, object],
    weights: dict[str, tuple[int, ...]],
    modules: dict[str, dict[str, str]],
) -> list[Finding]:
    excluded = config.get("exclude_modules")
    findings = []
    if targets == "all-linear":
        selected = [m for m, shape in weights.items() if len(shape) == 2 and _linear_like(m)]
    else:
        if isinstance(targets, list):
            for target in targets:
                if not any(_selects([target], module) for module in weights):
                    findings.append(
                        Finding(
                            "unmatched_target",
                            target,
                            f"target_modules entry {target!r} matches no base module",
                        )
                    )
        elif not any(_selects(targets, module) for module in weights):
            findings.append(
                Finding(
                    "unmatched_target", str(targets), f"target_modules {targets!r} matches no base module"
                )
            )
        selected = [m for m in weights if _selects(targets, m)]
        if isinstance(targets, list):
            selected = [m for m in selected if _in_layers(config, m)]
    if excluded:
        selected = [m for m in selected if not _selects(excluded, m)]
    trained = {module for module, tensors in modules.items() if any(tensors)}
    for module in selected:
        if module not in trained:
            findings.append(
                Finding(
                    "untrained_target",
                    module,
                    "target_modules selects this base module but the adapter has no weights for it "
                    "(PEFT would initialise them afresh)",
                )
            )
    return findings
