"""Keyword arguments that moved to a function of their own: a call with one names the call to make instead."""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import ParamSpec, TypeVar

from fvtransform.errors import UsageError

__all__ = ["moved_keywords"]

P = ParamSpec("P")
R = TypeVar("R")


def moved_keywords(**calls: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Refuse the keywords ``calls`` names (each a flag that changed the return type), showing the call that replaces it.

    >>> @moved_keywords(return_record="fvt.lora.merge_with_record(tree, adapters)")
    ... def merge(tree: int) -> int:
    ...     return tree
    >>> merge(1, return_record=True)
    Traceback (most recent call last):
    ...
    fvtransform.errors.UsageError: merge() has no return_record=; a flag does not change what a call returns. Call fvt.lora.merge_with_record(tree, adapters) instead
    """

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def checked(*args: P.args, **kwargs: P.kwargs) -> R:
            for name, call in calls.items():
                if name in kwargs:
                    raise UsageError(f"{fn.__name__}() has no {name}=; a flag does not change what a call returns. Call {call} instead")
            return fn(*args, **kwargs)

        return checked

    return wrap
