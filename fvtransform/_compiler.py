"""``torch.compiler.disable`` applied when first needed (private).

Decorating at import time imports ``torch._dynamo`` (about 1 s, the largest part of importing
fvtransform.lora after torch itself), which every command and script would pay although only a call
under ``torch.compile`` reaches these fallbacks. ``disabled(fn)`` returns a function that wraps ``fn``
with ``torch.compiler.disable`` on its first call (then ``torch.compile`` has imported dynamo anyway).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import ParamSpec, TypeVar

import torch

__all__ = ["disabled"]

P = ParamSpec("P")
R = TypeVar("R")


def disabled(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn`` run outside dynamo's tracing (a graph break), wrapped by ``torch.compiler.disable`` lazily."""
    wrapped: list[Callable[P, R]] = []

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        if not wrapped:
            wrapped.append(torch.compiler.disable(fn))
        return wrapped[0](*args, **kwargs)

    return call
