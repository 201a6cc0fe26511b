"""Checks that find a broken adapter before it is loaded: `check_adapter`, `check_base`
(`check_many`). From headers and adapter_config.json; `values=True` also reads tensor data."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from fastkeys.checkpoints.scan import Checkpoint, scan, scan_many
from fastkeys.preflight.findings import (
    Finding,
    Shapes,
    _degenerate_findings,
    _rules,
    _shape_findings,
    _value_findings,
)
from fastkeys.rules import records as tuners
from fastkeys.rules.matching import filter_missing, insert_adapter_name, tensor_segments
from fastkeys.rules.targets import all_linear_takes, in_layers, selects

__all__ = ["AdapterCheck", "BaseCheck", "Coverage", "Finding", "check_adapter", "check_base", "check_many"]


class AdapterCheck(NamedTuple):
    """What loading would report: the adapter-relevant missing keys and the
    unexpected keys (in their model form), like torch's `_IncompatibleKeys` after fastkeys' filter."""

    missing_keys: list[str]
    unexpected_keys: list[str]


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
    if not any(key.startswith(tuners.MODEL_PREFIX) for key in model):
        # Adapters injected into a bare model: PEFT drops the wrapper prefix from the checkpoint.
        keys = [key.removeprefix(tuners.MODEL_PREFIX) for key in keys]
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


# An adapter "name" no key holds: insert_adapter_name marks where each tensor segment ends.
def _adapter_modules(keys: list[str], method: object) -> dict[str, dict[str, str]]:
    """module -> {tensor segment: checkpoint key}, with the tensor segment found as
    insert_adapter_name finds it; keys with none are saved modules (modules_to_save), listed under
    their own module with the tensor segment ''."""
    modules: dict[str, dict[str, str]] = {}
    for key, span in zip(keys, tensor_segments(keys, method), strict=True):
        if span is None:
            module, _, _ = key.removeprefix(tuners.MODEL_PREFIX).rpartition(".")
            modules.setdefault(module, {})[""] = key
        else:
            start, end = span
            modules.setdefault(key[: start - 1].removeprefix(tuners.MODEL_PREFIX), {})[key[start:end]] = key
    return modules


class Coverage(NamedTuple):
    """What an adapter adapts: `modules` (adapter modules found in the base), the distinct `layers`
    they sit in (a layer is a module path up to its first numeric segment, such as
    `model.layers.3`), and `kinds`: modules per last name segment (`q_proj`), in first-seen order."""

    modules: int
    layers: int
    kinds: dict[str, int]

    def __str__(self) -> str:
        kinds = ", ".join(self.kinds)
        layers = f" in {self.layers} layer{'s' if self.layers != 1 else ''}" if self.layers else ""
        return f"{self.modules} module{'s' if self.modules != 1 else ''} ({kinds}){layers}"


class BaseCheck(list[Finding]):
    """`check_base`'s answer for one adapter: the findings (it is their list, so `== []` means
    clean), with the `adapter` path and the `coverage` as data."""

    def __init__(self, findings: Iterable[Finding], adapter: str, coverage: Coverage) -> None:
        super().__init__(findings)
        self.adapter = adapter
        self.coverage = coverage

    def verdict(self, base: str) -> str:
        """One line: `ADAPTER fits BASE: 96 modules (q_proj, v_proj) in 32 layers`, or the number
        of findings."""
        if not self:
            return f"{self.adapter} fits {base}: {self.coverage}"
        return f"{len(self)} finding(s) for {self.adapter} on {base}: {self.coverage}"


def _coverage(modules: Iterable[str]) -> Coverage:
    layers: set[str] = set()
    kinds: dict[str, int] = {}
    count = 0
    for module in modules:
        count += 1
        segments = module.split(".")
        kinds[segments[-1]] = kinds.get(segments[-1], 0) + 1
        numbered = next((i for i, segment in enumerate(segments[:-1]) if segment.isdigit()), None)
        if numbered is not None:
            layers.add(".".join(segments[: numbered + 1]))
    return Coverage(count, len(layers), kinds)


# A rewrite of adapter module names: the segment run `old` becomes `new`. An insertion (`old`
# empty) needs a place: right after the segment run `after` (empty: at the start).
Rewrite = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]

_REWRITE_SAMPLES = 16  # unmatched modules a rewrite is proposed from; each is then tried on all


def _apply(rewrite: Rewrite, segments: list[str]) -> str | None:
    old, new, after = rewrite
    run = old or after
    if not run:
        return ".".join([*new, *segments])
    width = len(run)
    for i in range(len(segments) - width + 1):
        if tuple(segments[i : i + width]) == run:
            cut = i if old else i + width
            return ".".join([*segments[:cut], *new, *segments[cut + len(old) :]])
    return None


def _propose(module: str, base_by_suffix: dict[str, list[str]]) -> set[Rewrite]:
    """The smallest rewrites that turn `module` into a base module sharing its longest dotted
    suffix: one per such base module (the index keeps a few)."""
    segments = module.split(".")
    for keep in range(len(segments), 0, -1):
        candidates = base_by_suffix.get(".".join(segments[-keep:]))
        if candidates:
            break
    else:
        return set()
    rewrites = set()
    head = segments[: len(segments) - keep]
    for base in candidates:
        target = base.split(".")
        tail = target[: len(target) - keep]
        shared = 0
        while shared < min(len(head), len(tail)) and head[shared] == tail[shared]:
            shared += 1
        old, new = tuple(head[shared:]), tuple(tail[shared:])
        rewrites.add((old, new, () if old else tuple(head[max(shared - 1, 0) : shared])))
    return rewrites


def _describe(rewrite: Rewrite) -> tuple[str, str]:
    """(the finding's key, what the rewrite does) for a rewrite."""
    old, new, after = (".".join(run) + "." if run else "" for run in rewrite)
    if not old:
        where = f"after {after!r}" if after else "at the start"
        return new, f"the adapter's keys lack {new!r} {where}"
    if not new:
        return old, f"the adapter's keys carry an extra prefix {old!r}"
    return f"{old} -> {new}", f"the adapter's keys have {old!r} where the base has {new!r}"


def _prefix_rewrite(unmatched: list[str], base: _Base) -> tuple[Finding | None, dict[str, str]]:
    """One consistent rewrite of a run of segments (inserted, removed or replaced anywhere) that
    makes the most `unmatched` modules exist in the base: its finding and the modules it fixes."""
    if not unmatched:
        return None, {}
    step = max(1, len(unmatched) // _REWRITE_SAMPLES)
    proposals = set().union(*(_propose(module, base.by_suffix) for module in unmatched[::step]))
    best: tuple[int, int, Rewrite, dict[str, str]] | None = None
    for rewrite in sorted(proposals):
        fixed = {}
        for module in unmatched:
            moved = _apply(rewrite, module.split("."))
            if moved is not None and moved in base.weights:
                fixed[module] = moved
        size = sum(len(run) for run in rewrite[:2])
        if fixed and (best is None or (len(fixed), -size) > (best[0], -best[1])):
            best = (len(fixed), size, rewrite, fixed)
    if best is None:
        return None, {}
    count, _, rewrite, fixed = best
    key, what = _describe(rewrite)
    example = next(iter(fixed.items()))
    message = (
        f"{what}: rewritten, {count} of {len(unmatched)} adapter modules exist in the base model "
        f"(e.g. {example[0]!r} -> {example[1]!r})"
    )
    if count < len(unmatched):
        message += f"; no single rewrite fixes the other {len(unmatched) - count}"
    return Finding("prefix", key, message), fixed


_SUFFIXES_KEPT = 8  # base modules remembered per dotted suffix, to propose rewrites from


class _Base:
    """What every adapter is checked against: the base's weights by module, read once."""

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.path = checkpoint.path
        self.weights = {
            name[: -len(".weight")]: tensor.shape
            for name, tensor in checkpoint.items()
            if name.endswith(".weight")
        }
        self._by_suffix: dict[str, list[str]] | None = None
        self.selections: dict[str, tuple[list[Finding], list[str]]] = {}
        self.verdicts: dict[object, tuple[list[Finding], Coverage, dict[str, dict[str, str]]]] = {}

    @property
    def by_suffix(self) -> dict[str, list[str]]:
        if self._by_suffix is None:
            index: dict[str, list[str]] = {}
            for module in self.weights:
                segments = module.split(".")
                for cut in range(len(segments)):
                    found = index.setdefault(".".join(segments[cut:]), [])
                    if len(found) < _SUFFIXES_KEPT:
                        found.append(module)
            self._by_suffix = index
        return self._by_suffix


AdapterPath = Checkpoint | str | os.PathLike[str]


def check_base(base: AdapterPath, adapter: AdapterPath, *, values: bool = False) -> BaseCheck:
    """Does this adapter fit this base model? From headers and adapter_config.json alone, unless
    `values=True` reads the adapter's tensor data too.

    `base` is the model's checkpoint (file, index or directory); `adapter` a directory with
    `adapter_config.json` (for many adapters, `check_many`: their headers are read in parallel).
    Every adapter module must exist in the base (else `missing_module`, or one `prefix` finding
    when one rewrite of a run of segments makes them exist); adapter tensors must hold values and
    have their method's number of dimensions (`degenerate`); for LoRA-family adapters shapes must
    agree with the base weight (`shape`); each of `target_modules` must match a base module
    (`unmatched_target`) and every base module they select must have weights in the adapter
    (`untrained_target`). With `values=True`: `untrained` when the tensors that make each
    module's update zero are all zero, `non_finite` for NaN or infinity. The answer is a
    `BaseCheck`: the list of findings, with the adapter's `coverage`. An unusable input raises
    (OSError or ValueError naming the file)."""
    if isinstance(adapter, (list, tuple)):
        raise TypeError(
            "check_base checks one adapter; for many, check_many(base, adapters) reads them in "
            "one parallel call and returns a BaseCheck or the adapter's error for each"
        )
    (answer,) = check_many(base, [adapter], values=values)
    if isinstance(answer, Exception):
        raise answer
    return answer


def check_many(
    base: AdapterPath, adapters: Sequence[AdapterPath], *, values: bool = False
) -> list[BaseCheck | OSError | ValueError]:
    """`check_base` for many adapters that keeps going: an adapter that cannot be used gives its
    exception in its place instead of raising (the base must be usable). The headers of all
    adapter files are read in one parallel call."""
    base_info = _Base(base if isinstance(base, Checkpoint) else scan(base))
    checkpoints = _scan_adapters(adapters)
    flags: dict[tuple[str, str], tuple[bool, bool]] | None = None
    if values:
        files = [file for c in checkpoints if isinstance(c, Checkpoint) for file in c.files]
        try:
            flags = _read_value_flags(files)  # every adapter's data in one parallel call
        except (OSError, ValueError):
            flags = {}  # a file failed: read adapter by adapter, so that its error stays with it
            for i, checkpoint in enumerate(checkpoints):
                if isinstance(checkpoint, Checkpoint):
                    try:
                        flags.update(_read_value_flags(checkpoint.files))
                    except (OSError, ValueError) as error:
                        checkpoints[i] = error
    answers: list[BaseCheck | OSError | ValueError] = []
    for checkpoint in checkpoints:
        if not isinstance(checkpoint, Checkpoint):
            answers.append(checkpoint)
            continue
        try:
            answers.append(_check_one(base_info, checkpoint, flags))
        except ValueError as error:
            # What is left to refuse once both were read is the adapter's config: name it.
            config = os.path.join(checkpoint.path, "adapter_config.json")
            answers.append(error if checkpoint.path in str(error) else ValueError(f"{config}: {error}"))
    return answers


def _scan_adapters(adapters: Sequence[AdapterPath]) -> list[Checkpoint | OSError | ValueError]:
    """Each adapter scanned (headers of all of them in one parallel read); errors in place."""
    paths = [adapter for adapter in adapters if not isinstance(adapter, Checkpoint)]
    scanned = iter(scan_many(paths))
    return [adapter if isinstance(adapter, Checkpoint) else next(scanned) for adapter in adapters]


def _read_value_flags(files: list[str]) -> dict[tuple[str, str], tuple[bool, bool]]:
    """(file, tensor) -> (all zero, some NaN/Inf) for every tensor of `files`."""
    from fastkeys.engine import core

    flags: dict[tuple[str, str], tuple[bool, bool]] = {}
    for file, (names, zero, non_finite) in zip(files, core.read_values(files), strict=True):
        for name, z, bad in zip(names, zero, non_finite, strict=True):
            flags[file, name] = (z, bad)
    return flags


def _check_one(
    base: _Base, adapter_ckpt: Checkpoint, flags: dict[tuple[str, str], tuple[bool, bool]] | None
) -> BaseCheck:
    config = adapter_ckpt.adapter_config
    if not config:
        raise ValueError(
            f"{adapter_ckpt.path}: no adapter_config.json; check_base needs the adapter's config"
        )
    # Adapters trained with one recipe have the same names, shapes and config, hence the same
    # header findings: they are worked out once per base (values are read for each).
    signature = (
        tuple(adapter_ckpt),
        tuple(adapter_ckpt._shapes),
        json.dumps(config, sort_keys=True, default=str),
    )
    known = base.verdicts.get(signature)
    if known is None:
        known = _header_check(base, adapter_ckpt, config)
        if len(base.verdicts) >= _VERDICTS_KEPT:
            base.verdicts.clear()
        base.verdicts[signature] = known
    findings, coverage, modules = known
    findings = list(findings)
    if flags is not None:
        rules = _rules(tuners.resolve(config.get("peft_type")))
        findings += _value_findings(modules, adapter_ckpt, flags, rules)
    return BaseCheck(findings, adapter_ckpt.path, coverage)


_VERDICTS_KEPT = 256  # header verdicts remembered per base


def _header_check(
    base: _Base, adapter_ckpt: Checkpoint, config: dict[str, object]
) -> tuple[list[Finding], Coverage, dict[str, dict[str, str]]]:
    """Everything the headers and the config tell: (findings, coverage, the adapter's modules)."""
    method = tuners.resolve(config.get("peft_type"))
    weights = base.weights
    findings: list[Finding] = []
    modules = _adapter_modules(list(adapter_ckpt), config.get("peft_type"))
    # Model-level tensors (`base_model.vera_A`) belong to the tuner, not to a base module.
    adapted = [module for module in modules if module not in ("", tuners.MODEL_ROOT)]
    unmatched = [module for module in adapted if module not in weights]
    hint, moved = _prefix_rewrite(unmatched, base)
    if hint is not None:
        findings.append(hint)
    for module in unmatched:
        if module not in moved:
            key = next(iter(modules[module].values()))
            findings.append(Finding("missing_module", key, f"no module {module!r} in the base model"))
    # Past a diagnosed rewrite, the adapter's modules are judged where the rewrite puts them.
    placed = {m: moved.get(m, m) for m in adapted if m in weights or m in moved}
    # Read as columns: a Tensor per lookup would cost more than the checks themselves.
    shapes: Shapes = dict(zip(adapter_ckpt._names, adapter_ckpt._shapes, strict=True))
    findings += _degenerate_findings(modules, placed, weights, shapes, _rules(method))
    broken = {f.key for f in findings if f.kind == "degenerate"}
    for module, target in placed.items():
        findings += _shape_findings(module, modules[module], weights[target], shapes, method, broken)
    targets = config.get("target_modules")
    if targets:
        trained = {placed.get(m, m): tensors for m, tensors in modules.items()}
        findings += _target_findings(targets, config, base, trained)
    return findings, _coverage(placed.values()), modules


def _target_findings(
    targets: object, config: dict[str, object], base: _Base, modules: dict[str, dict[str, str]]
) -> list[Finding]:
    # Adapters trained with one recipe share their target settings: each selection is made once
    # per base (it tests every base module against every target).
    fields = [targets, *(config.get(k) for k in ("exclude_modules", "layers_to_transform", "layers_pattern"))]
    memo = json.dumps(fields, sort_keys=True, default=str)
    if memo not in base.selections:
        base.selections[memo] = _selection(targets, config, base.weights)
    unmatched, selected = base.selections[memo]
    findings = list(unmatched)
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


def _selection(
    targets: object, config: dict[str, object], weights: dict[str, tuple[int, ...]]
) -> tuple[list[Finding], list[str]]:
    """(`unmatched_target` findings, the base modules PEFT would adapt) for these settings."""
    excluded = config.get("exclude_modules")
    findings = []
    if targets == "all-linear":
        selected = [m for m, shape in weights.items() if len(shape) == 2 and all_linear_takes(m)]
    else:
        if isinstance(targets, list):
            for target in targets:
                if not any(selects([target], module) for module in weights):
                    findings.append(
                        Finding(
                            "unmatched_target",
                            target,
                            f"target_modules entry {target!r} matches no base module",
                        )
                    )
        elif not any(selects(targets, module) for module in weights):
            findings.append(
                Finding(
                    "unmatched_target", str(targets), f"target_modules {targets!r} matches no base module"
                )
            )
        selected = [m for m in weights if selects(targets, m)]
        if isinstance(targets, list):
            selected = [m for m in selected if in_layers(config, m)]
    if excluded:
        selected = [m for m in selected if not selects(excluded, m)]
    return findings, selected
