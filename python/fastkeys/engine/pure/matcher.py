"""The mirror of `rust/matcher.rs` and `rust/rename.rs` (through `rust/py.rs`): `KeyMatcher`.

Same arguments (validated by the caller, `fastkeys.rules.matching`), same answers, same errors. The
rule lives in `_verdict`; everything else is a prefilter that rejects most keys with one C-level
substring test before the rule runs. Renaming (`insert_adapter_name`, `remove_adapter_name`) is
on the class, as on the native one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from fastkeys.engine.pure.regex import Regex

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["KeyMatcher"]

# With at most this many needles, testing each one with `in` beats running the rule.
_MAX_NEEDLES = 4


def _key_list(keys: Iterable[str]) -> tuple[Sequence[str], dict[int, str] | None]:
    """The keys as a sequence of exact str, TypeError naming the first element that is not a
    str. A str subclass is read by its string value (its own methods could answer otherwise, as
    the native side never asks them): it is copied to a str, and the second item maps each copy's
    id back to the caller's object, for the results; None when there is none."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be an iterable of str, not a single {type(keys).__name__}")
    if not isinstance(keys, (list, tuple)):
        try:
            iterator = iter(keys)
        except Exception:  # as the native side: whatever `__iter__` raises, keys is unusable
            raise TypeError(f"keys must be an iterable of str, not {type(keys).__name__}") from None
        keys = list(iterator)
    kinds = set(map(type, keys))
    for kind in kinds:
        if not issubclass(kind, str):
            index = next(i for i, key in enumerate(keys) if type(key) is kind)
            raise TypeError(f"keys[{index}] must be str, not {kind.__name__}")
    if kinds <= {str}:
        return keys, None
    plain = [key if type(key) is str else str.__str__(key) for key in keys]
    return plain, {id(copy): key for copy, key in zip(plain, keys, strict=True) if copy is not key}


def _originals(found: list[str], back: dict[int, str] | None) -> list[str]:
    return found if back is None else [back.get(id(key), key) for key in found]


class KeyMatcher:
    """See `fastkeys.KeyMatcher`."""

    __slots__ = (
        "_adapters",
        "_exact",
        "_ignore",
        "_needles",
        "_prefixes",
        "_root",
        "_shared",
        "_suffixes",
        "_wrappers",
    )
    _prefixes: tuple[str, ...]
    _exact: frozenset[str]
    _shared: frozenset[str]
    _root: str
    _adapters: dict[str, int] | None
    _ignore: list[Regex]
    _needles: tuple[str, ...] | None
    _wrappers: frozenset[str]
    _suffixes: dict[str, str]

    def __new__(
        cls,
        prefixes: Sequence[str],
        adapter_names: Sequence[str] | None,
        exact: Sequence[str],
        shared: Sequence[str],
        root: str,
        ignore: Sequence[str],
        wrappers: Sequence[str],
        suffixes: Sequence[tuple[str, str]],
    ) -> Self:
        # The root is checked here, first, as the native core does (the rest arrives validated).
        if not isinstance(root, str):
            raise TypeError(f"root must be str, not {type(root).__name__}")
        root = str.__str__(root)
        if not root or "." in root:
            raise ValueError(f"root must be one segment, non-empty and without a dot, not {root!r}")
        self = object.__new__(cls)
        # Immutable like the native class: attributes are set here, once, past `__setattr__`.
        init = object.__setattr__
        init(self, "_root", root)
        init(self, "_wrappers", frozenset(str.__str__(name) for name in wrappers))
        renames: dict[str, str] = {}
        for segment, parameter in suffixes:
            renames.setdefault(str.__str__(segment), str.__str__(parameter))
        init(self, "_suffixes", renames)
        plain = [str.__str__(name) for name in prefixes]  # by string value, as for keys
        init(self, "_prefixes", tuple(plain))
        init(self, "_exact", frozenset(str.__str__(name) for name in exact))
        init(self, "_shared", frozenset(str.__str__(name) for name in shared))
        adapters: dict[str, int] | None = None
        if adapter_names is not None:
            adapters = {}
            for name in adapter_names:
                adapters.setdefault(str.__str__(name), len(adapters))
        init(self, "_adapters", adapters)
        # Matched by the linear-time engine: `re` would backtrack on `(a+)+$` (fastkeys.engine.pure.regex).
        init(self, "_ignore", [Regex(pattern) for pattern in ignore])
        # Substrings every matching key contains: an adapter name, else a prefix. (The bare name:
        # a needle that starts with "." costs more, dots being everywhere in keys.)
        needles = None
        if adapters is not None and len(adapters) <= _MAX_NEEDLES:
            needles = tuple(adapters)
        elif len(self._prefixes) + len(self._exact) <= _MAX_NEEDLES:
            needles = self._prefixes + tuple(self._exact)
        init(self, "_needles", needles)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        # As the native class: a compiled matcher is not pickled (nor copied); build another.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def _hit(self, segments: list[str]) -> tuple[int, int | str] | None:
        """The last match (the rightmost, as the native walk finds it): (index of the qualifying
        segment, the adapter's index or name)."""
        for index in range(len(segments) - 2, -1, -1):
            segment = segments[index]
            if not (segment.startswith(self._prefixes) or segment in self._exact):
                continue
            if self._is_layer_copy(segment, index, segments[0]):
                continue
            following = segments[index + 1]
            if self._adapters is None:
                return index, following
            found = self._adapters.get(following)
            if found is not None:
                return index, found
        return None

    def _is_layer_copy(self, segment: str, index: int, first: str) -> bool:
        """A shared segment below the model level (neither the first segment, `index` 0, nor right
        after a leading root) is a layer's reference to a model-level tensor."""
        return segment in self._shared and index > 0 and not (index == 1 and first == self._root)

    def _verdict(self, key: str) -> int | str | None:
        """The adapter's index (named adapters) or name (any adapter), or None."""
        hit = self._hit(key.split("."))
        return None if hit is None else hit[1]

    def _ignored(self, key: str) -> bool:
        return any(pattern.search(key) for pattern in self._ignore)

    def _candidates(self, keys: Sequence[str]) -> Iterable[str]:
        needles = self._needles
        if needles is None:
            return keys
        if len(needles) == 1:
            (needle,) = needles
            return [key for key in keys if needle in key]
        return [key for key in keys if any(needle in key for needle in needles)]

    def _single_name(self, keys: Sequence[str], name: str) -> list[str]:
        """`filter` for one adapter name: find `.name`, then check the segment before it. The
        same rule as `_hit`, read from the name's side like the native name-first strategy, and
        written out inline: this loop is the fallback's hot path."""
        prefixes, exact, shared = self._prefixes, self._exact, self._shared
        is_layer_copy = self._is_layer_copy
        needle = "." + name
        width = len(needle)
        found = []
        # The C-level substring test rejects most keys before the loop looks at them.
        for key in self._candidates(keys):
            dot = key.find(needle)
            while dot >= 0:
                end = dot + width
                if end == len(key) or key[end] == ".":
                    start = key.rfind(".", 0, dot) + 1
                    segment = key[start:dot]
                    # The segment's index matters only when it is shared: counted only then.
                    if (segment.startswith(prefixes) or segment in exact) and not (
                        segment in shared
                        and is_layer_copy(segment, key.count(".", 0, start), key[: key.find(".")])
                    ):
                        found.append(key)
                        break
                dot = key.find(needle, end)
        return found

    def filter(self, keys: Iterable[str]) -> list[str]:
        keys, back = _key_list(keys)
        if self._adapters is not None and len(self._adapters) == 1:
            found = self._single_name(keys, next(iter(self._adapters)))
        else:
            verdict = self._verdict
            found = [key for key in self._candidates(keys) if verdict(key) is not None]
        if self._ignore:
            found = [key for key in found if not self._ignored(key)]
        return _originals(found, back)

    def group(self, keys: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        lists: list[list[str]] = []
        if self._adapters is not None:
            for name in self._adapters:
                lists.append(groups.setdefault(name, []))
        plain, back = _key_list(keys)
        for key in self._candidates(plain):
            verdict = self._verdict(key)
            if verdict is None or (self._ignore and self._ignored(key)):
                continue
            original = key if back is None else back.get(id(key), key)
            if isinstance(verdict, int):
                lists[verdict].append(original)
            else:
                groups.setdefault(verdict, []).append(original)
        return groups

    def _tensor_segment(self, key: str) -> tuple[int, int] | None:
        last_dot = key.rfind(".")
        spans = [(last_dot + 1, len(key))]
        if last_dot >= 0:
            spans.append((key.rfind(".", 0, last_dot) + 1, last_dot))
        for start, end in spans:
            segment = key[start:end]
            qualifies = segment.startswith(self._prefixes) or segment in self._exact
            if qualifies and segment not in self._wrappers:
                return start, end
        return None

    def _insert(self, key: str, name: str) -> str:
        span = self._tensor_segment(key)
        if span is None:
            return key
        start, end = span
        parameter = self._suffixes.get(key[start:end]) if end == len(key) else None
        tail = "" if parameter is None else "." + parameter
        return f"{key[:end]}.{name}{tail}{key[end:]}"

    def _remove(self, key: str) -> str:
        segments = key.split(".")
        hit = self._hit(segments)
        if hit is None:
            return key
        index = hit[0]
        parameter = self._suffixes.get(segments[index])
        if segments[index] in self._wrappers:
            del segments[index : index + 2]
        elif parameter is not None and segments[index + 2 :] == [parameter]:
            del segments[index + 1 :]
        else:
            del segments[index + 1]
        return ".".join(segments)

    def insert_adapter_name(self, keys: Iterable[str], adapter_name: str) -> list[str]:
        plain, back = _key_list(keys)
        name = str.__str__(adapter_name)
        return _originals([self._insert(key, name) for key in plain], back)

    def locate(self, keys: Iterable[str]) -> list[tuple[int, int] | None]:
        plain, _back = _key_list(keys)
        return [self._tensor_segment(key) for key in plain]

    def remove_adapter_name(self, keys: Iterable[str]) -> list[str]:
        plain, back = _key_list(keys)
        return _originals([self._remove(key) for key in plain], back)

    def __repr__(self) -> str:
        return "KeyMatcher(<compiled>)"
