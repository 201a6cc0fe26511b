"""Argument checks shared by both implementations, so that both raise the same errors."""

from __future__ import annotations

from collections.abc import Iterable


def names(what: str, values: Iterable[str] | None) -> list[str]:
    """Checks a collection of segment names (prefixes, adapter names, ...): each a non-empty str
    without a dot, because a name must lie within one dotted segment of a key."""
    if isinstance(values, (str, bytes)):
        raise TypeError(
            f"{what} must be an iterable of str, not a single {type(values).__name__}: write [{values!r}]"
        )
    try:
        items = list(values)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an iterable of str, not {type(values).__name__}") from None
    for index, value in enumerate(items):
        name(f"{what}[{index}]", value)
    return items


def name(what: str, value: object) -> str:
    """Checks one segment name."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "." in value:
        raise ValueError(
            f"{what} {value!r} contains a dot; a name must lie within one segment of a dotted key"
        )
    return value
