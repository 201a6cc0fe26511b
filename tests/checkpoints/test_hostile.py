"""Hostile checkpoints, configs, keys and expressions (issue 10; docs/hostile.md has the table).

What might block, run away or read where it must not runs in a child process with a timeout
and a memory cap (`_isolated`), so that a regression fails the test instead of hanging the suite.
Every test runs under both implementations (`make test` runs pytest twice).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import fastkeys
from fastkeys import KeyMatcher, filter_missing, read_keys, scan
from fastkeys.checkpoints.scan import MAX_CONFIG_BYTES, MAX_INDEX_BYTES
from fastkeys.cli import main as cli

LORA = "base_model.model.layers.0.q_proj.lora_A.default.weight"
TIMEOUT = 60  # seconds; each child needs well under 5
MEMORY = 2 << 30  # bytes of address space for a child


def _isolated(code: str) -> str:
    """Runs `code` (with `from fastkeys import *` done) in a child under the same implementation,
    with a timeout and a memory cap; returns its stdout. A hang or a runaway allocation fails."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    prelude = "import fastkeys\nfrom fastkeys import *\nfrom fastkeys import check_base, read_keys, scan\n"
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=limit,
        env={**os.environ, "FASTKEYS_IMPLEMENTATION": fastkeys.IMPLEMENTATION},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _outcome(call: str) -> str:
    """`call`'s outcome in a child: 'ok' or 'ExceptionType: message'."""
    return _isolated(
        f"""
        try:
            {call}
            print("ok")
        except Exception as error:
            print(f"{{type(error).__name__}}: {{error}}")
        """
    ).strip()


def _shard(path: Path, names: tuple[str, ...] = ("a.weight",)) -> Path:
    save_file({name: np.zeros(2, np.float32) for name in names}, str(path))
    return path


def _index(directory: Path, weight_map: dict[str, str]) -> Path:
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


# --- reading outside the checkpoint --------------------------------------------------------


@pytest.mark.parametrize("entry", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_an_index_cannot_name_a_file_outside_its_directory(tmp_path: Path, entry: str) -> None:
    outside = _shard(tmp_path / "outside.safetensors", ("secret.weight",))
    checkpoint = tmp_path / "ckpt"
    (checkpoint / "sub").mkdir(parents=True)
    entry = str(outside) if entry == "ABSOLUTE" else entry
    index = _index(checkpoint, {"secret.weight": entry})
    with pytest.raises(ValueError, match=r"weight_map entry 'secret\.weight'") as error:
        scan(index)
    assert str(index) in str(error.value) and "outside the checkpoint directory" in str(error.value)


def test_a_symlink_out_of_the_checkpoint_is_refused_and_one_inside_is_followed(tmp_path: Path) -> None:
    outside = _shard(tmp_path / "outside.safetensors", ("secret.weight",))
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "link.safetensors").symlink_to(outside)
    with pytest.raises(ValueError, match=r"'link\.safetensors' lies outside the checkpoint directory"):
        scan(_index(checkpoint, {"secret.weight": "link.safetensors"}))
    with pytest.raises(ValueError, match=r"'link\.safetensors' lies outside"):
        scan(checkpoint)  # a directory scan checks every file it would read
    (checkpoint / "link.safetensors").unlink()
    _shard(checkpoint / "real.safetensors")
    (checkpoint / "link.safetensors").symlink_to("real.safetensors")
    assert list(scan(_index(checkpoint, {"a.weight": "link.safetensors"}))) == ["a.weight"]


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    _shard(repo / "blobs" / "5f1e0d")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/5f1e0d")
    index = _index(snapshot, {"a.weight": "model-00001-of-00001.safetensors"})
    assert list(scan(index)) == ["a.weight"]
    assert list(scan(snapshot)) == ["a.weight"]


def test_errors_never_quote_the_bytes_of_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "id_rsa.safetensors"
    secret.write_bytes(b"SECRET!!" + b"x" * 100)
    for_number = str(int.from_bytes(b"SECRET!!", "little"))
    with pytest.raises(ValueError) as error:
        read_keys(secret)
    assert for_number not in str(error.value) and "SECRET" not in str(error.value)
    assert "the header length exceeds the limit" in str(error.value)
    small = tmp_path / "small.safetensors"
    small.write_bytes(struct.pack("<Q", 500) + b"{}")
    with pytest.raises(ValueError, match=r"the header length runs past the end of the file \(10 bytes\)$"):
        read_keys(small)


# --- only regular files; bounded, interruptible reads -----------------------------------------


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    expected = "ValueError: {}: not a regular file (a FIFO, socket or device); only regular files are read"
    assert _outcome(f"read_keys({str(fifo)!r})") == expected.format(fifo)
    assert _outcome(f"scan({str(fifo)!r})") == expected.format(fifo)
    # In a scanned directory, and named by an index: refused by stat, never opened.
    assert (
        _outcome(f"scan({str(tmp_path)!r})")
        == f"ValueError: {tmp_path}: 'model.safetensors' is not a regular file"
    )
    index = _index(tmp_path, {"a.weight": "model.safetensors"})
    assert _outcome(f"scan({str(index)!r})").endswith(
        "weight_map entry 'a.weight': 'model.safetensors' is not a regular file"
    )


def test_devices_are_refused(tmp_path: Path) -> None:
    assert _outcome("read_keys('/dev/zero')").startswith("ValueError: /dev/zero: not a regular file")
    index = tmp_path / "model.safetensors.index.json"
    index.symlink_to("/dev/zero")  # read until memory ran out, before
    assert (
        _outcome(f"scan({str(index)!r})")
        == f"ValueError: {index}: not a regular file (a FIFO, socket or device); only regular files are read"
    )


def test_json_files_have_a_size_cap(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    with open(index, "wb") as file:  # sparse: the cap is checked before a byte is read
        file.truncate(MAX_INDEX_BYTES + 1)
    with pytest.raises(ValueError, match=f"more than the limit of {MAX_INDEX_BYTES}"):
        scan(index)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    _shard(adapter / "adapter_model.safetensors")
    with open(adapter / "adapter_config.json", "wb") as file:
        file.truncate(MAX_CONFIG_BYTES + 1)
    with pytest.raises(ValueError, match=rf"adapter_config.json: {MAX_CONFIG_BYTES + 1} bytes, more than"):
        scan(adapter)


@pytest.mark.parametrize(
    ("argument", "error", "message"),
    [
        ("a\0b", ValueError, "contains a NUL byte"),
        (b"model.safetensors", TypeError, "path must be str or os.PathLike.str., not bytes"),
        (1, TypeError, "path must be str or os.PathLike.str., not int"),
        (None, TypeError, "not NoneType"),
    ],
)
def test_path_arguments(argument: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        read_keys(argument)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        scan(argument)  # type: ignore[arg-type]
    os.fstat(1)  # `read_keys(1)` once read stdout as a file and closed it


# --- regular expressions: linear in both implementations ---------------------------------------

CATASTROPHIC = ["(a+)+$", "(a|aa)+$", "(.*a){12}$", "(a*)*b", "(.+)+X", "(x+x+)+y"]


def test_catastrophic_ignore_patterns_take_linear_time() -> None:
    keys = ["a" * 5_000 + ".lora_A.default", "x" * 5_000 + ".lora_A.default." + "a" * 5_000 + "!"]
    out = _isolated(
        f"""
        keys = {keys!r}
        for pattern in {CATASTROPHIC!r}:
            print(len(filter_missing(keys, ignore=[pattern])))
        print(filter_missing(["m." + "a" * 200_000 + ".lora_A.default"], ignore=["a*b"]) != [])
        """
    )
    # `re` agrees on what these match; it only takes exponential (or quadratic) time about it.
    assert out.split() == ["2", "2", "2", "2", "2", "2", "True"]


def test_a_catastrophic_target_modules_or_layers_pattern_in_check(tmp_path: Path) -> None:
    base = tmp_path / "base.safetensors"
    _shard(base, ("model.layers.0." + "x" * 3_000 + ".weight", "model.layers.1.q_proj.weight"))
    for field, value in (("target_modules", "(.+)+X"), ("layers_pattern", "(.+)+X")):
        adapter = tmp_path / field
        adapter.mkdir()
        _shard(
            adapter / "adapter_model.safetensors", ("base_model.model.model.layers.1.q_proj.lora_A.weight",)
        )
        config = {"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [1]}
        config[field] = value
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        kinds = _isolated(f"print(sorted({{f.kind for f in check_base({str(base)!r}, {str(adapter)!r})}}))")
        assert kinds.strip() == ("['unmatched_target']" if field == "target_modules" else "[]")


def test_target_modules_and_layers_pattern_follow_peft() -> None:
    from fastkeys.rules.targets import in_layers as _in_layers
    from fastkeys.rules.targets import selects as _selects

    names = ["model.layers.3.self_attn.q_proj", "model.h.12.attn.c_attn", "encoder.block.0.layer.1.k"]
    for target in [r".*\.q_proj", r"model\.(h|layers)\.\d+\..*", "q_proj|c_attn", r"(?i)MODEL.*"]:
        assert [_selects(target, n) for n in names] == [re.fullmatch(target, n) is not None for n in names]
    config: dict[str, object] = {"layers_to_transform": [3, 12]}
    assert [_in_layers(config, n) for n in names] == [True, True, False]

    def peft(pattern: str, name: str) -> bool:  # PEFT 0.21's check_target_module_exists
        found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        return found is not None and found.group("idx") is not None and int(found.group("idx")) in (3, 12)

    for pattern in ("layers", "h", "(?:h|layers)", "h|block", "lay.*", "block"):
        assert [_in_layers({**config, "layers_pattern": pattern}, n) for n in names] == [
            peft(pattern, n) for n in names
        ]
    with pytest.raises(ValueError, match="target_modules must be a str or a list of str, not int"):
        _selects(5, "a")


@pytest.mark.parametrize(
    ("key", "pattern", "dropped"),
    [
        ("m.lora_A.default.\u212a", "(?i)k", False),  # the Kelvin sign: k in both engines' own (?i)
        ("m.lora_A.default.\u017f", "(?i)s", False),  # long s
        ("m.lora_A.default.\u0130", "(?i)i", False),  # dotted capital I
        ("m.lora_A.default.\u0131", "(?i)I", False),  # dotless small i
        ("m.lora_A.default.Q", "(?i)q", True),
        ("m.lora_A.default.q", "(?i)[P-R]", True),
        ("m.lora_A.default.q", r"(?i)\.[^Q]$", False),
        ("m.lora_A.default.Q", "(?i:q)", True),
        ("m.lora_A.default.Q", "(?i:(?-i:q))", False),
    ],
)
def test_case_folding_is_ascii_only_and_alike(key: str, pattern: str, dropped: bool) -> None:
    assert filter_missing([key], ignore=[pattern]) == ([] if dropped else [key])


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(?i)ä", r"'ä' has other cases; \(\?i\) folds ASCII letters only"),
        ("(?i)[ß-ÿ]", r"a range with non-ASCII letters under \(\?i\)"),
        ("a(?i)b", "flags go at the start"),
        ("(?:.{1000}){6}", r"it is too large \(6000 atoms"),
    ],
)
def test_what_cannot_be_read_alike_is_refused(pattern: str, reason: str) -> None:
    with pytest.raises(ValueError, match=f"ignore.0. .* is not an expression fastkeys accepts: {reason}"):
        filter_missing([LORA], ignore=[pattern])


def test_large_patterns_are_refused_together_and_accepted_ones_compile_in_both() -> None:
    assert filter_missing([LORA], ignore=[r"(?:\W{1000}){5}"]) == [LORA]  # the native side refused this
    assert filter_missing([LORA], ignore=[r"(?:.{1000}){2}"] * 2) == [LORA]
    with pytest.raises(ValueError, match=r"ignore.2. .* the expressions together are too large .6000"):
        filter_missing([LORA], ignore=[r"(?:.{1000}){2}"] * 3)


# --- the CLI ----------------------------------------------------------------------------------


def _check_dir(tmp_path: Path, config: object) -> tuple[Path, Path]:
    base = _shard(tmp_path / "base.safetensors", ("model.layers.0.q_proj.weight",))
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    _shard(adapter / "adapter_model.safetensors", ("base_model.model.model.layers.0.q_proj.lora_A.weight",))
    text = config if isinstance(config, (str, bytes)) else json.dumps(config)
    (adapter / "adapter_config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return base, adapter


HOSTILE_CONFIGS = [
    ([1, 2], "adapter_config.json: must be a JSON object, not list"),
    ({"peft_type": "LORA", "target_modules": 5}, "'target_modules' must be str or a list of str, not int"),
    ({"peft_type": "LORA", "target_modules": ["q", 1]}, "a list holding int, str"),
    ({"peft_type": "LORA", "target_modules": "(?=x)"}, "target_modules '(?=x)' is not an expression"),
    ({"peft_type": "LORA", "layers_pattern": "[", "target_modules": ["q"]}, "layers_pattern '[' is not"),
    ({"peft_type": "LORA", "layers_to_transform": "0"}, "'layers_to_transform' must be int or a list of int"),
    ({"peft_type": 7}, "'peft_type' must be str, not int"),
    ({"peft_type": "NOPE"}, "adapter_config.json: unknown peft_type 'NOPE'"),
    ("{not json", "adapter_config.json: invalid JSON"),
    ("[" * 100_000, "adapter_config.json: invalid JSON (nested too deeply"),
    ('{"peft_type": "LORA", "r": 1' + "0" * 5000 + "}", "adapter_config.json: invalid JSON"),
    (b"\xff\xfe{}", "adapter_config.json: not UTF-8"),
]


@pytest.mark.parametrize(("config", "message"), HOSTILE_CONFIGS)
def test_cli_exits_2_with_one_line_and_a_json_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: object, message: str
) -> None:
    base, adapter = _check_dir(tmp_path, config)
    assert cli.main(["check", str(base), str(adapter)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("fastkeys check: ")
    assert message in err, err
    assert cli.main(["check", "--json", str(base), str(adapter)]) == 2
    out, err = capsys.readouterr()
    # One object per adapter (fastkeys check takes many); an unusable one carries its error.
    (error,) = json.loads(out)
    assert error["status"] == 2 and message in error["error"] and error["type"]
    assert error["adapter"] == str(adapter)


def test_cli_errors_for_missing_and_unreadable_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["inspect", "--json", str(tmp_path / "absent.safetensors")]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out)["type"] == "FileNotFoundError"
    assert err == f"fastkeys inspect: {tmp_path / 'absent.safetensors'}: No such file or directory\n"
    os.mkfifo(tmp_path / "fifo.safetensors")
    assert cli.main(["inspect", str(tmp_path / "fifo.safetensors")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_cli_never_shows_a_traceback_and_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    base, adapter = _check_dir(tmp_path, [1])
    command = [sys.executable, "-m", "fastkeys", "check", str(base), str(adapter)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    base, adapter = _check_dir(tmp_path, {"peft_type": "LORA", "target_modules": ["nothing_here"]})
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # `| head -0`: the reader is gone before anything is written
    _, err = child.communicate(timeout=TIMEOUT)
    assert child.returncode == 1 and err == b""  # findings, and nothing else said


# --- one behaviour in both implementations ---------------------------------------------------


class _Liar(str):
    """A str whose methods answer otherwise than its value."""

    def split(self, *args: object, **kwargs: object) -> list[str]:
        return ["lora_A", "default"]

    def find(self, *args: object, **kwargs: object) -> int:
        return -1

    def startswith(self, *args: object, **kwargs: object) -> bool:
        return True

    def __getitem__(self, index: object) -> str:
        return "lora_A"

    def __str__(self) -> str:
        return "lora_A.default"


def test_str_subclasses_are_read_by_their_value() -> None:
    keys = [_Liar(LORA), _Liar("base.weight"), LORA]
    kept = filter_missing(keys)
    assert kept == [LORA, LORA] and kept[0] is keys[0]
    assert KeyMatcher(["lora_"]).group(keys) == {"default": [LORA, LORA]}
    renamed = fastkeys.insert_adapter_name([_Liar("m.lora_A.weight"), keys[1]], "x")
    assert renamed == ["m.lora_A.x.weight", "base.weight"] and renamed[1] is keys[1]
    assert fastkeys.remove_adapter_name(keys, "default") == [
        "base_model.model.layers.0.q_proj.lora_A.weight",
        "base.weight",
        "base_model.model.layers.0.q_proj.lora_A.weight",
    ]


def test_key_matcher_is_immutable_and_not_pickled() -> None:
    matcher = KeyMatcher(["lora_"], ["default"])
    with pytest.raises(AttributeError):
        matcher._prefixes = ("x",)  # type: ignore[attr-defined]
    with pytest.raises(AttributeError):
        matcher.anything = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="cannot pickle"):
        pickle.dumps(matcher)
    assert matcher.filter([LORA, "x.lora_A.other"]) == [LORA]


def test_an_iterable_whose_iter_raises_is_a_type_error() -> None:
    class Broken:
        def __iter__(self) -> object:
            raise RuntimeError("boom")

    with pytest.raises(TypeError, match="keys must be an iterable of str, not Broken"):
        filter_missing(Broken())
