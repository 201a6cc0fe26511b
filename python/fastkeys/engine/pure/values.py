"""The pure-Python mirror of `rust/values.rs`: per tensor, is every element zero, is any NaN/Inf.

Same arguments, answers and errors as `fastkeys._native.read_values`. Each chunk of the data
buffer becomes one big integer and every test is a handful of whole-chunk bit operations (C-level),
never a Python loop over elements.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

from fastkeys.engine.pure import safetensors as _headers

__all__ = ["LANES", "read_values"]

_CHUNK = 1 << 20  # a multiple of every element width, as in rust/values.rs

# dtype -> (width in bytes, bits that make an element non-zero, non-finite mask, non-finite value);
# rust/values.rs `lanes` says why each is so. A non-finite mask of 0: the dtype has none.
LANES: dict[str, tuple[int, int, int, int]] = {
    "F64": (8, (1 << 63) - 1, 0x7FF0 << 48, 0x7FF0 << 48),
    "F32": (4, 0x7FFF_FFFF, 0x7F80_0000, 0x7F80_0000),
    "C64": (4, 0x7FFF_FFFF, 0x7F80_0000, 0x7F80_0000),
    "F16": (2, 0x7FFF, 0x7C00, 0x7C00),
    "BF16": (2, 0x7FFF, 0x7F80, 0x7F80),
    "F8_E5M2": (1, 0x7F, 0x7C, 0x7C),
    "F8_E4M3": (1, 0x7F, 0x7F, 0x7F),
    "F8_E4M3FNUZ": (1, 0xFF, 0xFF, 0x80),
    "F8_E5M2FNUZ": (1, 0xFF, 0xFF, 0x80),
    "F8_E8M0": (1, 0, 0xFF, 0xFF),
    "F4": (1, 0x77, 0, 0),
    **dict.fromkeys(
        ("BOOL", "U8", "I8", "F6_E2M3", "F6_E3M2", "I16", "U16", "I32", "U32", "I64", "U64"), (1, 0xFF, 0, 0)
    ),
}


@lru_cache(maxsize=64)
def _repeat(mask: int, width: int, count: int) -> int:
    """`mask` in each of `count` little-endian lanes of `width` bytes, as one integer."""
    return int.from_bytes(mask.to_bytes(width, "little") * count, "little")


def _chunk_flags(chunk: bytes, dtype: str) -> tuple[bool, bool]:
    width, value_mask, mask, value = LANES[dtype]
    count = len(chunk) // width
    number = int.from_bytes(chunk, "little")
    zero = value_mask != 0 and number & _repeat(value_mask, width, count) == 0
    if mask == 0:
        return zero, False
    if mask == 0xFF:  # a whole-byte code (FNUZ NaN, E8M0 NaN)
        return zero, bytes((value,)) in chunk
    # Here mask == value: an exponent field of contiguous bits with a free bit above it. With
    # y = (lane & mask) ^ mask, y + mask reaches that bit exactly when y != 0 (no carry leaves
    # the lane), so a lane whose bit stays clear has its exponent all ones.
    top = mask + (mask & -mask)
    spread, tops = _repeat(mask, width, count), _repeat(top, width, count)
    flipped = (number & spread) ^ spread
    return zero, (flipped + spread) & tops != tops


def _file_values(path: str) -> tuple[list[str], list[bool], list[bool]]:
    names, dtypes, _shapes, sizes, _metadata, file_len = _headers._read_header(path)
    zeros: list[bool] = []
    non_finite: list[bool] = []
    with _headers.open_regular(path) as file:
        file.seek(file_len - sum(sizes))  # the tensors tile the data buffer, which ends the file
        for dtype, size in zip(dtypes, sizes, strict=True):
            zero, bad = size > 0 and LANES[dtype][1] != 0, False
            left = size
            while left:
                chunk = file.read(min(left, _CHUNK))
                if not chunk:
                    raise OSError(f"{os.fspath(path)}: the file ended before its tensor data")
                left -= len(chunk)
                chunk_zero, chunk_bad = _chunk_flags(chunk, dtype)
                zero, bad = zero and chunk_zero, bad or chunk_bad
            zeros.append(zero)
            non_finite.append(bad)
    return names, zeros, non_finite


def read_values(
    paths: Sequence[str | os.PathLike[str]], threads: int | None = None
) -> list[tuple[list[str], list[bool], list[bool]]]:
    """See `fastkeys._native.read_values` (`threads` is accepted and ignored: one thread)."""
    out = []
    for path in paths:
        text = _headers.path_text(path)
        try:
            out.append(_file_values(text))
        except _headers._Invalid as error:
            raise ValueError(f"{text}: {error}") from None
    return out
