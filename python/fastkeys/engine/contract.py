"""The engine contract: what `fastkeys._native` (rust/py.rs) and `fastkeys.engine.pure` both provide.

Read by the type checkers only (`typing` costs a third of `import fastkeys`): `_engine` declares
its choice as an `Engine`, so mypy checks both modules against it, and stubtest checks the
native module's stub against the compiled extension; tests/engine/test_contract.py checks that the
fallback's signatures are the stub's, at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from os import PathLike
from typing import Protocol

__all__ = ["Engine", "Header", "Matcher", "Regex"]

# One file's header: names, dtypes, shapes, byte sizes (file order), metadata, file size.
Header = tuple[list[str], list[str], list[tuple[int, ...]], list[int], dict[str, str] | None, int]


class Matcher(Protocol):
    """A compiled matcher. Arguments arrive validated by `fastkeys.rules.matching`."""

    def filter(self, keys: Iterable[str]) -> list[str]: ...
    def group(self, keys: Iterable[str]) -> dict[str, list[str]]: ...
    def insert_adapter_name(self, keys: Iterable[str], adapter_name: str) -> list[str]: ...
    def remove_adapter_name(self, keys: Iterable[str]) -> list[str]: ...
    def locate(self, keys: Iterable[str]) -> list[tuple[int, int] | None]: ...


# KeyMatcher(prefixes, adapter_names, exact, shared, root, ignore, wrappers, suffixes): `root` is
# the segment a model's keys start with (a shared segment right after it is at the model level),
# checked by the engine: one segment, non-empty, without a dot, else ValueError.
MatcherFactory = Callable[
    [
        Sequence[str],
        Sequence[str] | None,
        Sequence[str],
        Sequence[str],
        str,
        Sequence[str],
        Sequence[str],
        Sequence[tuple[str, str]],
    ],
    Matcher,
]


class Regex(Protocol):
    """An expression checked and written by `fastkeys.rules.expressions`, matched in linear time."""

    def search(self, text: str) -> bool: ...
    def group(self, text: str) -> str | None: ...


class Engine(Protocol):
    """The module an implementation is."""

    @property
    def KeyMatcher(self) -> MatcherFactory: ...  # the class the module exports
    @property
    def Regex(self) -> Callable[[str], Regex]: ...  # the class the module exports

    def read_headers(
        self, paths: Sequence[str | PathLike[str]], threads: int | None = None
    ) -> list[Header]: ...
    def read_values(
        self, paths: Sequence[str | PathLike[str]], threads: int | None = None
    ) -> list[tuple[list[str], list[bool], list[bool]]]: ...
