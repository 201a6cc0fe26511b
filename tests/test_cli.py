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
from fastkeys import cli


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
    with pytest.raises(SystemExit) as stopped:
        cli.main(["bench"])
    assert stopped.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
