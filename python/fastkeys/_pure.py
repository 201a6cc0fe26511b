"""The pure-Python mirror of `fastkeys._native`, class for class and method for method.

Same arguments (validated by the caller, `fastkeys.matching`), same answers, same errors. The
rule lives in `_verdict`; everything else is a prefilter that rejects most keys with one C-level
substring test before the rule runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

__all__ = ["KeyMatcher"]

# With at most this many needles, testing each one with `in` beats running the rule.
_MAX_NEEDLES = 4


def _key_list(keys: Iterable[str]) -> Sequence[str]:
    """The keys as a sequence of str; TypeError naming the first element that is not one."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be an iterable of str, not a single {type(keys).__name__}")
    if not isinstance(keys, (list, tuple)):
        try:
            iterator = iter(keys)
        except TypeError:
            raise TypeError(f"keys must be an iterable of str, not {type(keys).__name__}") from None
        keys = list(iterator)
    for kind in set(map(type, keys)):
        if not issubclass(kind, str):
            index = next(i for i, key in enumerate(keys) if type(key) is kind)
            raise TypeError(f"keys[{index}] must be str, not {kind.__name__}")
    return keys


class KeyMatcher:
    """See `fastkeys.KeyMatcher`."""

    __slots__ = ("_adapters", "_exact", "_ignore", "_needles", "_prefixes", "_shared")
    _prefixes: tuple[str, ...]
    _exact: frozenset[str]
    _shared: frozenset[str]
    _adapters: dict[str, int] | None
    _ignore: list[re.Pattern[str]]
    _needles: tuple[str, ...] | None

    def __new__(
        cls,
        prefixes: Sequence[str],
        adapter_names: Sequence[str] | None,
        exact: Sequence[str],
        shared: Sequence[str],
        ignore: Sequence[str],
    ) -> KeyMatcher:
        self = object.__new__(cls)
        self._prefixes = tuple(prefixes)
        self._exact = frozenset(exact)
        self._shared = frozenset(shared)
        self._adapters = None
        if adapter_names is not None:
            self._adapters = {}
            for name in adapter_names:
                self._adapters.setdefault(name, len(self._adapters))
        self._ignore = [re.compile(pattern) for pattern in ignore]
        # Substrings every matching key contains: "." + an adapter name, else a prefix.
        self._needles = None
        if self._adapters is not None and len(self._adapters) <= _MAX_NEEDLES:
            self._needles = tuple("." + name for name in self._adapters)
        elif len(self._prefixes) + len(self._exact) <= _MAX_NEEDLES:
            self._needles = self._prefixes + tuple(self._exact)
        return self

    def _verdict(self, key: str) -> int | str | None:
        """The adapter's index (named adapters) or name (any adapter), or None."""
        segments = key.split(".")
        for index in range(len(segments) - 1):
            segment = segments[index]
            if not (segment.startswith(self._prefixes) or segment in self._exact):
                continue
            if segment in self._shared and index > 0 and not (index == 1 and segments[0] == "base_model"):
                continue  # a layer's reference to a model-level shared tensor
            following = segments[index + 1]
            if self._adapters is None:
                return following
            found = self._adapters.get(following)
            if found is not None:
                return found
        return None

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

    def filter(self, keys: Iterable[str]) -> list[str]:
        verdict = self._verdict
        found = [key for key in self._candidates(_key_list(keys)) if verdict(key) is not None]
        if self._ignore:
            found = [key for key in found if not self._ignored(key)]
        return found

    def group(self, keys: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        lists: list[list[str]] = []
        if self._adapters is not None:
            for name in self._adapters:
                lists.append(groups.setdefault(name, []))
        for key in self._candidates(_key_list(keys)):
            verdict = self._verdict(key)
            if verdict is None or (self._ignore and self._ignored(key)):
                continue
            if isinstance(verdict, int):
                lists[verdict].append(key)
            else:
                groups.setdefault(verdict, []).append(key)
        return groups

    def __repr__(self) -> str:
        return "KeyMatcher(<compiled>)"
