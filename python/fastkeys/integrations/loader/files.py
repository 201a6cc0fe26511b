"""Reading an adapter's tensors through the checks `scan` made, never by a second blind open.

Every file is opened with O_NONBLOCK and checked on the open descriptor: a regular file (a FIFO
swapped in after the scan is refused at once instead of blocking), inside the checkpoint directory
(the descriptor's own path, so a symlink swapped in after the scan cannot lead outside), and holding
the tensors, shapes and sizes the scan read from its header. Files are read in chunks, so Ctrl-C
interrupts a long read as a KeyboardInterrupt. PEFT's own loader is then fed these tensors
(`boundary.fed_tensors`) and never opens the checkpoint itself.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from fastkeys.checkpoints.scan import Checkpoint, _adapter_config, _inside, _regular_file, scan
from fastkeys.engine.pure.safetensors import MAX_HEADER_LEN, open_regular

SINGLE_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
CONFIG_FILE = "adapter_config.json"
_CHUNK = 64 << 20
# safetensors' dtype names -> torch's (the others, F4, F6_*, F8_E8M0 and the FNUZ floats, torch
# cannot hold here)
_TORCH_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "U16": "uint16", "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def read_checked(path: str, directory: Path) -> bytearray:
    """The whole of `path`, a regular file that resolves inside `directory` (as `scan` allows:
    a Hugging Face cache snapshot's links into its `blobs/` included), read once into one buffer."""
    with open_regular(path, named=True) as file:
        descriptor_path = f"/proc/self/fd/{file.fileno()}"
        real = os.readlink(descriptor_path) if os.path.exists(descriptor_path) else os.path.realpath(path)
        if not _inside(directory, real):
            raise ValueError(f"{path}: lies outside the checkpoint directory {directory}")
        size = os.fstat(file.fileno()).st_size
        data = bytearray(size)
        view = memoryview(data)
        reader: Any = file  # a binary file object: readinto, which typing.BinaryIO does not declare
        done = 0
        while done < size:
            read = reader.readinto(view[done : done + _CHUNK])
            if not read:
                break
            done += read
        grew = done == size and file.read(1)
        view.release()
    if done != size or grew:
        raise ValueError(f"{path}: the file changed while being read")
    return data


def read_tensors(
    checkpoint: Checkpoint, directory: Path, names: list[str] | None = None, *, own: bool = True
) -> dict[str, Any]:
    """The tensors `names` (all when None) of a scanned checkpoint, read from the files the scan
    checked, each as its header said (ValueError naming the file if it changed since). Each file is
    read once; with `own=False` the tensors are views of that buffer (for a caller that copies each
    one anyway), else each gets its own storage, as safetensors' loader gives them."""
    wanted = list(checkpoint) if names is None else names
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(checkpoint.shard_of(name), []).append(name)
    tensors: dict[str, Any] = {}
    for file, file_names in by_file.items():
        data = read_checked(file, directory)
        scanned = [checkpoint[name] for name in checkpoint if checkpoint.shard_of(name) == file]
        start, offsets = _layout(file, data, scanned)
        headers = {tensor.name: tensor for tensor in scanned}
        for name in file_names:
            header = headers[name]
            kind = getattr(torch, _TORCH_DTYPES.get(header.dtype, "-"), None)
            if not isinstance(kind, torch.dtype):
                raise ValueError(f"{file}: tensor {name!r} is {header.dtype}, which torch cannot hold")
            if header.nbytes == 0:
                tensor = torch.empty(header.shape, dtype=kind)
            else:
                count = header.nbytes // kind.itemsize
                tensor = torch.frombuffer(data, dtype=kind, count=count, offset=start + offsets[name])
                tensor = tensor.reshape(header.shape)
                if own:
                    tensor = tensor.clone()
            tensors[name] = tensor
    return tensors


def _layout(file: str, data: bytearray, scanned: list[Any]) -> tuple[int, dict[str, int]]:
    """(where the data starts, each tensor's offset in it) of a file read after `scan` validated
    its header: the scan's tensors (in file order, contiguous) laid out as the header it read, and
    ValueError naming the file unless the header read now says exactly that. A comparison with
    the scan's answer, not a second validation: C-speed JSON, not the engine's parser again."""
    if sys.byteorder != "little":
        raise ValueError(f"{file}: safetensors data is little-endian; this machine is not")
    length = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    start = len(data) - sum(tensor.nbytes for tensor in scanned)
    if length < 0 or length > MAX_HEADER_LEN or 8 + length != start:
        raise ValueError(f"{file}: its layout changed since the checkpoint was scanned")
    expected: dict[str, object] = {}
    offsets: dict[str, int] = {}
    position = 0
    for tensor in scanned:
        offsets[tensor.name] = position
        expected[tensor.name] = {
            "dtype": tensor.dtype,
            "shape": list(tensor.shape),
            "data_offsets": [position, position + tensor.nbytes],
        }
        position += tensor.nbytes
    try:
        found = json.loads(memoryview(data)[8:start].tobytes())
    except (ValueError, RecursionError) as error:  # not UTF-8 or not JSON (or nested past the limit)
        raise ValueError(f"{file}: not a safetensors file fastkeys can read ({error})") from None
    if isinstance(found, dict):
        found.pop("__metadata__", None)
    if found != expected:
        raise ValueError(f"{file}: its tensors changed since the checkpoint was scanned")
    return start, offsets


def has_safetensors(directory: Path) -> bool:
    return (directory / SINGLE_FILE).is_file() or any(directory.glob("*.safetensors.index.json"))


def read_bin(directory: Path) -> tuple[dict[str, object], dict[str, Any]]:
    """(adapter_config.json, tensors) of a directory holding `adapter_model.bin`, with the rules of
    `scan`: both regular files inside the directory, the config capped and checked, and the pickle
    read by torch's weights-only loader from the bytes checked."""
    culprit = str(directory)
    config_path = _regular_file(directory, CONFIG_FILE, culprit)
    if not os.path.lexists(config_path):
        raise FileNotFoundError(2, "the adapter has no adapter_config.json", config_path)
    config = _adapter_config(Path(config_path))
    path = _regular_file(directory, BIN_FILE, culprit)
    data = read_checked(path, directory)
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler raises many error types
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({error})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{path}: must hold a dict of named tensors")
    return config, tensors


def check_local(path: object) -> None:
    """Before a library (transformers, diffusers) reads a local checkpoint directory by path: the
    checks of `scan` (files inside the directory, regular files, the config capped and its
    expressions checked). Anything that is not a local directory (a Hub id, a dict) passes."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isdir(path):
        return
    directory = Path(path)
    if has_safetensors(directory) or any(directory.glob("*.safetensors")):
        scan(directory)
        return
    culprit = str(directory)
    _regular_file(directory, BIN_FILE, culprit)
    config_path = _regular_file(directory, CONFIG_FILE, culprit)
    if os.path.lexists(config_path):
        _adapter_config(Path(config_path))
