"""The mirror of `rust/safetensors.rs` (through `rust/py_headers.rs`): headers read and validated
exactly as the native reader (and the `safetensors` package) does, from regular files only."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO

__all__ = ["DTYPE_BITS", "MAX_HEADER_LEN", "open_regular", "parse_header", "path_text", "read_headers"]

MAX_HEADER_LEN = 100_000_000
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_U64 = 1 << 64

Header = tuple[list[str], list[str], list[tuple[int, ...]], list[int], "dict[str, str] | None", int]


class _Invalid(ValueError):
    pass


def _quote(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


def _is_u64(value: object) -> bool:
    return type(value) is int and 0 <= value < _U64


def _entry(name: str, value: object) -> tuple[str, tuple[int, ...], int, int]:
    where = f"tensor {_quote(name)}"
    if isinstance(value, list) and not isinstance(value, _Pairs):
        # serde reads a struct from a sequence of its fields in order, and so does the reference.
        if len(value) != len(_ENTRY_FIELDS):
            raise _Invalid(f"{where}: invalid length {len(value)}, expected struct Entry with 3 elements")
        value = _Pairs(zip(_ENTRY_FIELDS, value, strict=True))
    if not isinstance(value, _Pairs):
        raise _Invalid(f"{where}: invalid type: expected struct Entry")
    fields: dict[str, object] = {}
    for field, item in value:
        if field not in _ENTRY_FIELDS:
            continue  # ignored, as the reference (and serde without deny_unknown_fields) does
        if field in fields:
            raise _Invalid(f"{where}: duplicate field `{field}`")
        fields[field] = item
    for field in _ENTRY_FIELDS:
        if field not in fields:
            raise _Invalid(f"{where}: missing field `{field}`")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _Invalid(f"{where}: unknown variant `{dtype}`, expected one of {', '.join(DTYPE_BITS)}")
    if not isinstance(shape, list) or not all(_is_u64(dim) for dim in shape):
        raise _Invalid(f"{where}: invalid value: shape must be a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise _Invalid(f"{where}: invalid value: data_offsets must be two non-negative integers")
    return dtype, tuple(shape), offsets[0], offsets[1]


class _Pairs(list):  # type: ignore[type-arg]
    """A JSON object as the list of its (key, value) pairs, to see order and duplicates."""


def _pairs(pairs: list[tuple[str, object]]) -> _Pairs:
    # serde_json refuses a lone surrogate escape (`"\\ud800"`) in any string; `json` decodes it.
    for key, value in pairs:
        for text in (key, value) if isinstance(value, str) else (key,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise _Invalid("invalid header JSON: a string holds a lone surrogate escape") from None
    return _Pairs(pairs)


def _json_int(text: str) -> int | float:
    # serde_json reads `-0` as the float -0.0 and integers beyond 64 bits as floats: not a u64.
    if text == "-0" or len(text) > 20:
        return float(text)
    return int(text)


def parse_header(
    raw: bytes, data_len: int
) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str] | None]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise _Invalid(f"the header is not UTF-8 ({error})") from None
    try:
        top = json.loads(text, object_pairs_hook=_pairs, parse_int=_json_int)
    except (json.JSONDecodeError, RecursionError) as error:
        raise _Invalid(f"invalid header JSON: {error}") from None
    if not isinstance(top, _Pairs):
        raise _Invalid(
            "invalid header JSON: expected a JSON object mapping tensor names to their dtype, shape "
            f"and data_offsets, got {type(top).__name__}"
        )
    tensors = []
    metadata = None
    seen: set[str] = set()
    for name, value in top:
        if name in seen:
            raise _Invalid(f"invalid header JSON: duplicate entry {_quote(name)}")
        seen.add(name)
        if name == "__metadata__":
            if value is None:  # no metadata, as the reference reads it (an Option)
                continue
            if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _, v in value):
                raise _Invalid("invalid header JSON: __metadata__ must map strings to strings")
            metadata = dict(value)
            continue
        try:
            dtype, shape, begin, end = _entry(name, value)
        except _Invalid as error:
            raise _Invalid(f"invalid header JSON: {error}") from None
        tensors.append((name, dtype, shape, begin, end))
    tensors.sort(key=lambda tensor: (tensor[3], tensor[4]))
    expected_begin = 0
    for name, dtype, shape, begin, end in tensors:
        where = f"tensor {_quote(name)}"
        if end < begin:
            raise _Invalid(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_len:
            raise _Invalid(
                f"{where}: data_offsets [{begin}, {end}] lie outside the data buffer of {data_len} bytes"
            )
        if begin != expected_begin:
            raise _Invalid(
                f"{where}: data_offsets [{begin}, {end}] leave a gap or overlap "
                f"(the previous tensor ends at {expected_begin})"
            )
        bits = DTYPE_BITS[dtype]
        for dim in shape:
            bits *= dim
            # Checked at every step, as the native fold does: [2**32, 2**32, 2**32, 0] overflows.
            if bits >= _U64:
                raise _Invalid(f"{where}: shape {list(shape)} overflows")
        if bits % 8:
            raise _Invalid(f"{where}: {dtype} x {list(shape)} does not fill whole bytes")
        if end - begin != bits // 8:
            raise _Invalid(
                f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes "
                f"but {dtype} x {list(shape)} needs {bits // 8}"
            )
        expected_begin = end
    if expected_begin != data_len:
        raise _Invalid(f"the tensors cover {expected_begin} bytes of a data buffer of {data_len} bytes")
    return tensors, metadata


@contextlib.contextmanager
def open_regular(path: str, *, named: bool = False) -> Iterator[BinaryIO]:
    """`with open_regular(path) as file:` reads `path`, if it is a regular file. A FIFO opens at
    once with O_NONBLOCK and is then refused by its type, so a hostile path never blocks; reads from
    a regular file ignore the flag. A directory is IsADirectoryError; a FIFO, socket or device
    ValueError (its message starting with the path when `named`). A context manager, so that
    nothing is open until the `with` holds it: an interruption anywhere leaves no file open."""
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    fd = os.open(path, flags)
    file: BinaryIO | None = None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            message = "not a regular file (a FIFO, socket or device); only regular files are read"
            raise ValueError(f"{path}: {message}") if named else _Invalid(message)
        file = os.fdopen(fd, "rb", buffering=0)
        yield file
    finally:
        if file is None:
            os.close(fd)
        else:
            file.close()


def _read_exactly(file: BinaryIO, size: int) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise _Invalid("the file ended inside its header: it changed while being read")
    return data


def _read_header(path: str) -> Header:
    with open_regular(path) as file:
        file_len = os.fstat(file.fileno()).st_size
        if file_len < 8:
            raise _Invalid(f"the file has {file_len} bytes, fewer than the 8 of the header length")
        # The length is never shown: it is the file's first 8 bytes, whatever the file is.
        header_len = int.from_bytes(_read_exactly(file, 8), "little")
        if header_len > MAX_HEADER_LEN:
            raise _Invalid(f"the header length exceeds the limit of {MAX_HEADER_LEN} bytes")
        if header_len > file_len - 8:
            raise _Invalid(f"the header length runs past the end of the file ({file_len} bytes)")
        raw = _read_exactly(file, header_len)
    tensors, metadata = parse_header(raw, file_len - 8 - header_len)
    return (
        [t[0] for t in tensors],
        [t[1] for t in tensors],
        [t[2] for t in tensors],
        [t[4] - t[3] for t in tensors],
        metadata,
        file_len,
    )


def read_headers(paths: Sequence[str | os.PathLike[str]], threads: int | None = None) -> list[Header]:
    """See `fastkeys._native.read_headers` (`threads` is accepted and ignored: one thread)."""
    out = []
    for path in paths:
        text = path_text(path)
        try:
            out.append(_read_header(text))
        except _Invalid as error:
            raise ValueError(f"{text}: {error}") from None
    return out


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as str; os.fspath refuses an int, which `open` would take for a file descriptor
    (and close)."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"paths must be str or os.PathLike[str], not {type(text).__name__}")
    return text
