"""Marks that blocks put on the calling thread, seen exactly while the block is open.

`linear_matching()`, `recorder.loading()` and `recorder.feeding()` mark the thread that opens them.
A mark kept as a thread-local value, set on entry and restored in a `finally`, outlives its block
when a KeyboardInterrupt lands on the restoring line (a trace function can raise there), and a main
thread left marked would refuse expressions or record loads for good. So a mark here belongs to a
generator suspended at its `yield` for as long as the `with` body runs: it counts while that
generator is suspended and stops counting the moment the generator finishes, however it finishes.
No line of fastkeys has to run on the way out.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

__all__ = ["ThreadMarks", "held"]

T = TypeVar("T")

# Every kind of mark, by name (for `held`).
_KINDS: dict[str, ThreadMarks[Any]] = {}


@contextlib.contextmanager
def _held() -> Iterator[None]:
    yield


class ThreadMarks(Generic[T]):
    """A stack of values per thread; `mark(value)` is a block that holds `value` on it."""

    def __init__(self, name: str) -> None:
        self._local = threading.local()
        _KINDS[name] = self

    def _entries(self) -> list[tuple[weakref.ref[Any], T]]:
        entries: list[tuple[weakref.ref[Any], T]] | None = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = []
        return entries

    def mark(self, value: T) -> contextlib.AbstractContextManager[None]:
        """A block that holds `value` on this thread while its body runs (nestable)."""
        self.values()  # drops the blocks that ended, so that a thread's list stays as long as its nesting
        block = _held()
        # Listed before it is entered: a created generator does not count yet, and one that is
        # never entered is collected with its block.
        self._entries().append((weakref.ref(block.gen), value))
        return block

    def values(self) -> list[T]:
        """The values of the blocks open on this thread, innermost last."""
        entries = self._entries()
        if not entries:
            return []
        kept = [(ref, value, _state(ref())) for ref, value in entries]
        kept = [entry for entry in kept if entry[2] != inspect.GEN_CLOSED]
        if len(kept) != len(entries):
            entries[:] = [(ref, value) for ref, value, _ in kept]
        return [value for _, value, state in kept if state == inspect.GEN_SUSPENDED]

    def innermost(self) -> T | None:
        values = self.values()
        return values[-1] if values else None


def _state(generator: Any) -> str:
    """A collected generator counts as closed."""
    return inspect.GEN_CLOSED if generator is None else inspect.getgeneratorstate(generator)


def held() -> list[str]:
    """The names of the marks on this thread (none outside every block)."""
    return [name for name, marks in _KINDS.items() if marks.values()]
