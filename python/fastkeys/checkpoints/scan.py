"""Checkpoints known from their headers alone: `read_keys`, `scan` and `Checkpoint`.

Only the 8-byte length and the JSON header of each `.safetensors` file are read, never the tensor
data; many shards are read in parallel with the GIL released (native implementation).

Checkpoints are untrusted (see docs/hostile.md): every file an index or a directory names must
resolve, symlinks followed, inside the checkpoint's directory; only regular files are opened;
JSON files are read up to a size cap (`MAX_INDEX_BYTES`, `MAX_CONFIG_BYTES`).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from fastkeys.engine import core
from fastkeys.engine.pure.safetensors import open_regular

__all__ = ["MAX_CONFIG_BYTES", "MAX_INDEX_BYTES", "Checkpoint", "Tensor", "read_keys", "scan"]

_BATCH = 16  # files per progress step

# The largest index we know of (a 671B-parameter MoE, 90k tensors) is under 10 MB.
MAX_INDEX_BYTES = 64 << 20
# adapter_config.json is a few kB; a target_modules list naming every module of a 100-layer
# model is under 100 kB.
MAX_CONFIG_BYTES = 4 << 20


class Tensor(NamedTuple):
    """A tensor as its header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str


class Checkpoint(Mapping[str, Tensor]):
    """The tensors of a checkpoint by name, in file order (shard by shard), with their files and
    metadata. `adapter_config` holds `adapter_config.json` when the checkpoint is a directory
    that has one.

    Held as columns (names, dtypes, shapes, byte sizes, files); a `Tensor` is made when asked
    for, so that scanning a million tensors does not build a million objects."""

    def __init__(
        self,
        path: str,
        columns: tuple[list[str], list[str], list[tuple[int, ...]], list[int], list[str]],
        files: list[str],
        metadata: dict[str, str],
        file_metadata: dict[str, dict[str, str]],
        adapter_config: dict[str, object] | None = None,
    ) -> None:
        self.path = path
        self._names, self._dtypes, self._shapes, self._sizes, self._files = columns
        self._index = dict(zip(self._names, range(len(self._names)), strict=True))
        if len(self._index) != len(self._names):
            seen: dict[str, str] = {}
            for name, file in zip(self._names, self._files, strict=True):
                if name in seen:
                    raise ValueError(f"tensor {name!r} is in two shards: {seen[name]} and {file}")
                seen[name] = file
        self.files = files
        self.metadata = metadata
        self.file_metadata = file_metadata
        self.adapter_config = adapter_config

    def __getitem__(self, name: str) -> Tensor:
        i = self._index[name]
        return Tensor(name, self._dtypes[i], self._shapes[i], self._sizes[i], self._files[i])

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def shard_of(self, name: str) -> str:
        return self._files[self._index[name]]

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    def dtype_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for dtype in self._dtypes:
            counts[dtype] = counts.get(dtype, 0) + 1
        return counts

    def file_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(self.files, 0)
        for file in self._files:
            counts[file] += 1
        return counts

    def _check_index(self, weight_map: dict[str, str]) -> None:
        """Every tensor the index lists is in the shard it names (set operations, in C)."""
        actual = dict(zip(self._names, self._files, strict=True))
        wrong = weight_map.items() - actual.items()
        if not wrong:
            return
        name, file = min(wrong)
        found = actual.get(name)
        if found is None:
            raise ValueError(f"the index lists tensor {name!r} in {file}, but that shard does not hold it")
        raise ValueError(f"the index lists tensor {name!r} in {file}, but it is in {found}")

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}: {len(self)} tensors in {len(self.files)} files)"


def _path(path: object) -> str:
    """A path argument as str: TypeError for anything but str or os.PathLike[str] (an int would
    be a file descriptor to `open`), ValueError for a NUL byte (no file has that name)."""
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else path
    if not isinstance(text, str):
        raise TypeError(f"path must be str or os.PathLike[str], not {type(text).__name__}")
    if "\0" in text:
        raise ValueError(f"path {text!r} contains a NUL byte")
    return text


def read_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of one `.safetensors` file, in file (data offset) order."""
    ((names, *_),) = core.read_headers([_path(path)])
    return names


def _read_json(path: Path, limit: int) -> object:
    """A JSON file read whole, if it is a regular file of at most `limit` bytes; ValueError
    naming the file otherwise."""
    try:
        with open_regular(str(path)) as file:
            size = os.fstat(file.fileno()).st_size
            data = file.read(limit + 1)  # bounded even if the file grows while being read
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    if max(size, len(data)) > limit:
        raise ValueError(
            f"{path}: {max(size, len(data))} bytes, more than the limit of {limit} for a JSON file"
        )
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid JSON ({error})") from None
    except (RecursionError, ValueError):  # nesting too deep; an integer of over 4300 digits
        raise ValueError(f"{path}: invalid JSON (nested too deeply or a number too large)") from None


def _inside(directory: Path, name: str) -> bool:
    """Whether `directory / name` resolves (symlinks followed) inside `directory`. A Hugging Face
    cache snapshot (`.../snapshots/<revision>/`) may also link into its repository's `blobs/`,
    which is how the hub cache stores every file."""
    base = os.path.realpath(directory)
    target = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, target]) == base and target != base:
        return True
    parent = os.path.dirname(base)
    if os.path.basename(parent) == "snapshots":
        blobs = os.path.join(os.path.dirname(parent), "blobs")
        return os.path.dirname(target) == blobs
    return False


def _regular_file(directory: Path, name: str, culprit: str) -> str:
    """`directory / name` after checking that it stays inside `directory` and, if it exists, is a
    regular file (checked with stat, so that a FIFO or a device is never opened)."""
    if not _inside(directory, name):
        raise ValueError(f"{culprit}: {name!r} lies outside the checkpoint directory {directory}")
    path = str(directory / name)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return path
    if not stat.S_ISREG(mode):
        raise ValueError(f"{culprit}: {name!r} is not a regular file")
    return path


Header = tuple[list[str], list[str], list[tuple[int, ...]], list[int], "dict[str, str] | None", int]


def _read(files: list[str], progress: Callable[[int, int], None] | None) -> list[Header]:
    if progress is None or len(files) <= _BATCH:
        return list(core.read_headers(files))
    headers: list[Header] = []
    for start in range(0, len(files), _BATCH):
        headers += core.read_headers(files[start : start + _BATCH])
        progress(len(headers), len(files))
    return headers


def _index_files(index_path: Path) -> tuple[list[str], dict[str, str], dict[str, str]]:
    """(shard files in name order, weight_map, metadata) of a `*.safetensors.index.json`."""
    index = _read_json(index_path, MAX_INDEX_BYTES)
    if not isinstance(index, dict):
        raise ValueError(f"{index_path}: must be a JSON object with a 'weight_map', not {_kind(index)}")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{index_path}: 'metadata' must be an object")
    # The first tensor each shard holds, to name in errors: one pass (an index lists up to ~1M).
    first_of: dict[str, str] = {}
    for name, shard in weight_map.items():
        first_of.setdefault(shard, name)
    files = []
    for shard in sorted(first_of):
        first = first_of[shard]
        file = _regular_file(index_path.parent, shard, f"{index_path}: weight_map entry {first!r}")
        files.append(file)
        if not os.path.isfile(file):
            raise FileNotFoundError(
                2,
                f"the shard {shard!r} listed for tensor {first!r} in {index_path.name} does not exist",
                file,
            )
    return (
        files,
        {name: str(index_path.parent / shard) for name, shard in weight_map.items()},
        {str(k): str(v) for k, v in metadata.items()},
    )


def _directory_files(directory: Path) -> tuple[list[str], Path | None]:
    """The safetensors files of a directory, or its index: adapter, then a model index, then a
    single model file, else every `*.safetensors`. Every one must be a regular file inside the
    directory (checked by stat, before anything is opened)."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    for index in indexes:
        _regular_file(directory, index.name, str(directory))
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (directory / name).is_file() and not indexes:
            return [_regular_file(directory, name, str(directory))], None
    if len(indexes) > 1:
        raise ValueError(
            f"{directory}: several indexes ({', '.join(p.name for p in indexes)}); scan one of them"
        )
    if indexes:
        return [], indexes[0]
    files = sorted(
        _regular_file(directory, path.name, str(directory)) for path in directory.glob("*.safetensors")
    )
    if not files:
        raise FileNotFoundError(2, "no .safetensors files in the directory", str(directory))
    return files, None


def _kind(value: object) -> str:
    """What a JSON value is, without quoting it."""
    if isinstance(value, list):
        kinds = sorted({type(item).__name__ for item in value})
        return f"a list holding {', '.join(kinds)}"
    return type(value).__name__


def _adapter_config(path: Path) -> dict[str, object]:
    """adapter_config.json, with the fields fastkeys reads checked: their types, and the regular
    expressions (`target_modules` or `exclude_modules` as a string, `layers_pattern`) compiled
    for the linear-time engine, so that a hostile config is a ValueError naming the file."""
    from fastkeys.rules.expressions import user_regex

    config = _read_json(path, MAX_CONFIG_BYTES)
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must be a JSON object, not {type(config).__name__}")
    expected = {
        "peft_type": (str,),
        "target_modules": (str, list),
        "exclude_modules": (str, list),
        "layers_pattern": (str, list),
        "layers_to_transform": (int, list),
    }
    for field, kinds in expected.items():
        value = config.get(field)
        if value is None:
            continue
        element = int if field == "layers_to_transform" else str
        if (
            not isinstance(value, kinds)
            or isinstance(value, bool)
            or (isinstance(value, list) and not all(type(item) is element for item in value))
        ):
            wanted = " or ".join("a list of " + element.__name__ if k is list else k.__name__ for k in kinds)
            raise ValueError(f"{path}: {field!r} must be {wanted}, not {_kind(value)}")
        # Regular expressions: a string target_modules or exclude_modules, every layers_pattern.
        if field == "layers_pattern" or (
            field in ("target_modules", "exclude_modules") and isinstance(value, str)
        ):
            for pattern in value if isinstance(value, list) else [value]:
                user_regex(str(pattern), f"{path}: {field}")
    return config


def scan(path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """Everything about a checkpoint's tensors but their data. `path` is a `.safetensors` file, a
    `*.safetensors.index.json`, or a directory (its adapter or model files, sharded or not, else
    every `*.safetensors` in it). `progress(done, total)` is called between batches of files.

    Raises FileNotFoundError/OSError for files that cannot be read and ValueError for malformed
    ones or an inconsistent index (a listed tensor its shard lacks, a tensor in two shards)."""
    layout = _layout(path)
    return _assemble(layout, _read(layout.files, progress))


def scan_many(paths: Sequence[str | os.PathLike[str]]) -> list[Checkpoint | OSError | ValueError]:
    """`scan` for many checkpoints that keeps going: one that cannot be used gives its exception
    in its place. The headers of every file are read in one parallel call."""
    layouts: list[_Layout | OSError | ValueError] = []
    for path in paths:
        try:
            layouts.append(_layout(path))
        except (OSError, ValueError) as error:
            layouts.append(error)
    files = [file for layout in layouts if isinstance(layout, _Layout) for file in layout.files]
    headers: dict[str, Header] = {}
    # A bad file fails the batch: then each checkpoint is read alone, keeping its error with it.
    with contextlib.suppress(OSError, ValueError):
        headers = dict(zip(files, core.read_headers(files), strict=True))
    out: list[Checkpoint | OSError | ValueError] = []
    for layout in layouts:
        if not isinstance(layout, _Layout):
            out.append(layout)
            continue
        try:
            known = all(file in headers for file in layout.files)
            read = [headers[file] for file in layout.files] if known else _read(layout.files, None)
            out.append(_assemble(layout, read))
        except (OSError, ValueError) as error:
            out.append(error)
    return out


class _Layout(NamedTuple):
    """What a checkpoint consists of, known before any header is read."""

    path: str
    files: list[str]
    weight_map: dict[str, str] | None
    metadata: dict[str, str]
    adapter_config: dict[str, object] | None


def _layout(path: str | os.PathLike[str]) -> _Layout:
    root = Path(_path(path))
    adapter_config = None
    weight_map: dict[str, str] | None = None
    metadata: dict[str, str] = {}
    if root.is_dir():
        files, index = _directory_files(root)
        config_path = root / "adapter_config.json"
        if os.path.lexists(config_path):
            _regular_file(root, config_path.name, str(root))
            adapter_config = _adapter_config(config_path)
    elif str(root).endswith(".index.json"):
        files, index = [], root
    else:
        files, index = [str(root)], None
    if index is not None:
        files, weight_map, metadata = _index_files(index)
    return _Layout(str(path), files, weight_map, metadata, adapter_config)


def _assemble(layout: _Layout, headers: list[Header]) -> Checkpoint:
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    sizes: list[int] = []
    file_column: list[str] = []
    file_metadata: dict[str, dict[str, str]] = {}
    for file, (file_names, file_dtypes, file_shapes, file_sizes, file_meta, _size) in zip(
        layout.files, headers, strict=True
    ):
        names += file_names
        dtypes += file_dtypes
        shapes += file_shapes
        sizes += file_sizes
        file_column += [file] * len(file_names)
        if file_meta is not None:
            file_metadata[file] = file_meta
    checkpoint = Checkpoint(
        layout.path,
        (names, dtypes, shapes, sizes, file_column),
        layout.files,
        dict(layout.metadata),
        file_metadata,
        layout.adapter_config,
    )
    if layout.weight_map is not None:
        checkpoint._check_index(layout.weight_map)
    elif len(layout.files) == 1 and layout.files[0] in file_metadata:
        checkpoint.metadata = file_metadata[layout.files[0]]
    return checkpoint
