"""The pure-Python mirror of `fastkeys._native`, class for class and method for method.

Same arguments (validated by the caller, `fastkeys.matching`), same answers, same errors. The
rule lives in `_verdict`; everything else is a prefilter that rejects most keys with one C-level
substring test before the rule runs.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from collections.abc import Iterable, Sequence

from ._linear import Regex

TYPE_CHECKING = False  # `typing` would cost a third of `import fastkeys`
if TYPE_CHECKING:
    from typing import BinaryIO

    from typing_extensions import Self

__all__ = ["KeyMatcher", "Regex", "read_headers", "read_values"]

# The segment at whose level a PEFT model keeps its model-level tensors (`base_model.vera_A`).
_MODEL_ROOT = "base_model"

# With at most this many needles, testing each one with `in` beats running the rule.
_MAX_NEEDLES = 4


def _key_list(keys: Iterable[str]) -> tuple[Sequence[str], dict[int, str] | None]:
    """The keys as a sequence of exact str, TypeError naming the first element that is not a
    str. A str subclass is read by its string value (its own methods could answer otherwise, as
    the native side never asks them): it is copied to a str, and the second item maps each copy's
    id back to the caller's object, for the results; None when there is none."""
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"keys must be an iterable of str, not a single {type(keys).__name__}")
    if not isinstance(keys, (list, tuple)):
        try:
            iterator = iter(keys)
        except Exception:  # as the native side: whatever `__iter__` raises, keys is unusable
            raise TypeError(f"keys must be an iterable of str, not {type(keys).__name__}") from None
        keys = list(iterator)
    kinds = set(map(type, keys))
    for kind in kinds:
        if not issubclass(kind, str):
            index = next(i for i, key in enumerate(keys) if type(key) is kind)
            raise TypeError(f"keys[{index}] must be str, not {kind.__name__}")
    if kinds <= {str}:
        return keys, None
    plain = [key if type(key) is str else str.__str__(key) for key in keys]
    return plain, {id(copy): key for copy, key in zip(plain, keys, strict=True) if copy is not key}


def _originals(found: list[str], back: dict[int, str] | None) -> list[str]:
    return found if back is None else [back.get(id(key), key) for key in found]


class KeyMatcher:
    """See `fastkeys.KeyMatcher`."""

    __slots__ = (
        "_adapters",
        "_exact",
        "_ignore",
        "_needles",
        "_prefixes",
        "_shared",
        "_suffixes",
        "_wrappers",
    )
    _prefixes: tuple[str, ...]
    _exact: frozenset[str]
    _shared: frozenset[str]
    _adapters: dict[str, int] | None
    _ignore: list[Regex]
    _needles: tuple[str, ...] | None
    _wrappers: frozenset[str]
    _suffixes: dict[str, str]

    def __new__(
        cls,
        prefixes: Sequence[str],
        adapter_names: Sequence[str] | None,
        exact: Sequence[str],
        shared: Sequence[str],
        ignore: Sequence[str],
        wrappers: Sequence[str],
        suffixes: Sequence[tuple[str, str]],
    ) -> Self:
        self = object.__new__(cls)
        # Immutable like the native class: attributes are set here, once, past `__setattr__`.
        init = object.__setattr__
        init(self, "_wrappers", frozenset(str.__str__(name) for name in wrappers))
        renames: dict[str, str] = {}
        for segment, parameter in suffixes:
            renames.setdefault(str.__str__(segment), str.__str__(parameter))
        init(self, "_suffixes", renames)
        plain = [str.__str__(name) for name in prefixes]  # by string value, as for keys
        init(self, "_prefixes", tuple(plain))
        init(self, "_exact", frozenset(str.__str__(name) for name in exact))
        init(self, "_shared", frozenset(str.__str__(name) for name in shared))
        adapters: dict[str, int] | None = None
        if adapter_names is not None:
            adapters = {}
            for name in adapter_names:
                adapters.setdefault(str.__str__(name), len(adapters))
        init(self, "_adapters", adapters)
        # Matched by the linear engine: `re` would backtrack on `(a+)+$` (see fastkeys._linear).
        init(self, "_ignore", [Regex(pattern) for pattern in ignore])
        # Substrings every matching key contains: an adapter name, else a prefix. (The bare name:
        # a needle that starts with "." costs more, dots being everywhere in keys.)
        needles = None
        if adapters is not None and len(adapters) <= _MAX_NEEDLES:
            needles = tuple(adapters)
        elif len(self._prefixes) + len(self._exact) <= _MAX_NEEDLES:
            needles = self._prefixes + tuple(self._exact)
        init(self, "_needles", needles)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce_ex__(self, protocol: object) -> tuple[object, ...]:
        # As the native class: a compiled matcher is not pickled (nor copied); build another.
        raise TypeError(f"cannot pickle {type(self).__name__!r} object")

    def _hit(self, segments: list[str]) -> tuple[int, int | str] | None:
        """The last match (the rightmost, as the native walk finds it): (index of the qualifying
        segment, the adapter's index or name)."""
        for index in range(len(segments) - 2, -1, -1):
            segment = segments[index]
            if not (segment.startswith(self._prefixes) or segment in self._exact):
                continue
            if self._is_layer_copy(segment, index, segments[0]):
                continue
            following = segments[index + 1]
            if self._adapters is None:
                return index, following
            found = self._adapters.get(following)
            if found is not None:
                return index, found
        return None

    def _is_layer_copy(self, segment: str, index: int, first: str) -> bool:
        """A shared segment below the model level (neither the first segment, `index` 0, nor right
        after a leading `base_model`) is a layer's reference to a model-level tensor."""
        return segment in self._shared and index > 0 and not (index == 1 and first == _MODEL_ROOT)

    def _verdict(self, key: str) -> int | str | None:
        """The adapter's index (named adapters) or name (any adapter), or None."""
        hit = self._hit(key.split("."))
        return None if hit is None else hit[1]

    def _ignored(self, key: str) -> bool:
        return any(pattern.search(key) for pattern in self._ignore)

    def _candidates(self, keys: Sequence[str]) -> Iterable[str]:
        needles = self._needles
        if needles is None:
            return keys
        if len(needles) == 1:
            (needle,) = needles
            return [key for key in keys if needle in key]
        return [key for key in keys if any(needle in key for needle in needles)]

    def _single_name(self, keys: Sequence[str], name: str) -> list[str]:
        """`filter` for one adapter name: find `.name`, then check the segment before it. The
        same rule as `_hit`, read from the name's side like the native name-first strategy, and
        written out inline: this loop is the fallback's hot path."""
        prefixes, exact, shared = self._prefixes, self._exact, self._shared
        is_layer_copy = self._is_layer_copy
        needle = "." + name
        width = len(needle)
        found = []
        # The C-level substring test rejects most keys before the loop looks at them.
        for key in self._candidates(keys):
            dot = key.find(needle)
            while dot >= 0:
                end = dot + width
                if end == len(key) or key[end] == ".":
                    start = key.rfind(".", 0, dot) + 1
                    segment = key[start:dot]
                    # The segment's index matters only when it is shared: counted only then.
                    if (segment.startswith(prefixes) or segment in exact) and not (
                        segment in shared
                        and is_layer_copy(segment, key.count(".", 0, start), key[: key.find(".")])
                    ):
                        found.append(key)
                        break
                dot = key.find(needle, end)
        return found

    def filter(self, keys: Iterable[str]) -> list[str]:
        keys, back = _key_list(keys)
        if self._adapters is not None and len(self._adapters) == 1:
            found = self._single_name(keys, next(iter(self._adapters)))
        else:
            verdict = self._verdict
            found = [key for key in self._candidates(keys) if verdict(key) is not None]
        if self._ignore:
            found = [key for key in found if not self._ignored(key)]
        return _originals(found, back)

    def group(self, keys: Iterable[str]) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        lists: list[list[str]] = []
        if self._adapters is not None:
            for name in self._adapters:
                lists.append(groups.setdefault(name, []))
        plain, back = _key_list(keys)
        for key in self._candidates(plain):
            verdict = self._verdict(key)
            if verdict is None or (self._ignore and self._ignored(key)):
                continue
            original = key if back is None else back.get(id(key), key)
            if isinstance(verdict, int):
                lists[verdict].append(original)
            else:
                groups.setdefault(verdict, []).append(original)
        return groups

    def _insert(self, key: str, name: str) -> str:
        last_dot = key.rfind(".")
        spans = [(last_dot + 1, len(key))]
        if last_dot >= 0:
            spans.append((key.rfind(".", 0, last_dot) + 1, last_dot))
        for start, end in spans:
            segment = key[start:end]
            qualifies = segment.startswith(self._prefixes) or segment in self._exact
            if qualifies and segment not in self._wrappers:
                parameter = self._suffixes.get(segment) if end == len(key) else None
                tail = "" if parameter is None else "." + parameter
                return f"{key[:end]}.{name}{tail}{key[end:]}"
        return key

    def _remove(self, key: str) -> str:
        segments = key.split(".")
        hit = self._hit(segments)
        if hit is None:
            return key
        index = hit[0]
        parameter = self._suffixes.get(segments[index])
        if segments[index] in self._wrappers:
            del segments[index : index + 2]
        elif parameter is not None and segments[index + 2 :] == [parameter]:
            del segments[index + 1 :]
        else:
            del segments[index + 1]
        return ".".join(segments)

    def insert_adapter_name(self, keys: Iterable[str], adapter_name: str) -> list[str]:
        plain, back = _key_list(keys)
        name = str.__str__(adapter_name)
        return _originals([self._insert(key, name) for key in plain], back)

    def remove_adapter_name(self, keys: Iterable[str]) -> list[str]:
        plain, back = _key_list(keys)
        return _originals([self._remove(key) for key in plain], back)

    def __repr__(self) -> str:
        return "KeyMatcher(<compiled>)"


# --- safetensors headers: the mirror of rust/safetensors.rs ---------------------------------

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


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading, if it is a regular file. A FIFO opens at once with O_NONBLOCK
    and is then refused by its type, so a hostile path never blocks; reads from a regular file
    ignore the flag. A directory is IsADirectoryError; a FIFO, socket or device ValueError."""
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    )
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise _Invalid("not a regular file (a FIFO, socket or device); only regular files are read")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


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


def read_values(
    paths: Sequence[str | os.PathLike[str]], threads: int | None = None
) -> list[tuple[list[str], list[bool], list[bool]]]:
    """See `fastkeys._native.read_values` (in `_pure_values`, loaded when first asked for)."""
    from ._pure_values import read_values as read

    return read(paths, threads)
