"""PEFT's regular-expression matching on fastkeys' linear-time engine, for the duration of a load.

An adapter's `adapter_config.json` is hostile input, and PEFT splices parts of it into regular
expressions that it matches with Python's backtracking `re`: `target_modules: "(.+)+X"` then holds
a load for minutes. `linear_time_matching()` makes every `re.match`, `re.fullmatch` and `re.search` that
PEFT's modules make, on the calling thread and while the block is open, run on
`fastkeys.rules.expressions` (Rust's `regex` crate, or the pure-Python Pike VM), with the answer `re` gives.

How. Each `peft.*` module's global `re` is replaced, once and for all, by `_Re`: a module object
that hands every attribute to the real `re`, except `match`, `fullmatch` and `search`, which
ask whether the calling thread is inside a block (`fastkeys.integrations.marks`): outside
(other threads, code outside the block) they are the real functions, called as is. Inside the
block a call is answered so:

1. The whole pattern is compiled by the real `re` (compiling is linear; matching is what
   backtracks), so that a pattern PEFT could not compile raises the `re.error` PEFT would raise.
2. PEFT's fixed patterns (`_fixed()`: no config text in them) are matched by the real `re`.
3. The pattern is read as one of PEFT's templates (`_PEFT`, `_ENGINES`): its fixed prefix and
   suffix are written out by hand for both engines, exactly (`$` is Python's "end, or before a final
   newline"; `\\d` in `(?P<idx>\\d+)` is Unicode's decimal digits), and the config's fragment in
   between goes through `fastkeys.rules.expressions`, which refuses what it cannot read as `re` does.
   A pattern that fits no template is one fragment, anchored as the function anchors it.
   The fragment must be a whole expression on its own (balanced, nothing to repeat at its start),
   so splicing its translation where PEFT spliced its text keeps the structure `re` parses.
4. The dialect reads `\\d \\w \\s \\b` and `(?i)` as on ASCII text and `$` as the very end:
   what `re` does on an ASCII name (for `\\s`, one without \\x1c-\\x1f) that does not end in a
   newline, which is every module name of every model we know. A fragment using one of those,
   matched against a name where the two readings differ, is refused (ValueError) rather than
   answered differently (`_read_differently`).

Refused inside the block (ValueError naming the field and the expression, never handed to the real
`re`): what `fastkeys.rules.expressions` refuses (lookaround, back-references, possessive quantifiers,
expressions over `MAX_SIZE` atoms, ...), a non-zero `flags` argument, the case of point 4, and a
global flag that PEFT's splicing moved into the middle of its expression (an error since Python
3.11, a flag on the whole expression before). `check_expressions` refuses the same fragments,
by field, before the model changes.

What a match returns is a `LinearTimeMatch`: true, and holding what PEFT reads (`groupdict()["idx"]`
for the layer index; group 0 of a `fullmatch`). Groups of the config's own expression are not
captured: asking for one raises NotImplementedError.
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import types
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from fastkeys.integrations.marks import ThreadMarks
from fastkeys.rules.expressions import _checked, regex_for_engine

if sys.version_info >= (3, 11):
    from re import _constants as _c
    from re import _parser as _sre_parse
else:  # pragma: no cover (3.10)
    import sre_constants as _c
    import sre_parse as _sre_parse

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastkeys.engine.contract import Regex

__all__ = ["LinearTimeMatch", "check_expressions", "linear_time_matching"]

# PEFT's templates (peft 0.21.2) by kind: the text PEFT formats, `{}` where the config's text goes.
_PEFT: dict[str, str] = {
    # peft/utils/other.py get_pattern_key; peft/tuners/tuners_utils.py, the rank/alpha_pattern check
    "pattern_key": r"(.*\.)?({})$",
    # peft/tuners/tuners_utils.py check_target_module_exists; peft/tuners/lora/model.py (tying)
    "module": r"(^|.*\.){}($|\..*)",
    # peft/tuners/tuners_utils.py check_target_module_exists: the layer index after layers_pattern
    "layers": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
    # the same before peft 0.21 (read with `.group(1)`): greedy in 0.17-0.19, lazy in 0.20
    "layers_greedy": r".*\.{}\.(\d+)\.",
    "layers_lazy": r".*?\.{}\.(\d+)\.",
    # peft/tuners/fourierft/model.py, peft/tuners/c3a/model.py: n_frequency/block_size_pattern keys
    "dotted_key": r".*\.{}$",
    # target_modules, exclude_modules, feedforward_modules as a string (re.fullmatch)
    "fullmatch": "{}",
    # peft/tuners/osf/model.py: rank_pattern keys (re.search)
    "search": "{}",
    # a re.match pattern that fits no template (none in peft 0.21.2): all of it the config's
    "match": "{}",
    # peft/tuners/lora/model.py _add_targets_to_tie: a string target_modules or the embedding's
    # escaped name, then matched as a whole by re.fullmatch (only check_expressions uses this)
    "tie": r"(?:{}|^x$)",
}

# The same for fastkeys' engines, (Rust, Python), anchored as `re.match`/`fullmatch`/`search`
# anchor; `{D}` is the digit class. `$` ending a `re.match` pattern is "end, or before a final
# newline": `\n?` then the very end. A fragment PEFT splices ungrouped is spliced ungrouped here
# too (its `|` splits the whole), inside a group that anchors every alternative as re.match does.
_ENGINES: dict[str, tuple[str, str]] = {
    "pattern_key": (r"^(?:.*\.)?(?:{})\n?$", r"\A(?:.*\.)?(?:{})\n?\Z"),
    "module": (r"^(?:(?:^|.*\.){}(?:\n?$|\..*))", r"\A(?:(?:\A|.*\.){}(?:\n?\Z|\..*))"),
    "layers": (r"^(?:(?:^|.*?\.){}\.({D}+)\.)", r"\A(?:(?:\A|.*?\.){}\.({D}+)\.)"),
    "layers_greedy": (r"^(?:.*\.{}\.({D}+)\.)", r"\A(?:.*\.{}\.({D}+)\.)"),
    "layers_lazy": (r"^(?:.*?\.{}\.({D}+)\.)", r"\A(?:.*?\.{}\.({D}+)\.)"),
    "dotted_key": (r"^(?:.*\.{}\n?$)", r"\A(?:.*\.{}\n?\Z)"),
    "fullmatch": (r"^(?:{})$", r"\A(?:{})\Z"),
    "search": ("(?:{})", "(?:{})"),
    "match": (r"^(?:{})", r"\A(?:{})"),
}

# The templates a `re.match` pattern is read as, by their fixed text; a pattern starting with one
# prefix and ending with its suffix is that template whatever filled it (see the module doc).
_MATCH_KINDS = ("pattern_key", "module", "layers", "layers_lazy", "layers_greedy", "dotted_key")

# Which config field a refusal names, from the PEFT function that matched (a default per kind).
_FIELDS = {
    "pattern_key": "rank_pattern/alpha_pattern key",
    "module": "modules_to_save entry",
    "layers": "layers_pattern",
    "layers_greedy": "layers_pattern",
    "layers_lazy": "layers_pattern",
    "dotted_key": "n_frequency_pattern/block_size_pattern key",
    "fullmatch": "target_modules",
    "search": "rank_pattern key",
    "match": "expression",
}
_FIELDS_BY_CALLER = {
    ("module", "_add_targets_to_tie"): "target_modules entry",
    ("fullmatch", "check_target_module_exists"): "exclude_modules",
    ("fullmatch", "_check_target_module_feedforward"): "feedforward_modules",
}


# Open `linear_time_matching()` blocks on each thread.
_MATCHING: ThreadMarks[bool] = ThreadMarks("linear_time_matching")


class LinearTimeMatch:
    """What `re.match`, `re.fullmatch` and `re.search` return inside `linear_time_matching()` when the
    expression matches: true, with the groups fastkeys knows (PEFT's `idx`; group 0 of a
    fullmatch). `re` is the pattern compiled by the real `re`, `string` the text matched."""

    __slots__ = ("_named", "_numbered", "_whole", "re", "string")

    def __init__(
        self,
        compiled: re.Pattern[str],
        string: str,
        whole: bool,
        named: dict[str, str | None],
        numbered: dict[int, str | None] | None = None,
    ) -> None:
        self.re = compiled
        self.string = string
        self._whole = whole
        self._named = named
        self._numbered = numbered or {}

    def __bool__(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<fastkeys.LinearTimeMatch of {self.re.pattern!r} in {self.string!r}>"

    @property
    def pos(self) -> int:
        return 0

    @property
    def endpos(self) -> int:
        return len(self.string)

    def _name(self, group: int | str) -> str | int:
        if group == 0:
            if self._whole:
                return 0
        else:
            index = self.re.groupindex.get(group, group) if isinstance(group, str) else group
            if not isinstance(index, int) or not 0 < index <= self.re.groups:
                raise IndexError("no such group")
            if index in self._numbered:
                return index
            for name, number in self.re.groupindex.items():
                if number == index and name in self._named:
                    return name
        raise NotImplementedError(
            f"group {group!r} of {self.re.pattern!r}: linear_time_matching() captures only what PEFT reads"
        )

    def group(self, *groups: int | str) -> Any:
        values = [self[group] for group in groups or (0,)]
        return values[0] if len(values) == 1 else tuple(values)

    def __getitem__(self, group: int | str) -> str | None:
        name = self._name(group)
        if isinstance(name, int):
            return self.string if name == 0 else self._numbered[name]
        return self._named[name]

    def groupdict(self, default: Any = None) -> dict[str, Any]:
        """The named groups fastkeys captured (PEFT reads `idx`); others are left out."""
        return {name: default if value is None else value for name, value in self._named.items()}

    def span(self, group: int | str = 0) -> tuple[int, int]:
        if self._name(group) != 0:
            raise NotImplementedError("linear_time_matching() knows the span of a fullmatch only")
        return 0, len(self.string)

    def start(self, group: int | str = 0) -> int:
        return self.span(group)[0]

    def end(self, group: int | str = 0) -> int:
        return self.span(group)[1]


class _Re(types.ModuleType):
    """`re` as PEFT's modules see it: the real module, but for `match`, `fullmatch` and `search`
    on a thread inside `linear_time_matching()`."""

    def __init__(self) -> None:
        super().__init__("re", re.__doc__)
        for name in ("__file__", "__loader__", "__package__", "__spec__"):
            setattr(self, name, getattr(re, name, None))

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)

    def __dir__(self) -> list[str]:
        return dir(re)

    def __repr__(self) -> str:
        return "<module 're', matching in linear time inside fastkeys' linear_time_matching()>"

    def match(self, pattern: Any, string: Any, flags: Any = 0) -> Any:
        if not _MATCHING.values():
            return re.match(pattern, string, flags)
        return _answer("match", pattern, string, flags, _caller())

    def fullmatch(self, pattern: Any, string: Any, flags: Any = 0) -> Any:
        if not _MATCHING.values():
            return re.fullmatch(pattern, string, flags)
        return _answer("fullmatch", pattern, string, flags, _caller())

    def search(self, pattern: Any, string: Any, flags: Any = 0) -> Any:
        if not _MATCHING.values():
            return re.search(pattern, string, flags)
        return _answer("search", pattern, string, flags, _caller())


_PROXY = _Re()


def _caller() -> str:
    """The PEFT function that called `re` (past generator expressions and lambdas)."""
    frame = sys._getframe(2)
    while frame.f_back is not None and frame.f_code.co_name.startswith("<"):
        frame = frame.f_back
    return frame.f_code.co_name


@contextlib.contextmanager
def linear_time_matching() -> Iterator[None]:
    """While open, on the calling thread only: PEFT's `re.match`, `re.fullmatch` and `re.search`
    run on fastkeys' linear-time engine and answer as `re` would, or raise ValueError for an expression
    fastkeys cannot answer for exactly (see the module doc). Other threads, and this one outside
    the block, see the real `re`. Blocks nest."""
    _install()
    with _MATCHING.mark(True):
        yield


# The modules of peft 0.21.2 that match config text with `re`: patched on every block. The other
# `peft.*` modules are patched when `sys.modules` has changed size since they were last looked at.
_KNOWN = (
    "peft.utils.other",
    "peft.tuners.tuners_utils",
    "peft.tuners.lora.model",
    "peft.tuners.ia3.model",
    "peft.tuners.fourierft.model",
    "peft.tuners.c3a.model",
    "peft.tuners.osf.model",
    "peft.utils.save_and_load",
)
_scanned = [-1]  # len(sys.modules) at the last full look


def _install() -> None:
    """Puts `_PROXY` in place of `re` in every `peft` module imported so far (again on each
    block, for modules PEFT imports late); the real `re` stays everyone else's."""
    import peft  # noqa: F401  (imports PEFT's tuners, so that they are patched too)

    # No lock: each step is idempotent (two threads at once set the same attribute twice), and a
    # lock held across Python code leaks for good when a KeyboardInterrupt lands on the `with`
    # line's exit (its __exit__ call is outside the protected range): every later load would hang.
    if len(sys.modules) != _scanned[0]:
        _scanned[0] = len(sys.modules)
        names: Iterable[str] = [n for n in list(sys.modules) if n == "peft" or n.startswith("peft.")]
    else:
        names = _KNOWN
    for name in names:
        module = sys.modules.get(name)
        if module is not None and vars(module).get("re") is re:
            module.re = _PROXY  # type: ignore[attr-defined]


@functools.cache
def _fixed() -> frozenset[str]:
    """PEFT's patterns that hold no config text: matched by the real `re`, as they are."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    patterns = {r".*?\.[^.]*\.(?P<idx>\d+)\."}  # tuners_utils check_target_module_exists
    patterns |= {r".*\.[^.]*\.(\d+)\.", r".*?\.[^.]*\.(\d+)\."}  # the same in peft 0.17-0.19, 0.20
    patterns |= {rf"(.*\.)?{e}$" for e in EMBEDDING_LAYER_NAMES}  # save_and_load (saving)
    return frozenset(patterns)


def _read(function: str, pattern: str) -> tuple[str, str]:
    """(template kind, the config's fragment) of a pattern PEFT passed to `function`."""
    if function == "match":
        for kind in _MATCH_KINDS:
            prefix, suffix = _PEFT[kind].split("{}")
            if (
                pattern.startswith(prefix)
                and pattern.endswith(suffix)
                and len(pattern) >= len(prefix + suffix)
            ):
                return kind, pattern[len(prefix) : len(pattern) - len(suffix)]
    return function, pattern


_CLASSES, _BOUNDARY, _FOLD, _END = "\\d, \\w or \\s", "\\b", "(?i)", "$"


@functools.lru_cache(maxsize=1024)
def _constructs(fragment: str) -> frozenset[str]:
    """The constructs of `fragment` that `fastkeys.rules.expressions` reads as on ASCII text (`\\d \\w
    \\s \\b`, `(?i)`) or as the very end (`$`), where `re` reads Unicode or "end, or before a
    final newline"."""
    parsed: Any = _sre_parse.parse(fragment, 0)
    found = {_FOLD} if parsed.state.flags & _c.SRE_FLAG_IGNORECASE else set()
    boundaries = {_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY, _c.AT_UNI_BOUNDARY, _c.AT_UNI_NON_BOUNDARY}
    repeats = {_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)}
    stack: list[Any] = list(parsed)
    while stack:
        op, av = stack.pop()
        if op is _c.IN and any(item is _c.CATEGORY for item, _ in av):
            found.add(_CLASSES)
        elif op is _c.AT and av in boundaries:
            found.add(_BOUNDARY)
        elif op is _c.AT and av is _c.AT_END:
            found.add(_END)
        elif op is _c.SUBPATTERN:
            if av[1] & _c.SRE_FLAG_IGNORECASE:
                found.add(_FOLD)
            stack.extend(av[3])
        elif op is _c.BRANCH:
            for branch in av[1]:
                stack.extend(branch)
        elif op in repeats:
            stack.extend(av[2])
        elif op in (_c.ASSERT, _c.ASSERT_NOT):  # refused by the dialect; read all the same
            stack.extend(av[1])
        elif op is getattr(_c, "ATOMIC_GROUP", None):
            stack.extend(av)
        elif op is _c.GROUPREF_EXISTS:
            stack.extend(av[1])
            stack.extend(av[2] or ())
    return frozenset(found)


def _read_differently(fragment: str, text: str) -> str | None:
    """What of `fragment` fastkeys' dialect would read differently from `re` on `text`: `$` on a
    text ending in a newline, the ASCII-only constructs on a non-ASCII text (`\\s` also on
    \\x1c-\\x1f, which `re` counts as spaces); None when the dialect answers as `re` does."""
    found = _constructs(fragment)
    if not found:
        return None
    if _END in found and text.endswith("\n"):
        return _END
    if not text.isascii():
        return next((c for c in (_FOLD, _CLASSES, _BOUNDARY) if c in found), None)
    if _CLASSES in found and any(c in text for c in "\x1c\x1d\x1e\x1f"):
        return _CLASSES
    return None


@functools.cache
def _unicode_digits() -> str:
    """Python's `\\d` for str (what `str.isdecimal` accepts) as ranges for both engines' classes."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x110000):
        if chr(code).isdecimal():
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))

    def escaped(code: int) -> str:
        return chr(code) if 0x30 <= code <= 0x39 else f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"

    return "".join(f"{escaped(low)}-{escaped(high)}" if low < high else escaped(low) for low, high in ranges)


@functools.lru_cache(maxsize=1024)
def _compiled(kind: str, fragment: str, what: str, unicode: bool) -> Regex:
    """The fragment in its template, for the engine that runs; `unicode` writes the template's
    `\\d` with every decimal digit (`[0-9]` is the same on an ASCII name)."""
    for_rust, for_python, _size = _checked(fragment, what)
    # A leading `(?s)` becomes a group: inside a template it would no longer be at the start.
    if for_python.startswith("(?s)"):
        for_rust, for_python = f"(?s:{for_rust[4:]})", f"(?s:{for_python[4:]})"
    digits = f"[{_unicode_digits()}]" if unicode else "[0-9]"
    rust, python = (t.replace("{D}", digits) for t in _ENGINES[kind])
    return regex_for_engine(rust.replace("{}", for_rust, 1), python.replace("{}", for_python, 1))


def _answer(function: str, pattern: Any, string: Any, flags: Any, caller: str) -> Any:
    real = getattr(re, function)
    if not isinstance(pattern, str) or not isinstance(string, str):
        # A compiled pattern (PEFT compiles none from a config), or a text `re` refuses at once.
        return real(pattern, string, flags)
    compiled = re.compile(pattern, flags)  # PEFT's own re.error, if any
    if pattern in _fixed() and not flags:
        return real(pattern, string, flags)
    kind, fragment = _read(function, pattern)
    what = _FIELDS_BY_CALLER.get((kind, caller), _FIELDS[kind])
    if flags:
        raise ValueError(f"{what} {pattern!r} is not matched with flags ({flags!r}) in linear time")
    if kind != function and compiled.flags & ~re.UNICODE:  # Python 3.10: a spliced global flag
        raise ValueError(
            f"{what} {fragment!r} is not an expression fastkeys accepts: PEFT writes it into "
            f"{pattern!r}, where its flags would apply to the whole expression"
        )
    regex = _compiled(kind, fragment, what, not string.isascii())
    construct = _read_differently(fragment, string)  # `fragment` is in the dialect: re parses it
    if construct is not None:
        raise ValueError(
            f"{what} {fragment!r} cannot be matched in linear time as re matches it against {string!r}: "
            + (
                "fastkeys' $ is the very end, where re's also holds before a final newline"
                if construct == _END
                else f"fastkeys reads {construct} as re does on ASCII characters only"
            )
        )
    if kind.startswith("layers"):
        if kind != "layers" and compiled.groups != 1:
            # before peft 0.21 PEFT reads `.group(1)`: then a group of the fragment's own (which the
            # dialect does not capture), not the index
            raise ValueError(
                f"{what} {fragment!r} has groups of its own, which PEFT < 0.21 reads as the layer "
                "index; fastkeys cannot reproduce that in linear time"
            )
        index = regex.group(string)
        if index is None and not regex.search(string):
            return None
        if kind == "layers":
            return LinearTimeMatch(compiled, string, False, {"idx": index})
        return LinearTimeMatch(compiled, string, False, {}, {1: index})
    if not regex.search(string):
        return None
    return LinearTimeMatch(compiled, string, function == "fullmatch", {})


# --- checking a config before the load -------------------------------------------------------


def _field(config: object, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _pattern_fields(config: object) -> Iterable[tuple[str, Any]]:
    """The config's `*_pattern` dicts (rank_pattern, alpha_pattern, lambda_pattern, ...)."""
    items = config.items() if isinstance(config, Mapping) else vars(config).items()
    for name, value in items:
        if isinstance(name, str) and name.endswith("_pattern") and isinstance(value, Mapping):
            yield name, value


def _expressions(config: object) -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(field, fragment, template kinds) of every config text PEFT 0.21.2 would splice into an
    expression it matches while loading; each fragment formatted as PEFT's f-strings do."""
    peft_type = _field(config, "peft_type")
    peft_type = str(getattr(peft_type, "value", peft_type))
    tie = bool(_field(config, "ensure_weight_tying"))
    targets = _field(config, "target_modules")
    if isinstance(targets, str):
        yield "target_modules", targets, ("fullmatch", "tie") if tie else ("fullmatch",)
    elif tie and isinstance(targets, (list, tuple, set, frozenset)):
        for index, target in enumerate(targets):
            yield f"target_modules[{index}]", f"{target}", ("module",)
    for name in ("exclude_modules", "feedforward_modules"):
        value = _field(config, name)
        if isinstance(value, str):
            yield name, value, ("fullmatch",)
    saved = _field(config, "modules_to_save")
    if saved and isinstance(saved, (str, list, tuple, set, frozenset)):
        for index, module in enumerate(saved):
            yield f"modules_to_save[{index}]", f"{module}", ("module",)
    layers = _field(config, "layers_to_transform")
    patterns = _field(config, "layers_pattern")
    in_use = layers is not None and (len(layers) != 0 if isinstance(layers, list) else True)
    if in_use and not isinstance(targets, str) and isinstance(patterns, (str, list, tuple)) and patterns:
        for index, pattern in enumerate([patterns] if isinstance(patterns, str) else patterns):
            label = "layers_pattern" if isinstance(patterns, str) else f"layers_pattern[{index}]"
            yield label, f"{pattern}", ("layers",)
    for name, mapping in _pattern_fields(config):
        kinds: tuple[str, ...] = ("pattern_key",)
        if (peft_type, name) in (("FOURIERFT", "n_frequency_pattern"), ("C3A", "block_size_pattern")):
            kinds = ("dotted_key",)
        elif (peft_type, name) == ("OSF", "rank_pattern"):
            kinds = ("pattern_key", "search")
        for key in mapping:
            yield f"{name} key", f"{key}", kinds


def check_expressions(config: object, where: str) -> None:
    """Raises ValueError, naming `where` (the config file), the field and the expression, for any
    text of `config` (adapter_config.json as a dict, or a PeftConfig) that PEFT would match as a
    regular expression while loading and that `linear_time_matching()` would refuse: one outside
    fastkeys' dialect, or one that makes PEFT's expression invalid (PEFT would raise re.error)."""
    for field, fragment, kinds in _expressions(config):
        what = f"{where}: {field}"
        _checked(fragment, what)
        for kind in kinds:
            full = _PEFT[kind].replace("{}", fragment, 1)
            try:
                compiled = re.compile(full)
            except (re.error, OverflowError, RecursionError) as error:
                raise ValueError(
                    f"{what} {fragment!r} is not an expression PEFT can use: it writes it into "
                    f"{full!r}, which Python's re refuses ({error})"
                ) from None
            if full != fragment and compiled.flags & ~re.UNICODE:
                raise ValueError(
                    f"{what} {fragment!r} is not an expression fastkeys accepts: PEFT writes it into "
                    f"{full!r}, where its flags would apply to the whole expression"
                )
