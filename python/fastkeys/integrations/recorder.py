"""The one mechanism by which fastkeys sees raw load results inside PEFT, transformers and diffusers.

Each library filters the missing keys of a load before its caller sees them, so fastkeys wraps, once
per process, the internal function that returns the raw result (`wrap_once`). The wrappers are
pass-throughs except for the thread inside a fastkeys call: that call pushes a `Load` on this
thread's stack (`loading`), and a wrapper records into every `Load` on the stack and, when the
innermost one asks for it, hands the library fastkeys' verdict instead of the raw keys, so that
the library's own report and warning name only the tensors that are really missing.

- `install_peft`: `set_peft_model_state_dict`, which PEFT's loader (`peft.peft_model`), diffusers
  (`peft`) and transformers 4.x (`peft.utils`) call under different names, with one wrapper; and
  PEFT's `safe_load_file`, fed the tensors fastkeys already read (`feeding`).
- `install_transformers`: transformers 5.x loads an adapter through the static
  `PreTrainedModel._load_pretrained_model`; transformers 4.x through `set_peft_model_state_dict`.

It also holds the versions fastkeys was verified on (`VERIFIED`), the RuntimeError for an internal
a release lacks, and the missing-keys warning. Importing it imports none of torch, peft,
transformers, diffusers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from fastkeys.integrations.marks import ThreadMarks
from fastkeys.rules import versions
from fastkeys.rules.matching import MissingAdapterKeysWarning, filter_missing

# Every library version fastkeys was verified on, in one place. The PEFT fast path is exact only on
# these PEFT releases (its loader changes in patch releases too) and torch minor releases, checked
# by the differential tests (tests/integrations/loader/test_load_adapters.py) against PEFT's own
# loop; transformers and diffusers by their integration tests.
VERIFIED = {
    "peft": ("0.21.2",),
    "torch": ("2.15",),
    "transformers": ("4.57.6", "5.24"),
    "diffusers": ("0.39.0", "0.42.1"),
}
_SHOWN = 5
# The loads and feeds open on each thread.
_LOADS: ThreadMarks[Load] = ThreadMarks("loading")
_FEEDS: ThreadMarks[tuple[str, dict[str, Any]]] = ThreadMarks("feeding")


def version(library: Any) -> str:
    return str(getattr(library, "__version__", "?")).split("+")[0]


def missing_internal(library: Any, internal: str, instead: str) -> RuntimeError:
    """The error for an internal of `library` (a module) that fastkeys relies on and this release
    lacks; `instead` says what the caller can do."""
    name = library.__name__
    return RuntimeError(
        f"fastkeys relies on {internal}, which {name} {version(library)} does not have (fastkeys is "
        f"tested with {name} {', '.join(VERIFIED.get(name, ('?',)))}); {instead}"
    )


def warn_missing(adapter_name: str, missing: list[str], source: object, stacklevel: int) -> None:
    """Warns once, with MissingAdapterKeysWarning, when tensors of the adapter are missing."""
    if not missing:
        return
    shown = ", ".join(missing[:_SHOWN]) + (
        f", ... ({len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else ""
    )
    warnings.warn(
        MissingAdapterKeysWarning(
            f"adapter {adapter_name!r}: {len(missing)} of its tensors are missing from the checkpoint "
            f"at {source}: {shown}",
            adapter_name,
            missing,
        ),
        stacklevel=stacklevel + 1,
    )


# ---------------------------------------------------------------------------------------------
# Loads in progress on this thread.


class Judged(NamedTuple):
    model: Any
    adapter_name: str
    raw_missing: list[str]
    verdict: list[str]
    unexpected: list[str]


class Load:
    """One fastkeys call in progress on this thread: the adapter it loads (None: the library picks
    the name), the raw results of `set_peft_model_state_dict` (`raw`, as torch returned them) and,
    when `judging`, fastkeys' verdict for each model loaded (a pipeline loads several)."""

    def __init__(self, adapter_name: str | None, judging: bool) -> None:
        self.adapter_name = adapter_name
        self.judging = judging
        self.raw: list[Any] = []
        self.results: list[Judged] = []
        self.error: Exception | None = None

    def judge(
        self, model: Any, missing: Any, unexpected: Any, adapter_name: str | None = None
    ) -> list[str] | None:
        """Records and returns fastkeys' verdict on the raw `missing` keys of `model`, with the method
        and options of the adapter's config in `model.peft_config`. Returns None, keeping the error
        for `raise_error`, when there is no verdict (a method fastkeys does not know): raising here,
        inside the library's load, would leave the model half loaded."""
        configs = getattr(model, "peft_config", None)
        configs = configs if isinstance(configs, dict) else {}
        # The loader adds the new adapter's config last (dicts keep insertion order).
        name = adapter_name or self.adapter_name or next(reversed(configs), "default")
        raw = _ordered(missing)
        try:
            verdict = filter_missing(raw, name, config=configs.get(name))
        except (ValueError, TypeError) as error:
            self.error = self.error or error
            return None
        judged = Judged(model, name, raw, verdict, _ordered(unexpected))
        # Enclosing loads on this thread see it too (a pipeline's load holds a model's load).
        for load in _stack():
            load.results.append(judged)
        return judged.verdict

    def raise_error(self) -> None:
        """Raises the error that left a load without a verdict, now that the library has finished."""
        if self.error is not None:
            raise self.error

    def result_for(self, model: Any) -> Judged | None:
        """The last load into `model` in this call, or None."""
        found: Judged | None = next(
            (judged for judged in reversed(self.results) if judged.model is model), None
        )
        return found


def _ordered(keys: Any) -> list[str]:
    """transformers keeps keys in sets: sorted, so that results and warnings are reproducible."""
    return sorted(keys) if isinstance(keys, (set, frozenset)) else list(keys)


def _stack() -> list[Load]:
    """The loads open on this thread, innermost last."""
    return _LOADS.values()


@contextlib.contextmanager
def loading(adapter_name: str | None, *, judging: bool = True) -> Iterator[Load]:
    """Marks this thread as inside a fastkeys load of `adapter_name` while open (nestable).
    `judging=False` only records the raw results and leaves the library's result as it is."""
    load = Load(adapter_name, judging)
    with _LOADS.mark(load):
        yield load


def active() -> Load | None:
    """The innermost load that asks for fastkeys' verdict, if it is the innermost load at all."""
    stack = _stack()
    return stack[-1] if stack and stack[-1].judging else None


def recording() -> bool:
    """Whether this thread is inside a load that asked for the raw results only."""
    return any(not load.judging for load in _stack())


@contextlib.contextmanager
def feeding(path: str, tensors: dict[str, Any]) -> Iterator[None]:
    """While open, PEFT's `safe_load_file` of the file `path` (an empty safetensors file) on this
    thread returns `tensors` instead."""
    with _FEEDS.mark((path, tensors)):
        yield


# ---------------------------------------------------------------------------------------------
# Wrapping, once per process.

# The wrapper made for each original function, so that one function reachable under several names
# gets one wrapper (a call records once, whichever name the library uses).
_wrappers: dict[Any, Callable[..., Any]] = {}


def wrap_once(owner: Any, name: str, make: Callable[[Any], Callable[..., Any]]) -> bool:
    """Replaces the function `owner.name` (a module attribute, or a staticmethod or classmethod of
    the class `owner`) by `make(original)` unless fastkeys did already. False when there is no such
    function. No lock: two threads at once both wrap the original and the second assignment wins
    (never a wrapper of a wrapper), and a lock held across Python code would leak for good if a
    KeyboardInterrupt landed on the `with` line's exit, hanging every later load."""
    found = vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name, None)
    kind = type(found) if isinstance(found, (staticmethod, classmethod)) else None
    original = found.__func__ if kind is not None else found  # type: ignore[union-attr]
    if not callable(original) or (isinstance(owner, type) and kind is None):
        return False
    if getattr(original, "__fastkeys_wrapper__", False):
        return True
    wrapper = _wrappers.get(original)
    if wrapper is None:
        wrapper = functools.wraps(original)(make(original))
        wrapper.__fastkeys_wrapper__ = True  # type: ignore[attr-defined]
        _wrappers[original] = wrapper
    setattr(owner, name, kind(wrapper) if kind is not None else wrapper)
    return True


def _recording(original: Callable[..., Any]) -> Callable[..., Any]:
    """`set_peft_model_state_dict`, recording its raw result into every load on this thread and
    returning the innermost judging load's verdict in place of the raw missing keys."""

    def recording(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        stack = _stack()
        if not stack or result is None or not hasattr(result, "missing_keys"):
            return result
        # PEFT filters `missing_keys` in place right after this returns: keep a copy.
        raw = result._replace(missing_keys=list(result.missing_keys))
        for load in stack:
            load.raw.append(raw)
        judging = active()
        if judging is not None:
            model = kwargs.get("model", args[0] if args else None)
            adapter_name = kwargs.get("adapter_name", args[2] if len(args) > 2 else "default")
            verdict = judging.judge(model, raw.missing_keys, raw.unexpected_keys, adapter_name)
            if verdict is not None:
                result = result._replace(missing_keys=verdict)
        return result

    return recording


def _fed(original: Callable[..., Any]) -> Callable[..., Any]:
    def fed(filename: Any, device: Any = "cpu") -> Any:
        feed = _FEEDS.innermost()
        if feed is not None and os.fspath(filename) == feed[0]:
            # the placeholder is an empty safetensors file: reading it checks `device` as safetensors
            # does (same errors), then the checked tensors go where they would have gone
            original(filename, device=device)
            return {name: tensor.to(device) for name, tensor in feed[1].items()}
        return original(filename, device=device)

    return fed


INSTEAD = "use fastkeys.filter_missing on the result of model.load_state_dict instead"
# Where PEFT's loader, diffusers and transformers 4.x find `set_peft_model_state_dict`.
_PEFT_NAMES = ("peft.peft_model", "peft", "peft.utils")


def install_peft() -> None:
    """Installs the recorder of `set_peft_model_state_dict` under each name PEFT exposes it by, and
    PEFT's fed `safe_load_file` (idempotent). RuntimeError naming the version if PEFT lacks them."""
    import peft

    for module_name in _PEFT_NAMES:
        if not wrap_once(importlib.import_module(module_name), "set_peft_model_state_dict", _recording):
            raise missing_internal(peft, f"{module_name}.set_peft_model_state_dict", INSTEAD)
    if not wrap_once(importlib.import_module("peft.utils.save_and_load"), "safe_load_file", _fed):
        raise missing_internal(peft, "peft.utils.save_and_load.safe_load_file", INSTEAD)


def _judging(original: Callable[..., Any]) -> Callable[..., Any]:
    """transformers 5.x's `_load_pretrained_model(model, ...)` (a classmethod in 5.0, then static),
    handing transformers fastkeys' verdict as the raw `missing_keys` of a model loaded inside a
    judging load."""

    def judging(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        load = active()
        model = kwargs.get("model", next((arg for arg in args if not isinstance(arg, type)), None))
        if load is not None and isinstance(getattr(model, "peft_config", None), dict):
            # `result` is (LoadStateDictInfo, ...) or LoadStateDictInfo; transformers filters its
            # `missing_keys` with `is_adapter_key` after this returns, which keeps every key of our
            # verdict (each holds the adapter name), and then prints the LOAD REPORT from it.
            info = result[0] if isinstance(result, tuple) else result
            verdict = load.judge(model, info.missing_keys, info.unexpected_keys)
            if verdict is not None:
                info.missing_keys = set(verdict)
        return result

    return judging


def transformers_generation() -> int:
    """4 for transformers 4.57 (it loads adapters through `set_peft_model_state_dict`), 5 for 5.24
    and later 5.x (through `PreTrainedModel._load_pretrained_model`); RuntimeError naming the
    supported releases for any other. 5.0 to 5.23 are refused: on 5.0.0, 3 of the 24 integration
    tests fail (a BERT model reports every key missing), and no release between was verified."""
    import transformers

    found = version(transformers)
    try:
        release = versions.parse(found, "transformers.__version__")[:2]
    except ValueError:
        release = ()  # "main", a fork's own scheme: not a release fastkeys knows
    if (4, 57) <= release < (4, 58) or (5, 24) <= release < (6,):
        return release[0]
    raise RuntimeError(
        f"fastkeys.transformers supports transformers 4.57 and 5.24 to 5.x (tested with transformers "
        f"{', '.join(VERIFIED['transformers'])}), not {found}; {INSTEAD}"
    )


def install_transformers() -> None:
    """Installs the recorder where this transformers loads adapters (idempotent). RuntimeError
    naming the version outside the supported range or where an internal is gone."""
    from transformers import modeling_utils

    generation = transformers_generation()
    install_peft()
    if generation == 5:
        owner = getattr(modeling_utils, "PreTrainedModel", None)
        if owner is None or not wrap_once(owner, "_load_pretrained_model", _judging):
            raise missing_internal(
                importlib.import_module("transformers"),
                "transformers.modeling_utils.PreTrainedModel._load_pretrained_model",
                INSTEAD,
            )
