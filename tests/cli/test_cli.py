"""The command line: fastkeys demo / inspect / check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import fastkeys
from fastkeys.cli import main as cli


def _adapter(
    directory: Path, out: int = 8, inp: int = 6, r: int = 2, targets: list[str] | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"base_model.model.layers.{i}.q_proj.lora_{ab}.weight": np.zeros(shape, np.float32)
        for i in range(2)
        for ab, shape in (("A", (r, inp)), ("B", (out, r)))
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "target_modules": targets or ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def _base(path: Path, out: int = 8, inp: int = 6) -> Path:
    tensors: dict[str, np.ndarray] = {
        f"layers.{i}.q_proj.weight": np.zeros((out, inp), np.float16) for i in range(2)
    }
    tensors["layers.0.norm.weight"] = np.zeros(inp, np.float16)
    save_file(tensors, str(path))
    return path


def test_inspect_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = _adapter(tmp_path / "adapter")
    assert cli.main(["inspect", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "4 tensors, 224 bytes in 1 file(s)" in text
    assert "methods: lora/adalora: 4" in text
    assert "adapter_config: peft_type: LORA" in text
    assert cli.main(["inspect", "--json", str(adapter)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == 4 and report["dtypes"] == {"F32": 4}
    assert report["metadata"] == {"format": "pt"}


def test_inspect_model_keys_show_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = {f"m.q.lora_A.{name}.weight": np.zeros(2, np.float32) for name in ("default", "foo", "foobar")}
    tensors["m.q.randlora_A.bar"] = np.zeros(2, np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert cli.main(["inspect", "--json", str(tmp_path / "model.safetensors")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapters"] == {"default": 1, "foo": 1, "foobar": 1, "bar": 1}
    assert report["methods"] == {"lora/adalora": 3, "randlora": 1}


def test_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _base(tmp_path / "base.safetensors")
    assert cli.main(["check", str(base), str(_adapter(tmp_path / "good"))]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'good'} fits {base}: 2 modules (q_proj) in 2 layers\n"
    assert cli.main(["check", str(base), str(_adapter(tmp_path / "wide", out=16))]) == 1
    out = capsys.readouterr().out
    assert (
        "[shape] base_model.model.layers.0.q_proj.lora_B.weight: expected [8, r] for a base weight [8, 6]"
        in out
    )
    assert (
        cli.main(["check", "--json", str(base), str(_adapter(tmp_path / "t", targets=["q_proj", "k_proj"]))])
        == 1
    )
    (report,) = json.loads(capsys.readouterr().out)
    assert report == {
        "adapter": str(tmp_path / "t"),
        "status": 1,
        "coverage": {"modules": 2, "layers": 2, "kinds": {"q_proj": 2}},
        "findings": [
            {
                "kind": "unmatched_target",
                "key": "k_proj",
                "message": "target_modules entry 'k_proj' matches no base module",
            }
        ],
    }
    assert cli.main(["check", str(tmp_path / "absent.safetensors"), str(tmp_path / "good")]) == 2
    assert "No such file or directory" in capsys.readouterr().err
    (tmp_path / "garbage.safetensors").write_bytes(b"garbage!garbage")
    assert cli.main(["check", str(tmp_path / "garbage.safetensors"), str(tmp_path / "good")]) == 2
    assert "exceeds the limit of 100000000 bytes" in capsys.readouterr().err


def test_progress_only_at_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(40):
        save_file({f"t{i}": np.zeros(1, np.float32)}, str(tmp_path / f"s{i:02d}.safetensors"))
    assert cli.main(["inspect", str(tmp_path)]) == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "scanning shards: 16/40" in err and err.endswith("40/40\n")


def test_python_dash_m_and_demo() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastkeys", "demo", "--layers", "4", "--adapters", "20"],
        capture_output=True, text=True, check=False, env=os.environ.copy(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "fastkeys.filter_missing keeps 0: nothing is wrong" in done.stdout
    timing = done.stdout.split("Median of 5 interleaved rounds:", 1)[1].splitlines()
    labels = [line.split("  ")[1].strip() for line in timing if "ns/key" in line]
    assert labels == ["fastkeys.filter_missing", "PEFT's substring loop", "floor: [k for k in keys]"]
    assert f"implementation: {fastkeys.IMPLEMENTATION}" in done.stdout


def test_the_benchmark_suite_is_not_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The suite lives in benches/ (a source checkout), not in the installed package."""
    assert cli.main(["bench"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("fastkeys: error: argument command: invalid choice: 'bench'")


# --- usage errors: one line, and the JSON object with --json ------------------------------------

REQUIRED = "error: the following arguments are required:"
USAGE_ERRORS = [
    # (argv, whether it asks for --json, the line on stderr; the JSON "error" is after "error: ")
    (["check"], False, f"fastkeys check: {REQUIRED} base, adapter"),
    (["check", "--json"], True, f"fastkeys check: {REQUIRED} base, adapter"),
    (["check", "b", "--js"], True, f"fastkeys check: {REQUIRED} adapter"),  # as argparse reads it
    (["inspect", "--bogus", "x"], False, "fastkeys inspect: error: unrecognized arguments: --bogus"),
    (["inspect", "--json", "--bogus", "x"], True, "fastkeys inspect: error: unrecognized arguments: --bogus"),
    (["inspect", "x", "y", "--json"], True, "fastkeys inspect: error: unrecognized arguments: y"),
    (["demo", "--json"], True, "fastkeys demo: error: unrecognized arguments: --json"),
    (["demo", "--layers", "x"], False, "fastkeys demo: error: argument --layers: invalid int value: 'x'"),
    (["bench"], False, "fastkeys: error: argument command: invalid choice: 'bench'"),
    (["--json", "bench"], True, "fastkeys: error: argument command: invalid choice: 'bench'"),
    ([], False, f"fastkeys: {REQUIRED} command"),
]


@pytest.mark.parametrize(
    ("argv", "json_wanted", "line"), USAGE_ERRORS, ids=[" ".join(case[0]) or "-" for case in USAGE_ERRORS]
)
def test_usage_errors_are_one_line_and_a_json_object(
    capsys: pytest.CaptureFixture[str], argv: list[str], json_wanted: bool, line: str
) -> None:
    """argparse's errors follow the contract of every other error: exit 2, one line on stderr (no
    usage line); with --json anywhere in argv, the object {"error", "type", "exit_code"} on stdout.
    (The lines are prefixes: Python versions word the choices differently.)"""
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(line) and err.count("\n") == 1 and err.endswith("\n"), err
    if not json_wanted:
        assert out == ""
        return
    message = err.rstrip("\n").split(": error: ", 1)[1]
    assert json.loads(out) == {"error": message, "type": "UsageError", "exit_code": 2}
    assert out.count("\n") == 1


def test_a_usage_error_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    done = _fastkeys(["check", "--json"])
    assert done.returncode == 2
    assert done.stderr == b"fastkeys check: error: the following arguments are required: base, adapter\n"
    assert json.loads(done.stdout)["type"] == "UsageError"
    with pytest.raises(SystemExit) as stopped:  # --help is unchanged
        cli.main(["check", "--help"])
    assert stopped.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fastkeys check [-h] [--values] [--json] base")


# --- stdout closed, gone or failing; stderr closed ----------------------------------------------

# Python buffers stdout that is not a terminal unless PYTHONUNBUFFERED is set (as it may be where
# the suite runs). The children run buffered, as from a user's shell: then a write can fail as late
# as the interpreter's exit (`Exception ignored ...`, exit 120) as well as in a print.
_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
FASTKEYS = [sys.executable, "-m", "fastkeys"]
TIMEOUT = 60


def _fastkeys(argv: list[str], redirect: str = "") -> subprocess.CompletedProcess[bytes]:
    """`python -m fastkeys ARGV REDIRECT` in sh, stdout and stderr captured unless redirected
    (`>&-` closes fd 1: subprocess' DEVNULL would not)."""
    command = ["sh", "-c", f'exec "$@" {redirect}', "sh", *FASTKEYS, *argv]
    return subprocess.run(command, capture_output=True, env=_ENV, timeout=TIMEOUT, check=False)


def _answers(tmp_path: Path) -> list[tuple[list[str], int]]:
    """Commands and the exit code of their answer: clean (0) and findings (1), text and --json."""
    base = str(_base(tmp_path / "base.safetensors"))
    good = str(_adapter(tmp_path / "good"))
    wide = str(_adapter(tmp_path / "wide", out=16))
    return [
        (["inspect", good], 0),
        (["inspect", "--json", good], 0),
        (["check", base, good], 0),
        (["check", base, wide], 1),
        (["check", "--json", base, wide], 1),
        (["check", "--json", base, good, wide], 1),
        (["--help"], 0),
    ]


@pytest.mark.parametrize("redirect", [">&-", "1</dev/null"], ids=["closed", "read-only"])
def test_a_closed_stdout_ends_quietly_with_the_answers_code(tmp_path: Path, redirect: str) -> None:
    """`fastkeys inspect CKPT >&-`: Python starts with sys.stdout None; a stdout open for reading
    only fails each write (EBADF). Neither is an error of the input: the answer's exit code,
    nothing said (before: exit 2, `internal error (AttributeError ...)` or `Bad file descriptor`)."""
    for argv, code in _answers(tmp_path):
        done = _fastkeys(argv, redirect)
        assert (done.returncode, done.stderr) == (code, b""), argv
    # An unusable input is still one line and exit 2; its JSON object goes nowhere.
    done = _fastkeys(["inspect", "--json", str(tmp_path / "absent")], redirect)
    assert done.returncode == 2
    assert done.stderr == f"fastkeys inspect: {tmp_path / 'absent'}: No such file or directory\n".encode()
    done = _fastkeys(["check", "--json"], redirect)
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1


def test_a_reader_gone_before_or_during_the_output_ends_quietly(tmp_path: Path) -> None:
    """`| head -0` (the reader gone before the first write) and `| head -1` (gone mid-output:
    ~240 kB, more than a pipe holds, so the writer meets the closed pipe)."""
    for argv, code in _answers(tmp_path):
        read, write = os.pipe()
        os.close(read)
        with os.fdopen(write, "wb") as gone:
            done = subprocess.run(
                [*FASTKEYS, *argv],
                stdout=gone,
                stderr=subprocess.PIPE,
                env=_ENV,
                timeout=TIMEOUT,
                check=False,
            )
        assert (done.returncode, done.stderr) == (code, b""), argv
    many = _adapter(tmp_path / "many", targets=["q_proj", *(f"module_{i}" for i in range(3000))])
    for json_flag in ([], ["--json"]):
        command = [*FASTKEYS, "check", *json_flag, str(tmp_path / "base.safetensors"), str(many)]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_ENV) as child:
            assert child.stdout is not None and child.stderr is not None
            assert child.stdout.readline()
            child.stdout.close()  # `| head -1`
            err = child.stderr.read()
            assert (child.wait(timeout=TIMEOUT), err) == (1, b""), json_flag


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_failing_stdout_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A write that fails for another reason (a full disk) loses the answer: that is said, once."""
    for argv, _code in _answers(tmp_path):
        if argv == ["--help"]:
            continue  # the help is not an answer: it is dropped quietly
        done = _fastkeys(argv, ">/dev/full")
        assert done.returncode == 2, argv
        assert done.stderr == f"fastkeys {argv[0]}: <stdout>: No space left on device\n".encode(), argv


def test_a_closed_stderr_changes_nothing_on_stdout(tmp_path: Path) -> None:
    """`2>&-`: sys.stderr is None (before: inspect exited 2, and print(file=None) sent the error line
    to stdout, ahead of the JSON object)."""
    for argv, code in _answers(tmp_path):
        done = _fastkeys(argv, "2>&-")
        assert done.returncode == code and done.stdout == _fastkeys(argv).stdout != b"", argv
    done = _fastkeys(["inspect", "--json", str(tmp_path / "absent")], "2>&-")
    assert done.returncode == 2 and json.loads(done.stdout)["type"] == "FileNotFoundError"
    done = _fastkeys(["check", "--json"], "2>&-")
    assert done.returncode == 2 and json.loads(done.stdout)["type"] == "UsageError"
