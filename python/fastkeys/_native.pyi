"""Type stubs for the compiled extension (rust/py.rs)."""

from collections.abc import Iterable, Sequence

class KeyMatcher:
    """The compiled engine behind `fastkeys.KeyMatcher`; arguments arrive validated."""

    def __new__(
        cls,
        prefixes: Sequence[str],
        adapter_names: Sequence[str] | None,
        exact: Sequence[str],
        shared: Sequence[str],
        ignore: Sequence[str],
    ) -> KeyMatcher: ...
    def filter(self, keys: Iterable[str]) -> list[str]: ...
    def group(self, keys: Iterable[str]) -> dict[str, list[str]]: ...
