"""What is wrong with an adapter's tensors against the base model: shapes, ranks, zero-size
dimensions, values (untrained, non-finite), LoKr factors. Pure functions of headers, records and
value flags, used by `checks`."""

from __future__ import annotations

import functools
from typing import NamedTuple

from fastkeys.checkpoints.scan import Checkpoint
from fastkeys.rules import records as tuners

Shapes = dict[str, tuple[int, ...]]


class Finding(NamedTuple):
    """One problem `check_base` found: `kind` (missing_module, shape, unmatched_target,
    untrained_target, prefix), the key or name it concerns, and what was expected."""

    kind: str
    key: str
    message: str


def _rules(method: tuners.Method | None) -> tuners.Method:
    """The method's record; with no method known (a config without `peft_type`), every
    method's tensor rules at once (tensor names do not collide across methods)."""
    return method if method is not None else _every_method()


@functools.cache
def _every_method() -> tuners.Method:
    records = list(tuners.METHODS.values())
    return tuners.Method(
        "any",
        "",
        shapes={k: v for m in records for k, v in m.shapes.items()},
        embedding_shapes={k: v for m in records for k, v in m.embedding_shapes.items()},
        ranks={k: v for m in records for k, v in m.ranks.items()},
        zero_factors=tuple(name for m in records for name in m.zero_factors),
        standalone=tuple(name for m in records for name in m.standalone),
    )


def _expected_form(name: str, base_shape: tuple[int, ...] | None, rules: tuners.Method) -> str:
    rule = rules.shapes.get(name) or rules.embedding_shapes.get(name)
    if rule is not None and base_shape is not None and len(base_shape) == 2:
        out, inp = base_shape if name in rules.shapes else base_shape[::-1]
        dims: dict[str | int, str | int] = {"out": out, "in": inp}
        return "[" + ", ".join(str(dims.get(want, want)) for want in rule) + "]"
    rank = _rank(name, base_shape, rules)
    if rank is None:
        return "non-empty"
    return f"{rank}-D" if rule is None else f"{rank}-D ({', '.join(str(w) for w in rule)})"


def _rank(name: str, base_shape: tuple[int, ...] | None, rules: tuners.Method) -> int | None:
    """How many dimensions the tensor `name` must have: fixed by the record, or the base weight's."""
    rank = rules.ranks.get(name)
    if rank == "base":
        return len(base_shape) if base_shape is not None and len(base_shape) >= 2 else None
    return rank if isinstance(rank, int) else None


def _degenerate_findings(
    modules: dict[str, dict[str, str]],
    placed: dict[str, str],
    weights: dict[str, tuple[int, ...]],
    shapes: Shapes,
    rules: tuners.Method,
) -> list[Finding]:
    findings = []
    for module, tensors in modules.items():
        target = placed.get(module)
        base_shape = weights[target] if target is not None else None
        for name, key in tensors.items():
            shape = shapes[key]
            if 0 in shape:
                findings.append(
                    Finding(
                        "degenerate",
                        key,
                        f"shape {list(shape)} holds no values (a zero-size dimension); "
                        f"expected {_expected_form(name, base_shape, rules)}",
                    )
                )
                continue
            rank = _rank(name, base_shape, rules)
            if rank is not None and len(shape) != rank:
                findings.append(
                    Finding(
                        "degenerate",
                        key,
                        f"shape {list(shape)} has {len(shape)} dimension(s), {name} needs {rank}: "
                        f"expected {_expected_form(name, base_shape, rules)}",
                    )
                )
    return findings


def _value_findings(
    modules: dict[str, dict[str, str]],
    adapter: Checkpoint,
    flags: dict[tuple[str, str], tuple[bool, bool]],
    rules: tuners.Method,
) -> list[Finding]:
    findings = []
    inert: list[str] = []  # the first all-zero factor of each module that changes nothing
    factored = 0
    zero_kinds: dict[str, int] = {}
    for tensors in modules.values():
        for key in tensors.values():
            if flags[adapter.shard_of(key), key][1]:
                findings.append(Finding("non_finite", key, "the tensor holds NaN or infinity"))
        factors = {name: key for name, key in tensors.items() if name in rules.zero_factors}
        if not factors or any(name in tensors for name in rules.standalone):  # DoRA's magnitude
            continue
        factored += 1
        zero = [(name, key) for name, key in factors.items() if flags[adapter.shard_of(key), key][0]]
        if zero:
            inert.append(zero[0][1])
            zero_kinds[zero[0][0]] = zero_kinds.get(zero[0][0], 0) + 1
    if inert:
        kinds = ", ".join(zero_kinds)
        if len(inert) == factored:
            message = (
                f"every adapted module ({factored}) has an all-zero {kinds}: the adapter changes "
                "nothing (never trained, or its trained weights were lost on save)"
            )
        else:
            message = (
                f"{len(inert)} of {factored} adapted modules have an all-zero {kinds}: they change nothing"
            )
        findings.insert(0, Finding("untrained", inert[0], message))
    return findings


def _shape_findings(
    module: str,
    tensors: dict[str, str],
    base_shape: tuple[int, ...],
    shapes: Shapes,
    method: tuners.Method | None,
    broken: set[str],
) -> list[Finding]:
    findings = []
    if "" in tensors:  # a saved copy of the module (modules_to_save)
        saved = shapes[tensors[""]]
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
    dims: dict[str | int, str | int] = {"out": out, "in": inp}
    for name, key in tensors.items():
        if key in broken:  # already a `degenerate` finding
            continue
        rule = rules.get(name)
        shape = shapes[key]
        if rule is not None and len(rule) == 1:  # a vector over the base's out features (DoRA)
            if shape != (out,):
                findings.append(
                    Finding("shape", key, f"expected [{out}] (the base's out features), found {list(shape)}")
                )
            continue
        if rule is None or len(shape) != 2:
            continue
        expected = (dims.get(rule[0], rule[0]), dims.get(rule[1], rule[1]))
        rank = 0 if expected[0] == "r" else 1
        ranks.add(shape[rank])
        if shape[1 - rank] != expected[1 - rank]:
            shown = ", ".join(str(want) for want in expected)
            findings.append(
                Finding(
                    "shape",
                    key,
                    f"expected [{shown}] for a base weight {list(base_shape)}, found {list(shape)}",
                )
            )
    if method.kronecker is not None:
        findings += _lokr_findings(tensors, shapes, out, inp, method.kronecker)
    if len(ranks) > 1:
        key = next(iter(tensors.values()))
        findings.append(
            Finding("shape", key, f"the tensors of {module!r} disagree on the rank: {sorted(ranks)}")
        )
    return findings


def _lokr_findings(
    tensors: dict[str, str], shapes: Shapes, out: int, inp: int, factors: tuple[str, str]
) -> list[Finding]:
    """LoKr: kron(w1, w2) must be [out, in]; w1 is `lokr_w1` or `lokr_w1_a @ lokr_w1_b`, likewise
    w2 (the factor names come from the method's record)."""

    def factor(name: str) -> tuple[int, int] | None:
        if name in tensors:
            shape = shapes[tensors[name]]
            return (shape[0], shape[1]) if len(shape) == 2 else None
        if f"{name}_a" in tensors and f"{name}_b" in tensors:
            a, b = shapes[tensors[f"{name}_a"]], shapes[tensors[f"{name}_b"]]
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
