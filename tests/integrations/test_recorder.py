"""fastkeys.integrations.recorder without any library: wrapping once (module functions, static and
class methods, one function under several names), the thread-local stack of loads, the error for
a missing internal and the missing-keys warning. The wrappers inside PEFT, transformers and
diffusers are tested by their integration tests."""

from __future__ import annotations

import re
import sys
import threading
import types
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest

from fastkeys import MissingAdapterKeysWarning
from fastkeys.integrations import recorder


def _counting(calls: list[str]) -> Callable[[Any], Callable[..., Any]]:
    def make(original: Any) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append("wrapped")
            return original(*args, **kwargs)

        return wrapper

    return make


def test_a_function_is_wrapped_once_with_one_wrapper_under_every_name() -> None:
    def load(x: int) -> int:
        return x + 1

    first, second = types.ModuleType("first"), types.ModuleType("second")
    first.load = second.load = load  # type: ignore[attr-defined]
    calls: list[str] = []
    for module in (first, second, first):
        assert recorder.wrap_once(module, "load", _counting(calls))
    assert first.load is second.load is not load
    assert first.load.__wrapped__ is load and first.load.__name__ == "load"
    assert first.load(1) == 2 and calls == ["wrapped"], "a call records once"
    assert not recorder.wrap_once(first, "absent", _counting(calls))


def test_static_and_class_methods_stay_what_they_were() -> None:
    class Loader:
        @staticmethod
        def static(x: int) -> int:
            return x * 2

        @classmethod
        def klass(cls, x: int) -> str:
            return f"{cls.__name__}{x}"

        def plain(self) -> None: ...

    calls: list[str] = []
    for _ in range(2):
        assert recorder.wrap_once(Loader, "static", _counting(calls))
        assert recorder.wrap_once(Loader, "klass", _counting(calls))
    assert isinstance(vars(Loader)["static"], staticmethod) and isinstance(vars(Loader)["klass"], classmethod)
    assert Loader.static(3) == 6 and Loader().static(3) == 6 and Loader.klass(1) == "Loader1"
    assert calls == ["wrapped"] * 3
    assert not recorder.wrap_once(Loader, "plain", _counting(calls)), "only static and class methods"


class _Result(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class _Model:
    def __init__(self) -> None:
        self.peft_config = {"foo": {"peft_type": "LORA"}}


def test_the_recorder_judges_inside_a_judging_load_only() -> None:
    raw = ["q.lora_A.foo.weight", "q.lora_A.foobar.weight"]

    def set_state(model: Any, state: Any, adapter_name: str = "default") -> _Result:
        return _Result(list(raw), [])

    recording = recorder._recording(set_state)
    assert recording(_Model(), {}, "foo").missing_keys == raw, "a pass-through outside fastkeys"
    with recorder.loading(None, judging=False) as records:
        assert recorder.recording() and recorder.active() is None
        assert recording(_Model(), {}, "foo").missing_keys == raw
    assert records.raw == [_Result(raw, [])] and not recorder.recording()
    loaded = _Model()
    with recorder.loading("foo") as outer, recorder.loading("foo") as inner:
        assert recording(loaded, {}, "foo").missing_keys == ["q.lora_A.foo.weight"]
    assert inner.result_for(loaded) is inner.results[0] and inner.result_for(_Model()) is None
    for load in (outer, inner):
        assert [judged.verdict for judged in load.results] == [["q.lora_A.foo.weight"]]
        assert load.results[0].raw_missing == raw


def test_loads_are_per_thread() -> None:
    seen: list[bool] = []
    with recorder.loading("foo"):
        thread = threading.Thread(target=lambda: seen.append(recorder.active() is None))
        thread.start()
        thread.join()
    assert seen == [True]


def test_missing_internal_names_the_release_and_the_verified_ones() -> None:
    fake = types.ModuleType("transformers")
    fake.__version__ = "9.1.0"  # type: ignore[attr-defined]
    error = recorder.missing_internal(fake, "transformers.X", "do Y")
    tested = ", ".join(recorder.VERIFIED["transformers"])
    assert str(error) == (
        f"fastkeys relies on transformers.X, which transformers 9.1.0 does not have (fastkeys is "
        f"tested with transformers {tested}); do Y"
    )


def test_the_warning_names_at_most_five_tensors() -> None:
    missing = [f"k{index}" for index in range(7)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recorder.warn_missing("foo", missing, "dir", 1)
        recorder.warn_missing("foo", [], "dir", 1)
    assert len(caught) == 1 and caught[0].filename == __file__
    message = caught[0].message
    assert isinstance(message, MissingAdapterKeysWarning) and message.missing_keys == missing
    assert str(message) == (
        "adapter 'foo': 7 of its tensors are missing from the checkpoint at dir: k0, k1, k2, k3, k4, "
        "... (2 more)"
    )


@pytest.mark.parametrize("release", ["4.56.2", "4.58.0", "5.0.0", "5.23.1", "6.0.0", "main", "5..24"])
def test_transformers_outside_the_range_is_refused(release: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("transformers")
    fake.__version__ = release  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(
        RuntimeError, match=rf"supports transformers 4\.57 and 5\.24 to 5\.x .*, not {re.escape(release)};"
    ):
        recorder.transformers_generation()


@pytest.mark.parametrize(
    ("release", "generation"),
    [("4.57.0", 4), ("4.57.6", 4), ("5.24.0", 5), ("5.24.0.dev0", 5), ("5.24.1+local", 5), ("5.31.0", 5)],
)
def test_transformers_in_the_range_picks_its_loader(
    release: str, generation: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = types.ModuleType("transformers")
    fake.__version__ = release  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", fake)
    assert recorder.transformers_generation() == generation
