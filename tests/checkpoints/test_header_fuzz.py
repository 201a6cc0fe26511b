"""Header validation, fuzzed against the reference: the `safetensors` package.

Headers are built from pieces chosen to reach the corners where JSON readers differ: `-0` and
64-bit overflows in shapes and offsets, lone surrogate escapes, entries written as arrays,
`__metadata__` null or wrong, unknown fields, shapes that overflow before a trailing 0, leading
whitespace, offsets off by one. The implementation under test (both run this suite) must accept
exactly what `safetensors` accepts, with the same tensor names. One difference is by design: a
name given twice is refused here and silently kept as the last entry there. `make fuzz` runs
more examples (FASTKEYS_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from fastkeys import read_keys
from tests.conftest import examples


class Raw(str):
    """A JSON token written as is."""


def dump(value: object) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{dump(k)}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


DTYPES = {"F32": 32, "F16": 16, "U8": 8, "BOOL": 8, "F4": 4, "F6_E2M3": 6, "I64": 64}
NUMBER = st.one_of(
    st.integers(0, 12),
    st.sampled_from([Raw("-0"), Raw("-1"), Raw("0.0"), Raw("1e1"), Raw("18446744073709551615"),
                     Raw("18446744073709551616"), Raw("4294967296"), Raw("00"), Raw("1.5")]),
)  # fmt: skip
NAME = st.one_of(
    st.sampled_from(["a", "b.weight", "__metadata__", "é", ""]),
    st.sampled_from([Raw('"\\ud800"'), Raw('"\\udc00x"'), Raw('"\\ud83d\\ude00"'), Raw('"a\\u0000"')]),
)


@st.composite
def entry(draw: st.DrawFn, begin: int) -> tuple[object, int]:
    """An entry starting at `begin`, usually right, and its intended end."""
    dtype = draw(st.sampled_from([*DTYPES, "F99", 5]))
    shape = draw(st.lists(NUMBER, max_size=4))
    if draw(st.booleans()):
        shape = [draw(st.integers(0, 3)) for _ in range(draw(st.integers(0, 3)))]
    size = 0
    if dtype in DTYPES and all(type(d) is int for d in shape):
        bits = DTYPES[str(dtype)]
        for dim in shape:
            bits *= int(dim)
        size = bits // 8
    end = begin + size + draw(st.sampled_from([0, 0, 0, 1, -1]))
    offsets: object = [begin, end]
    if draw(st.integers(0, 9)) == 0:
        offsets = draw(
            st.sampled_from([[Raw("-0"), end], [begin], [begin, end, end], "x", [begin, Raw("1.0")]])
        )
    fields = {"dtype": dtype, "shape": shape, "data_offsets": offsets}
    form = draw(st.integers(0, 9))
    if form == 0:
        return [dtype, shape, offsets], end  # serde reads a struct from an array of its fields
    if form == 1:
        return [dtype, shape], end
    if form == 2:
        fields["extra"] = 1
    if form == 3:
        del fields[draw(st.sampled_from(list(fields)))]
    if form == 4:
        fields = dict(reversed(list(fields.items())))
    return fields, end


@st.composite
def header_file(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(the file's bytes, whether a name occurs twice)."""
    header: list[tuple[object, object]] = []  # pairs: a name may come twice
    begin = 0
    for _ in range(draw(st.integers(0, 3))):
        name = draw(NAME)
        value: object
        if name == "__metadata__":
            value = draw(
                st.sampled_from([{"format": "pt"}, Raw("null"), {"a": 1}, [], {}, {"k": Raw('"\\udfff"')}])
            )
        else:
            value, begin = draw(entry(begin))
        header.append((name, value))
    names = [str(name) for name, _ in header]
    text = "{" + ",".join(f"{dump(name)}:{dump(value)}" for name, value in header) + "}"
    text = draw(st.sampled_from(["", "", " ", "\n"])) + text + draw(st.sampled_from(["", "", "  ", "x"]))
    raw = text.encode()
    data = b"\0" * max(0, begin + draw(st.sampled_from([0, 0, 0, 1])))
    return struct.pack("<Q", len(raw)) + raw + data, len(set(names)) != len(names)


def _reference(path: str) -> list[str] | None:
    try:
        with safe_open(path, "np") as file:
            return sorted(file.keys())
    except Exception:  # SafetensorError, and whatever else it raises for a malformed file
        return None


def _ours(path: str) -> list[str] | None:
    try:
        return sorted(read_keys(path))
    except ValueError:
        return None


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header_file())
def test_header_validation_agrees_with_safetensors(case: tuple[bytes, bool]) -> None:
    content, duplicated = case
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "x.safetensors")
        Path(path).write_bytes(content)
        ours = _ours(path)
        if duplicated:
            assert ours is None  # refused here by design; the reference keeps the last entry
        else:
            assert ours == _reference(path), content
