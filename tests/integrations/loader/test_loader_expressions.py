"""PEFT's regular-expression matching on fastkeys' linear-time engine (issue 16, item 6).

`linear_time_matching()` must give, on the calling thread, the answer Python's `re` gives to every match
PEFT makes on a config's expressions (or refuse, with a ValueError, what it cannot answer for
exactly), in time linear in the name; other threads keep the real `re`. Runs under both
implementations (FASTKEYS_IMPLEMENTATION=rust and =python).
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.engine  # the linear-time engine: both implementations

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft.tuners.ia3.model import IA3Model  # noqa: E402
from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists  # noqa: E402
from peft.utils.other import get_pattern_key  # noqa: E402

import fastkeys  # noqa: E402
from fastkeys.integrations.loader import peft_re as expressions  # noqa: E402
from fastkeys.integrations.loader.peft_re import LinearTimeMatch, check_expressions, linear_time_matching  # noqa: E402
from fastkeys.rules.expressions import _checked  # noqa: E402
from fixtures.peft_models import save_adapter, tiny_bert, tiny_llama  # noqa: E402
from tests.conftest import examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

NAMES = sorted(
    {name for model in (tiny_llama(), tiny_bert()) for name, _ in model.named_modules()}
    | {
        "transformer.h.10.mlp.c_fc",
        "h.\u0663.attn.c_attn",  # an Arabic-Indic 3: `\d` in PEFT's layer expression matches it
        "blocks.1.experts.0.w1",
        "model.layers.1.mlp.experts.2.gate_proj",
        "model.layers.0.self_attn.q_proj\n",  # before a final newline, `$` holds in `re`
        "mod\u00e8le.couches.0.q_proj",
        "a\x1cb.0.q",  # `re`'s \s matches \x1c
    }
)

# Every kind of config text PEFT matches, and the function PEFT matches it with.
KINDS = {kind: expressions._PEFT[kind] for kind in expressions._ENGINES}
FUNCTION = {"fullmatch": "fullmatch", "search": "search"}


def _outcome(call: Any) -> tuple[str, Any]:
    """('ok', value) or (exception type name, message)."""
    try:
        return "ok", call()
    except Exception as error:
        return type(error).__name__, str(error)


class _Slow(BaseException):
    """The real `re` took too long: a backtracking case, not one to compare answers on."""


def _both(call: Any, limit: float = 0.5) -> tuple[tuple[str, Any], tuple[str, Any]] | None:
    """`call` outside (given `limit` seconds: `re` checks for signals while it backtracks), then
    inside `linear_time_matching()`; None when outside took too long."""

    def ring(*_: object) -> None:
        raise _Slow

    # no garbage collection in the window: the alarm would ring inside a gc callback (hypothesis
    # installs one), where an exception is only reported, as an unraisable one (seen once in CI)
    collecting = gc.isenabled()
    gc.disable()
    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        outside = _outcome(call)
    except _Slow:
        return None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if collecting:
            gc.enable()
    with linear_time_matching():
        inside = _outcome(call)
    return outside, inside


def _fragments(config: SimpleNamespace) -> list[str]:
    found = [config.target_modules] if isinstance(config.target_modules, str) else []
    found += [config.exclude_modules] if isinstance(config.exclude_modules, str) else []
    found += [f"{m}" for m in config.modules_to_save or []]
    patterns = config.layers_pattern
    found += [patterns] if isinstance(patterns, str) else [f"{p}" for p in patterns or []]
    return found


def _differs(fragment: str, name: str) -> bool:
    """Whether fastkeys' dialect reads `fragment` differently from `re` on `name`."""
    try:
        return expressions._read_differently(fragment, name) is not None
    except re.error:  # not an expression on its own: never matched by the dialect
        return False


def _refusal_is_allowed(config: SimpleNamespace, name: str, message: str) -> bool:
    """A ValueError inside the block is allowed for an expression outside the dialect, or one that
    reads ASCII-only constructs matched against a name the dialect does not read as `re` does."""
    try:
        check_expressions(vars(config), "config")
    except ValueError:
        return True
    return "cannot be matched" in message and any(_differs(f, name) for f in _fragments(config))


def _config(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict.fromkeys(
        ("target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern")
    )
    base["target_parameters"] = None
    return SimpleNamespace(**{**base, **fields})


def _same(config: SimpleNamespace, name: str) -> None:
    def call() -> tuple[str, bool]:
        found = check_target_module_exists(config, name)
        return type(found).__name__ if isinstance(found, _ExcludedModule) else "", bool(found)

    both = _both(call)
    if both is None:
        return
    outside, inside = both
    if inside[0] == "ValueError" and inside != outside:
        assert _refusal_is_allowed(config, name, inside[1]), (config, name, inside)
    else:
        assert inside == outside, (config, name)


# --- (1) differential: PEFT's own functions, inside and outside ------------------------------

REALISTIC = [
    _config(target_modules=r".*\.(q|v)_proj"),
    _config(target_modules=r".*(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj$"),
    _config(target_modules=r"model\.layers\.\d+\.self_attn\.[qkv]_proj"),
    _config(target_modules=r"(?i).*Q_PROJ"),
    _config(target_modules=r".*\bq_proj", exclude_modules=r".*\.0\..*"),
    _config(target_modules=r"\w+\.\w+\.\d\.\w+\.q_proj"),
    _config(target_modules=r"(?s).*query|.*value"),
    _config(target_modules="lm_head|all-linear"),
    _config(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head", "classifier", "score"]),
    _config(target_modules=["q_proj", "down_proj"], modules_to_save=["mlp", r"embed_\w+"]),
    _config(target_modules=["q_proj", "c_attn"], modules_to_save="lm_head"),  # a string: its characters
    _config(target_modules=["q_proj"], exclude_modules=r".*layers\.1.*", modules_to_save=[r"layers\.1"]),
    _config(target_modules=["q_proj", "v_proj", "c_attn"], layers_to_transform=[1, 3, 10]),
    _config(target_modules=["q_proj", "c_attn", "w1"], layers_to_transform=1, layers_pattern="layers"),
    _config(
        target_modules=["q_proj", "c_attn", "w1"], layers_to_transform=[0, 3], layers_pattern=["layers", "h"]
    ),
    _config(target_modules=["q_proj", "c_attn"], layers_to_transform=[0, 1, 3], layers_pattern="layers|h"),
    _config(target_modules=["q_proj", "gate_proj"], layers_to_transform=[1, 2], layers_pattern=r"l\w+s"),
    _config(target_modules=["w1", "gate_proj"], layers_to_transform=[0, 2], layers_pattern=["experts", ""]),
    _config(target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["(?P<layer>layers)"]),
    _config(
        target_modules=["q_proj"], layers_to_transform=[0], layers_pattern=["(?P<idx>layers)"]
    ),  # re.error
    _config(target_modules="(?=q).*"),  # lookahead: refused inside, answered outside
]


@pytest.mark.parametrize("config", REALISTIC, ids=range(len(REALISTIC)))
def test_check_target_module_exists_answers_alike(config: SimpleNamespace) -> None:
    for name in NAMES:
        _same(config, name)


def test_pattern_keys_and_feedforward_modules_answer_alike() -> None:
    key_lists = [
        ["q_proj"],
        [r"layers\.1\.self_attn\.q_proj", "q_proj"],
        [r"model.*v_proj", r"mlp\..*"],
        [r"\d\.mlp\.down_proj", "(v|k)_proj$"],
        ["(?i)Q_PROJ"],  # PEFT's expression puts the flag in the middle: re.error both ways
        ["q_proj|(?i:K_PROJ)", r"\w+"],
    ]
    for keys in key_lists:
        for name in NAMES:
            both = _both(lambda keys=keys, name=name: get_pattern_key(keys, name))
            assert both is not None
            outside, inside = both
            if inside[0] != outside[0] and inside[0] == "ValueError":
                assert "cannot be matched" in inside[1]
                assert any(_differs(k, name) for k in keys), (keys, name)
            else:
                assert inside == outside, (keys, name)
    feedforward = IA3Model._check_target_module_feedforward
    for modules in [r".*\.down_proj", r".*mlp\..*", r"(?i).*DOWN.*"]:
        config = SimpleNamespace(feedforward_modules=modules)
        for name in NAMES:
            both = _both(lambda name=name, config=config: feedforward(config, name))
            assert both is not None
            outside, inside = both
            if inside[0] != outside[0] and inside[0] == "ValueError":
                assert "cannot be matched" in inside[1]
                assert _differs(modules, name), (modules, name)
            else:
                assert inside == outside, (modules, name)


# A small grammar of expressions: the constructs PEFT's configs use, the ones the dialect reads as
# ASCII, anchors, groups (named ones too), lazy and counted repetitions.
ATOMS = [
    "a", "b", "q", "_", "1", "\u0663", ".", r"\.", "[ab]", "[^.]", "[0-9]", r"\d", r"\w", r"\s",
    r"\W", r"\b", "^", "$", r"\Z", "(?i:A)", r"\x61", "é", "{", "", "layers", "h", "model", "[a-z_]+",
    r"\w+", ".*", ".*?", "q_proj", "self_attn", "mlp", r"\d+",
]  # fmt: skip


def _extend(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.lists(children, min_size=2, max_size=3).map("".join),
        st.tuples(children, children).map("|".join),
        st.tuples(st.sampled_from(["(", "(?:", "(?P<g>", "(?s:"]), children).map(lambda t: f"{t[0]}{t[1]})"),
        st.tuples(children, st.sampled_from(["*", "+", "?", "*?", "+?", "??", "{1,2}", "{2}", "{,2}"])).map(
            lambda t: f"(?:{t[0]}){t[1]}"
        ),
    )


EXPRESSIONS = st.one_of(
    st.recursive(st.sampled_from(ATOMS), _extend, max_leaves=6),
    st.sampled_from(["(?i)q.*", "(?s).*", "(?i)", "(a|aa)+$", "(.*a){3}", "a)|(b", "(?=a)"]),
)
TEXTS = st.one_of(st.text(alphabet="ab1q_.\u0663Aé\n\x1c", max_size=10), st.sampled_from(NAMES))


@settings(max_examples=examples(300), deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), fragment=EXPRESSIONS, text=TEXTS)
def test_every_template_answers_as_re_does(kind: str, fragment: str, text: str) -> None:
    """Each PEFT template, through the `re` PEFT's modules see, against the real `re`."""
    pattern = KINDS[kind].replace("{}", fragment, 1)
    function = FUNCTION.get(kind, "match")

    def call() -> Any:
        found = getattr(peft.tuners.tuners_utils.re, function)(pattern, text)
        if kind == "layers" and found:
            return True, found.groupdict().get("idx")
        return bool(found)

    both = _both(call)
    if both is None:
        return
    outside, inside = both
    if inside[0] != "ValueError" or outside[0] == "ValueError":  # refusals: the next test
        assert inside == outside, (pattern, text)


SEGMENTS = ["model", "layers", "h", "blocks", "experts", "0", "1", "12", "\u0663", "q_proj", "a", ""]
LAYER_PATTERNS = st.one_of(
    EXPRESSIONS,
    st.sampled_from(
        ["layers", "h", "blocks", r"l\w+s", r"model\.layers", ".*layers", "layers|h", "h|layers"]
    ),
    st.sampled_from([r"(?:la|h)[a-z]*", "", "experts", r"\w+", ".*", "[^.]*", "layers|", "|h"]),
)


@settings(max_examples=examples(300), deadline=None)
@given(pattern=LAYER_PATTERNS, segments=st.lists(st.sampled_from(SEGMENTS), min_size=2, max_size=7))
def test_the_layer_index_is_read_as_re_reads_it(pattern: str, segments: list[str]) -> None:
    name = ".".join(segments)
    proxy: Any = peft.tuners.tuners_utils.re
    for template in (KINDS["layers"].replace("{}", pattern, 1), r".*?\.[^.]*\.(?P<idx>\d+)\."):

        def call(template: str = template) -> Any:
            found = proxy.match(template, name)
            return found and found.groupdict().get("idx")

        both = _both(call)
        if both is not None and (both[1][0] != "ValueError" or both[0][0] == "ValueError"):
            assert both[1] == both[0], (template, name)


@settings(max_examples=examples(300), deadline=None)
@given(fragment=EXPRESSIONS, text=TEXTS)
def test_refusals_happen_only_where_the_dialect_must(fragment: str, text: str) -> None:
    """Inside the block a ValueError comes only from an expression outside the dialect, or one of
    its ASCII-only constructs against a name the dialect does not read as `re` does."""
    try:
        _checked(fragment, "x")
        in_dialect = True
    except ValueError:
        in_dialect = False
    for kind, template in KINDS.items():
        pattern = template.replace("{}", fragment, 1)
        function = FUNCTION.get(kind, "match")
        with linear_time_matching():
            refused = _outcome(lambda p=pattern, f=function: getattr(peft.utils.other.re, f)(p, text))
        if refused[0] != "ValueError":
            continue
        if "groups of its own" in refused[1]:  # PEFT < 0.21 would read the fragment's group
            assert kind.startswith("layers_") and re.compile(fragment).groups > 0, (pattern, refused)
        elif in_dialect and "flags would apply" not in refused[1]:
            assert _differs(fragment, text), (pattern, text, refused)


@settings(max_examples=examples(200), deadline=None)
@given(
    target=st.one_of(EXPRESSIONS, st.just(["q_proj", "c_attn", "w1", "attn"])),
    exclude=st.one_of(st.none(), EXPRESSIONS),
    saved=st.one_of(st.none(), st.lists(EXPRESSIONS, max_size=2)),
    layers=st.one_of(st.none(), st.just([0, 1, 3])),
    pattern=st.one_of(st.none(), EXPRESSIONS, st.lists(EXPRESSIONS, max_size=2)),
    name=TEXTS,
)
def test_generated_configs_answer_alike(
    target: Any, exclude: Any, saved: Any, layers: Any, pattern: Any, name: str
) -> None:
    config = _config(
        target_modules=target,
        exclude_modules=exclude,
        modules_to_save=saved,
        layers_to_transform=layers,
        layers_pattern=pattern,
    )
    _same(config, name)


# --- what a match returns ------------------------------------------------------------------


def test_a_match_holds_what_peft_reads() -> None:
    proxy: Any = expressions._PROXY
    with linear_time_matching():
        found = proxy.match(r"(?:^|.*?\.)layers\.(?P<idx>\d+)\.", "model.layers.12.q")
        assert isinstance(found, LinearTimeMatch) and found
        assert found.groupdict() == {"idx": "12"} and found.group("idx") == "12" and found["idx"] == "12"
        assert found.group(1) == "12"
        with pytest.raises(NotImplementedError):
            found.group(0)  # where a re.match ends is not kept
        with pytest.raises(IndexError):
            found.group("nope")
        unindexed = proxy.match(r"(?:^|.*?\.)lay|h\.(?P<idx>\d+)\.", "model.layers.12.q")
        assert (
            unindexed and unindexed.groupdict() == {"idx": None} and unindexed.groupdict("-") == {"idx": "-"}
        )
        whole = proxy.fullmatch(r"(m)odel\..*", "model.x")
        assert whole.group() == "model.x" and whole.span() == (0, 7) and whole.re.pattern == r"(m)odel\..*"
        with pytest.raises(NotImplementedError):
            whole.group(1)  # the config's own groups are not captured
        assert proxy.search("q_proj", "model.v_proj") is None


# --- checking a config before the load ---------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"target_modules": "(?=q)q"},
            "cfg.json: target_modules '(?=q)q' is not an expression fastkeys accepts",
        ),
        ({"exclude_modules": r"(a)\1"}, r"cfg.json: exclude_modules '(a)\\1' is not an expression fastkeys"),
        ({"modules_to_save": ["lm_head", "a++"]}, "cfg.json: modules_to_save[1] 'a++' is not"),
        ({"rank_pattern": {"q": 4, "(?<=x)q": 8}}, "cfg.json: rank_pattern key '(?<=x)q' is not"),
        ({"alpha_pattern": {"(?i)q": 8}}, "alpha_pattern key '(?i)q' is not an expression PEFT can use"),
        ({"lambda_pattern": {"(?#c)": 1}}, "cfg.json: lambda_pattern key '(?#c)' is not"),
        (
            {"layers_to_transform": [1], "layers_pattern": ["h", "x(?!y)"]},
            "layers_pattern[1] 'x(?!y)' is not",
        ),
        ({"layers_to_transform": 0, "layers_pattern": "(?P<idx>h)"}, "redefinition of group name"),
        ({"peft_type": "IA3", "feedforward_modules": "(?=f)"}, "cfg.json: feedforward_modules '(?=f)'"),
        ({"peft_type": "FOURIERFT", "n_frequency_pattern": {"(?>a)": 8}}, "n_frequency_pattern key '(?>a)'"),
        ({"ensure_weight_tying": True, "target_modules": ["q", "(?=e)"]}, "target_modules[1] '(?=e)'"),
        ({"ensure_weight_tying": True, "target_modules": "(?i)q"}, "writes it into '(?:(?i)q|^x$)'"),
        ({"target_modules": "x" * 6_000}, "too large"),
    ],
)
def test_check_expressions_names_the_file_the_field_and_the_expression(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        check_expressions(config, "cfg.json")


@pytest.mark.parametrize(
    "config",
    [
        {"peft_type": "LORA", "target_modules": r".*\.(q|v)_proj", "rank_pattern": {"q_proj": 8}},
        {"target_modules": ["q_proj", "(?=x)"]},  # a list is matched by suffix, never as an expression
        {"target_modules": ["q"], "layers_pattern": "(?=x)"},  # no layers_to_transform: never matched
        {"target_modules": ["q"], "layers_to_transform": [], "layers_pattern": "(?=x)"},
        {"peft_type": "OSF", "rank_pattern": {"q_proj": 4}},
        {"peft_type": "FOURIERFT", "n_frequency_pattern": {r"layers\.0\.q": 8}},
        {"target_modules": "(?i)q_proj"},  # a flag at the start of PEFT's whole expression
        {"modules_to_save": None, "exclude_modules": ["(?=x)"], "feedforward_modules": ["(?=x)"]},
    ],
)
def test_check_expressions_accepts_what_peft_never_matches_or_fastkeys_reads(config: dict[str, Any]) -> None:
    check_expressions(config, "cfg.json")


def test_check_expressions_reads_a_peft_config_object() -> None:
    config = peft.LoraConfig(target_modules=["q_proj"], rank_pattern={"(?<=a)q": 2})
    with pytest.raises(ValueError, match="adapter: rank_pattern key"):
        check_expressions(config, "adapter")
    check_expressions(peft.LoraConfig(target_modules=r".*q_proj", alpha_pattern={"q_proj": 2}), "adapter")


# --- (3) threads -------------------------------------------------------------------------------


def test_only_the_calling_thread_is_affected() -> None:
    hostile = "(?=a)a"  # outside fastkeys' dialect: refused inside the block, answered outside
    entered, release = threading.Event(), threading.Event()
    seen: dict[str, Any] = {}

    def holder() -> None:
        with linear_time_matching():
            seen["inside"] = _outcome(lambda: peft.utils.other.re.fullmatch(hostile, "a"))
            child = threading.Thread(
                target=lambda: seen.update(child=peft.utils.other.re.fullmatch(hostile, "a"))
            )
            child.start()
            child.join()
            entered.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert entered.wait(10)
        # While another thread holds a block open: the real `re`, answers and all.
        proxy: Any = peft.utils.other.re
        assert isinstance(proxy, expressions._Re)  # installed, and a pass-through here
        assert isinstance(proxy.fullmatch(hostile, "a"), re.Match)
        assert isinstance(proxy.compile(hostile), re.Pattern) and proxy.escape is re.escape
        assert sys.modules["re"] is re and re.fullmatch.__module__ == "re"
    finally:
        release.set()
        thread.join()
    assert seen["inside"][0] == "ValueError" and "lookaround" in seen["inside"][1]
    assert isinstance(seen["child"], re.Match)  # a thread started inside the block is outside it
    # Inside a block, `re` itself (not PEFT's) stays the real one; blocks nest; errors leave.
    with linear_time_matching():
        assert isinstance(re.fullmatch(hostile, "a"), re.Match)
        with linear_time_matching():
            pass
        with pytest.raises(ValueError):
            peft.utils.other.re.fullmatch(hostile, "a")
    with pytest.raises(KeyError), linear_time_matching():
        raise KeyError
    assert isinstance(peft.utils.other.re.fullmatch(hostile, "a"), re.Match)


# --- (2) hostile configs load in linear time ---------------------------------------------------

MEMORY = 8 << 30  # bytes of address space for a child: torch maps more than test_hostile's 2 GiB
TIMEOUT = 90  # seconds for the whole child; importing torch and PEFT takes most of it
WITHOUT = 3.0  # seconds the unprotected load is given: it needs minutes


def _child(code: str) -> dict[str, Any]:
    """Runs `code` in a child (same implementation, memory cap, timeout); its last stdout line,
    as JSON."""

    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        preexec_fn=limit,
        cwd=ROOT,
        env={**os.environ, "FASTKEYS_IMPLEMENTATION": fastkeys.IMPLEMENTATION, "PYTHONWARNINGS": "ignore"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_hostile_expressions_load_in_linear_time_and_hang_without(tmp_path: Path) -> None:
    # Every field PEFT splices into an expression, each one catastrophic for a backtracking
    # matcher on the model's names (`(.+)+X` on a 31-character name: about 2**31 steps).
    single = save_adapter(peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), tmp_path / "single")
    config = json.loads((single / "adapter_config.json").read_text())
    config.update(
        target_modules=r"(.+)+X|.*\.self_attn\.(q|v)_proj",
        exclude_modules="(.+)+Y",
        modules_to_save=["(.+)+W"],
        rank_pattern={"(.+)+Z": 8},
        alpha_pattern={"(.+)+V": 8},
    )
    (single / "adapter_config.json").write_text(json.dumps(config))
    layered = save_adapter(
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        tmp_path / "layered",
    )
    config = json.loads((layered / "adapter_config.json").read_text())
    config.update(layers_pattern=["(.+)+L", "layers"])
    (layered / "adapter_config.json").write_text(json.dumps(config))

    result = _child(
        f"""
        import json, signal, time
        import peft
        from fastkeys.integrations.loader.peft_re import linear_time_matching
        from fixtures.peft_models import tiny_llama

        def ring(*_):
            raise TimeoutError

        signal.signal(signal.SIGALRM, ring)

        def timed(call, limit):
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                call()
            except TimeoutError:
                return None
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            return time.perf_counter() - start

        def adapted(model):
            return sorted(n for n, _ in model.named_modules() if n.endswith("lora_A.layered") or
                          n.endswith("lora_A.default") or n.endswith("modules_to_save.default"))

        loaded = {{}}

        def load():
            model = peft.PeftModel.from_pretrained(tiny_llama(), {str(single)!r})
            model.load_adapter({str(layered)!r}, adapter_name="layered")
            loaded["model"] = model

        with linear_time_matching():
            inside = timed(load, 60)
        modules = adapted(loaded["model"])
        outside = timed(lambda: peft.PeftModel.from_pretrained(tiny_llama(), {str(single)!r}), {WITHOUT})
        print(json.dumps({{"inside": inside, "outside": outside, "modules": modules}}))
        """
    )
    layer = "base_model.model.model.layers.{}.self_attn.{}_proj.lora_A.{}"
    assert result["modules"] == sorted(
        [layer.format(i, p, "default") for i in (0, 1) for p in "qv"]
        + [layer.format(1, p, "layered") for p in "qv"]
    )
    assert result["inside"] is not None and result["inside"] < 10, result
    assert result["outside"] is None, result  # the same load without linear_time_matching(): still at it


@pytest.mark.parametrize("template", [r".*\.{}\.(\d+)\.", r".*?\.{}\.(\d+)\."])
def test_the_layer_index_templates_of_peft_before_0_21(template: str) -> None:
    """PEFT 0.17-0.19 (greedy) and 0.20 (lazy) read the layer index with `.group(1)`: the same
    answers through the proxy, and a fragment with groups of its own (PEFT would read those as the
    index) is refused rather than answered differently."""
    import peft.tuners.tuners_utils as tuners_utils

    names = ["model.layers.3.self_attn.q_proj", "a.h.12.attn.c", "x.layers.1.y.layers.2.z", "layers.4.q", "q"]
    with linear_time_matching():
        pass  # installs the proxy
    proxy: Any = vars(tuners_utils)["re"]
    for fragment in ["layers", "h", "layers|h", "lay.rs", "(?:la)yers"]:
        pattern = template.format(fragment)
        for name in names:
            expected = re.match(pattern, name)
            with linear_time_matching():
                got = proxy.match(pattern, name)
            assert (got is None) == (expected is None), (pattern, name)
            if expected is not None:
                assert got.group(1) == expected.group(1), (pattern, name)
    with linear_time_matching(), pytest.raises(ValueError, match="groups of its own"):
        proxy.match(template.format("(layers|h)"), names[0])
