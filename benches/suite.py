"""The benchmark suite behind `make bench` (`python -m benches.run`); not part of the package.

Every scenario runs all of its contenders in one process, interleaved, for several rounds with
the garbage collector paused, and reports the median. Before timing, every exact contender's
answer is checked against fastkeys' (the run fails on a disagreement). Key sets are generated here:
a Llama-70B-shaped model (80 layers; q, k, v, o, gate, up, down) with LoRA adapters loaded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastkeys.checkpoints import scan as checkpoint
from fastkeys.cli import demo as scenarios
from fastkeys.engine import pure as _pure
from fastkeys.rules import records as tuners

LAYERS = 80
PREFIX = "lora_"
Contender = Callable[[], Any]


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _native() -> Any:
    try:
        from fastkeys import _native
    except ImportError:
        return None
    return _native


def _matcher(module: Any, names: Sequence[str]) -> Any:
    """The core matcher `filter_missing(..., peft_type="lora")` builds, from a given core."""
    prefixes, exact, shared, suffixes = tuners.patterns(tuners.resolve("lora"))
    return module.KeyMatcher(
        list(prefixes),
        list(names),
        list(exact),
        list(shared),
        tuners.MODEL_ROOT,
        [],
        list(tuners.WRAPPERS),
        list(suffixes),
    )


# --- the alternatives -----------------------------------------------------------------------


def _segment_before_is_lora(key: str, dot: int, end: int) -> bool:
    """`.name` found at dot..end: a whole segment, after a segment starting with `lora_`."""
    if end != len(key) and key[end] != ".":
        return False
    return key.startswith(PREFIX, key.rfind(".", 0, dot) + 1)


def _name_regex(name: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|\.)" + re.escape(PREFIX) + r"[^.]*\." + re.escape(name) + r"(?:\.|$)")


def best_python(keys: Sequence[str], name: str) -> list[str]:
    """The best exact pure-Python filter we could write: a C-level substring prefilter, then a
    segment-anchored regular expression on the survivors."""
    needle = "." + name
    search = _name_regex(name).search
    return [key for key in keys if needle in key and search(key)]


def regex_alone(keys: Sequence[str], name: str) -> list[str]:
    search = _name_regex(name).search
    return [key for key in keys if search(key)]


def ahocorasick_rs_per_key(keys: Sequence[str], name: str) -> list[str]:
    import ahocorasick_rs

    automaton = ahocorasick_rs.AhoCorasick(["." + name])
    find = automaton.find_matches_as_indexes
    return [
        key
        for key in keys
        if any(_segment_before_is_lora(key, start, end) for _, start, end in find(key, overlapping=False))
    ]


def pyahocorasick_per_key(keys: Sequence[str], name: str) -> list[str]:
    import ahocorasick

    automaton = ahocorasick.Automaton()
    needle = "." + name
    automaton.add_word(needle, len(needle))
    automaton.make_automaton()
    found = []
    for key in keys:
        for last, width in automaton.iter(key):
            if _segment_before_is_lora(key, last - width + 1, last + 1):
                found.append(key)
                break
    return found


def best_python_group(keys: Sequence[str], names: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {name: [] for name in names}
    search = re.compile(r"(?:^|\.)" + re.escape(PREFIX) + r"[^.]*\.([^.]+)(?:\.|$)").search
    for key in keys:
        found = search(key)
        if found is not None:
            group = groups.get(found.group(1))
            if group is not None:
                group.append(key)
    return groups


def peft_insert(keys: Sequence[str], name: str) -> list[str]:
    """PEFT's `_insert_adapter_name_into_state_dict` (PEFT's own when installed, else a copy)."""
    insert: Any
    try:
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict as insert
    except ImportError:
        insert = _peft_insert_copy
    return list(insert(dict.fromkeys(keys), name, PREFIX))


def _peft_insert_copy(state_dict: dict[str, Any], adapter_name: str, parameter_prefix: str) -> dict[str, Any]:
    peft_model_state_dict = {}
    for key, val in state_dict.items():
        if parameter_prefix in key:
            _, _, suffix = key.rpartition(parameter_prefix)
            if "." in suffix:
                suffix_to_replace = ".".join(suffix.split(".")[1:])
                key = re.sub(re.escape(suffix_to_replace) + r"$", f"{adapter_name}.{suffix_to_replace}", key)
            else:
                key = f"{key}.{adapter_name}"
        peft_model_state_dict[key] = val
    return peft_model_state_dict


def safe_open_loop(files: Sequence[str]) -> dict[str, tuple[str, list[int], str]]:
    """What `scan` gives, the way one gets it with the safetensors package."""
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(file, "np") as handle:
            for name in handle.keys():  # noqa: SIM118 (a handle, not a dict)
                piece = handle.get_slice(name)
                found[name] = (piece.get_dtype(), piece.get_shape(), file)
    return found


# --- measuring -----------------------------------------------------------------------------


def _measure(contenders: dict[str, Contender], rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds per contender, interleaved round by round, collector paused; and each
    contender's answer from the first round (checked by the caller, after the timing)."""
    samples: dict[str, list[float]] = {label: [] for label in contenders}
    answers: dict[str, Any] = {}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for round_ in range(rounds):
            for label, work in contenders.items():
                start = time.perf_counter()
                answer = work()
                samples[label].append(time.perf_counter() - start)
                if round_ == 0:
                    answers[label] = answer
                del answer
    finally:
        if enabled:
            gc.enable()
    return {label: statistics.median(times) for label, times in samples.items()}, answers


class Disagreement(AssertionError):
    pass


def _check(label: str, scenario: str, got: Any, expected: Any) -> None:
    if got != expected:
        raise Disagreement(f"{scenario}: {label} disagrees with fastkeys")


def _run_scenario(
    name: str,
    keys_count: int,
    contenders: dict[str, Contender],
    expected: Any,
    exact: set[str],
    rounds: int,
) -> dict[str, Any]:
    seconds, answers = _measure(contenders, rounds)
    agrees = {label: answers[label] == expected for label in contenders}
    for label in exact:
        _check(label, name, answers[label], expected)
    del answers
    return {
        "scenario": name,
        "keys": keys_count,
        "ns_per_key": {label: s * 1e9 / keys_count for label, s in seconds.items()},
        "agrees": agrees,
    }


def filter_contenders(keys: list[str], name: str, slow: bool) -> tuple[dict[str, Contender], set[str]]:
    native = _native()
    contenders: dict[str, Contender] = {}
    if native is not None:
        matcher = _matcher(native, [name])
        contenders["fastkeys (rust)"] = lambda: matcher.filter(keys)
    pure = _matcher(_pure, [name])
    contenders["fastkeys (python)"] = lambda: pure.filter(keys)
    contenders["PEFT loop"] = lambda: scenarios.peft_substring_filter(keys, name, PREFIX)
    contenders["best pure Python"] = lambda: best_python(keys, name)
    if slow:
        contenders["regex alone"] = lambda: regex_alone(keys, name)
        # Optional contenders: measured where installed (`make bench` installs them).
        if _installed("ahocorasick_rs"):
            contenders["ahocorasick_rs per key"] = lambda: ahocorasick_rs_per_key(keys, name)
        if _installed("ahocorasick"):
            contenders["pyahocorasick per key"] = lambda: pyahocorasick_per_key(keys, name)
    contenders["floor: [k for k in keys]"] = lambda: [k for k in keys]
    exact = set(contenders) - {"PEFT loop", "floor: [k for k in keys]"}
    return contenders, exact


def serving_keys(adapters: int) -> tuple[list[str], str, list[str]]:
    """A model holding `adapters` adapters; one more (`incoming`) is being loaded and lost two
    tensors. Returns (missing keys, incoming name, expected)."""
    names = [f"adapter_{i}" for i in range(adapters)]
    incoming = "incoming"
    lost = [
        f"base_model.model.model.layers.{LAYERS // 2}.mlp.up_proj.lora_B.{incoming}.weight",
        f"base_model.model.model.layers.{LAYERS - 1}.self_attn.v_proj.lora_A.{incoming}.weight",
    ]
    keys = scenarios.model_keys(LAYERS, names)
    keys[len(keys) // 3 : len(keys) // 3] = lost[:1]
    keys.append(lost[1])
    return keys, incoming, lost


def run(
    *,
    quick: bool = False,
    full: bool = False,
    rounds: int | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Runs the suite. `quick`: tiny sizes, one round (CI checks agreement). Default: every
    scenario at its real size (under a minute), headers on 64 shards. `full`: also the scale
    curve from 10k to 5M keys, headers on 256 shards holding 1M tensors, and the slow per-key
    contenders on the dense scenario."""
    rounds = rounds or (1 if quick else 3)
    serving_adapters = 9 if quick else 900
    results: list[dict[str, Any]] = []

    log("seed")
    seed_keys = [
        *scenarios.base_keys(LAYERS),
        "base_model.model.model.layers.3.mlp.down_proj.lora_B.default.weight",
    ]
    contenders, exact = filter_contenders(seed_keys, "default", slow=True)
    results.append(_run_scenario("seed", len(seed_keys), contenders, seed_keys[-1:], exact, rounds * 20))

    log("serving")
    keys, incoming, lost = serving_keys(serving_adapters)
    contenders, exact = filter_contenders(keys, incoming, slow=True)
    results.append(_run_scenario("serving", len(keys), contenders, lost, exact, rounds))

    log("dense")
    dense_layers = 2_000 if quick else 1_000_000 // (len(scenarios.PROJECTIONS) * 2)
    dense = scenarios.adapter_keys(dense_layers, "default")
    # The per-key regex and automaton contenders run here only with --full: they take about
    # nine seconds of the one-minute default run, and serving already shows them.
    contenders, exact = filter_contenders(dense, "default", slow=full or quick)
    results.append(_run_scenario("dense", len(dense), contenders, dense, exact, rounds))

    log("group")
    names = [f"adapter_{i}" for i in range(serving_adapters)] + [incoming]
    native = _native()
    group_contenders: dict[str, Contender] = {}
    if native is not None:
        native_matcher = _matcher(native, names)
        group_contenders["fastkeys (rust)"] = lambda: native_matcher.group(keys)
    pure_matcher = _matcher(_pure, names)
    group_contenders["fastkeys (python)"] = lambda: pure_matcher.group(keys)
    group_contenders["best pure Python"] = lambda: best_python_group(keys, names)
    group_contenders["floor: [k for k in keys]"] = lambda: [k for k in keys]
    expected_groups = pure_matcher.group(keys)
    results.append(
        _run_scenario(
            "group",
            len(keys),
            group_contenders,
            expected_groups,
            {"fastkeys (rust)", "best pure Python"} & set(group_contenders),
            rounds,
        )
    )
    del expected_groups

    log("renaming")
    checkpoint_keys = [key.replace(".default.", ".") for key in dense]
    rename_contenders: dict[str, Contender] = {}
    if native is not None:
        renamer = _matcher(native, ["default"])
        rename_contenders["fastkeys (rust)"] = lambda: renamer.insert_adapter_name(checkpoint_keys, "default")
    pure_renamer = _matcher(_pure, ["default"])
    rename_contenders["fastkeys (python)"] = lambda: pure_renamer.insert_adapter_name(
        checkpoint_keys, "default"
    )
    rename_contenders["PEFT _insert_adapter_name_into_state_dict"] = lambda: peft_insert(
        checkpoint_keys, "default"
    )
    rename_contenders["floor: [k for k in keys]"] = lambda: [k for k in checkpoint_keys]
    results.append(
        _run_scenario(
            "renaming",
            len(checkpoint_keys),
            rename_contenders,
            dense,
            set(rename_contenders) - {"floor: [k for k in keys]"},
            rounds,
        )
    )

    if _installed("safetensors") and _installed("numpy"):
        log("headers")
        shards = 8 if quick else (256 if full else 64)
        per_shard = 100 if quick else 1_000_000 // 256
        results.append(_headers(shards, per_shard, rounds))
    else:
        log("headers: skipped (needs the safetensors and numpy packages)")

    if full:
        results.extend(_scale(rounds, log))
    if not quick:
        results.append({"scenario": "memory", **_memory(dense)})
    results.append({"scenario": "import", **_import_ms()})
    return {"machine": _machine(), "rounds": rounds, "results": results}


@contextlib.contextmanager
def _engine(module: Any) -> Iterator[None]:
    """`fastkeys.scan` reading headers with the given engine, whichever one the process chose:
    both are timed in one run, through the function users call."""
    namespace = vars(checkpoint)
    chosen = namespace["core"]
    namespace["core"] = module
    try:
        yield
    finally:
        namespace["core"] = chosen


def _scan_with(module: Any, path: str) -> checkpoint.Checkpoint:
    with _engine(module):
        return checkpoint.scan(path)


def _headers(shards: int, per_shard: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    from safetensors.numpy import save_file

    with tempfile.TemporaryDirectory() as scratch:
        files = []
        for shard in range(shards):
            tensors = {
                f"model.layers.{shard}.block.{i}.weight": np.zeros((1,), np.float32) for i in range(per_shard)
            }
            file = os.path.join(scratch, f"model-{shard:05d}.safetensors")
            save_file(tensors, file)
            files.append(file)
        contenders: dict[str, Contender] = {}
        native = _native()
        if native is not None:
            contenders["fastkeys (rust)"] = lambda: _scan_with(native, scratch)
        contenders["fastkeys (python)"] = lambda: _scan_with(_pure, scratch)
        contenders["safe_open loop"] = lambda: safe_open_loop(files)

        def summary(found: Any) -> list[tuple[str, str, list[int]]]:
            if isinstance(found, dict):
                return sorted((name, dtype, list(shape)) for name, (dtype, shape, _f) in found.items())
            return sorted((name, t.dtype, list(t.shape)) for name, t in found.items())

        seconds, answers = _measure(contenders, rounds)
        expected = summary(answers["safe_open loop"])
        for label in contenders:
            _check(label, "headers", summary(answers[label]), expected)
    total = shards * per_shard
    return {
        "scenario": "headers",
        "keys": total,
        "shards": shards,
        "ns_per_key": {label: s * 1e9 / total for label, s in seconds.items()},
        "agrees": dict.fromkeys(contenders, True),
    }


def _scale(rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    sizes = [10_000, 100_000, 1_000_000, 5_000_000]
    out = []
    for size in sizes:
        log(f"scale {size:,}")
        adapters = max(1, round((size - len(scenarios.base_keys(LAYERS))) / (LAYERS * 14)))
        keys, incoming, lost = serving_keys(adapters)
        contenders, exact = filter_contenders(keys, incoming, slow=False)
        result = _run_scenario("scale", len(keys), contenders, lost, exact, max(3, rounds))
        out.append(result)
        del keys
        gc.collect()
    return out


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory(keys: list[str]) -> dict[str, Any]:
    """Peak resident memory during one native filter call, beyond its input and output lists."""
    native = _native()
    if native is None or not os.path.exists("/proc/self/statm"):
        return {"bytes_per_key": None}
    matcher = _matcher(native, ["default"])
    peak = 0
    running = True

    def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, _rss())
            time.sleep(0.0002)

    gc.collect()
    before = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    time.sleep(0.01)
    result = matcher.filter(keys)
    running = False
    sampler.join()
    output = sys.getsizeof(result)
    beyond = max(0, peak - before - output)
    return {"keys": len(keys), "output_bytes": output, "bytes_per_key": beyond / len(keys)}


def _import_ms(rounds: int = 15) -> dict[str, float]:
    """What `import fastkeys` adds to a process's start (what a CLI call or a worker waits for),
    beside the bare interpreter's start measured in the same rounds (interleaved): medians of the
    wall time of `python -c pass` and of `python -c "import fastkeys"`."""
    bare: list[float] = []
    loaded: list[float] = []
    for _ in range(rounds):
        for code, times in (("pass", bare), ("import fastkeys", loaded)):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            times.append(time.perf_counter() - start)
    interpreter = statistics.median(bare) * 1e3
    return {"ms": statistics.median(loaded) * 1e3 - interpreter, "interpreter_ms": interpreter}


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
    }


# --- reporting -----------------------------------------------------------------------------

RUST = "fastkeys (rust)"
FLOOR = "floor: [k for k in keys]"
PEFT_INSERT = "PEFT _insert_adapter_name_into_state_dict"
TARGETS = [
    # (description, scenario, contender, reference, maximum ratio contender/reference)
    ("serving: fastkeys no slower than the bare comprehension", "serving", RUST, FLOOR, 1.0),
    ("serving: fastkeys at least 4x faster than PEFT's loop", "serving", RUST, "PEFT loop", 0.25),
    ("dense: at least 10x faster than the best pure Python", "dense", RUST, "best pure Python", 0.1),
    ("group: at least 10x faster than the best pure Python", "group", RUST, "best pure Python", 0.1),
    ("renaming: at least 20x faster than PEFT", "renaming", RUST, PEFT_INSERT, 0.05),
    ("headers: at least 2x faster than the safe_open loop", "headers", RUST, "safe_open loop", 0.5),
]


def evaluate(report: dict[str, Any]) -> list[tuple[str, float | None, bool]]:
    """(target, measured ratio, met?) for each target, plus fallback, flatness, memory, import."""
    by_name = {r["scenario"]: r for r in report["results"] if "ns_per_key" in r and r["scenario"] != "scale"}
    out: list[tuple[str, float | None, bool]] = []
    for description, scenario, contender, reference, limit in TARGETS:
        times = by_name.get(scenario, {}).get("ns_per_key", {})
        if contender in times and reference in times:
            ratio = times[contender] / times[reference]
            out.append((description, ratio, ratio <= limit))
    for scenario, result in by_name.items():
        times = result["ns_per_key"]
        if "fastkeys (python)" in times and "PEFT loop" in times:
            ratio = times["fastkeys (python)"] / times["PEFT loop"]
            out.append((f"{scenario}: the fallback no slower than PEFT's loop", ratio, ratio <= 1.0))
    scale = [r for r in report["results"] if r["scenario"] == "scale"]
    if len(scale) >= 2:
        first, last = scale[0]["ns_per_key"]["fastkeys (rust)"], scale[-1]["ns_per_key"]["fastkeys (rust)"]
        out.append(
            (
                f"scale: ns/key flat from {scale[0]['keys']:,} to {scale[-1]['keys']:,} keys (within 30%)",
                last / first,
                abs(last / first - 1) <= 0.3,
            )
        )
    for result in report["results"]:
        if result["scenario"] == "memory" and result.get("bytes_per_key") is not None:
            out.append(
                (
                    "memory: under 8 bytes per key beyond input and output",
                    result["bytes_per_key"],
                    result["bytes_per_key"] < 8,
                )
            )
        if result["scenario"] == "import":
            ratio = result["ms"] / result["interpreter_ms"]
            out.append(("import fastkeys: at most the bare interpreter's start", ratio, ratio <= 1.0))
    return out


def format_report(report: dict[str, Any]) -> str:
    lines = []
    machine = report["machine"]
    lines.append(
        f"Machine: {machine['cpu']}, {machine['cores']} cores, Python {machine['python']}; "
        f"median of {report['rounds']} interleaved rounds, gc paused; ns per key (ratio to fastkeys rust)"
    )
    for result in report["results"]:
        if "ns_per_key" not in result:
            continue
        times = result["ns_per_key"]
        reference = times.get("fastkeys (rust)") or times.get("fastkeys (python)")
        lines.append(f"\n{result['scenario']} ({result['keys']:,} keys)")
        for label, ns in times.items():
            mark = "" if result["agrees"].get(label, True) else "  (different answer)"
            lines.append(f"  {label:<44} {ns:10.1f} ns/key  {ns / reference:8.2f}x{mark}")
    lines.append("\nTargets")
    for description, value, met in evaluate(report):
        shown = "n/a" if value is None else f"{value:.3g}"
        lines.append(f"  [{'met ' if met else 'MISS'}] {description}: {shown}")
    return "\n".join(lines)
