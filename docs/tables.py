"""Writes the generated tables of README.md and docs/*.md: `python docs/tables.py` (or `make docs`).

Each table sits between `<!-- name:start -->` and `<!-- name:end -->` markers in the pages that
`PAGES` lists; `tests/test_readme.py` fails when a table is out of date or a page lacks one.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastkeys import filter_missing
from fastkeys.cli.demo import peft_substring_filter
from fastkeys.rules import records as tuners

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fixtures.peft_filters import peft_from_pretrained_filter

if TYPE_CHECKING:
    from fixtures.peft_models import PeftSurvey, Survey

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
LAYER = "base_model.model.model.layers.0.self_attn.q_proj"
MLP = "base_model.model.model.layers.0.mlp.down_proj"

# (missing key, adapter name, method, why)
DIFFERENCES = [
    (f"{LAYER}.lora_A.foobar.weight", "foo", "lora", "`foobar` is another adapter"),
    (f"{LAYER}.lora_A.default_10.weight", "default_1", "lora", "`default_10` is another adapter"),
    (f"{LAYER}.lora_A.default.weight", "model", "lora", "`model` occurs in every key"),
    (
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight",
        "1",
        "lora",
        "`1` is a layer index here",
    ),
    (f"{MLP}.lora_A.default.weight", "mlp", "lora", "`mlp` is a module here"),
    (f"{LAYER}.lora_A.default.weight", "lora", "lora", "`lora` is inside the prefix"),
    (f"{LAYER}.randlora_lambda.default", "default", "lora", "`lora_` inside `randlora_`"),
    (f"{LAYER}.boft_R.default", "default", "oft", "`oft_` inside `boft_`"),
    (f"{LAYER}.pvera_lambda_b.default", "default", "vera", "`vera_lambda_` inside `pvera_lambda_`"),
    ("base_model.vera_B.default", "default", "vera", "the shared projection is saved; it lacks the prefix"),
    (f"{LAYER}.vera_A.default", "default", "vera", "a layer's reference to the shared projection"),
    ("base_model.tinylora_v.default.0", "default", "tinylora", "the model-level vector is saved"),
    (f"{LAYER}.tinylora_v.default.0", "default", "tinylora", "a layer's reference"),
    ("base_model.vblora_vector_bank.default", "default", "vblora", "the model-level bank is saved"),
    (
        "base_model.model.prompt_encoder.layers.0.lora_A.default.weight",
        "default",
        "lora",
        "a model's own module named `prompt_encoder` (SAM)",
    ),
]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def differences_table() -> str:
    rows = [
        "| missing key | adapter, method | PEFT `load_adapter` | PEFT `from_pretrained` | fastkeys | why |",
        "|---|---|---|---|---|---|",
    ]
    for key, adapter, method, why in DIFFERENCES:
        prefix = tuners.METHODS[method].prefix
        load_adapter = bool(peft_substring_filter([key], adapter, prefix, method.upper()))
        pretrained = bool(peft_from_pretrained_filter([key], adapter, prefix, method.upper()))
        ours = bool(filter_missing([key], adapter, method))
        shown = key.replace(LAYER, "…q_proj").replace(MLP, "…mlp.down_proj")
        rows.append(
            f"| `{shown}` | `{adapter}`, {method} | {_yes(load_adapter)} | {_yes(pretrained)} "
            f"| **{_yes(ours)}** | {why} |"
        )
    return "\n".join(rows)


@functools.cache  # builds real models: once per run, whichever pages show it
def peft_table(surveyed: PeftSurvey | None = None) -> str:
    """Real PEFT models (fixtures/peft_models.py): PEFT's filters and fastkeys on the same loads,
    those of `surveyed` (a peft_models.PeftSurvey; the tests pass the session's) or, by default,
    of a fresh one in a temporary directory."""
    import tempfile

    sys.path.insert(0, str(README.parent))
    from fixtures import peft_models

    if surveyed is None:
        with tempfile.TemporaryDirectory() as scratch:
            return peft_table(peft_models.PeftSurvey(Path(scratch)))
    rows = [
        "| case | tensors | complete checkpoint: keys kept by PEFT `load_adapter` / `from_pretrained` / "
        "fastkeys (right: 0) | one tensor lost: loads right for PEFT `load_adapter` / `from_pretrained` / "
        "fastkeys | PEFT raises instead |",
        "|---|---|---|---|---|",
    ]

    def row(case: str, survey: Survey) -> str:
        counts = peft_models.survey_counts(survey)
        loads = counts["tensors"] - counts["refused"]
        return (
            f"| {case} | {counts['tensors']} | {counts['complete_load_adapter']} / "
            f"{counts['complete_from_pretrained']} / **{counts['complete_fastkeys']}** | "
            f"{counts['dropped_load_adapter']}/{loads} / {counts['dropped_from_pretrained']}/{loads} / "
            f"**{counts['dropped_fastkeys']}/{loads}** | {counts['refused'] or ''} |"
        )

    for method in peft_models.METHOD_CONFIGS:
        rows.append(row(method, surveyed.method(method)))
    for name in peft_models.TRICKY_NAMES:
        others = len(peft_models.TRICKY_NAMES) - 1
        rows.append(row(f"lora, adapter `{name}` beside {others} others", surveyed.tricky(name)))
    return "\n".join(rows)


@functools.cache
def loaders_table() -> str:
    """transformers' `model.load_adapter` (tiny resized Llama) and diffusers' `load_lora_adapter`
    (tiny SD3 transformer) beside fastkeys.transformers / fastkeys.diffusers, on the same loads."""
    import copy
    import tempfile
    import warnings

    from fixtures import peft_models as pm

    cases = [
        ("second", ["first"]),
        ("foo", ["foobar"]),
        ("default_1", ["default_10"]),
    ]
    rows = [
        "| adapter loaded, beside | transformers `load_adapter`, complete checkpoint: keys kept by "
        "transformers / fastkeys (right: 0) | one tensor lost: loads right for transformers / fastkeys "
        "| diffusers `load_lora_adapter`, complete: keys kept by diffusers / fastkeys (right: 0) "
        "| one tensor lost: loads right for diffusers / fastkeys |",
        "|---|---|---|---|---|",
    ]

    def survey(
        make: Any,
        load: Any,
        judged: Any,
        directory: Path,
        filename: str,
        name: str,
        others: list[str],
        scratch: Path,
    ) -> str:
        base = make()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for other in others:
                load(base, directory, other)
        counts = pm.loader_survey(copy.deepcopy(base), load, judged, directory, filename, name, scratch)
        tensors = counts["tensors"]
        return (
            f"{counts['complete_library']} / **{counts['complete_fastkeys']}** | "
            f"{counts['dropped_library']}/{tensors} / **{counts['dropped_fastkeys']}/{tensors}**"
        )

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            llama = pm.save_adapter(pm.tricky_lora_config(), root / "llama")
            sd3 = pm.save_diffusers_lora(pm.tiny_sd3_transformer, root / "sd3")
        for name, others in cases:
            shown = ", ".join(f"`{other}`" for other in others)
            left = survey(
                lambda: pm.tiny_llama(resized=True),
                pm.transformers_load,
                pm.fastkeys_transformers_load,
                llama,
                "adapter_model.safetensors",
                name,
                others,
                root / f"t-{name}",
            )
            right = survey(
                pm.tiny_sd3_transformer,
                pm.diffusers_load,
                pm.fastkeys_diffusers_load,
                sd3,
                pm.DIFFUSERS_FILE,
                name,
                others,
                root / f"d-{name}",
            )
            rows.append(f"| `{name}` beside {shown} | {left} | {right} |")
    return "\n".join(rows)


@functools.cache
def cli_examples() -> str:
    """Real `fastkeys inspect` and `fastkeys check` output on a tiny model and adapters."""
    import contextlib
    import io
    import os
    import shutil
    import tempfile

    sys.path.insert(0, str(README.parent))
    import peft
    import torch
    from safetensors.torch import load_file, save_file

    from fastkeys.cli import main as cli
    from fixtures import peft_models

    blocks = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        peft_models.tiny_llama().save_pretrained(root / "llama", max_shard_size="40KB")
        qv = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
        adapter = peft_models.save_adapter(qv, root / "adapter")
        peft_models.save_adapter(
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "qkv_proj"]),
            root / "other-model-adapter",
            model_factory=lambda: peft_models.tiny_llama(hidden_size=48),
        )
        (root / "llava").mkdir()
        llava = peft_models.tiny_llava().state_dict()
        save_file({k: v.contiguous() for k, v in llava.items()}, root / "llava" / "model.safetensors")
        # Saved at PEFT's initialisation (lora_B zero), and one whose lora_A ZeRO-3 left empty.
        peft.get_peft_model(peft_models.tiny_llama(), qv).save_pretrained(str(root / "untrained-adapter"))
        shutil.copytree(adapter, root / "zero3-adapter")
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.empty(0)
        save_file(tensors, root / "zero3-adapter" / "adapter_model.safetensors")
        for argv in (
            ["inspect", "llama"],
            ["inspect", "adapter"],
            ["check", "llama", "adapter"],
            ["check", "llama", "other-model-adapter"],
            ["check", "llava", "adapter"],
            ["check", "--values", "llama", "adapter", "untrained-adapter", "zero3-adapter"],
        ):
            out, cwd = io.StringIO(), os.getcwd()
            os.chdir(root)  # contextlib.chdir is Python 3.11's
            try:
                with contextlib.redirect_stdout(out):
                    status = cli.main(argv)
            finally:
                os.chdir(cwd)
            blocks.append(f"$ fastkeys {' '.join(argv)}\n{out.getvalue().rstrip()}\n(exit status {status})")
    return "```\n" + "\n\n".join(blocks) + "\n```"


def bench_table() -> str:
    """benches/results.json (written by `make bench`) as the README's table and targets."""
    sys.path.insert(0, str(ROOT))
    from benches import suite

    return "```\n" + suite.format_report(_bench_report()) + "\n```"


def _bench_report() -> dict[str, object]:
    import json

    report: dict[str, object] = json.loads((ROOT / "benches" / "results.json").read_text(encoding="utf-8"))
    return report


def bench_summary() -> str:
    """The user page's short table: fastkeys' time per key and its ratio to the alternatives."""
    report = _bench_report()
    results = {r["scenario"]: r for r in report["results"]}  # type: ignore[attr-defined]
    rows = [
        "| scenario | keys | fastkeys (rust) | PEFT's loop | best pure Python | fastkeys (python) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, what in (
        ("serving", "900 adapters loaded, one more loading"),
        ("dense", "every key carries the adapter's name"),
        ("group", "`KeyMatcher.group` over 901 adapters"),
    ):
        times = results[scenario]["ns_per_key"]
        rust = times["fastkeys (rust)"]

        def ratio(label: str, rust: float = rust, times: dict[str, float] = times) -> str:
            return f"{times[label] / rust:.1f}x slower" if label in times else "-"

        rows.append(
            f"| {scenario}: {what} | {results[scenario]['keys']:,} | {rust:.0f} ns/key | "
            f"{ratio('PEFT loop')} | {ratio('best pure Python')} | {ratio('fastkeys (python)')} |"
        )
    return "\n".join(rows)


def adapters_figures() -> str:
    """docs/loading.md's figures: `make bench-adapters`' last report (benches/adapters.json)."""
    import json

    report = json.loads((ROOT / "benches" / "adapters.json").read_text(encoding="utf-8"))
    times, totals, fresh = report["per_adapter_s"], report["total_s"], report["fresh_model_s"]
    middle = len(times["peft"]) // 2

    def row(label: str, index: int) -> str:
        return (
            f"| {label} | {times['peft'][index] * 1e3:,.0f} ms | {times['fastkeys'][index] * 1e3:,.0f} ms |"
        )

    machine = report["machine"]
    loaders = ", ".join(f"{name}: {count}" for name, count in report["loaders"].items())
    lines = [
        "| | PEFT `load_adapter` loop | `fastkeys.peft.load_adapters` |",
        "|---|---|---|",
        row("adapter 2 (1 already loaded)", 0),
        row(f"adapter {middle + 2}", middle),
        row(f"adapter {report['adapters']} ({report['adapters'] - 1} already loaded)", -1),
        f"| all {report['adapters'] - 1} after the first | {totals['peft']:,.1f} s | "
        f"{totals['fastkeys']:,.1f} s (**{report['speedup_total']:.0f}x less**) |",
        f"| one adapter into a fresh model (median of rounds) | {fresh['peft'] * 1e3:,.0f} ms | "
        f"{fresh['fastkeys'] * 1e3:,.0f} ms ({report['fresh_model_ratio']:.2f}x) |",
        "",
        f"Machine: {machine['cpus']} cores (load average {machine['load_average'][0]:.1f} at the end), "
        f"Python {machine['python']}, PEFT {machine['peft']}, torch {machine.get('torch', '?')}, "
        f"fastkeys {machine['implementation']}; loaders of the {report['adapters'] - 1} loads: {loaders}. "
        f"fastkeys' last load took {report['fastkeys_last_over_first']:.2f}x its first (medians of three).",
        "",
        "| function (fastkeys' last load, cProfile) | cumulative |",
        "|---|---|",
    ]
    lines += [
        f"| `{entry['function']}` | {entry['cumulative_s'] * 1e3:.1f} ms |"
        for entry in report["profile_last_load"]["top"]
        if not entry["function"].startswith(("adapters.py", "~:0(<built-in method gc."))
    ][:10]
    return "\n".join(lines)


TABLES: dict[str, Callable[[], str]] = {
    "adapters": adapters_figures,
    "differences": differences_table,
    "peft": peft_table,
    "loaders": loaders_table,
    "cli": cli_examples,
    "bench": bench_table,
    "bench-summary": bench_summary,
}
# The pages and the tables each must show.
PAGES = {
    README: ("bench-summary",),
    ROOT / "docs" / "differences.md": ("differences", "peft", "loaders"),
    ROOT / "docs" / "benchmarks.md": ("bench",),
    ROOT / "docs" / "cli.md": ("cli",),
    ROOT / "docs" / "loading.md": ("adapters",),
}


def render(
    text: str,
    names: tuple[str, ...] = tuple(TABLES),
    page: str = "README.md",
    surveyed: PeftSurvey | None = None,
) -> str:
    """`text` with the tables `names` regenerated; the PEFT table from `surveyed`'s loads if given."""
    for name in names:
        pattern = re.compile(rf"(<!-- {name}:start -->).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{page} has no <!-- {name}:start --> ... <!-- {name}:end --> markers")
        table = peft_table(surveyed) if name == "peft" else TABLES[name]()

        def framed(found: re.Match[str], table: str = table) -> str:
            return f"{found.group(1)}\n{table}\n{found.group(2)}"

        text = pattern.sub(framed, text)
    return text


if __name__ == "__main__":
    stale = []
    for path, names in PAGES.items():
        text = path.read_text(encoding="utf-8")
        updated = render(text, names, str(path.relative_to(ROOT)))
        if "--check" in sys.argv:
            if updated != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(updated, encoding="utf-8")
    if stale:
        sys.exit(f"out of date: {', '.join(stale)}: run `make docs`")
