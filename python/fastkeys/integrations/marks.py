"""Marks that blocks put on the calling thread, seen exactly while the block is open.

`linear_time_matching()`, `recorder.loading()` and `recorder.feeding()` mark the thread that opens them.
A mark kept as a thread-local value, set on entry and restored in a `finally`, outlives its block
when a KeyboardInterrupt lands on the restoring line (a trace function, or a signal, can raise
there), and a main thread left marked would refuse expressions or record loads for good. So a mark
here counts only while two things hold, neither of which needs a line of fastkeys on the way out:
- the generator that holds the block open is suspended at its `yield` (it finishes, however it
  finishes, when the block is left);
- the frame of the `with` statement that opened the block is on the thread's stack. An interrupt
  that lands in contextlib's own `__exit__`, before it resumes the generator, leaves the generator
  suspended, held by the traceback (which a REPL keeps in `sys.last_exc`); by then the frame has left
  the stack.
The usual way out also forgets the entry at once, so that nothing the block's frame holds (a
model) outlives the block.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import weakref
from collections.abc import Iterator
from types import FrameType
from typing import Any, Generic, TypeVar

__all__ = ["ThreadMarks", "held"]

T = TypeVar("T")

# Every kind of mark, by name (for `held`).
_KINDS: dict[str, ThreadMarks[Any]] = {}
_CONTEXTLIB = contextlib.__file__


class _Entry:
    __slots__ = ("frame", "generator", "value")

    def __init__(self, frame: FrameType, value: Any) -> None:
        self.generator: weakref.ref[Any] | None = None
        self.frame = frame
        self.value = value


def _opener(frame: FrameType) -> FrameType:
    """The frame of the `with` statement: past the generators run by contextlib's `__enter__`
    (`linear_time_matching`, `loading`, `recorded_results`, ...) and contextlib's own frames."""
    while frame.f_back is not None and _CONTEXTLIB in (
        frame.f_code.co_filename,
        frame.f_back.f_code.co_filename,
    ):
        frame = frame.f_back
    return frame


class ThreadMarks(Generic[T]):
    """A stack of values per thread; `mark(value)` is a block that holds `value` on it."""

    def __init__(self, name: str) -> None:
        self._local = threading.local()
        _KINDS[name] = self

    def _entries(self) -> list[_Entry]:
        entries: list[_Entry] | None = getattr(self._local, "entries", None)
        if entries is None:
            entries = self._local.entries = []
        return entries

    def mark(self, value: T) -> contextlib.AbstractContextManager[None]:
        """A block that holds `value` on this thread while its body runs (nestable). Open it in a
        `with` statement, or in a contextmanager generator that a `with` statement opens."""
        self.values()  # drops the blocks that were left by an interrupt
        entries = self._entries()
        entry = _Entry(_opener(sys._getframe(1)), value)

        @contextlib.contextmanager
        def held() -> Iterator[None]:
            try:
                yield
            finally:  # the usual way out; a Ctrl-C right here leaves the entry to the next prune
                entries[:] = [each for each in entries if each is not entry]

        block = held()
        # Listed before it is entered: a created generator does not count yet, and one that is
        # never entered is collected with its block.
        entry.generator = weakref.ref(block.gen)
        entries.append(entry)
        return block

    def values(self) -> list[T]:
        """The values of the blocks open on this thread, innermost last."""
        entries = self._entries()
        if not entries:
            return []
        wanted = {id(entry.frame) for entry in entries}
        found: set[int] = set()
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and len(found) < len(wanted):
            if id(frame) in wanted:
                found.add(id(frame))
            frame = frame.f_back
        states = [_state(entry.generator) for entry in entries]
        kept = [
            (entry, state)
            for entry, state in zip(entries, states, strict=True)
            if state != inspect.GEN_CLOSED
            and not (state == inspect.GEN_SUSPENDED and id(entry.frame) not in found)
        ]
        if len(kept) != len(entries):
            entries[:] = [entry for entry, _ in kept]
        return [entry.value for entry, state in kept if state == inspect.GEN_SUSPENDED]

    def innermost(self) -> T | None:
        values = self.values()
        return values[-1] if values else None


def _state(reference: weakref.ref[Any] | None) -> str:
    """A generator not made yet is created; a collected one is closed."""
    if reference is None:
        return inspect.GEN_CREATED
    generator = reference()
    return inspect.GEN_CLOSED if generator is None else inspect.getgeneratorstate(generator)


def held() -> list[str]:
    """The names of the marks on this thread (none outside every block)."""
    return [name for name, marks in _KINDS.items() if marks.values()]
