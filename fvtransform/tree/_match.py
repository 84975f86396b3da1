"""Key patterns: globs, regular expressions, key lists and predicates."""

from __future__ import annotations

from collections.abc import Callable, Collection
import fnmatch
import inspect
import re
from typing import Union

import torch

from fvtransform.errors import UsageError

__all__ = ["Pattern", "matcher"]

#: A key pattern: a glob (``"blocks.*.attn1.*"``; ``*`` crosses dots), a
#: compiled regular expression (full match), a collection of either, or a
#: predicate ``(key, tensor) -> bool``.
Pattern = Union[str, "re.Pattern[str]", Collection[Union[str, "re.Pattern[str]"]], Callable[[str, torch.Tensor], bool]]
"""What selects keys: a glob (``"blocks.*.weight"``), a compiled regex, a list of those, or a predicate ``(key, tensor) -> bool``."""


def _check_predicate(fn: Callable[..., bool]) -> None:
    """A predicate takes ``(key, tensor)``; one that takes a single argument is a :class:`UsageError`."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(positional) < 2 or len(required) > 2:
        raise UsageError(
            f"a predicate pattern takes (key, tensor) and returns bool; {getattr(fn, '__name__', fn)!r} takes "
            f"{len(positional)} positional argument(s). Write it as lambda key, tensor: ..."
        )


def matcher(pattern: Pattern) -> Callable[[str, torch.Tensor], bool]:
    """Turn a :data:`Pattern` into a predicate ``(key, tensor) -> bool``.

    >>> m = matcher("blocks.*.to_q.weight")
    >>> m("blocks.3.attn1.to_q.weight", None), m("blocks.3.to_k.weight", None)
    (True, False)
    >>> matcher(re.compile(r"a\\.\\d+"))("a.12", None)
    True
    """
    if isinstance(pattern, str):
        regex = re.compile(fnmatch.translate(pattern))
        return lambda key, _t: regex.match(key) is not None
    if isinstance(pattern, re.Pattern):
        return lambda key, _t: pattern.fullmatch(key) is not None
    if callable(pattern):
        _check_predicate(pattern)
        return pattern
    if isinstance(pattern, Collection):
        parts = [matcher(p) for p in pattern]
        return lambda key, t: any(p(key, t) for p in parts)
    raise UsageError(
        f"expected a glob string, a compiled regex, a list of them or a predicate; "
        f"found {type(pattern).__name__}"
    )
