"""fastkeys.integrations.marks: a thread is marked exactly while one of its blocks runs
(`linear_time_matching()`, `recorder.loading()`, `recorder.feeding()`), however the block ends, an
interrupt at any line included."""

from __future__ import annotations

import contextlib
import gc
import sys
from typing import Any

import pytest

peft = pytest.importorskip("peft")  # the blocks patch PEFT's modules

pytestmark = pytest.mark.engine  # linear_time_matching() answers with the engine: both implementations

from fastkeys.integrations.loader import peft_re  # noqa: E402
from fastkeys.integrations.loader.peft_re import linear_time_matching  # noqa: E402


def test_a_thread_keeps_only_the_marks_of_its_open_blocks() -> None:
    """A server opens blocks for every load, for the life of the process: the ended ones are dropped
    whether or not anything asked for the marks in between."""
    from fastkeys.integrations.marks import ThreadMarks

    marks: ThreadMarks[int] = ThreadMarks("test")
    with marks.mark(1):
        for value in range(1000):
            with marks.mark(value):
                pass
        with marks.mark(2):
            assert marks.values() == [1, 2]
        assert len(marks._entries()) <= 2
    assert marks.values() == [] and marks._entries() == []


def _thread_blocks() -> dict[str, Any]:
    """The blocks that mark a thread, by the name `marks.held()` gives them."""
    from fastkeys.integrations import recorder

    return {
        "linear_time_matching": linear_time_matching,
        "loading": lambda: recorder.loading("x"),
        "feeding": lambda: recorder.feeding("p", {}),
    }


@pytest.mark.parametrize("block", ["linear_time_matching", "loading", "feeding"])
def test_an_interrupt_in_contextlib_leaves_no_mark_while_its_traceback_is_kept(block: str) -> None:
    """Ctrl-C at the first line of contextlib's `__exit__`, before it resumes the block's generator:
    the generator stays suspended, held by the traceback that a REPL keeps (`sys.last_exc`), and
    the thread must still be unmarked, and marked again by the next block."""
    from fastkeys.integrations import marks

    blocks = _thread_blocks()

    def tracer(frame: Any, event: str, _arg: Any) -> Any:
        if frame.f_code.co_filename != contextlib.__file__ or frame.f_code.co_name != "__exit__":
            return None
        if event == "line":
            raise KeyboardInterrupt
        return tracer

    def load() -> None:  # fastkeys opens its blocks inside its own functions
        with blocks[block]():
            sys.settrace(tracer)

    kept: list[BaseException] = []
    try:
        load()
    except KeyboardInterrupt as error:
        kept.append(error)  # what the REPL does with an uncaught one
    finally:
        sys.settrace(None)
    assert kept and kept[0].__traceback__ is not None
    assert marks.held() == []
    with blocks[block]():
        assert marks.held() == [block]
    assert marks.held() == []
    kept.clear()  # the traceback held the suspended generators: finalize them here, not in a later test
    gc.collect()


@pytest.mark.parametrize("block", ["linear_time_matching", "loading", "feeding"])
def test_an_interrupt_anywhere_in_a_block_leaves_the_thread_unmarked(block: str) -> None:
    """Ctrl-C at every line fastkeys runs to enter and leave the thread-local blocks: the thread is
    left unmarked (a marked main thread would refuse expressions or record loads for good), and a
    block that was not interrupted marks the thread while its body runs."""
    from fastkeys.integrations import marks, recorder

    blocks = _thread_blocks()
    files = {peft_re.__file__, recorder.__file__, marks.__file__}

    def run(stop_at: int | None) -> tuple[int, list[str]]:
        """Lines traced over the whole block, and the marks its body saw; with `stop_at`, Ctrl-C at
        that line."""
        count = 0
        inside: list[str] = []
        assert marks.held() == []  # and the blocks that ended are dropped: every run starts alike

        def tracer(frame: Any, event: str, _arg: Any) -> Any:
            nonlocal count
            if frame.f_code.co_filename not in files:
                return None
            if event == "line":
                count += 1
                if count == stop_at:
                    raise KeyboardInterrupt
            return tracer

        gc.disable()
        sys.settrace(tracer)
        try:
            with blocks[block]():
                sys.settrace(None)
                inside.extend(marks.held())
                sys.settrace(tracer)
        finally:
            sys.settrace(None)
            gc.enable()
        return count, inside

    gc.collect()  # earlier tests' garbage is finalized now, not inside a traced run (gc is off there)
    run(None)  # the first block installs the proxy: a longer path than the ones measured
    total, inside = run(None)
    assert total >= 4 and inside == [block] and marks.held() == []
    for point in range(1, total + 1):
        with pytest.raises(KeyboardInterrupt):
            run(point)
        assert marks.held() == [], (block, point, total)
