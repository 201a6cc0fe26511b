"""read_values (`check_base(values=True)`): all-zero and non-finite flags for every dtype
safetensors stores, held against torch's own reading of the same bytes, and the two
implementations against each other."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastkeys.engine.pure import safetensors as _headers
from fastkeys.engine.pure import values as _pure_values
from fastkeys.preflight.checks import _read_value_flags
from tests.conftest import examples

torch = pytest.importorskip("torch")

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu, "C64": torch.complex64, "BOOL": torch.bool,
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "U16": torch.uint16,
    "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64, "U64": torch.uint64,
}  # fmt: skip
PACKED = ("F4", "F6_E2M3", "F6_E3M2")  # no torch arithmetic: the expectation is written out below


def test_every_dtype_is_covered() -> None:
    assert set(TORCH_DTYPES) | set(PACKED) == set(_headers.DTYPE_BITS) == set(_pure_values.LANES)


def _write(path: Path, tensors: list[tuple[str, str, int, bytes]]) -> Path:
    """A safetensors file of 1-D tensors (name, dtype, elements, raw bytes)."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, count, data in tensors:
        header[name] = {"dtype": dtype, "shape": [count], "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(t[3] for t in tensors))
    return path


def _expected(dtype: str, data: bytes) -> tuple[bool, bool]:
    """(all zero, some non-finite) as torch reads the bytes, or by the format's definition."""
    if not data:
        return False, False
    if dtype == "F4":  # E2M1, two per byte: zero when exponent and mantissa are; no NaN/Inf
        return all(byte & 0x77 == 0 for byte in data), False
    if dtype in PACKED:  # F6: only all-zero bytes are read as zero (see rust/values.rs)
        return not any(data), False
    values = torch.frombuffer(bytearray(data), dtype=TORCH_DTYPES[dtype])
    if dtype.startswith("F8"):
        values = values.float()
    if values.dtype in (torch.bool, torch.uint16, torch.uint32, torch.uint64):
        values = values.to(torch.int64) if values.dtype != torch.uint64 else values.view(torch.int64)
    floating = values.is_floating_point() or values.is_complex()
    return bool((values == 0).all()), bool(floating and (~torch.isfinite(values)).any())


def _width(dtype: str) -> int:
    return 3 if _headers.DTYPE_BITS[dtype] == 6 else max(1, _headers.DTYPE_BITS[dtype] // 8)


def _elements(dtype: str, size: int) -> int:
    return size * 8 // _headers.DTYPE_BITS[dtype]


SPECIAL = [b"\x00", b"\x80", b"\x7f", b"\xff", b"\x7c", b"\x7e", b"\x78", b"\x01"]


@st.composite
def tensor_bytes(draw: st.DrawFn) -> tuple[str, bytes]:
    dtype = draw(st.sampled_from(sorted(_headers.DTYPE_BITS)))
    width = _width(dtype)
    count = draw(st.integers(0, 6))
    # Mostly zero bytes with special ones mixed in: the edges (-0, NaN codes, Inf) are hit often.
    data = b"".join(
        draw(
            st.lists(
                st.sampled_from(SPECIAL[:1] * 6 + SPECIAL), min_size=count * width, max_size=count * width
            )
        )
    )
    return dtype, data


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(tensor_bytes(), min_size=1, max_size=4))
def test_flags_equal_torch_for_every_dtype(tensors: list[tuple[str, bytes]]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = _write(
            Path(scratch) / "t.safetensors",
            [(f"t{i}", dtype, _elements(dtype, len(data)), data) for i, (dtype, data) in enumerate(tensors)],
        )
        flags = _read_value_flags([str(path)])
        for i, (dtype, data) in enumerate(tensors):
            assert flags[str(path), f"t{i}"] == _expected(dtype, data), (dtype, data.hex())


def test_the_two_implementations_agree_on_a_large_file(tmp_path: Path) -> None:
    native = pytest.importorskip("fastkeys._native")
    rng = torch.Generator().manual_seed(0)
    big = torch.zeros(600_000, dtype=torch.float32)  # 2.4 MB: crosses the 1 MiB read chunks
    big[-1] = -0.0
    noisy = torch.randn(300_000, generator=rng).to(torch.bfloat16)
    noisy[299_999] = float("inf")
    tensors = [
        ("big", "F32", big.numel(), big.numpy().tobytes()),
        ("noisy", "BF16", noisy.numel(), noisy.view(torch.int16).numpy().tobytes()),
    ]
    path = str(_write(tmp_path / "large.safetensors", tensors))
    expected = (["big", "noisy"], [True, False], [False, True])
    assert native.read_values([path]) == _pure_values.read_values([path]) == [expected]


def test_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00[]")
    with pytest.raises(ValueError, match=rf"^{bad}: invalid header JSON"):
        _read_value_flags([str(bad)])
    with pytest.raises(FileNotFoundError) as error:
        _read_value_flags([str(tmp_path / "absent.safetensors")])
    assert error.value.filename == os.fspath(tmp_path / "absent.safetensors")
