"""User ignore expressions, read once and written out for both engines.

The native implementation searches with Rust's `regex` crate, the fallback with Python's `re`.
They must give the same answer for every key, so fastkeys accepts only the syntax both read alike
and rewrites the few constructs they read differently:

* `$` is Python's "end, or before a final newline"; it becomes `\\Z` for `re` (Rust's `$`).
* `\\d`, `\\w`, `\\s`, `\\b` are Unicode-aware in both engines, but with different Unicode tables;
  they become their ASCII meaning in both (`\\d` is `[0-9]`): module paths are ASCII in practice.
* `{,n}` (Python only) becomes `{0,n}`; a `{` that starts no repetition is a literal in both.
* Named groups become plain groups (the names are never used: back-references are refused).

Refused, with a ValueError naming the expression: lookaround, back-references, conditionals,
atomic groups, possessive quantifiers, comments, flags other than `i` and `s`, octal and named
escapes, nested sets and set operations inside `[...]`, and lone surrogates or U+FFFD in the
expression (the native side sees a lone surrogate in a key as U+FFFD).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Iterable

__all__ = ["translate"]

# Characters that Rust's parser reads as syntax, so a literal one is written escaped.
_RUST_META = frozenset("\\.+*?()|[]{}^$#&-~")
# Characters with a meaning inside a class in either engine.
_CLASS_META = frozenset("\\[]-^&~")
_SHORTHAND_CLASS = {"d": "0-9", "w": "0-9A-Za-z_", "s": "\\t\\n\\x0b\\x0c\\r "}
_SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "f": "\f", "v": "\v", "a": "\a"}
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_MAX_REPEAT = 1000


@functools.cache
def _syntax() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(counted repetition, inline flags); compiled on first use to keep `import fastkeys` fast."""
    return re.compile(r"\{(\d*)(,(\d*))?\}"), re.compile(r"\(\?([a-zA-Z]*)(?:-([a-zA-Z]+))?([:)])")


class _Refused(ValueError):
    pass


def _check_char(ch: str) -> str:
    code = ord(ch)
    if 0xD800 <= code <= 0xDFFF or code == 0xFFFD:
        raise _Refused(f"it contains {ch!r}: lone surrogates and U+FFFD cannot be matched alike")
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
            raise _Refused("it ends with a lone backslash")
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
                raise _Refused(f"\\{e} needs {width} hex digits")
            self.pos += width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise _Refused(f"\\{e}{digits} is not a code point")
            return "char", _check_char(chr(code))
        if e.isdigit():
            raise _Refused("back-references and octal escapes are not supported")
        if e.isascii() and e.isalpha():
            raise _Refused(f"the escape \\{e} is not supported")
        return "char", _check_char(e)


def _read_class(reader: _Reader) -> str:
    """Reads `[...]` (the `[` already taken) and returns it for both engines."""
    out = ["["]
    if reader.peek() == "^":
        out.append(reader.take())
    # ("char", c) typed as is, ("lit", c) escaped (never a range dash), ("class", ranges)
    items: list[tuple[str, str]] = []
    first = True
    while True:
        if reader.done():
            raise _Refused("a [ is never closed")
        ch = reader.take()
        if ch == "]" and not first:
            break
        first = False
        if ch == "[":
            raise _Refused("nested sets ('[' inside [...]) are read differently by the engines; escape it")
        if ch in "&~|-" and reader.peek() == ch:
            raise _Refused(f"'{ch}{ch}' inside [...] is a set operation in one engine; escape it")
        if ch == "\\":
            kind, value = reader.escape()
            if kind == "assert":
                raise _Refused(f"\\{value} is not supported inside [...]")
            if kind == "class":
                if value.isupper():
                    raise _Refused(f"\\{value} inside [...] is not supported; use [^...]")
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
                raise _Refused(f"the range {value!r}-{items[index + 2][1]!r} is reversed")
            if (low <= 0xDFFF and high >= 0xD800) or low <= 0xFFFD <= high:
                raise _Refused("a range covering surrogates or U+FFFD cannot be matched alike")
            out.append(f"{_class_lit(value)}-{_class_lit(items[index + 2][1])}")
            index += 3
            continue
        out.append(value if kind == "class" else _class_lit(value))
        index += 1
    out.append("]")
    return "".join(out)


def _read_group_open(reader: _Reader) -> str:
    """Reads what follows `(` and returns the opening for both engines."""
    if reader.peek() != "?":
        return "("
    rest = reader.text[reader.pos :]
    if rest.startswith("?:"):
        reader.pos += 2
        return "(?:"
    if rest.startswith("?P<"):
        end = rest.find(">")
        if end < 0:
            raise _Refused("a group name is never closed")
        reader.pos += end + 1
        return "(?:"
    if rest.startswith(("?=", "?!", "?<")):
        raise _Refused("lookaround is not supported")
    if rest.startswith("?P="):
        raise _Refused("back-references are not supported")
    if rest.startswith("?("):
        raise _Refused("conditional groups are not supported")
    if rest.startswith("?>"):
        raise _Refused("atomic groups are not supported")
    if rest.startswith("?#"):
        raise _Refused("comments are not supported")
    flags = _syntax()[1].match(reader.text, reader.pos - 1)
    if flags is None:
        raise _Refused("unknown group syntax after '(?'")
    for flag in (flags.group(1) or "") + (flags.group(2) or ""):
        if flag not in "is":
            raise _Refused(f"the flag {flag!r} is not supported (only i and s are)")
    reader.pos = flags.end()
    return flags.group(0)


def _read_quantifier(reader: _Reader) -> tuple[str, str] | None:
    """Reads a counted repetition at `{`, or returns None when `{` is a literal."""
    found = _syntax()[0].match(reader.text, reader.pos - 1)
    if found is None or (found.group(1) == "" and found.group(2) is None):
        return None
    low = int(found.group(1) or 0)
    high_text = found.group(3) if found.group(2) else found.group(1)
    high = int(high_text) if high_text else None
    if low > _MAX_REPEAT or (high is not None and high > _MAX_REPEAT):
        raise _Refused(f"repetition counts above {_MAX_REPEAT} are not supported")
    reader.pos = found.end()
    if not found.group(2):
        text = f"{{{low}}}"
    elif high is None:
        text = f"{{{low},}}"
    else:
        text = f"{{{low},{high}}}"
    return text, text


def _translate_one(pattern: str) -> tuple[str, str]:
    reader = _Reader(pattern)
    rust: list[str] = []
    python: list[str] = []

    def both(text: str) -> None:
        rust.append(text)
        python.append(text)

    while not reader.done():
        ch = reader.take()
        if ch == "\\":
            kind, value = reader.escape()
            if kind == "char":
                rust.append(_lit_rust(value))
                python.append(_lit_python(value))
            elif kind == "class":
                negate = "^" if value.isupper() else ""
                both(f"[{negate}{_SHORTHAND_CLASS[value.lower()]}]")
            elif value in "bB":
                rust.append(f"(?-u:\\{value})")
                python.append(f"(?a:\\{value})")
            elif value == "A":
                both("\\A")
            else:  # Z
                rust.append("\\z")
                python.append("\\Z")
        elif ch == "[":
            both(_read_class(reader))
        elif ch == "(":
            both(_read_group_open(reader))
        elif ch in ")|.^":
            both(ch)
        elif ch == "$":
            rust.append("$")
            python.append("\\Z")
        elif ch in "*+?":
            both(ch)
            if reader.peek() == "+":
                raise _Refused("possessive quantifiers are not supported")
        elif ch == "{":
            quantifier = _read_quantifier(reader)
            if quantifier is None:
                both("\\{")
            else:
                both(quantifier[0])
                if reader.peek() == "+":
                    raise _Refused("possessive quantifiers are not supported")
        elif ch == "}":
            both("\\}")
        else:
            _check_char(ch)
            rust.append(_lit_rust(ch))
            python.append(_lit_python(ch))
    return "".join(rust), "".join(python)


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
    for index, pattern in enumerate(items):
        if not isinstance(pattern, str):
            raise TypeError(f"ignore[{index}] must be str, not {type(pattern).__name__}")
        try:
            for_rust, for_python = _translate_one(pattern)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                re.compile(for_python)
        except (_Refused, re.error, FutureWarning, DeprecationWarning) as error:
            raise ValueError(
                f"ignore[{index}] {pattern!r} is not an expression fastkeys accepts: {error}"
            ) from None
        rust.append(for_rust)
        python.append(for_python)
    return rust, python
