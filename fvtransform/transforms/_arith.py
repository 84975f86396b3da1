"""Transform forms of the tree arithmetic (:mod:`fvtransform.tree._arith`): ``fvt.transforms.add(tau, alpha=0.5)``."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform.transforms._transform import Transform, _fmt, factory
from fvtransform.tree import _arith
from fvtransform.tree._match import Pattern

__all__ = ["add", "subtract", "scale", "lerp"]


def _dtype(dtype: DTypeLike | None) -> torch.dtype | None:
    return None if dtype is None else as_dtype(dtype)  # checked when the step is built


@factory("add", takes_tensors=True)
def add(other: Mapping[str, torch.Tensor], *, alpha: _arith.Number = 1.0, dtype: DTypeLike | None = None,
        only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.add`: ``tree + alpha * other``."""
    a, d = _arith._coefficient(alpha, "alpha", "transforms.add"), _dtype(dtype)
    return Transform(lambda t: _arith.add(t, other, alpha=a, dtype=d, only=only),
                     f"add({_fmt(alpha=a, dtype=d, only=only)})")


@factory("subtract", takes_tensors=True)
def subtract(other: Mapping[str, torch.Tensor], *, dtype: DTypeLike | None = None, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.subtract`: ``tree - other``."""
    d = _dtype(dtype)
    return Transform(lambda t: _arith.subtract(t, other, dtype=d, only=only), f"subtract({len(other)} keys)")


@factory("scale")
def scale(factor: _arith.Number, *, dtype: DTypeLike | None = None, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.scale`: ``factor * tree``."""
    f, d = _arith._coefficient(factor, "factor", "transforms.scale"), _dtype(dtype)
    return Transform(lambda t: _arith.scale(t, f, dtype=d, only=only), f"scale({_fmt(f, dtype=d, only=only)})")


@factory("lerp", takes_tensors=True)
def lerp(other: Mapping[str, torch.Tensor], weight: _arith.Number, *, dtype: DTypeLike | None = None,
         only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.lerp`: ``tree + weight * (other - tree)``."""
    w, d = _arith._coefficient(weight, "weight", "transforms.lerp"), _dtype(dtype)
    return Transform(lambda t: _arith.lerp(t, other, w, dtype=d, only=only), f"lerp({_fmt(w, dtype=d, only=only)})")
