"""User ignore expressions, read once and written out for both engines.

The native implementation searches with Rust's `regex` crate, the fallback with Python's `re`.
They must give the same answer for every key, so fastkeys accepts only the syntax both read alike
and rewrites the few constructs they read differently:

* `$` is Python's "end, or before a final newline"; it becomes `\\Z` for `re` (Rust's `$`).
* `\\d`, `\\w`, `\\s`, `\\b` are Unicode-aware in both engines, but with different Unicode tables;
  they become their ASCII meaning in both (`\\d` is `[0-9]`): module paths are ASCII in practice.
* `{,n}` (Python only) becomes `{0,n}`; a `{` that starts no repetition is a literal in both.
* Groups become non-capturing groups (captures are never used: back-references are refused).
* `(?i)` folds ASCII letters only, in both engines: the translation writes `k` as `[kK]` and
  drops the flag, since `re` and `regex` fold non-ASCII letters by different rules (dotted and
  dotless I, the Kelvin sign, newer Unicode pairs). A non-ASCII letter that has a case is refused
  under `(?i)`. Flags go at the start of the expression (`(?i)...`) or on a group (`(?i:...)`).

Refused, with a ValueError naming the expression: lookaround, back-references, conditionals,
atomic groups, possessive quantifiers, comments, flags other than `i` and `s`, octal and named
escapes, nested sets and set operations inside `[...]`, lone surrogates or U+FFFD in the
expression (the native side sees a lone surrogate in a key as U+FFFD), and expressions larger
than `MAX_SIZE` (characters, classes and `.`, each counted as many times as the repetitions
around it can repeat it: `(ab){1000}` is 2000), so that both engines compile what is accepted.

Matching is linear in the length of the key in both implementations: Rust's `regex` crate on
the native side and `fastkeys.engine.pure.regex` (a Pike VM) in the fallback; Python's `re` only checks
the syntax and never matches a user's expression.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastkeys.engine.contract import Regex

__all__ = ["MAX_SIZE", "regex_for_engine", "translate", "user_regex"]

# Characters that Rust's parser reads as syntax, so a literal one is written escaped.
_RUST_META = frozenset("\\.+*?()|[]{}^$#&-~")
# Characters with a meaning inside a class in either engine.
_CLASS_META = frozenset("\\[]-^&~")
_SHORTHAND_CLASS = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\x0b\\x0c\\r "}
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "a": "\a"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_MAX_REPEAT = 1000
# The largest expression (or list of ignore expressions, together) accepted, in atoms counted
# with their repetitions. The costliest atom we found, `\W` (a Unicode class), compiles to about
# 1.1 kB in Rust's `regex`, whose default size limit (10 MB) then holds 9,400 of them: half that
# leaves a margin, so that whatever is accepted here compiles there. A Pike VM step in the
# fallback costs at most this many threads.
MAX_SIZE = 5_000


@functools.cache
def _syntax() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(counted repetition, inline flags); compiled on first use to keep `import fastkeys` fast."""
    return re.compile(r"\{(\d*)(,(\d*))?\}"), re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]+))?([:)])")


class _Unsupported(ValueError):
    """An expression the dialect does not accept (the loader's `plan.Refused` is another thing: a
    load sent to PEFT)."""


def _check_char(ch: str) -> str:
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF or code == 0xFFFD:
        raise _Unsupported(f"it contains {ch!r}: lone surrogates and U+FFFD cannot be matched alike")
    return ch


def _lit_rust(ch: str) -> str:
    if ch in _RUST_META:
        return "\\" + ch
    if ch.isascii() and ch.isprintable():
        return ch
    return f"\\x{{{ord(ch):X}}}"


def _lit_python(ch: str) -> str:
    if ch.isascii() and not ch.isprintable():
        return f"\\x{ord(ch):02x}"
    return re.escape(ch)


def _class_lit(ch: str) -> str:
    """A literal inside `[...]`, the same text for both engines."""
    if ch in _CLASS_META:
        return "\\" + ch
    if ch.isascii() and ch.isprintable():
        return ch
    if ord(ch) <= 0xFFFF:
        return f"\\u{ord(ch):04X}"
    return f"\\U{ord(ch):08X}"


def _cased(ch: str) -> bool:
    return ch.lower() != ch or ch.upper() != ch or ch.casefold() != ch


def _fold_literal(ch: str) -> str | None:
    """Under `(?i)`: a class text for an ASCII letter, None for a character without case."""
    if ch.isascii() and ch.isalpha():
        return f"[{ch.lower()}{ch.upper()}]"
    if _cased(ch):
        raise _Unsupported(f"{ch!r} has other cases; (?i) folds ASCII letters only")
    return None


def _fold_range(low: int, high: int) -> list[tuple[int, int]]:
    """Under `(?i)`: the ASCII case partners of the letters in low..high."""
    if high > 0x7F and any(_cased(chr(code)) for code in range(max(low, 0x80), high + 1)):
        raise _Unsupported("a range with non-ASCII letters under (?i); (?i) folds ASCII letters only")
    extra = []
    for start, end, shift in ((0x41, 0x5A, 0x20), (0x61, 0x7A, -0x20)):
        a, b = max(low, start), min(high, end)
        if a <= b:
            extra.append((a + shift, b + shift))
    return extra


class _Reader:
    def __init__(self, pattern: str) -> None:
        self.text = pattern
        self.pos = 0

    def done(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self, ahead: int = 0) -> str:
        at = self.pos + ahead
        return self.text[at] if at < len(self.text) else ""

    def take(self) -> str:
        ch = self.text[self.pos]
        self.pos += 1
        return ch

    def escape(self) -> tuple[str, str]:
        """Reads the character after a backslash: ('char', c) for a literal, ('class', x) for a
        shorthand class, ('assert', x) for an assertion."""
        if self.done():
            raise _Unsupported("it ends with a lone backslash")
        e = self.take()
        if e in "dwsDWS":
            return "class", e
        if e in "bBAZ":
            return "assert", e
        if e in _SIMPLE_ESCAPES:
            return "char", _SIMPLE_ESCAPES[e]
        if e in _HEX_DIGITS:
            width = _HEX_DIGITS[e]
            digits = self.text[self.pos : self.pos + width]
            if len(digits) != width or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise _Unsupported(f"\\{e} needs {width} hex digits")
            self.pos += width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise _Unsupported(f"\\{e}{digits} is not a code point")
            return "char", _check_char(chr(code))
        if e.isdigit():
            raise _Unsupported("back-references and octal escapes are not supported")
        if e.isascii() and e.isalpha():
            raise _Unsupported(f"the escape \\{e} is not supported")
        return "char", _check_char(e)


def _read_class(reader: _Reader, fold: bool = False) -> str:
    """Reads `[...]` (the `[` already taken) and returns it for both engines; with `fold`, ASCII
    letters gain their other case."""
    out = ["["]
    if reader.peek() == "^":
        out.append(reader.take())
    # ("char", c) typed as is, ("lit", c) escaped (never a range dash), ("class", ranges)
    items: list[tuple[str, str]] = []
    first = True
    while True:
        if reader.done():
            raise _Unsupported("a [ is never closed")
        ch = reader.take()
        if ch == "]" and not first:
            break
        first = False
        if ch == "[":
            raise _Unsupported(
                "nested sets ('[' inside [...]) are read differently by the engines; escape it"
            )
        if ch in "&~|-" and reader.peek() == ch:
            raise _Unsupported(f"'{ch}{ch}' inside [...] is a set operation in one engine; escape it")
        if ch == "\\":
            kind, value = reader.escape()
            if kind == "assert":
                raise _Unsupported(f"\\{value} is not supported inside [...]")
            if kind == "class":
                if value.isupper():
                    raise _Unsupported(f"\\{value} inside [...] is not supported; use [^...]")
                items.append(("class", _SHORTHAND_CLASS[value]))
                continue
            items.append(("lit", value))
        else:
            items.append(("char", _check_char(ch)))
    index = 0
    while index < len(items):
        kind, value = items[index]
        is_range = (
            kind != "class"
            and index + 2 < len(items)
            and items[index + 1] == ("char", "-")
            and items[index + 2][0] != "class"
        )
        if is_range:
            low, high = ord(value), ord(items[index + 2][1])
            if low > high:
                raise _Unsupported(f"the range {value!r}-{items[index + 2][1]!r} is reversed")
            if (low <= 0xDFFF and high >= 0xD800) or low <= 0xFFFD <= high:
                raise _Unsupported("a range covering surrogates or U+FFFD cannot be matched alike")
            out.append(f"{_class_lit(value)}-{_class_lit(items[index + 2][1])}")
            if fold:
                out += [f"{_class_lit(chr(a))}-{_class_lit(chr(b))}" for a, b in _fold_range(low, high)]
            index += 3
            continue
        out.append(value if kind == "class" else _class_lit(value))
        if fold and kind != "class":
            folded = _fold_literal(value)
            if folded is not None:
                out.append(_class_lit(value.swapcase()))
        index += 1
    out.append("]")
    return "".join(out)


def _read_group_open(reader: _Reader, fold: bool, at_start: bool) -> tuple[str, bool, bool]:
    """Reads what follows `(` and returns (the opening for both engines, whether `(?i)` folds
    inside, whether it was a bare flag setting such as `(?i)` rather than a group)."""
    if reader.peek() != "?":
        return "(?:", fold, False
    rest = reader.text[reader.pos :]
    if rest.startswith("?:"):
        reader.pos += 2
        return "(?:", fold, False
    if rest.startswith("?P<"):
        end = rest.find(">")
        if end < 0:
            raise _Unsupported("a group name is never closed")
        reader.pos += end + 1
        return "(?:", fold, False
    if rest.startswith(("?=", "?!", "?<")):
        raise _Unsupported("lookaround is not supported")
    if rest.startswith("?P="):
        raise _Unsupported("back-references are not supported")
    if rest.startswith("?("):
        raise _Unsupported("conditional groups are not supported")
    if rest.startswith("?>"):
        raise _Unsupported("atomic groups are not supported")
    if rest.startswith("?#"):
        raise _Unsupported("comments are not supported")
    flags = _syntax()[1].match(reader.text, reader.pos - 1)
    if flags is None:
        raise _Unsupported("unknown group syntax after '(?'")
    on, off, closing = flags.group(1) or "", flags.group(2) or "", flags.group(3)
    for flag in on + off:
        if flag not in "is":
            raise _Unsupported(f"the flag {flag!r} is not supported (only i and s are)")
    bare = closing == ")"
    if bare and (off or not at_start):
        raise _Unsupported("flags go at the start of the expression, (?i)..., or on a group, (?i:...)")
    reader.pos = flags.end()
    inside = (fold or "i" in on) and "i" not in off
    # `i` is written out as case classes, never passed on; `s` means the same in both engines.
    dotall = ("s" if "s" in on else "") + ("-s" if "s" in off else "")
    if bare:
        return (f"(?{dotall})" if dotall else ""), inside, True
    return (f"(?{dotall}:" if dotall else "(?:"), inside, False


def _read_quantifier(reader: _Reader) -> tuple[str, int] | None:
    """Reads a counted repetition at `{` and returns (its text for both engines, how many times
    it can repeat at most, a loop counting as its minimum plus one); None when `{` is a literal."""
    found = _syntax()[0].match(reader.text, reader.pos - 1)
    if found is None or (found.group(1) == "" and found.group(2) is None):
        return None
    low = int(found.group(1) or 0)
    high_text = found.group(3) if found.group(2) else found.group(1)
    high = int(high_text) if high_text else None
    if low > _MAX_REPEAT or (high is not None and high > _MAX_REPEAT):
        raise _Unsupported(f"repetition counts above {_MAX_REPEAT} are not supported")
    reader.pos = found.end()
    if not found.group(2):
        return f"{{{low}}}", low
    if high is None:
        return f"{{{low},}}", low + 1
    return f"{{{low},{high}}}", high


def _translate_one(pattern: str) -> tuple[str, str, int]:
    """(text for Rust's regex, text for Python's re, size as MAX_SIZE counts it)."""
    reader = _Reader(pattern)
    rust: list[str] = []
    python: list[str] = []
    # One frame per open group: [size so far, size of the last atom, (?i) inside]
    frames: list[list[int]] = [[0, 0, 0]]

    def both(text: str) -> None:
        rust.append(text)
        python.append(text)

    def atom(size: int = 1) -> None:
        frames[-1][0] += size
        frames[-1][1] = size

    def literal(ch: str) -> None:
        """One literal character: both cases under `(?i)` (ASCII), else escaped per engine."""
        folded = _fold_literal(ch) if frames[-1][2] else None
        if folded is not None:
            both(folded)
        else:
            rust.append(_lit_rust(ch))
            python.append(_lit_python(ch))
        atom()

    def repeat(times: int) -> None:
        # The last atom now counts `times` over (at least once: a loop compiles one copy).
        frame = frames[-1]
        frame[0] += frame[1] * (max(times, 1) - 1)
        frame[1] *= max(times, 1)

    while not reader.done():
        fold = bool(frames[-1][2])
        ch = reader.take()
        if ch == "\\":
            kind, value = reader.escape()
            if kind == "char":
                literal(value)
            elif kind == "class":
                negate = "^" if value.isupper() else ""
                both(f"[{negate}{_SHORTHAND_CLASS[value.lower()]}]")
                atom()
            elif value in "bB":
                rust.append(f"(?-u:\\{value})")
                python.append(f"(?a:\\{value})")
            elif value == "A":
                both("\\A")
            else:  # Z
                rust.append("\\z")
                python.append("\\Z")
        elif ch == "[":
            both(_read_class(reader, fold))
            atom()
        elif ch == "(":
            opening, inside, bare = _read_group_open(reader, fold, reader.pos == 1)
            both(opening)
            if bare:
                frames[-1][2] = int(inside)
            else:
                frames.append([0, 0, int(inside)])
        elif ch == ")":
            both(ch)
            if len(frames) > 1:
                size = frames.pop()[0]
                atom(size)
        elif ch == "|":
            both(ch)
            frames[-1][1] = 0
        elif ch == ".":
            both(ch)
            atom()
        elif ch == "^":
            both(ch)
        elif ch == "$":
            rust.append("$")
            python.append("\\Z")
        elif ch in "*+?":
            both(ch)
            repeat(2 if ch == "+" else 1)
            if reader.peek() == "+":
                raise _Unsupported("possessive quantifiers are not supported")
        elif ch == "{":
            quantifier = _read_quantifier(reader)
            if quantifier is None:
                both("\\{")
                atom()
            else:
                both(quantifier[0])
                repeat(quantifier[1])
                if reader.peek() == "+":
                    raise _Unsupported("possessive quantifiers are not supported")
        elif ch == "}":
            both("\\}")
            atom()
        else:
            literal(_check_char(ch))
    return "".join(rust), "".join(python), sum(frame[0] for frame in frames)


def translate(patterns: Iterable[str] | None) -> tuple[list[str], list[str]]:
    """Checks user ignore expressions and returns them written for (Rust's regex, Python's re).

    Raises TypeError for something that is not an iterable of str, ValueError naming the
    expression for one that fastkeys does not accept.
    """
    if patterns is None:
        return [], []
    if isinstance(patterns, (str, bytes)):
        raise TypeError(
            f"ignore must be a list of regular expressions, not a single {type(patterns).__name__}: "
            f"write ignore=[{patterns!r}]"
        )
    try:
        items = list(patterns)
    except TypeError:
        raise TypeError(f"ignore must be an iterable of str, not {type(patterns).__name__}") from None
    rust: list[str] = []
    python: list[str] = []
    total = 0
    for index, pattern in enumerate(items):
        if not isinstance(pattern, str):
            raise TypeError(f"ignore[{index}] must be str, not {type(pattern).__name__}")
        for_rust, for_python, size = _checked(pattern, f"ignore[{index}]")
        total += size
        if total > MAX_SIZE:
            raise ValueError(
                f"ignore[{index}] {pattern!r} is not an expression fastkeys accepts: the expressions "
                f"together are too large ({total} atoms counted with their repetitions, over {MAX_SIZE})"
            )
        rust.append(for_rust)
        python.append(for_python)
    return rust, python


def _checked(pattern: str, what: str) -> tuple[str, str, int]:
    """`_translate_one`, with the Python text compiled once to check its syntax (compiling is
    linear; only matching could backtrack, and `re` never matches a user's expression)."""
    try:
        for_rust, for_python, size = _translate_one(pattern)
        if size > MAX_SIZE:
            raise _Unsupported(
                f"it is too large ({size} atoms counted with their repetitions, over {MAX_SIZE})"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            re.compile(for_python)
    except (_Unsupported, re.error, FutureWarning, DeprecationWarning, RecursionError) as error:
        raise ValueError(f"{what} {pattern!r} is not an expression fastkeys accepts: {error}") from None
    return for_rust, for_python, size


def user_regex(pattern: str, what: str, template: tuple[str, str] = ("{}", "{}")) -> Regex:
    """A user's expression compiled for the implementation that runs, matched in linear time:
    `fastkeys._native.Regex` (Rust's `regex` crate) or `fastkeys.engine.pure.regex.Regex` (a Pike VM).
    `template` places it inside a larger expression, written for (Rust, Python); the result's
    `search(text)` and `group(text)` (group 1) answer as `re.search` would. ValueError naming
    `what` when the expression is refused."""
    if not isinstance(pattern, str):
        raise TypeError(f"{what} must be str, not {type(pattern).__name__}")
    for_rust, for_python, _size = _checked(pattern, what)
    return regex_for_engine(template[0].format(for_rust), template[1].format(for_python))


@functools.lru_cache(maxsize=256)
def regex_for_engine(for_rust: str, for_python: str) -> Regex:
    """An expression already written for both engines, compiled for the one that runs."""
    from fastkeys.engine import IMPLEMENTATION, core

    return core.Regex(for_rust if IMPLEMENTATION == "rust" else for_python)
