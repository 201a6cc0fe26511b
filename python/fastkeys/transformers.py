"""transformers' `model.load_adapter` with fastkeys' verdict on the missing keys.

transformers (5.x) keeps a missing key when it contains the adapter name *or* the method name
(`"lora"`), so loading a second LoRA adapter reports every tensor of the first one as MISSING, and
an adapter called `foo` is blamed for `foobar`'s tensors. `load_adapter` here calls transformers'
own `model.load_adapter` (same arguments, same side effects) and replaces that filter with
fastkeys' rule, applied to the raw result of the load.

To see the raw result, the first call wraps `transformers.modeling_utils.PreTrainedModel.
_load_pretrained_model` (the loader that `load_adapter` calls) with a pass-through: for a model
being loaded inside a fastkeys call on the same thread, it replaces the raw `missing_keys` by
fastkeys' verdict before transformers filters and reports them, so the LOAD REPORT shows only the
tensors that are really missing. Every other load, on any thread, is untouched. Importing this
module imports none of torch, peft, transformers.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

from fastkeys.rules import validate as _validate
from fastkeys.rules.matching import MissingAdapterKeysWarning, filter_missing

__all__ = ["load_adapter"]

_TESTED_WITH = "5.24"
_SHOWN = 5
_state = threading.local()


class _Judged(NamedTuple):
    model: Any
    adapter_name: str
    raw_missing: list[str]
    verdict: list[str]
    unexpected: list[str]


class _Load:
    """One fastkeys call in progress on this thread: the adapter it loads (None: the loader picks
    the name) and, for each model loaded (a pipeline loads several), a `_Judged` record."""

    def __init__(self, adapter_name: str | None) -> None:
        self.adapter_name = adapter_name
        self.results: list[_Judged] = []
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
        judged = _Judged(model, name, raw, verdict, _ordered(unexpected))
        # Enclosing loads on this thread see it too (a pipeline's load holds a model's load).
        for load in getattr(_state, "stack", ()):
            load.results.append(judged)
        return judged.verdict

    def raise_error(self) -> None:
        """Raises the error that left a load without a verdict, now that the library has finished."""
        if self.error is not None:
            raise self.error

    def result_for(self, model: Any) -> _Judged | None:
        """The last load into `model` in this call, or None."""
        found: _Judged | None = next(
            (judged for judged in reversed(self.results) if judged.model is model), None
        )
        return found


def _ordered(keys: Any) -> list[str]:
    """transformers keeps keys in sets: sorted, so that results and warnings are reproducible."""
    return sorted(keys) if isinstance(keys, (set, frozenset)) else list(keys)


@contextlib.contextmanager
def _loading(adapter_name: str | None) -> Iterator[_Load]:
    """Marks this thread as inside a fastkeys load of `adapter_name` while open (nestable)."""
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    load = _Load(adapter_name)
    stack.append(load)
    try:
        yield load
    finally:
        stack.pop()


def _active() -> _Load | None:
    stack: list[_Load] | None = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _missing_version(library: Any, internal: str, tested_with: str, instead: str) -> RuntimeError:
    return RuntimeError(
        f"fastkeys relies on {internal}, which {library.__name__} "
        f"{getattr(library, '__version__', '?')} does not have (fastkeys is tested with "
        f"{library.__name__} {tested_with}); {instead}"
    )


def _prepare() -> None:
    """Imports transformers (and peft, which its adapter loading needs) and installs the recorder."""
    try:
        import peft  # noqa: F401  (transformers' load_adapter imports it; say so before loading)
        import transformers
        from transformers import modeling_utils
    except ImportError as error:
        raise ImportError(
            'fastkeys.transformers needs transformers, peft and torch: pip install "fastkeys[transformers]"'
        ) from error
    owner = getattr(modeling_utils, "PreTrainedModel", None)
    loader = vars(owner).get("_load_pretrained_model") if owner is not None else None
    if not isinstance(loader, staticmethod):
        raise _missing_version(
            transformers,
            "transformers.modeling_utils.PreTrainedModel._load_pretrained_model (a staticmethod)",
            _TESTED_WITH,
            "use fastkeys.filter_missing on the result of model.load_state_dict instead",
        )
    _install(owner, loader)


def _install(owner: Any, loader: staticmethod[..., Any]) -> None:
    # No lock: installing is idempotent (a second thread wraps the same original and its
    # assignment wins), and a lock would leak for good if Ctrl-C landed on the `with` exit.
    original = loader.__func__
    if getattr(original, "__fastkeys_recording__", False):
        return

    @functools.wraps(original)
    def judging(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        load = _active()
        model = kwargs.get("model", args[0] if args else None)
        if load is not None and isinstance(getattr(model, "peft_config", None), dict):
            # `result` is (LoadStateDictInfo, ...); transformers filters its `missing_keys`
            # with `is_adapter_key` after this returns, which keeps every key of our verdict
            # (each holds the adapter name), and then prints the LOAD REPORT from it.
            info = result[0]
            verdict = load.judge(model, info.missing_keys, info.unexpected_keys)
            if verdict is not None:
                info.missing_keys = set(verdict)
        return result

    judging.__fastkeys_recording__ = True  # type: ignore[attr-defined]
    owner._load_pretrained_model = staticmethod(judging)


def _warn_missing(adapter_name: str, missing: list[str], source: object, stacklevel: int) -> None:
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


def load_adapter(model: Any, peft_model_id: Any = None, adapter_name: str = "default", **kwargs: Any) -> Any:
    """`model.load_adapter(peft_model_id, adapter_name=adapter_name, **kwargs)` on a transformers
    model, with the same arguments and side effects. Returns transformers' `LoadStateDictInfo` with
    `missing_keys` (a set, as transformers has it) holding exactly the adapter's tensors that the
    checkpoint lacks; `unexpected_keys` are as transformers reports them (an adapter checkpoint
    holds only adapter tensors, so each of them is one that went nowhere).

    Warns once, with `fastkeys.MissingAdapterKeysWarning`, when tensors of this adapter are missing.
    """
    _validate.name("adapter_name", adapter_name)
    if not callable(getattr(model, "load_adapter", None)):
        raise TypeError(
            "model must be a transformers model with PEFT support (a PreTrainedModel), "
            f"not {type(model).__name__}"
        )
    _prepare()
    from fastkeys.integrations.loader.files import check_local

    check_local(peft_model_id)
    with _loading(adapter_name) as load:
        info = model.load_adapter(peft_model_id, adapter_name=adapter_name, **kwargs)
    load.raise_error()
    judged = load.result_for(model)
    if judged is None:
        raise RuntimeError(
            "transformers' load_adapter did not call PreTrainedModel._load_pretrained_model on the "
            "model, so there is no load result to check (fastkeys is tested with transformers "
            f"{_TESTED_WITH})"
        )
    missing = judged.verdict
    # Our verdict already went through transformers' own filter; set it again so that the result
    # is our verdict even if a later transformers filters differently.
    info.missing_keys = set(missing)
    _warn_missing(adapter_name, missing, peft_model_id if peft_model_id is not None else "state_dict", 2)
    return info
