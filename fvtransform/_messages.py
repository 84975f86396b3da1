"""Helpers that shape error messages (private: the library's own wording, not public API)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (best first).

    >>> close_matches("blocks.0.attn1.to_qq", ["blocks.0.attn1.to_q", "x"])
    ['blocks.0.attn1.to_q']
    """
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
    """Format a list of keys for an error message, sorted, eliding a long tail.

    >>> format_keys(["b", "a"])
    "['a', 'b']"
    >>> format_keys([str(i) for i in range(20)], limit=2)
    "['0', '1', ... (18 more)]"
    """
    items = sorted(keys)
    if len(items) <= limit:
        return repr(items)
    shown = ", ".join(repr(k) for k in items[:limit])
    return f"[{shown}, ... ({len(items) - limit} more)]"
