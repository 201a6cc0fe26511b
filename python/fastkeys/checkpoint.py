"""Checkpoints known from their headers alone: `read_keys`, `scan` and `Checkpoint`.

Only the 8-byte length and the JSON header of each `.safetensors` file are read, never the tensor
data; many shards are read in parallel with the GIL released (native implementation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

from ._engine import core

__all__ = ["Checkpoint", "Tensor", "read_keys", "scan"]

_BATCH = 16  # files per progress step


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


def read_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of one `.safetensors` file, in file (data offset) order."""
    ((names, *_),) = core.read_headers([path])
    return names


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
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{index_path}: not a JSON index ({error})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to shard file names")
    metadata = index.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{index_path}: 'metadata' must be an object")
    shards = sorted(set(weight_map.values()))
    files = [str(index_path.parent / shard) for shard in shards]
    for shard, file in zip(shards, files, strict=True):
        if not os.path.isfile(file):
            first = next(name for name, listed in weight_map.items() if listed == shard)
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
    single model file, else every `*.safetensors`."""
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (directory / name).is_file() and not list(directory.glob("*.safetensors.index.json")):
            return [str(directory / name)], None
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(
            f"{directory}: several indexes ({', '.join(p.name for p in indexes)}); scan one of them"
        )
    if indexes:
        return [], indexes[0]
    files = sorted(str(path) for path in directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(2, "no .safetensors files in the directory", str(directory))
    return files, None


def scan(path: str | os.PathLike[str], *, progress: Callable[[int, int], None] | None = None) -> Checkpoint:
    """Everything about a checkpoint's tensors but their data. `path` is a `.safetensors` file, a
    `*.safetensors.index.json`, or a directory (its adapter or model files, sharded or not, else
    every `*.safetensors` in it). `progress(done, total)` is called between batches of files.

    Raises FileNotFoundError/OSError for files that cannot be read and ValueError for malformed
    ones or an inconsistent index (a listed tensor its shard lacks, a tensor in two shards)."""
    root = Path(path)
    adapter_config = None
    weight_map: dict[str, str] | None = None
    metadata: dict[str, str] = {}
    if root.is_dir():
        files, index = _directory_files(root)
        config_path = root / "adapter_config.json"
        if config_path.is_file():
            adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    elif str(root).endswith(".index.json"):
        files, index = [], root
    else:
        files, index = [str(root)], None
    if index is not None:
        files, weight_map, metadata = _index_files(index)
    headers = _read(files, progress)
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[tuple[int, ...]] = []
    sizes: list[int] = []
    file_column: list[str] = []
    file_metadata: dict[str, dict[str, str]] = {}
    for file, (file_names, file_dtypes, file_shapes, file_sizes, file_meta, _size) in zip(
        files, headers, strict=True
    ):
        names += file_names
        dtypes += file_dtypes
        shapes += file_shapes
        sizes += file_sizes
        file_column += [file] * len(file_names)
        if file_meta is not None:
            file_metadata[file] = file_meta
    checkpoint = Checkpoint(
        str(path), (names, dtypes, shapes, sizes, file_column), files, metadata, file_metadata, adapter_config
    )
    if weight_map is not None:
        checkpoint._check_index(weight_map)
    elif len(files) == 1 and files[0] in file_metadata:
        checkpoint.metadata = file_metadata[files[0]]
    return checkpoint
