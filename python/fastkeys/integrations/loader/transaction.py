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
import gc
import signal
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

_ABSENT = object()
# A dict this small is copied whole even when only one key is asked for: cheap, and exact whatever
# the load does to it.
_SMALL = 16
# What adding an adapter can change in a module's own dicts: its children, parameters and buffers,
# and PEFT's per-adapter dicts (public names: `r`, `scaling`, ...). Torch's hook dicts are left out
# of a keyed record: the fast path registers no hooks.
_STRUCTURE = ("_modules", "_parameters", "_buffers")

# Undo entries, applied last first (tuples, not closures: a load records thousands, and on a model
# holding many adapters every allocation can trigger a garbage collection of the whole heap).
_ATTRIBUTES, _ALL, _ONE, _COLLECTION, _GRADS, _FLAGS = range(6)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off while open: a record of a whole model is hundreds of
    thousands of new containers, which set off full collections of a heap that the model's adapters
    make large (on 12 adapters of a 16-layer model: 90 ms instead of 490)."""
    paused = gc.isenabled()
    try:  # disabled inside: an interrupt between the two lines would leave it off for good
        gc.disable()
        yield
    finally:
        if paused:
            gc.enable()


class Transaction:
    """What a load may change. Record before changing; `roll_back()` restores everything recorded."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, ...]] = []
        self._seen: set[tuple[int, str | None]] = set()
        self._values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rng = torch.random.get_rng_state()
        self._cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None  # type: ignore[no-untyped-call]

    def record(self, obj: Any, key: str | None = None) -> None:
        """Records `obj` once: its attributes, the contents of its dicts, lists and sets, and its
        parameters' `requires_grad`. With `key`, only what adding the entry `key` changes: of a
        large dict only that entry, and of torch's own dicts only children, parameters, buffers."""
        if (id(obj), key) in self._seen or (id(obj), None) in self._seen:
            return
        self._seen.add((id(obj), key))
        undo = self._undo
        attributes = dict(vars(obj))
        undo.append((_ATTRIBUTES, obj, attributes))
        for name, value in attributes.items():
            if key is not None and name[0] == "_" and name not in _STRUCTURE:
                continue
            if isinstance(value, dict):
                if key is None or len(value) <= _SMALL:
                    undo.append((_ALL, value, list(value.items())))
                else:
                    undo.append((_ONE, value, key, value.get(key, _ABSENT)))
            elif isinstance(value, (list, set)):
                undo.append((_COLLECTION, value, list(value)))
        if isinstance(obj, nn.Module):
            parameters = obj._parameters
            chosen = parameters.values() if key is None else [parameters.get(key)]
            grads = [(p, p.requires_grad) for p in chosen if p is not None]
            if grads:
                undo.append((_GRADS, grads))

    def record_entries(self, value: dict[str, Any], key: str) -> None:
        """Only the entry `key` of the dict `value` (a container's children, say)."""
        if len(value) <= _SMALL:
            self._undo.append((_ALL, value, list(value.items())))
        else:
            self._undo.append((_ONE, value, key, value.get(key, _ABSENT)))

    def record_all(self, objects: Iterable[Any]) -> None:
        """`record` of every object, with the cyclic garbage collector paused (`collector_paused`)."""
        with collector_paused():
            for obj in objects:
                self.record(obj)

    def record_attributes(self, obj: Any, names: Iterable[str]) -> None:
        """Only these attributes of `obj` (by identity; the caller replaces, never mutates them)."""
        current = vars(obj)
        self._undo.append((_ATTRIBUTES, obj, {name: current.get(name, _ABSENT) for name in names}, False))

    def record_grads(self, parameters: Iterable[torch.Tensor]) -> None:
        """Only the `requires_grad` flags of these parameters."""
        self._undo.append((_GRADS, [(parameter, parameter.requires_grad) for parameter in parameters]))

    def record_training(self, modules: Iterable[nn.Module]) -> None:
        """Only the `training` flags (what `eval()` changes)."""
        self._undo.append((_FLAGS, [(module, module.training) for module in modules]))

    def protect(self, tensor: torch.Tensor) -> None:
        """Keeps a copy of `tensor`'s values, to restore them in place."""
        if id(tensor) not in self._values:
            self._values[id(tensor)] = (tensor, tensor.detach().clone())

    def differs(self, tensor: torch.Tensor) -> bool:
        """Whether a protected tensor's values are no longer, bit for bit, those it was protected
        with: a write through `.data =` (PEFT's special initialisations) changes neither the
        tensor's identity nor its version. False for a tensor not protected."""
        kept = self._values.get(id(tensor))
        if kept is None or kept[0] is not tensor:
            return False
        saved = kept[1]
        if tensor.shape != saved.shape or tensor.dtype != saved.dtype or tensor.device != saved.device:
            return True
        bits = tensor.detach().reshape(-1).view(torch.uint8)
        return not torch.equal(bits, saved.reshape(-1).view(torch.uint8))

    def roll_back(self) -> None:
        """Restores everything recorded, with Ctrl-C deferred until it is done. A Ctrl-C that
        arrives before the deferral is in place restarts the restore (every step sets a recorded
        value: doing it twice is doing it once) and is raised once it is complete."""
        interrupted = False
        while True:
            done = False
            try:
                with deferred_interrupts():
                    self._restore()
                    done = True
            except KeyboardInterrupt:
                if done:
                    raise  # arrived during the restore, deferred until it was complete
                interrupted = True
                continue
            if interrupted:
                raise KeyboardInterrupt
            return

    def _restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in self._values.values():
                tensor.copy_(saved)
        for entry in reversed(self._undo):
            _apply(entry)
        torch.random.set_rng_state(self._rng)
        if self._cuda_rng is not None:
            torch.cuda.set_rng_state_all(self._cuda_rng)


def _unchanged(value: dict[Any, Any], items: list[tuple[Any, Any]]) -> bool:
    """Whether the dict holds these items, in this order, each value the same object."""
    return len(value) == len(items) and all(
        key == old_key and current is old
        for (key, current), (old_key, old) in zip(value.items(), items, strict=True)
    )


def _apply(entry: tuple[Any, ...]) -> None:
    kind = entry[0]
    if kind == _ATTRIBUTES:
        current = vars(entry[1])
        saved = entry[2]
        whole = len(entry) == 3  # record_attributes names only some
        if whole:
            for name in [name for name in current if name not in saved]:
                del current[name]
        for name, value in saved.items():
            if value is _ABSENT:
                current.pop(name, None)
            else:
                current[name] = value
    elif kind == _ALL:
        if not _unchanged(entry[1], entry[2]):  # a dict that forbids updates (diffusers' FrozenDict
            # config) was not changed by the load: left alone
            entry[1].clear()
            entry[1].update(entry[2])
    elif kind == _ONE:
        _, value, key, old = entry
        if old is _ABSENT:
            value.pop(key, None)
        else:
            value[key] = old
    elif kind == _COLLECTION:
        value, items = entry[1], entry[2]
        if isinstance(value, list):
            value[:] = items
        else:
            value.clear()
            value.update(items)
    elif kind == _GRADS:
        for parameter, requires_grad in entry[1]:
            parameter.requires_grad_(requires_grad)
    else:
        for module, training in entry[1]:
            module.training = training


@contextlib.contextmanager
def settled_heap() -> Iterator[None]:
    """While PEFT's own code runs after a whole-model record: the objects alive now (the model, the
    records) are left out of the garbage collector's passes (`gc.freeze`), so that the full
    collections PEFT's load sets off do not traverse them again; they are let back in afterwards.
    Only when no objects are frozen already (a server's own `gc.freeze()` stays as it is) and the
    collector runs."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    try:  # frozen inside, as record_all disables
        gc.freeze()
        yield
    finally:
        gc.unfreeze()


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
