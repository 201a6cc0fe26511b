"""The transaction under a Ctrl-C at every line of the code that does its work: a rollback still
restores everything and the interrupt still propagates; the garbage collector is left as it was
found. (A Ctrl-C on the very line that calls them, before any of their code runs, is beyond what
Python code can defer.)"""

from __future__ import annotations

import functools
import gc
import sys
from collections.abc import Callable
from typing import Any

import pytest
from torch import nn

from fastkeys.integrations.loader import transaction
from fastkeys.integrations.loader.transaction import Transaction, settled_heap


def interrupted_at(call: Callable[[], Any], line: int, functions: set[str]) -> bool:
    """Runs `call`, raising KeyboardInterrupt at the `line`-th line event in the `functions` of
    transaction.py; whether it fired."""
    count = 0

    def tracer(frame: Any, event: str, _arg: Any) -> Any:
        nonlocal count
        code = frame.f_code
        if code.co_filename != transaction.__file__ or code.co_name not in functions:
            return tracer if event == "call" else None
        if event == "line":
            count += 1
            if count == line:
                raise KeyboardInterrupt
        return tracer

    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    return False


class _Thing:
    kept: dict[str, int]
    added: int


def test_a_ctrl_c_anywhere_in_a_roll_back_restores_everything_and_is_raised() -> None:
    fired = 0
    for line in range(1, 200):
        thing = _Thing()
        thing.kept = {"a": 1}
        module = nn.Linear(2, 2)
        tx = Transaction()
        tx.record(thing)
        tx.record(module)
        thing.kept["b"] = 2
        thing.added = 3
        module.weight.requires_grad_(False)
        # the restore, its steps and the deferral of Ctrl-C (whose handler is not in place at once)
        if not interrupted_at(tx.roll_back, line, {"_restore", "_apply", "deferred_interrupts"}):
            break
        fired += 1
        assert vars(thing) == {"kept": {"a": 1}}, line
        assert module.weight.requires_grad, line
    assert fired > 10


def test_a_ctrl_c_while_recording_leaves_the_garbage_collector_on() -> None:
    assert gc.isenabled()
    fired = 0
    for line in range(1, 100):
        objects = [nn.Linear(2, 2), _Thing()]
        done = not interrupted_at(functools.partial(Transaction().record_all, objects), line, {"record"})
        assert gc.isenabled(), line
        if done:
            break
        fired += 1
    assert fired >= 10


def test_settled_heap_lets_the_heap_back_in_whatever_happens_inside() -> None:
    with pytest.raises(KeyboardInterrupt), settled_heap():
        assert gc.get_freeze_count() > 0
        raise KeyboardInterrupt
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_settled_heap_leaves_a_server_s_own_freeze_alone() -> None:
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with settled_heap():
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()
