"""PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, in bounded time on untrusted patterns.

PEFT picks the first pattern ``p`` (in the config's order) for which
``re.match(rf"(.*\\.)?({p})$", module)`` succeeds. A backtracking regex engine
can take exponential time on a hostile pattern (``(a|a)(a|a)...``, ``(a+)+b``),
so the pattern is only *parsed* here (linear, length-bounded) and matched by a
set-of-positions simulation: the work is polynomial in the pattern and name
sizes whatever the pattern. Constructs that need backtracking semantics
(backreferences, lookarounds, conditionals, inline flags) are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import re
from typing import Any

from fvtransform.errors import FormatError

__all__ = ["pattern_value", "compile_patterns", "check_pattern", "full_match", "MAX_PATTERN_CHARS"]

try:  # Python >= 3.11
    from re import _constants as _c, _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c
    import sre_parse as _p

MAX_PATTERN_CHARS = 256
MAX_REPEAT_COUNT = 256
_Pos = frozenset[int]

_CATEGORY: dict[Any, Callable[[str], bool]] = {
    _c.CATEGORY_DIGIT: str.isdecimal,
    _c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    _c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    _c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
    _c.CATEGORY_SPACE: str.isspace,
    _c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
}


def check_pattern(pattern: Any, where: str) -> Any:
    """Parse ``pattern`` (bounded length and constructs); returns the parsed form or raises FormatError."""
    if not isinstance(pattern, str):
        raise FormatError(f"{where}: a pattern must be a string; found {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise FormatError(f"{where}: pattern of {len(pattern)} characters is longer than {MAX_PATTERN_CHARS}; use a shorter pattern")
    try:
        parsed = _p.parse(pattern, 0)
    except (re.error, RecursionError, OverflowError) as e:
        raise FormatError(f"{where}: pattern {pattern!r} is not a valid regular expression ({e})") from None
    if parsed.state.flags & ~(re.UNICODE):
        raise FormatError(f"{where}: pattern {pattern!r} sets regex flags, which are not supported; remove them")
    _check(list(parsed), pattern, where)
    return list(parsed)


_ATOMS = {_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN, _c.CATEGORY}
_ANCHORS = {_c.AT_BEGINNING, _c.AT_BEGINNING_STRING, _c.AT_END, _c.AT_END_STRING}


def _check(items: list[Any], pattern: str, where: str) -> None:
    for op, av in items:
        if op in _ATOMS or (op is _c.AT and av in _ANCHORS):
            continue
        if op is _c.BRANCH:
            for alt in av[1]:
                _check(list(alt), pattern, where)
        elif op is _c.SUBPATTERN:
            if av[1] or av[2]:
                raise FormatError(f"{where}: pattern {pattern!r} sets regex flags in a group; remove them")
            _check(list(av[3]), pattern, where)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            lo, hi, body = av
            if lo > MAX_REPEAT_COUNT or (hi != _c.MAXREPEAT and hi > MAX_REPEAT_COUNT):
                raise FormatError(f"{where}: pattern {pattern!r} repeats more than {MAX_REPEAT_COUNT} times; use * or +")
            _check(list(body), pattern, where)
        else:
            raise FormatError(
                f"{where}: pattern {pattern!r} uses {str(op).lower()}, which module patterns do not support "
                "(no backreferences, lookarounds or conditionals); write a plain pattern"
            )


def _char_ok(op: Any, av: Any, ch: str) -> bool:
    if op is _c.LITERAL:
        return ord(ch) == av
    if op is _c.NOT_LITERAL:
        return ord(ch) != av
    if op is _c.ANY:
        return ch != "\n"
    if op is _c.CATEGORY:
        return _CATEGORY[av](ch)
    # IN: a set of items, maybe negated
    negate, hit = False, False
    for iop, iav in av:
        if iop is _c.NEGATE:
            negate = True
        elif iop is _c.RANGE:
            hit = hit or iav[0] <= ord(ch) <= iav[1]
        else:
            hit = hit or _char_ok(iop, iav, ch)
    return hit != negate


def _run(items: list[Any], text: str, starts: _Pos) -> _Pos:
    """End positions of matches of the sequence ``items`` beginning at any of ``starts``."""
    cur = starts
    for op, av in items:
        if not cur:
            return cur
        if op in _ATOMS:
            cur = frozenset(p + 1 for p in cur if p < len(text) and _char_ok(op, av, text[p]))
        elif op is _c.AT:
            if av in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
                cur = frozenset(p for p in cur if p == 0)
            else:  # AT_END / AT_END_STRING: check_pattern admits no other anchor
                cur = frozenset(p for p in cur if p == len(text))
        elif op is _c.BRANCH:
            cur = frozenset().union(*(_run(list(alt), text, cur) for alt in av[1]))
        elif op is _c.SUBPATTERN:
            cur = _run(list(av[3]), text, cur)
        else:  # repeats: exact minimum, then a breadth-first search by count (each position once)
            lo, hi, body = av
            body = list(body)
            for _ in range(lo):
                cur = _run(body, text, cur)
            seen, frontier, count = set(cur), cur, lo
            while frontier and (hi == _c.MAXREPEAT or count < hi):
                frontier = _run(body, text, frontier) - seen
                seen |= frontier
                count += 1
            cur = frozenset(seen)
    return cur


def _peft_match(parsed: list[Any], module: str) -> bool:
    """``re.match(rf"(.*\\.)?({pattern})$", module)`` without backtracking."""
    starts = frozenset([0] + [i + 1 for i, ch in enumerate(module) if ch == "." and "\n" not in module[:i]])
    ends = _run(parsed, module, starts)
    return len(module) in ends or (module.endswith("\n") and len(module) - 1 in ends)


def full_match(parsed: list[Any], text: str) -> bool:
    """``re.fullmatch(pattern, text)`` (PEFT's string ``target_modules`` / ``exclude_modules``) without backtracking."""
    return len(text) in _run(parsed, text, frozenset([0]))


def compile_patterns(patterns: Mapping[str, Any], where: str) -> list[tuple[list[Any], Any]]:
    """Check every pattern once: ``[(parsed, value), ...]`` in the config's order."""
    return [(check_pattern(pat, f"{where}: pattern {str(pat)[:60]!r}"), value) for pat, value in patterns.items()]


def pattern_value(module: str, compiled: list[tuple[list[Any], Any]], default: Any) -> Any:
    """The value of the first pattern (in order) that matches ``module`` as PEFT matches it, else ``default``."""
    for parsed, value in compiled:
        if _peft_match(parsed, module):
            return value
    return default
