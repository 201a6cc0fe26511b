"""The `fastkeys` command line: `demo`, `inspect PATH`, `check BASE ADAPTER [ADAPTER ...]`."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from fastkeys.cli import demo as scenarios
from fastkeys.engine import IMPLEMENTATION
from fastkeys.rules import records as tuners
from fastkeys.rules.matching import filter_missing

if TYPE_CHECKING:
    from _typeshed import SupportsWrite


class _StdoutFailed(Exception):
    """Writing the answer to stdout failed (not reading the input): main's handler decides."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


def _out(*values: object, end: str = "\n") -> None:
    """print() for the answer. A stdout closed before the start (`>&-`) is None: nothing is
    written. A write that fails raises _StdoutFailed."""
    try:
        print(*values, end=end)
    except OSError as error:
        raise _StdoutFailed(error) from error


def _flush_out() -> None:
    """Writes what stdout holds, so that a failure shows inside main's handler, not at exit."""
    try:
        if sys.stdout is not None:
            sys.stdout.flush()
    except OSError as error:
        raise _StdoutFailed(error) from error


def _err(line: str, end: str = "\n") -> None:
    """print() to stderr, if there is one (print(file=None) would write to stdout); a failing
    write is dropped, as there is nowhere left to report it."""
    if sys.stderr is not None:
        try:
            print(line, end=end, file=sys.stderr, flush=True)
        except OSError:
            _silence(sys.stderr)


def _show(keys: Sequence[str], limit: int = 4) -> None:
    for key in keys[:limit]:
        _out(f"    {key}")
    if len(keys) > limit:
        _out(f"    ... and {len(keys) - limit:,} more")


def demo(layers: int = 32, serving_adapters: int = 900) -> None:
    """The seed scenario, then the timing of one load on a serving-sized model."""
    adapters = ["default", "default_1", "default_10", "foo"]
    _out(f"fastkeys demo (implementation: {IMPLEMENTATION})")
    _out(
        f"A Llama-like model: {layers} layers, LoRA on q,k,v,o,gate,up,down; "
        f"adapters loaded: {', '.join(adapters)}"
    )
    model = scenarios.model_keys(layers, adapters)
    checkpoint = set(scenarios.adapter_keys(layers, "default"))
    # Resizing the embeddings means they are re-created, so the loader reports them as well.
    missing = [key for key in model if key not in checkpoint]
    _out(f"\nLoading adapter 'default' ({len(checkpoint)} tensors) after resizing the embeddings:")
    _out(f"  load_state_dict(strict=False) reports {len(missing):,} missing keys, e.g.")
    _show(missing)
    peft_kept = scenarios.peft_substring_filter(missing, "default", "lora_")
    _out(
        f"  PEFT's substring filter keeps {len(peft_kept):,}: "
        "it takes 'default_1' and 'default_10' for 'default'"
    )
    _show(peft_kept, 2)
    kept = filter_missing(missing, "default", "lora")
    _out(f"  fastkeys.filter_missing keeps {len(kept)}: nothing is wrong with this load")

    lost = f"{tuners.MODEL_PREFIX}model.layers.{layers // 4}.mlp.up_proj.lora_B.default.weight"
    kept = filter_missing([*missing, lost], "default", "lora")
    _out(f"\nThe checkpoint lost one tensor. fastkeys.filter_missing keeps {len(kept)}:")
    _show(kept)
    assert kept == [lost]

    names = [f"adapter_{i}" for i in range(serving_adapters)]
    serving = scenarios.model_keys(80, names)
    target = names[len(names) // 2]
    _out(
        f"\nServing: a Llama-70B-shaped model (80 layers) holding {serving_adapters} adapters; "
        f"loading '{target}', {len(serving):,} missing keys. Median of 5 interleaved rounds:"
    )
    contenders = {
        "fastkeys.filter_missing": lambda: filter_missing(serving, target, "lora"),
        "PEFT's substring loop": lambda: scenarios.peft_substring_filter(serving, target, "lora_"),
        "floor: [k for k in keys]": lambda: [k for k in serving],
    }
    seconds = _median_seconds(contenders, rounds=5)
    reference = seconds["fastkeys.filter_missing"]
    for label, taken in seconds.items():
        _out(
            f"  {label:<27} {taken * 1e3:8.2f} ms  {taken * 1e9 / len(serving):6.1f} ns/key"
            f"  {taken / reference:5.2f}x"
        )
    _out("  (the full benchmark suite: `make bench` in a source checkout, see docs/benchmarks.md)")


def _median_seconds(contenders: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median wall time per contender, interleaved round by round so that a noisy neighbour
    slows them all alike, with the garbage collector paused (it would charge one contender for
    another's garbage)."""
    import gc
    import statistics
    import time

    samples: dict[str, list[float]] = {label: [] for label in contenders}
    paused = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for label, work in contenders.items():
                start = time.perf_counter()
                work()
                samples[label].append(time.perf_counter() - start)
    finally:
        if paused:
            gc.enable()
    return {label: statistics.median(times) for label, times in samples.items()}


def _progress() -> Callable[[int, int], None] | None:
    """A one-line progress display on stderr, only at a terminal."""
    if sys.stderr is None or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        _err(f"\rscanning shards: {done}/{total}", end="\n" if done >= total else "")

    return show


def _methods_found(keys: Sequence[str]) -> dict[str, int]:
    """Keys per PEFT method (methods that share a prefix together: `lora/adalora`), found by the
    matcher: model keys lose their adapter name, then `locate` finds the tensor segment of each
    adapter tensor; each distinct segment is given to the method whose matcher takes it (longest
    prefix first, as `randlora_A` is not `lora_`)."""
    from fastkeys.rules.matching import KeyMatcher

    prefixes, exact, shared, suffixes = tuners.patterns(None)
    every = KeyMatcher(
        prefixes, exact=exact, shared=shared, wrappers=tuners.WRAPPERS, suffixes=dict(suffixes)
    )
    segments: dict[str, int] = {}
    unnamed = every.remove_adapter_name(keys)
    for key, span in zip(unnamed, every.locate(unnamed), strict=True):
        if span is not None:
            tensor = key[span[0] : span[1]]
            segments[tensor] = segments.get(tensor, 0) + 1
    groups: dict[str, list[tuners.Method]] = {}
    for method in tuners.METHODS.values():
        if not method.prompt_learning:
            groups.setdefault(method.prefix, []).append(method)
    owners = [
        (
            "/".join(method.name for method in methods),
            KeyMatcher([prefix], exact=[name for method in methods for name in method.exact]),
        )
        for prefix, methods in sorted(groups.items(), key=lambda item: -len(item[0]))
    ]
    counts: dict[str, int] = {}
    for tensor, count in segments.items():
        for label, matcher in owners:
            if matcher.locate([tensor])[0] is not None:
                counts[label] = counts.get(label, 0) + count
                break
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def inspect_report(path: str) -> dict[str, object]:
    from fastkeys.checkpoints.scan import scan
    from fastkeys.rules.matching import KeyMatcher

    checkpoint = scan(path, progress=_progress())
    keys = list(checkpoint)
    prefixes, exact, shared, _suffixes = tuners.patterns(None)
    config = checkpoint.adapter_config or {}
    adapters: dict[str, list[str]] = {}
    if not config:
        # Model state dicts carry adapter names; adapter checkpoints do not (PEFT adds them on load).
        grouped = KeyMatcher(prefixes, exact=exact, shared=shared).group(keys)
        adapters = {name: found for name, found in grouped.items() if name not in ("weight", "bias")}
    return {
        "path": path,
        "tensors": len(keys),
        "bytes": checkpoint.total_bytes,
        "files": checkpoint.file_counts(),
        "dtypes": checkpoint.dtype_counts(),
        "methods": _methods_found(keys),
        "adapters": {name: len(found) for name, found in adapters.items()},
        # PEFT saves target_modules from a set: sorted, the report is stable.
        "adapter_config": {
            k: sorted(str(v) for v in value) if isinstance(value, list) else value
            for k in ("peft_type", "r", "target_modules")
            if (value := config.get(k)) is not None
        },
        "metadata": checkpoint.metadata,
    }


def _print_inspect(report: dict[str, object]) -> None:
    files = report["files"]
    assert isinstance(files, dict)
    _out(
        f"{report['path']}: {report['tensors']:,} tensors, {report['bytes']:,} bytes in {len(files)} file(s)"
    )
    for file, count in files.items():
        _out(f"  {count:>8,}  {file}")
    for label in ("dtypes", "methods", "adapters", "adapter_config", "metadata"):
        value = report[label]
        if value:
            shown = ", ".join(f"{k}: {v}" for k, v in value.items())  # type: ignore[attr-defined]
            _out(f"{label}: {shown}")


class UsageError(Exception):
    """A command line argparse refuses: an unknown option, a missing argument, a bad choice."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error raises UsageError instead of printing the usage and
    exiting: main reports it as any other error. `--help` still prints the usage, exit 0."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(self.prog, message)

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        """To stdout as an answer: nothing if stdout is closed (argparse would turn to stderr),
        quietly if a write fails (`| head -1`)."""
        if file is not None:
            super().print_help(file)
            return
        try:
            _out(self.format_help(), end="")
            _flush_out()
        except _StdoutFailed:
            _silence(sys.stdout)


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether argv asks for --json, read as argparse reads it: before `--`, maybe abbreviated."""
    for token in argv:
        if token == "--":
            return False
        option = token.partition("=")[0]
        if len(option) > 2 and "--json".startswith(option):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="fastkeys", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="the seed scenario and a timing, on synthetic keys")
    demo_parser.add_argument("--layers", type=int, default=32, help="layers of the seed model (default 32)")
    demo_parser.add_argument(
        "--adapters", type=int, default=900, help="adapters in the serving timing (default 900)"
    )
    inspect_parser = commands.add_parser(
        "inspect", help="methods, adapters, shards, dtypes, size and metadata of a checkpoint (headers only)"
    )
    inspect_parser.add_argument("path", help="a .safetensors file, a *.safetensors.index.json or a directory")
    inspect_parser.add_argument("--json", action="store_true", help="print JSON")
    check_parser = commands.add_parser(
        "check",
        help="does each ADAPTER fit BASE? exit 0 clean, 1 findings, 2 unusable input (the worst one)",
    )
    check_parser.add_argument("base", help="the base model: file, index or directory")
    check_parser.add_argument(
        "adapters", nargs="+", metavar="adapter", help="adapter directories (with adapter_config.json)"
    )
    check_parser.add_argument(
        "--values", action="store_true", help="read the adapters' tensor data too: untrained, NaN/Inf"
    )
    check_parser.add_argument("--json", action="store_true", help="print JSON: one object per adapter")
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser: `fastkeys check: error: unrecognized ...`
            parsers = {"demo": demo_parser, "inspect": inspect_parser, "check": check_parser}
            parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    except UsageError as error:  # `fastkeys check: error: <message>`, no usage line; exit 2
        return _report(f"{error.prog}: error", " ".join(str(error).split()), error, _wants_json(argv))
    args.status = 0
    try:
        return _command(args)
    except _StdoutFailed as failed:
        return _stdout_failed(args, failed.error)
    except KeyboardInterrupt:
        _err(f"fastkeys {args.command}: interrupted")
        return 130
    except Exception as error:  # every unusable input: one line (and a JSON object), exit 2
        return _fail(args, error)


def _describe(args: argparse.Namespace, error: BaseException) -> str:
    """One line naming the file and the problem."""
    if isinstance(error, OSError) and error.filename is not None:
        message = f"{error.filename}: {error.strerror or error}"
    elif isinstance(error, (OSError, ValueError, TypeError, LookupError)):
        message = str(error)
    elif isinstance(error, (RecursionError, MemoryError)):
        message = "the input is nested too deeply or too large to read"
    else:  # a bug in fastkeys; still no traceback for whoever runs the command
        message = f"internal error ({type(error).__name__}: {error}); please report it"
    return " ".join(message.split()) or type(error).__name__


def _fail(args: argparse.Namespace, error: BaseException) -> int:
    return _report(f"fastkeys {args.command}", _describe(args, error), error, getattr(args, "json", False))


def _report(speaker: str, message: str, error: BaseException, json_wanted: bool) -> int:
    """Exit 2: one line on stderr, `<speaker>: <message>`; with --json, the error object."""
    import json

    _err(f"{speaker}: {message}")
    if json_wanted:
        try:
            _out(json.dumps({"error": message, "type": type(error).__name__, "exit_code": 2}))
            _flush_out()
        except _StdoutFailed:
            _silence(sys.stdout)
    return 2


def _stdout_failed(args: argparse.Namespace, error: OSError) -> int:
    """The answer could not be written. Nobody reads it (`| head -1`: EPIPE; a stdout not open
    for writing: EBADF): end quietly with the answer's code. Else (a full disk): one line, exit 2."""
    _silence(sys.stdout)
    if error.errno in (errno.EPIPE, errno.EBADF):
        return int(args.status)
    _err(f"fastkeys {args.command}: <stdout>: {error.strerror or error}")
    return 2


def _silence(stream: TextIO) -> None:
    """Points a stream whose write failed at /dev/null, so that the interpreter's final flush of
    what it still holds cannot fail again (`Exception ignored ...`, exit 120)."""
    try:
        target = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):  # not a file: an in-process caller's capture
        return
    try:
        os.dup2(devnull, target)
    except OSError:
        pass
    finally:
        os.close(devnull)


def _command(args: argparse.Namespace) -> int:
    if args.command == "demo":
        demo(args.layers, args.adapters)
        _flush_out()
        return 0
    import json

    if args.command == "inspect":
        report = inspect_report(args.path)
        if args.json:
            _out(json.dumps(report, indent=2))
        else:
            _print_inspect(report)
        _flush_out()
        return 0
    return _check(args)


_FINDINGS_SHOWN = 20  # per adapter, when many adapters are checked


def _check(args: argparse.Namespace) -> int:
    """`fastkeys check BASE ADAPTER [ADAPTER ...]`: the worst exit status of all adapters (0 fits,
    1 findings, 2 unusable). An unusable base raises; an unusable adapter is reported in its row."""
    import json

    from fastkeys.checkpoints.scan import scan
    from fastkeys.preflight.checks import BaseCheck, check_many

    answers = check_many(scan(args.base, progress=_progress()), args.adapters, values=args.values)
    statuses = [2 if not isinstance(a, BaseCheck) else 1 if a else 0 for a in answers]
    args.status = max(statuses)  # the answer's exit code, should the pipe close while printing
    if args.json:
        objects: list[dict[str, object]] = []
        for adapter, answer, status in zip(args.adapters, answers, statuses, strict=True):
            if isinstance(answer, BaseCheck):
                coverage = answer.coverage._asdict()
                findings = [finding._asdict() for finding in answer]
                objects.append(
                    {"adapter": adapter, "status": status, "coverage": coverage, "findings": findings}
                )
            else:
                # As main's error object, per adapter: the one line and the exception's type.
                error = answer if isinstance(answer, BaseException) else ValueError(answer)
                objects.append(
                    {
                        "adapter": adapter,
                        "status": status,
                        "error": _describe(args, error),
                        "type": type(error).__name__,
                    }
                )
        _out(json.dumps(objects, indent=2))
        _flush_out()
        return int(args.status)
    for answer in answers:
        if isinstance(answer, BaseException):
            _err(f"fastkeys check: {_describe(args, answer)}")
    if len(answers) > 1:
        _print_check_table(args.adapters, answers)
    limit = _FINDINGS_SHOWN if len(answers) > 1 else None
    for answer in answers:
        if not isinstance(answer, BaseCheck) or (len(answers) > 1 and not answer):
            continue
        _out(answer.verdict(args.base))
        for finding in answer[:limit]:
            _out(f"  [{finding.kind}] {finding.key}: {finding.message}")
        if limit is not None and len(answer) > limit:
            _out(f"  ... and {len(answer) - limit} more (--json lists them all)")
    _flush_out()
    return int(args.status)


def _print_check_table(adapters: Sequence[str], answers: Sequence[object]) -> None:
    from fastkeys.preflight.checks import BaseCheck

    width = max(len(adapter) for adapter in adapters)
    _out(f"{'adapter':<{width}}  {'verdict':<8}  {'modules':>7}  {'layers':>6}  findings")
    counts: dict[str, int] = {"fits": 0, "findings": 0, "unusable": 0}
    for adapter, answer in zip(adapters, answers, strict=True):
        if not isinstance(answer, BaseCheck):
            counts["unusable"] += 1
            _out(f"{adapter:<{width}}  {'unusable':<8}  {'-':>7}  {'-':>6}  see the error above")
            continue
        kinds: dict[str, int] = {}
        for finding in answer:
            kinds[finding.kind] = kinds.get(finding.kind, 0) + 1
        verdict = "findings" if answer else "fits"
        counts[verdict] += 1
        shown = ", ".join(f"{kind}: {count}" for kind, count in kinds.items()) or "-"
        coverage = answer.coverage
        _out(f"{adapter:<{width}}  {verdict:<8}  {coverage.modules:>7}  {coverage.layers:>6}  {shown}")
    _out(
        ", ".join(f"{count} {label}" for label, count in counts.items() if count)
        + f" ({len(answers)} adapters)"
    )


if __name__ == "__main__":
    sys.exit(main())
