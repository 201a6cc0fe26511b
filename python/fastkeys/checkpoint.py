"""Checkpoints known from their headers alone: `read_keys`, `scan` and `Checkpoint`.

Only the 8-byte length and the JSON header of each `.safetensors` file are read, never the tensor
data; many shards are read in parallel with the GIL released (native implementation).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ._engine import core

__all__ = ["Checkpoint", "Tensor", "read_keys", "scan"]

_BATCH = 16  # files per progress step


class Tensor:
    """A tensor as its header describes it."""

    __slots__ = ("dtype", "file", "name", "nbytes", "shape")

    def __init__(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, file: str) -> None:
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.nbytes = nbytes
        self.file = file

    def __repr__(self) -> str:
        return f"Tensor({self.name!r}, {self.dtype}, {list(self.shape)}, {self.nbytes} bytes, {self.file!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tensor) and (self.name, self.dtype, self.shape, self.nbytes, self.file) == (
            other.name,
            other.dtype,
            other.shape,
            other.nbytes,
            other.file,
        )

    __hash__ = None  # type: ignore[assignment]


class Checkpoint(Mapping[str, Tensor]):
    """The tensors of a checkpoint by name, in file order (shard by shard), with their files and
    metadata. `adapter_config` holds `adapter_config.json` when the checkpoint is a directory
    that has one."""

    def __init__(
        self,
        path: str,
        tensors: dict[str, Tensor],
        files: list[str],
        metadata: dict[str, str],
        file_metadata: dict[str, dict[str, str]],
        adapter_config: dict[str, object] | None = None,
    ) -> None:
        self.path = path
        self.tensors = tensors
        self.files = files
        self.metadata = metadata
        self.file_metadata = file_metadata
        self.adapter_config = adapter_config

    def __getitem__(self, name: str) -> Tensor:
        return self.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def shard_of(self, name: str) -> str:
        return self.tensors[name].file

    @property
    def total_bytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors.values())

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}: {len(self.tensors)} tensors in {len(self.files)} files)"


def read_keys(path: str | os.PathLike[str]) -> list[str]:
    """The tensor names of one `.safetensors` file, in file (data offset) order."""
    ((names, *_),) = core.read_headers([path])
    return names  # type: ignore[no-any-return]


HeaderReader = Callable[[list[str]], Any]


def _read(
    files: list[str], progress: Callable[[int, int], None] | None, read_headers: HeaderReader
) -> list[tuple[object, ...]]:
    if progress is None or len(files) <= _BATCH:
        return list(read_headers(files))
    headers: list[tuple[object, ...]] = []
    for start in range(0, len(files), _BATCH):
        headers += read_headers(files[start : start + _BATCH])
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
    return _scan(path, progress, core.read_headers)


def _scan(
    path: str | os.PathLike[str], progress: Callable[[int, int], None] | None, read_headers: HeaderReader
) -> Checkpoint:
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
    headers = _read(files, progress, read_headers)
    tensors: dict[str, Tensor] = {}
    file_metadata: dict[str, dict[str, str]] = {}
    for file, (names, dtypes, shapes, sizes, file_meta, _size) in zip(files, headers, strict=True):
        for name, dtype, shape, nbytes in zip(names, dtypes, shapes, sizes, strict=True):  # type: ignore[call-overload]
            if name in tensors:
                raise ValueError(f"tensor {name!r} is in two shards: {tensors[name].file} and {file}")
            tensors[name] = Tensor(name, dtype, shape, nbytes, file)
        if file_meta is not None:
            file_metadata[file] = file_meta  # type: ignore[assignment]
    if weight_map is not None:
        for name, file in weight_map.items():
            found = tensors.get(name)
            if found is None:
                raise ValueError(
                    f"the index lists tensor {name!r} in {file}, but that shard does not hold it"
                )
            if found.file != file:
                raise ValueError(f"the index lists tensor {name!r} in {file}, but it is in {found.file}")
    elif len(files) == 1 and files[0] in file_metadata:
        metadata = file_metadata[files[0]]
    return Checkpoint(str(path), tensors, files, metadata, file_metadata, adapter_config)
