"""The public matching API: `KeyMatcher` and `filter_missing`."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from fastkeys.engine import IMPLEMENTATION, core
from fastkeys.rules import records as tuners
from fastkeys.rules import validate as _validate
from fastkeys.rules import versions
from fastkeys.rules.expressions import translate

__all__ = [
    "KeyMatcher",
    "MissingAdapterKeysWarning",
    "filter_missing",
    "insert_adapter_name",
    "remove_adapter_name",
]


class MissingAdapterKeysWarning(UserWarning):
    """Tensors of the adapter being loaded are missing from its checkpoint. The warning carries
    them: `warning.adapter_name` and `warning.missing_keys` (the model keys, all of them)."""

    def __init__(self, message: str, adapter_name: str = "", missing_keys: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.adapter_name = adapter_name
        self.missing_keys = list(missing_keys)


Result = TypeVar("Result")

if TYPE_CHECKING:
    from typing_extensions import Self

    # The checkers see the stub's methods, with their types, whichever engine runs.
    from fastkeys._native import KeyMatcher as _Core
else:
    _Core = core.KeyMatcher


class KeyMatcher(_Core):
    """A compiled, reusable key filter, safe to share between threads.

    A key matches when one of its dotted segments starts with one of `prefixes` (or equals one of
    `exact`) and the very next segment is one of `adapter_names` (any segment when None).
    A `shared` segment below the model level (not the first segment, nor right after a leading
    `base_model`) is a layer's reference to a model-level tensor and does not count. Keys that
    match any `ignore` expression (searched anywhere in the key) are dropped.

    `filter(keys)` returns the matching keys in input order (the caller's own str objects);
    `group(keys)` returns them per adapter name. `insert_adapter_name(keys, name)` and
    `remove_adapter_name(keys)` convert between checkpoint and model keys, and `locate(keys)` gives
    each checkpoint key's tensor segment (the span, in characters, the name goes after; None for a
    key that is not an adapter tensor); `wrappers` are
    segments dropped together with the name (`modules_to_save`), `suffixes` maps a segment to the
    parameter its checkpoint key lacks (`{"lora_magnitude_vector": "weight"}`, DoRA).
    `fastkeys.rules.records` holds these rules for every PEFT method.
    """

    __slots__ = ()

    def __new__(
        cls,
        prefixes: Iterable[str],
        adapter_names: Iterable[str] | None = None,
        *,
        exact: Iterable[str] = (),
        shared: Iterable[str] = (),
        ignore: Iterable[str] | None = None,
        wrappers: Iterable[str] = (),
        suffixes: Mapping[str, str] | None = None,
    ) -> Self:
        names = None if adapter_names is None else _validate.names("adapter_names", adapter_names)
        for_rust, for_python = translate(ignore)
        if suffixes is not None and not isinstance(suffixes, Mapping):
            raise TypeError(
                f"suffixes must map a segment to a parameter name (a dict), not {type(suffixes).__name__}"
            )
        pairs = [
            (_validate.name("a suffixes key", segment), _validate.name(f"suffixes[{segment!r}]", parameter))
            for segment, parameter in (suffixes or {}).items()
        ]
        return super().__new__(
            cls,
            _validate.names("prefixes", prefixes),
            names,
            _validate.names("exact", exact),
            _validate.names("shared", shared),
            tuners.MODEL_ROOT,
            for_rust if IMPLEMENTATION == "rust" else for_python,
            _validate.names("wrappers", wrappers),
            pairs,
        )


@functools.lru_cache(maxsize=512)
def _matcher_for(patterns: tuners.Patterns, adapter_name: str, ignore: tuple[str, ...]) -> KeyMatcher:
    prefixes, exact, shared, suffixes = patterns
    return KeyMatcher(
        prefixes,
        [adapter_name],
        exact=exact,
        shared=shared,
        ignore=ignore,
        wrappers=tuners.WRAPPERS,
        suffixes=dict(suffixes),
    )


def _config_peft_type(config: object) -> object:
    if isinstance(config, Mapping):
        if "peft_type" not in config:
            raise ValueError("config has no 'peft_type' entry (is it an adapter_config.json?)")
        return config["peft_type"]
    if not hasattr(config, "peft_type"):
        raise TypeError(
            f"config must be a PEFT config or a dict with 'peft_type', not {type(config).__name__}"
        )
    return config.peft_type


def _method_for(peft_type: object, config: object) -> tuners.Method | None:
    method = tuners.resolve(peft_type)
    if config is None:
        return method
    from_config = tuners.resolve(_config_peft_type(config))
    if method is not None and from_config is not None and method.name != from_config.name:
        raise ValueError(
            f"peft_type {method.name!r} contradicts the config's peft_type {from_config.name!r}; "
            "pass one of them"
        )
    return from_config


def _unset_flags(method: tuners.Method | None, config: object) -> frozenset[str]:
    """The config flags that the method's version-scoped rules name and the config sets false."""
    if method is None or config is None:
        return frozenset()
    unset = set()
    for rule in method.harmless:
        if rule.unless is not None:
            read = config.get if isinstance(config, Mapping) else functools.partial(getattr, config)
            value = read(rule.unless, None)
            if value is False:
                unset.add(rule.unless)
    return frozenset(unset)


def _without_harmless(
    found: list[str], adapter_name: str, method: tuners.Method | None, config: object, explicit: object
) -> list[str]:
    """`found` less the tensors that the PEFT release rebuilds at load (records.Harmless). One
    engine pass over `found` decides whether any such tensor is there; the release is looked up
    only then (the lookup costs more than `import fastkeys`)."""
    candidates = tuners.harmless_candidates(method)
    if not candidates or not found or not _segment_matcher(candidates, adapter_name).filter(found):
        return found
    release = versions.resolve(explicit, config)
    harmless = tuners.harmless_segments(method, release, _unset_flags(method, config))
    if not harmless:
        return found
    dropped = set(_segment_matcher(harmless, adapter_name).filter(found))
    return [key for key in found if key not in dropped]


@functools.lru_cache(maxsize=64)
def _segment_matcher(segments: frozenset[str], adapter_name: str) -> KeyMatcher:
    """Keys where one of `segments` is followed by the adapter's name (the engine's rule)."""
    return KeyMatcher((), [adapter_name], exact=tuple(sorted(segments)))


def _mentions(keys: Iterable[str], segments: tuple[str, ...]) -> bool:
    """Whether any key may hold one of `segments`: one substring search for what they all start
    with (`frod_`); a false positive costs only the exact pass."""
    common = os.path.commonprefix(list(segments))  # noqa: RUF071 (a string prefix is meant)
    text = "\n".join(keys)
    return any(probe in text for probe in ((common,) if common else segments))


def _per_category_hits(
    keys: Iterable[str], adapter_name: str, segments: tuple[str, ...], ignore: tuple[str, ...]
) -> list[str]:
    """The keys of the model-level per-category tensors (records.Method.per_category) of the
    adapter: `base_model.frod_V.<category>.<name>`, right under the model root."""
    hits = []
    for key in _category_matcher(segments, ignore).filter(keys):
        parts = key.split(".")
        at = 1 if parts[0] == tuners.MODEL_ROOT else 0
        if len(parts) == at + 3 and parts[at] in segments and parts[-1] == adapter_name:
            hits.append(key)
    return hits


@functools.lru_cache(maxsize=64)
def _category_matcher(segments: tuple[str, ...], ignore: tuple[str, ...]) -> KeyMatcher:
    # Any adapter name: the segment after these is the category; the caller checks the name.
    return KeyMatcher((), None, exact=segments, ignore=ignore)


def _ignore_key(ignore: Iterable[str] | None) -> tuple[str, ...]:
    """The ignore expressions as a hashable cache key; `translate` raises the TypeError that
    explains what to write when they are not an iterable of str."""
    if ignore is None:
        return ()
    if isinstance(ignore, (str, bytes)):
        translate(ignore)
    try:
        items = tuple(ignore)
    except TypeError:
        translate(ignore)
        raise
    if not all(isinstance(item, str) for item in items):
        translate(items)
    return items


def _with_missing_keys(result: Result, kept: list[str]) -> Result:
    """A copy of a load result with `missing_keys` replaced and everything else untouched."""
    original = result.missing_keys  # type: ignore[attr-defined]
    value: Any = type(original)(kept) if isinstance(original, (list, tuple)) else kept
    if hasattr(result, "_replace"):  # namedtuples, torch's _IncompatibleKeys
        return result._replace(missing_keys=value)  # type: ignore[no-any-return]
    if hasattr(type(result), "__dataclass_fields__"):
        import dataclasses  # only here: it costs a third of `import fastkeys`

        return dataclasses.replace(result, missing_keys=value)  # type: ignore[type-var]
    import copy  # only here: with weakref, a fifth of `import fastkeys`

    duplicate = copy.copy(result)
    duplicate.missing_keys = value  # type: ignore[attr-defined]
    return duplicate


@overload
def filter_missing(
    missing: Iterable[str],
    adapter_name: str = ...,
    peft_type: object = ...,
    *,
    config: object = ...,
    ignore: Iterable[str] | None = ...,
    peft_version: str | None = ...,
) -> list[str]: ...
@overload
def filter_missing(
    missing: Result,
    adapter_name: str = ...,
    peft_type: object = ...,
    *,
    config: object = ...,
    ignore: Iterable[str] | None = ...,
    peft_version: str | None = ...,
) -> Result: ...
def filter_missing(
    missing: Any,
    adapter_name: str = "default",
    peft_type: object = None,
    *,
    config: object = None,
    ignore: Iterable[str] | None = None,
    peft_version: str | None = None,
) -> Any:
    """The missing keys that matter for adapter `adapter_name`, and nothing else.

    `missing` is an iterable of str (returns a list, input order kept) or a load result with a
    `missing_keys` attribute, such as torch's `_IncompatibleKeys` (returns the same type with
    `missing_keys` filtered and `unexpected_keys` untouched). `peft_type` is a method name in
    any case, a `peft.PeftType` or None for every known method; `config` is a PEFT config or
    an adapter_config.json dict and supplies the method. `ignore` holds regular expressions:
    keys matching any of them are dropped.

    A few rules depend on the PEFT release that loads the adapter (`fastkeys.rules.versions`):
    `peft_version` ("0.20.0") names it; by default it is the installed PEFT's, or, when none is
    installed, the `peft_version` of an adapter_config.json dict passed as `config`.
    """
    _validate.name("adapter_name", adapter_name)
    if peft_version is not None:
        versions.parse(peft_version)
    method = _method_for(peft_type, config)
    ignored = _ignore_key(ignore)
    matcher = _matcher_for(tuners.patterns(method), adapter_name, ignored)
    categories = tuners.per_category(method)

    def kept(keys: Iterable[str]) -> list[str]:
        if categories and not isinstance(keys, (list, tuple, str, bytes)):
            try:
                keys = list(keys)  # read twice
            except Exception:
                matcher.filter(keys)  # names what is no iterable of str, as without FRoD
                raise
        found = _without_harmless(matcher.filter(keys), adapter_name, method, config, peft_version)
        # the per-category pass only when one of its segments is in the keys (checked at C speed;
        # every key is a str: the matcher checked)
        if categories and _mentions(keys, categories):
            extra = _per_category_hits(keys, adapter_name, categories, ignored)
            if extra:
                chosen = {*found, *extra}
                found = [key for key in keys if key in chosen]
        return found

    if hasattr(missing, "missing_keys") and not isinstance(missing, (str, bytes)):
        return _with_missing_keys(missing, kept(missing.missing_keys))
    return kept(missing)


def _renamer(adapter_name: str, peft_type: object) -> KeyMatcher:
    _validate.name("adapter_name", adapter_name)
    return _matcher_for(tuners.patterns(tuners.resolve(peft_type)), adapter_name, ())


def insert_adapter_name(keys: Iterable[str], adapter_name: str, peft_type: object = None) -> list[str]:
    """Checkpoint keys to model keys: `L.lora_A.weight` -> `L.lora_A.<adapter_name>.weight`.

    The name goes after the last or second-to-last segment when it starts with the method's prefix
    (or is a shared tensor's name); DoRA's `lora_magnitude_vector` also gains `.weight`. Other keys
    come back unchanged (the caller's own objects). `modules_to_save` keys cannot be told from base
    keys by name: `check_adapter` maps them against the model's keys."""
    return _renamer(adapter_name, peft_type).insert_adapter_name(keys, adapter_name)


def tensor_segments(keys: Iterable[str], peft_type: object = None) -> list[tuple[int, int] | None]:
    """For each checkpoint key, the (start, end) span of the segment that holds the adapter tensor
    (`lora_A` in `L.lora_A.weight`: where `insert_adapter_name` puts the name), or None for a key
    that is not an adapter tensor of the method."""
    return _renamer("default", peft_type).locate(keys)


def remove_adapter_name(keys: Iterable[str], adapter_name: str, peft_type: object = None) -> list[str]:
    """Model keys to checkpoint keys: the adapter-name segment of each adapter tensor removed
    (`modules_to_save.<name>` too; DoRA's magnitude loses `.weight`). Other keys are unchanged."""
    return _renamer(adapter_name, peft_type).remove_adapter_name(keys)
