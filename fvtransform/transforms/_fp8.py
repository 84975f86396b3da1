"""Float8 transforms: :func:`dequantize` and :func:`quantize_fp8` as steps for :func:`~fvtransform.chain`."""

from __future__ import annotations

import torch

from fvtransform._dtypes import DTypeLike
from fvtransform.transforms._transform import Transform, _fmt, factory
from fvtransform.tree import _fp8 as _tree_fp8
from fvtransform.tree._match import Pattern
from fvtransform.tree._paramtree import ParamTree

__all__ = ["dequantize", "quantize_fp8"]


@factory("dequantize")
def dequantize(dtype: DTypeLike = torch.bfloat16) -> Transform:
    """Transform form of :func:`fvtransform.dequantize`; the dtype is checked when the step is built.

    >>> import torch, fvtransform as fvt
    >>> step = fvt.transforms.dequantize(torch.float32)
    >>> step
    dequantize(torch.float32)
    """
    target = _tree_fp8._compute_dtype(dtype, "fvt.transforms.dequantize")
    return Transform(lambda t: _tree_fp8.dequantize(t, target), f"dequantize({_fmt(target)})")


@factory("quantize_fp8")
def quantize_fp8(
    dtype: torch.dtype | str = "float8_e4m3fn",
    *,
    layout: _tree_fp8.Layout = "scaled",
    scale: float | None = None,
    only: Pattern | None = None,
    saturate: bool = False,
    seed: int | None = None,
) -> Transform:
    """Transform form of :func:`fvtransform.quantize_fp8`; the arguments are checked when the step is built."""
    probe = ParamTree({"probe.weight": torch.zeros(1, 1)})
    _tree_fp8.quantize_fp8(probe, dtype, layout=layout, scale=scale, saturate=saturate, seed=seed)  # bad arguments raise now
    return Transform(
        lambda t: _tree_fp8.quantize_fp8(t, dtype, layout=layout, scale=scale, only=only, saturate=saturate, seed=seed),
        f"quantize_fp8({_fmt(dtype, layout=layout, scale=scale, only=only, seed=seed)})",
    )
