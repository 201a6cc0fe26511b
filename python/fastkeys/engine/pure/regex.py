"""A linear-time regular-expression engine for the pure-Python fallback.

Python's `re` backtracks: `(a+)+$` or `(.+)+X` take exponential time, and `a*b` searched in a
long key quadratic time. Expressions from users and from files (`ignore`, `target_modules`,
`layers_pattern`) therefore never reach `re` for matching. They are parsed by `re`'s own parser
(after `fastkeys.rules.expressions.translate` has checked and rewritten them), compiled to a Thompson NFA
and run as a Pike VM: every position of the text is visited once with at most one thread per
instruction, so a match costs O(len(text) x len(program)) whatever the expression. Threads are
kept in priority order, which gives the leftmost-first answer (and group span) that a
backtracking engine gives, as Rust's `regex` crate does on the native side.

`search` (all that `ignore` and `target_modules` need) runs the same NFA as a lazily built DFA:
a state is the set of instructions alive before a character, the transitions are made on first
use and cached (at most `_CACHE` states, then the cache starts afresh, so memory stays bounded
and time linear), and a key then costs one dict lookup per character. `group` (only
`layers_pattern` needs it) runs the Pike VM. This is the mirror of `fastkeys._native.Regex`.
"""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    from re import _constants as _c
    from re import _parser as _sre_parse
else:  # pragma: no cover (3.10)
    import sre_constants as _c
    import sre_parse as _sre_parse

from typing import Any

__all__ = ["Regex"]

_CACHE = 4096  # DFA states kept per expression
_MATCHED = -1  # the transition that completes a match

_WORD = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")

# Instructions: (CHAR, test) consumes one character the test accepts; (SPLIT, a, b) tries a,
# then b; (JUMP, a); (ASSERT, kind); (SAVE, slot); (MATCH,).
_CHAR, _SPLIT, _JUMP, _ASSERT, _SAVE, _MATCH = range(6)


class _Set:
    """A character class: literal characters and ranges, possibly negated."""

    __slots__ = ("chars", "negate", "ranges")

    def __init__(self, chars: frozenset[str], ranges: tuple[tuple[int, int], ...], negate: bool) -> None:
        self.chars = chars
        self.ranges = ranges
        self.negate = negate

    def __call__(self, ch: str) -> bool:
        found = ch in self.chars
        if not found and self.ranges:
            code = ord(ch)
            found = any(low <= code <= high for low, high in self.ranges)
        return found != self.negate


def _test(op: object, av: Any, dotall: bool) -> _Set:
    if op is _c.LITERAL:
        return _Set(frozenset(chr(av)), (), False)
    if op is _c.NOT_LITERAL:
        return _Set(frozenset(chr(av)), (), True)
    if op is _c.ANY:
        return _Set(frozenset() if dotall else frozenset("\n"), (), True)
    if op is _c.IN:
        chars: set[str] = set()
        ranges: list[tuple[int, int]] = []
        negate = False
        for item, value in av:
            if item is _c.NEGATE:
                negate = True
            elif item is _c.LITERAL:
                chars.add(chr(value))
            elif item is _c.RANGE:
                ranges.append(value)
            else:  # `translate` writes classes out; nothing else reaches here
                raise ValueError(f"unsupported class item {item}")
        return _Set(frozenset(chars), tuple(ranges), negate)
    raise ValueError(f"unsupported {op}")


class _Compiler:
    def __init__(self, capture: int) -> None:
        self.program: list[tuple[Any, ...]] = []
        self.capture = capture

    def emit(self, *instruction: object) -> int:
        self.program.append(instruction)
        return len(self.program) - 1

    def patch(self, at: int, *instruction: object) -> None:
        self.program[at] = instruction

    def sequence(self, items: Any, dotall: bool) -> None:
        for op, av in items:
            self.node(op, av, dotall)

    def node(self, op: object, av: Any, dotall: bool) -> None:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            self.emit(_CHAR, _test(op, av, dotall))
        elif op is _c.SUBPATTERN:
            group, add_flags, del_flags, body = av
            if add_flags & _c.SRE_FLAG_DOTALL:
                dotall = True
            if del_flags & _c.SRE_FLAG_DOTALL:
                dotall = False
            if group == self.capture:
                self.emit(_SAVE, 0)
            self.sequence(body, dotall)
            if group == self.capture:
                self.emit(_SAVE, 1)
        elif op is _c.BRANCH:
            _, branches = av
            jumps = []
            for index, branch in enumerate(branches):
                if index < len(branches) - 1:
                    split = self.emit(_SPLIT, 0, 0)
                    self.sequence(branch, dotall)
                    jumps.append(self.emit(_JUMP, 0))
                    self.patch(split, _SPLIT, split + 1, len(self.program))
                else:
                    self.sequence(branch, dotall)
            for jump in jumps:
                self.patch(jump, _JUMP, len(self.program))
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            greedy = op is _c.MAX_REPEAT
            for _ in range(low):
                self.sequence(body, dotall)
            if high is _c.MAXREPEAT:
                split = self.emit(_SPLIT, 0, 0)
                self.sequence(body, dotall)
                self.emit(_JUMP, split)
                self._branch(split, split + 1, len(self.program), greedy)
            else:
                splits = []
                for _ in range(high - low):
                    splits.append(self.emit(_SPLIT, 0, 0))
                    self.sequence(body, dotall)
                for split in splits:
                    self._branch(split, split + 1, len(self.program), greedy)
        elif op is _c.AT:
            self.emit(_ASSERT, av)
        else:  # refused by `translate` before we get here
            raise ValueError(f"unsupported {op}")

    def _branch(self, at: int, take: int, skip: int, greedy: bool) -> None:
        self.patch(at, _SPLIT, *((take, skip) if greedy else (skip, take)))


def _holds_at(kind: object, start: bool, end: bool, before: bool, after: bool) -> bool:
    """An assertion at a position: at the start of the text, at its end, after and before a
    word character."""
    if kind in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        return start
    if kind is _c.AT_END_STRING:
        return end
    if kind in (_c.AT_BOUNDARY, _c.AT_UNI_BOUNDARY):
        return before != after
    if kind in (_c.AT_NON_BOUNDARY, _c.AT_UNI_NON_BOUNDARY):
        return before == after
    raise ValueError(f"unsupported assertion {kind}")  # `translate` writes `$` as `\\Z`


def _holds(kind: object, text: str, pos: int) -> bool:
    before = pos > 0 and text[pos - 1] in _WORD
    after = pos < len(text) and text[pos] in _WORD
    return _holds_at(kind, pos == 0, pos == len(text), before, after)


class _Dfa:
    """The lazily built DFA of a program. A state: (instructions to start from before the next
    character, whether the previous character is a word character, whether none was read yet).
    Threads may share one: a new state or transition is only ever added, and a full cache is
    replaced by a new `_Dfa` while a search in progress keeps the one it started with."""

    __slots__ = ("ids", "next", "program", "states")

    def __init__(self, program: tuple[tuple[Any, ...], ...]) -> None:
        self.program = program
        self.states: list[tuple[frozenset[int], bool, bool]] = []
        self.ids: dict[tuple[frozenset[int], bool, bool], int] = {}
        self.next: list[dict[str, int]] = []
        self.state(frozenset([0]), False, True)

    def state(self, pending: frozenset[int], word: bool, start: bool) -> int:
        key = (pending, word, start)
        found = self.ids.get(key)
        if found is None:
            self.states.append(key)
            self.next.append({})
            found = self.ids.setdefault(key, len(self.states) - 1)
        return found

    def closure(self, state: int, end: bool, after: bool) -> tuple[list[int], bool]:
        """The consuming instructions reachable from `state` at a position followed (`after`)
        by a word character or not, or at the end; and whether MATCH is reachable."""
        pending, before, start = self.states[state]
        program = self.program
        seen: set[int] = set()
        stack = list(pending)
        consuming: list[int] = []
        matched = False
        while stack:
            pc = stack.pop()
            if pc in seen:
                continue
            seen.add(pc)
            instruction = program[pc]
            kind = instruction[0]
            if kind == _JUMP:
                stack.append(instruction[1])
            elif kind == _SPLIT:
                stack += (instruction[1], instruction[2])
            elif kind == _ASSERT:
                if _holds_at(instruction[1], start, end, before, after):
                    stack.append(pc + 1)
            elif kind == _SAVE:
                stack.append(pc + 1)
            elif kind == _MATCH:
                matched = True
            else:
                consuming.append(pc)
        return consuming, matched

    def transition(self, state: int, ch: str) -> int:
        word = ch in _WORD
        consuming, matched = self.closure(state, False, word)
        if matched:
            target = _MATCHED
        else:
            program = self.program
            # Every position is also a new start: `search` looks anywhere.
            target = self.state(
                frozenset([0, *(pc + 1 for pc in consuming if program[pc][1](ch))]), word, False
            )
        self.next[state][ch] = target
        return target


class Regex:
    """A compiled expression in the dialect `translate` writes for Python (`\\Z`, ASCII classes,
    no case folding, no capturing groups of the user's). Mirrors `fastkeys._native.Regex`."""

    __slots__ = ("_dfa", "_program")

    def __init__(self, pattern: str) -> None:
        parsed = _sre_parse.parse(pattern, 0)
        compiler = _Compiler(capture=1)
        compiler.sequence(parsed, bool(parsed.state.flags & _c.SRE_FLAG_DOTALL))
        compiler.emit(_MATCH)
        self._program = tuple(compiler.program)
        self._dfa = _Dfa(self._program)

    def search(self, text: str) -> bool:
        """Whether the expression matches anywhere in `text` (`re.search`)."""
        dfa = self._dfa
        if len(dfa.states) > _CACHE:
            dfa = self._dfa = _Dfa(self._program)
        following = dfa.next
        state = 0
        for ch in text:
            target = following[state].get(ch)
            if target is None:
                target = dfa.transition(state, ch)
            if target == _MATCHED:
                return True
            state = target
        return dfa.closure(state, True, False)[1]

    def group(self, text: str) -> str | None:
        """Group 1 of the leftmost-first match in `text`, as `re.search(...).group(1)` gives it;
        None when nothing matches or the group took no part."""
        found = self._run(text, span=True)
        if found is None or found[0] < 0 or found[1] < 0:
            return None
        return text[found[0] : found[1]]

    def _run(self, text: str, span: bool) -> tuple[int, int] | None:
        program = self._program
        size = len(text)
        seen = [-1] * len(program)  # the position each instruction was last queued at
        found: tuple[int, int] | None = None
        no_span = (-1, -1)

        def add(queue: list[tuple[int, tuple[int, int]]], pc: int, groups: tuple[int, int], pos: int) -> None:
            # Follows jumps, splits, assertions and saves without recursion, first branch first.
            stack = [(pc, groups)]
            while stack:
                pc, groups = stack.pop()
                if seen[pc] == pos:
                    continue
                seen[pc] = pos
                instruction = program[pc]
                kind = instruction[0]
                if kind == _JUMP:
                    stack.append((instruction[1], groups))
                elif kind == _SPLIT:
                    stack.append((instruction[2], groups))
                    stack.append((instruction[1], groups))
                elif kind == _ASSERT:
                    if _holds(instruction[1], text, pos):
                        stack.append((pc + 1, groups))
                elif kind == _SAVE:
                    groups = (pos, groups[1]) if instruction[1] == 0 else (groups[0], pos)
                    stack.append((pc + 1, groups))
                else:
                    queue.append((pc, groups))

        threads: list[tuple[int, tuple[int, int]]] = []
        add(threads, 0, no_span, 0)
        for pos in range(size + 1):
            ch = text[pos] if pos < size else ""
            following: list[tuple[int, tuple[int, int]]] = []
            for pc, groups in threads:
                instruction = program[pc]
                if instruction[0] == _MATCH:
                    if not span:
                        return groups  # any match answers `search`
                    found = groups
                    break  # the threads after this one have lower priority
                if ch and instruction[1](ch):
                    add(following, pc + 1, groups, pos + 1)
            if found is None and pos < size:
                add(following, 0, no_span, pos + 1)  # the next start, at the lowest priority
            if not following and found is not None:
                break
            threads = following
        return found
