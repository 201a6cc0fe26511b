"""Type stubs for the compiled extension (rust/py.rs)."""

from collections.abc import Iterable, Sequence
from os import PathLike
from typing import final

from typing_extensions import Self, disjoint_base

__all__ = ["KeyMatcher", "Regex", "read_headers", "read_values"]

@disjoint_base
class KeyMatcher:
    """The compiled engine behind `fastkeys.KeyMatcher`; arguments arrive validated."""

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
    ) -> Self: ...
    def filter(self, keys: Iterable[str]) -> list[str]: ...
    def group(self, keys: Iterable[str]) -> dict[str, list[str]]: ...
    def insert_adapter_name(self, keys: Iterable[str], adapter_name: str) -> list[str]: ...
    def remove_adapter_name(self, keys: Iterable[str]) -> list[str]: ...
    def locate(self, keys: Iterable[str]) -> list[tuple[int, int] | None]: ...

def read_headers(
    paths: Sequence[str | PathLike[str]], threads: int | None = None
) -> list[tuple[list[str], list[str], list[tuple[int, ...]], list[int], dict[str, str] | None, int]]: ...
def read_values(
    paths: Sequence[str | PathLike[str]], threads: int | None = None
) -> list[tuple[list[str], list[bool], list[bool]]]: ...

@final
class Regex:
    """An expression checked and written by `fastkeys._patterns`, matched in linear time."""

    def __new__(cls, pattern: str) -> Regex: ...
    def search(self, text: str) -> bool: ...
    def group(self, text: str) -> str | None: ...
