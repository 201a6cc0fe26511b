"""Header-only reading: read_keys and scan against the safetensors package, and bad files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import fastkeys
from fastkeys import read_keys, scan
from tests.conftest import examples


def write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


TENSORS: dict[str, np.ndarray] = {
    "b.weight": np.zeros((2, 3), dtype=np.float16),
    "a.weight": np.ones((4,), dtype=np.float32),
    "c.bias": np.zeros((1, 1, 2), dtype=np.int8),
    "d.flag": np.zeros((3,), dtype=np.bool_),
    "e.empty": np.zeros((0, 5), dtype=np.float64),
}


def test_read_keys_matches_safetensors(tmp_path: Path) -> None:
    path = write(tmp_path / "one.safetensors", TENSORS, {"format": "np", "note": "ä"})
    with safe_open(str(path), "np") as handle:
        assert read_keys(path) == handle.offset_keys()
        assert sorted(read_keys(str(path))) == sorted(handle.keys())
        checkpoint = scan(path)
        assert checkpoint.metadata == handle.metadata()
        for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
            piece = handle.get_slice(name)
            assert checkpoint[name].dtype == piece.get_dtype()
            assert list(checkpoint[name].shape) == piece.get_shape()
            assert checkpoint[name].nbytes == TENSORS[name].nbytes
    assert checkpoint.files == [str(path)]
    assert checkpoint.total_bytes == sum(t.nbytes for t in TENSORS.values())


def test_no_metadata_and_empty_file(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.safetensors", {})
    assert read_keys(empty) == []
    assert scan(empty).metadata == {}


def _sharded(tmp_path: Path) -> Path:
    shards: dict[str, dict[str, np.ndarray]] = {
        "model-00001-of-00002.safetensors": {
            "x.0.weight": np.zeros(2, np.float32),
            "x.1.weight": np.zeros(3, np.float32),
        },
        "model-00002-of-00002.safetensors": {"x.2.weight": np.zeros(4, np.float16)},
    }
    weight_map: dict[str, str] = {}
    for file, tensors in shards.items():
        write(tmp_path / file, tensors, {"format": "np"})
        weight_map.update(dict.fromkeys(tensors, file))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 36}, "weight_map": weight_map}))
    return index


def test_sharded_index_and_directory(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    for target in (index, tmp_path):
        checkpoint = scan(target)
        assert list(checkpoint) == ["x.0.weight", "x.1.weight", "x.2.weight"]
        assert checkpoint.shard_of("x.2.weight").endswith("model-00002-of-00002.safetensors")
        assert checkpoint.metadata == {"total_size": "36"}
        assert len(checkpoint.files) == 2
        assert all(meta == {"format": "np"} for meta in checkpoint.file_metadata.values())


def test_index_inconsistencies_name_key_and_file(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    data = json.loads(index.read_text())
    data["weight_map"]["x.9.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"lists tensor 'x\.9\.weight' in .*model-00001-of-00002.* does not hold it"
    ):
        scan(index)
    del data["weight_map"]["x.9.weight"]
    data["weight_map"]["x.1.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"lists tensor 'x\.1\.weight' in .*00002.*, but it is in .*00001"):
        scan(index)
    data["weight_map"]["x.1.weight"] = "model-00001-of-00002.safetensors"
    data["weight_map"]["x.2.weight"] = "model-00003-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(
        FileNotFoundError, match=r"shard 'model-00003-of-00002.safetensors' listed for tensor 'x\.2\.weight'"
    ):
        scan(index)


def test_a_tensor_in_two_shards(tmp_path: Path) -> None:
    write(tmp_path / "a.safetensors", {"same": np.zeros(1, np.float32)})
    write(tmp_path / "b.safetensors", {"same": np.zeros(1, np.float32)})
    with pytest.raises(
        ValueError, match=r"tensor 'same' is in two shards: .*a\.safetensors and .*b\.safetensors"
    ):
        scan(tmp_path)


def test_directory_and_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \.safetensors files"):
        scan(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        read_keys(tmp_path / "absent.safetensors")
    assert error.value.filename == str(tmp_path / "absent.safetensors")
    with pytest.raises(IsADirectoryError if fastkeys.IMPLEMENTATION == "python" else OSError):
        read_keys(tmp_path)


def _raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
    return path


def _entry(
    dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None
) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape if shape is not None else [1], "data_offsets": offsets or [0, 4]}


MALFORMED = [
    ("truncated", lambda p: p.write_bytes(b"\x10\x00\x00"), "fewer than the 8"),
    ("header past the end", lambda p: _raw(p, b"{}", length=4096), "runs past the end of the file"),
    ("header length 2^63", lambda p: _raw(p, b"{}", length=2**63), "exceeds the limit of 100000000"),
    ("invalid JSON", lambda p: _raw(p, b"{not json"), "invalid header JSON"),
    ("not UTF-8", lambda p: _raw(p, b'{"\xff": 1}'), "not UTF-8"),
    ("JSON array", lambda p: _raw(p, b"[1, 2]"), "expected a JSON object"),
    (
        "unknown dtype",
        lambda p: _raw(p, json.dumps({"t": _entry("F99")}).encode(), b"\0" * 4),
        'tensor "t": unknown variant `F99`',
    ),
    (
        "negative dim",
        lambda p: _raw(p, json.dumps({"t": _entry(shape=[-1])}).encode(), b"\0" * 4),
        'tensor "t": invalid',
    ),
    (
        "offsets outside",
        lambda p: _raw(p, json.dumps({"t": _entry(offsets=[0, 8])}).encode(), b"\0" * 4),
        "outside the data buffer",
    ),
    (
        "offsets vs shape",
        lambda p: _raw(p, json.dumps({"t": _entry(shape=[2])}).encode(), b"\0" * 4),
        "needs 8",
    ),
    (
        "reversed offsets",
        lambda p: _raw(p, json.dumps({"t": _entry(offsets=[4, 0])}).encode(), b"\0" * 4),
        "end before they begin",
    ),
    (
        "duplicate names",
        lambda p: _raw(
            p,
            b'{"t": ' + json.dumps(_entry()).encode() + b', "t": ' + json.dumps(_entry()).encode() + b"}",
            b"\0" * 4,
        ),
        'duplicate entry "t"',
    ),
    (
        "metadata not strings",
        lambda p: _raw(p, b'{"__metadata__": {"a": 1}}'),
        "__metadata__ must map strings to strings",
    ),
    (
        "metadata a list",
        lambda p: _raw(p, b'{"__metadata__": ["a"]}'),
        "__metadata__ must map strings to strings",
    ),
    (
        "uncovered buffer",
        lambda p: _raw(p, json.dumps({"t": _entry()}).encode(), b"\0" * 8),
        "cover 4 bytes of a data buffer of 8",
    ),
    (
        "overlap",
        lambda p: _raw(p, json.dumps({"t": _entry(), "u": _entry()}).encode(), b"\0" * 8),
        "leave a gap or overlap",
    ),
    (
        "half bytes",
        lambda p: _raw(p, json.dumps({"t": _entry("F4", [1], [0, 0])}).encode()),
        "does not fill whole bytes",
    ),
    ("entry not an object", lambda p: _raw(p, b'{"t": 5}'), 'tensor "t": invalid type'),
    ("deep nesting", lambda p: _raw(p, b"[" * 100_000 + b"]" * 100_000), "invalid header JSON"),
]


@pytest.mark.parametrize(("label", "make", "message"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_files_are_value_errors_naming_file_and_problem(
    label: str, make: object, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "bad.safetensors"
    make(path)  # type: ignore[operator]
    with pytest.raises(ValueError) as error:
        read_keys(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)
    with pytest.raises(ValueError):
        scan(path)


@settings(max_examples=examples(300), deadline=None)
@given(data=st.binary(max_size=64))
def test_garbage_never_crashes(data: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(data)
    try:
        read_keys(path)
    except ValueError as error:
        assert str(path) in str(error)
