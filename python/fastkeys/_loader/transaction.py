"""All-or-nothing loads: record what a load may change before it changes, put it back on failure.

One mechanism for both paths. Of an object (a module, the tuner) the transaction records its
`__dict__`, the contents of every dict, list and set in it (child modules, parameters, buffers,
hooks, PEFT's per-adapter dicts such as `r`, `scaling`, `_active_adapter`) and the `requires_grad`
of its own parameters; of a tensor written in place, its values (base weights a checkpoint
overwrites, the weights of an adapter being replaced); and torch's random number generator, so that
a load routed to PEFT after the fast path gave up draws the numbers PEFT's loop would. PEFT's path
records every module (its passes touch every layer), a small fraction of what PEFT's load costs.
The fast path records only what it touches, and of a layer's per-adapter dicts only the entry of
the adapter it adds (`key=`), so that its cost does not grow with the adapters already loaded.

A rollback runs with Ctrl-C deferred (on the main thread) and re-raises it afterwards, so an
interruption cannot leave a half-restored model; the original exception propagates unchanged.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

_ABSENT = object()


class Transaction:
    """What a load may change. Record before changing; `roll_back()` restores everything recorded."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._seen: set[tuple[int, str | None]] = set()
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rng = torch.random.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]

    def record(self, obj: Any, key: str | None = None) -> None:
        """Records `obj` once: its attributes, the contents of its containers (with `key`, only
        the entry `key` of each dict in it) and its parameters' `requires_grad`."""
        if (id(obj), key) in self._seen or (id(obj), None) in self._seen:
            return
        self._seen.add((id(obj), key))
        attributes = dict(vars(obj))
        for value in attributes.values():
            if isinstance(value, dict):
                self._undo.append(_keep_dict(value, key))
            elif isinstance(value, (list, set)):
                self._undo.append(_keep_collection(value))
        if isinstance(obj, nn.Module):
            parameters = obj._parameters
            chosen = parameters.values() if key is None else [parameters.get(key)]
            grads = [(p, p.requires_grad) for p in chosen if p is not None]
            if grads:
                self._undo.append(lambda: _set_grads(grads))

        def attributes_back() -> None:
            current = vars(obj)
            for name in [name for name in current if name not in attributes]:
                del current[name]
            current.update(attributes)

        self._undo.append(attributes_back)

    def record_all(self, objects: Iterable[Any]) -> None:
        for obj in objects:
            self.record(obj)

    def record_attributes(self, obj: Any, names: Iterable[str]) -> None:
        """Only these attributes of `obj` (by identity; the caller replaces, never mutates them)."""
        saved = {name: vars(obj).get(name, _ABSENT) for name in names}

        def back() -> None:
            current = vars(obj)
            for name, value in saved.items():
                if value is _ABSENT:
                    current.pop(name, None)
                else:
                    current[name] = value

        self._undo.append(back)

    def record_training(self, modules: Iterable[nn.Module]) -> None:
        """Only the `training` flags (what `eval()` changes)."""
        flags = [(module, module.training) for module in modules]

        def back() -> None:
            for module, training in flags:
                module.training = training

        self._undo.append(back)

    def protect(self, tensor: torch.Tensor) -> None:
        """Keeps a copy of `tensor`'s values, to restore them in place."""
        if id(tensor) not in self._values:
            self._values[id(tensor)] = (tensor, tensor.detach().clone())

    def roll_back(self) -> None:
        with deferred_interrupts():
            with torch.no_grad():
                for tensor, saved in self._values.values():
                    tensor.copy_(saved)
            for undo in reversed(self._undo):
                undo()
            torch.random.set_rng_state(self._rng)
            if self._cuda_rng is not None:
                torch.cuda.set_rng_state_all(self._cuda_rng)


def _set_grads(grads: list[tuple[Any, bool]]) -> None:
    for parameter, requires_grad in grads:
        parameter.requires_grad_(requires_grad)


# A dict this small is copied whole even when only one key is asked for (a layer's children,
# hooks): cheap, and exact whatever the load does to it.
_SMALL = 16


def _keep_dict(value: dict[Any, Any], key: str | None) -> Callable[[], None]:
    if key is None or len(value) <= _SMALL:
        items = list(value.items())

        def back() -> None:
            value.clear()
            value.update(items)

        return back
    old = value.get(key, _ABSENT)

    def back_one() -> None:
        if old is _ABSENT:
            value.pop(key, None)
        else:
            value[key] = old

    return back_one


def _keep_collection(value: list[Any] | set[Any]) -> Callable[[], None]:
    items = list(value)

    def back() -> None:
        if isinstance(value, list):
            value[:] = items
        else:
            value.clear()
            value.update(items)

    return back


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Ctrl-C (SIGINT) waits until the block has run, then raises KeyboardInterrupt. Only the main
    thread receives signals; elsewhere, and under a handler that is not Python's default, the block
    runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
