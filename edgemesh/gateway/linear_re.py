"""Regular expressions matched in linear time, for VirtualService ``regex`` matches.

Istio hands ``regex`` matches (uri, headers, authority, queryParams) to Envoy, which runs them
with RE2: linear in the text, whatever the pattern. Python's ``re`` backtracks: ``.*a.*a.*b``
takes seconds on a 4 KiB URI, ``(a+)+b`` forever. The gateway matches untrusted request data
against patterns from manifests, so it does as Envoy does: a pattern is parsed with Python's
own parser (the same syntax errors), compiled to a Thompson NFA, and matched by simulating it
with a lazily built DFA: one table lookup per character once a state was seen, and at worst
``MAX_NODES / 8`` lookups per character (see ``LinearPattern``). No backtracking, so no pattern
can stall the process; only a boolean full match is computed (routes need nothing else).

Refused at compile time (``UnsupportedPattern``, a ``re.error``, so the table builder reports
it as one ``bad regex`` problem and skips the route):

- backreferences and lookaround assertions (RE2 rejects them too; no linear engine has them),
  atomic groups and possessive quantifiers (not RE2 syntax), ``\\b``/``\\B`` and the multiline
  flag (not needed for one-line request data);
- a pattern whose NFA would exceed ``MAX_NODES`` nodes once counted repetitions are expanded
  (``a{1000}``), as Envoy refuses RE2 programs over its ``max_program_size``.

Semantics follow RE2 where Python's differ: ``\\d``, ``\\w``, ``\\s`` are ASCII classes; ``$``
is the end of the text (Python's also matches before a final newline).

Bounds: the text matched is part of one request head, so at most the head limit (16 KiB); the
worst case, a pattern built to defeat the DFA cache at ``MAX_NODES``, costs about 0.1 s on
16 KiB (``tests/unit/test_gateway_routes.py`` checks the growth is linear), the common case two
dict lookups per character. ``MAX_DFA_STATES`` bounds the memory a pattern's DFA may take (past
it the cache is dropped and rebuilt, as RE2 does).
"""
from __future__ import annotations

import re
import re._constants as C  # noqa: N812 — the parser's own opcode names
import re._parser as P  # noqa: N812
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_NODES = 256  # Envoy refuses RE2 programs over 100 instructions by default
MAX_DFA_STATES = 2048

Pred = Callable[[str], bool]
_CHAR, _SPLIT, _BEGIN, _END, _MATCH = range(5)
_ASCII_DIGIT = frozenset("0123456789")
_ASCII_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_ASCII_SPACE = frozenset("\t\n\f\r \v")
_CATEGORIES: dict[Any, Pred] = {
    C.CATEGORY_DIGIT: _ASCII_DIGIT.__contains__,
    C.CATEGORY_NOT_DIGIT: lambda ch: ch not in _ASCII_DIGIT,
    C.CATEGORY_WORD: _ASCII_WORD.__contains__,
    C.CATEGORY_NOT_WORD: lambda ch: ch not in _ASCII_WORD,
    C.CATEGORY_SPACE: _ASCII_SPACE.__contains__,
    C.CATEGORY_NOT_SPACE: lambda ch: ch not in _ASCII_SPACE,
}
_REFUSED = {
    C.GROUPREF: "backreferences are not supported (RE2 rejects them too)",
    C.GROUPREF_EXISTS: "conditional backreferences are not supported (RE2 rejects them too)",
    C.ASSERT: "lookaround assertions are not supported (RE2 rejects them too)",
    C.ASSERT_NOT: "lookaround assertions are not supported (RE2 rejects them too)",
    C.ATOMIC_GROUP: "atomic groups are not RE2 syntax",
    C.POSSESSIVE_REPEAT: "possessive quantifiers are not RE2 syntax",
}


class UnsupportedPattern(re.error):
    """A pattern the gateway will not run: see the module docstring."""


@dataclass(slots=True)
class _Node:
    kind: int
    pred: Pred | None = None
    out: list[int] = field(default_factory=list)


class _Compiler:
    """Builds the NFA back to front: ``seq(items, nxt)`` returns the entry of ``items``,
    which continue at node ``nxt``."""

    def __init__(self) -> None:
        self.nodes: list[_Node] = [_Node(_MATCH)]

    def add(self, kind: int, pred: Pred | None = None, out: list[int] | None = None) -> int:
        if len(self.nodes) >= MAX_NODES:
            raise UnsupportedPattern(f"pattern too large: over {MAX_NODES} NFA nodes once "
                                     f"repetitions are expanded")
        self.nodes.append(_Node(kind, pred, out if out is not None else []))
        return len(self.nodes) - 1

    def seq(self, items: Any, nxt: int, flags: int) -> int:
        for op, arg in reversed(list(items)):
            nxt = self.item(op, arg, nxt, flags)
        return nxt

    def item(self, op: Any, arg: Any, nxt: int, flags: int) -> int:
        if op in _REFUSED:
            raise UnsupportedPattern(_REFUSED[op])
        if op is C.SUBPATTERN:
            _group, add, remove, body = arg
            return self.seq(body, nxt, (flags | add) & ~remove)
        if op is C.BRANCH:
            return self.add(_SPLIT, out=[self.seq(b, nxt, flags) for b in arg[1]])
        if op in (C.MAX_REPEAT, C.MIN_REPEAT):
            low, high, body = arg
            return self.repeat(low, high, body, nxt, flags)
        if op is C.AT:
            return self.anchor(arg, nxt, flags)
        return self.add(_CHAR, _pred(op, arg, flags), [nxt])

    def repeat(self, low: int, high: Any, body: Any, nxt: int, flags: int) -> int:
        if high is C.MAXREPEAT:
            loop = self.add(_SPLIT)
            self.nodes[loop].out = [self.seq(body, loop, flags), nxt]
            entry = loop
        else:
            entry = nxt
            for _ in range(high - low):
                entry = self.add(_SPLIT, out=[self.seq(body, entry, flags), nxt])
        for _ in range(low):
            entry = self.seq(body, entry, flags)
        return entry

    def anchor(self, at: Any, nxt: int, flags: int) -> int:
        if flags & re.MULTILINE:
            raise UnsupportedPattern("the multiline flag is not supported")
        if at in (C.AT_BEGINNING, C.AT_BEGINNING_STRING):
            return self.add(_BEGIN, out=[nxt])
        if at in (C.AT_END, C.AT_END_STRING):
            return self.add(_END, out=[nxt])
        raise UnsupportedPattern("\\b and \\B are not supported")


def _pred(op: Any, arg: Any, flags: int) -> Pred:
    fold = bool(flags & re.IGNORECASE)
    if op in (C.LITERAL, C.NOT_LITERAL):
        want = chr(arg).lower() if fold else chr(arg)
        same: Pred = (lambda ch: ch.lower() == want) if fold else want.__eq__
        return same if op is C.LITERAL else (lambda ch: not same(ch))
    if op is C.ANY:
        return (lambda ch: True) if flags & re.DOTALL else "\n".__ne__
    if op is C.IN:
        return _class(arg, fold)
    raise UnsupportedPattern(f"unsupported construct {op}")


def _range(low: str, high: str) -> Pred:
    return lambda ch: low <= ch <= high


def _class(items: list[tuple[Any, Any]], fold: bool) -> Pred:
    """Membership in a character class; with ``fold``, a character is in it when any of its
    cases is (then negated: ``(?i)[^a]`` refuses ``A``)."""
    negate = False
    chars: set[str] = set()
    tests: list[Pred] = []
    for op, arg in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            chars.add(chr(arg))
        elif op is C.RANGE:
            low, high = arg
            tests.append(_range(chr(low), chr(high)))
        elif op is C.CATEGORY and arg in _CATEGORIES:
            tests.append(_CATEGORIES[arg])
        else:
            raise UnsupportedPattern(f"unsupported class item {op} {arg}")
    frozen = frozenset(chars)

    def positive(ch: str) -> bool:
        return ch in frozen or any(t(ch) for t in tests)

    if fold:
        return lambda ch: (positive(ch) or positive(ch.lower()) or positive(ch.upper())) \
            != negate
    return lambda ch: positive(ch) != negate


def _reads(node: _Node, ch: str) -> bool:
    return node.kind == _CHAR and node.pred is not None and node.pred(ch)


def _mask(ids: Iterable[int]) -> int:
    out = 0
    for i in ids:
        out |= 1 << i
    return out


class LinearPattern:
    """A compiled pattern; ``fullmatch(text)`` is True when the whole text matches.

    DFA states are sets of NFA nodes held as int bitmasks. For the 256 characters request data
    is made of (heads are decoded as latin-1), ``_accept[c]`` holds the nodes that read ``c``,
    and the next state is the union of those nodes' precomputed follow sets, taken a byte of
    the mask at a time (``_union``): a step is at most ``MAX_NODES / 8`` table lookups."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        re.compile(pattern, flags)  # Python's own syntax errors, with positions
        parsed = P.parse(pattern, flags)
        compiler = _Compiler()
        entry = compiler.seq(parsed, 0, parsed.state.flags | flags)
        self.pattern = pattern
        self._nodes = nodes = compiler.nodes
        self._follow = [self._closure([n.out[0]]) if n.kind == _CHAR else 0 for n in nodes]
        self._accept = [_mask(i for i, n in enumerate(nodes) if _reads(n, chr(c)))
                        for c in range(256)]
        self._bytes = (len(nodes) + 7) // 8
        self._unions: list[dict[int, int]] = [{} for _ in range(self._bytes)]
        self._start = self._closure([entry], begin=True)
        self._trans: dict[int, dict[str, int]] = {}
        self._accepts: dict[tuple[int, bool], bool] = {}

    def fullmatch(self, text: str) -> bool:
        state = self._start
        trans = self._table(state)
        for ch in text:
            nxt = trans.get(ch)
            if nxt is None:
                nxt = trans[ch] = self._step(state, ch)
            if not nxt:
                return False
            state = nxt
            trans = self._table(state)
        key = (state, not text)
        accepts = self._accepts.get(key)
        if accepts is None:
            nodes = [i for i in range(len(self._nodes)) if state >> i & 1]
            accepts = self._accepts[key] = bool(self._closure(nodes, begin=not text,
                                                              end=True) & 1)
        return accepts

    def _table(self, state: int) -> dict[str, int]:
        table = self._trans.get(state)
        if table is None:
            if len(self._trans) >= MAX_DFA_STATES:
                self._trans.clear()
                self._accepts.clear()
            table = self._trans[state] = {}
        return table

    def _step(self, state: int, ch: str) -> int:
        code = ord(ch)
        if code < 256:
            readers = state & self._accept[code]
        else:
            readers = _mask(i for i, n in enumerate(self._nodes)
                            if state >> i & 1 and _reads(n, ch))
        nxt = 0
        for k, byte in enumerate(readers.to_bytes(self._bytes, "little")):
            if byte:
                union = self._unions[k].get(byte)
                if union is None:
                    union = self._unions[k][byte] = self._union(k, byte)
                nxt |= union
        return nxt

    def _union(self, k: int, byte: int) -> int:
        out = 0
        for j in range(8):
            if byte >> j & 1:
                out |= self._follow[8 * k + j]
        return out

    def _closure(self, start: list[int], begin: bool = False, end: bool = False) -> int:
        """Nodes reachable from ``start`` without reading a character, as a bitmask; an
        anchor that does not hold here stays in (``_END``: the accept check may pass it)."""
        nodes = self._nodes
        seen: set[int] = set()
        stack = list(start)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            node = nodes[i]
            if node.kind == _SPLIT or (node.kind == _BEGIN and begin) or \
                    (node.kind == _END and end):
                stack.extend(node.out)
        return _mask(i for i in seen if nodes[i].kind in (_CHAR, _MATCH, _END))
