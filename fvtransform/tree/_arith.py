"""Arithmetic over trees: model soups and task vectors.

The names are the verbs of the arithmetic (``fvt.add``, ``fvt.subtract``,
``fvt.scale``, ``fvt.lerp``, ``fvt.weighted_mean``), as ``torch.add`` and
``torch.lerp`` name them, so that task arithmetic reads as written:
``fvt.add(base, fvt.subtract(tuned, base, dtype="float32"), alpha=0.5, dtype=base_dtype)``.
They are not :func:`~fvtransform.combine`, which joins trees of *disjoint*
keys; these take trees of the *same* keys and combine their values.

Every result is computed in float32 (float64 where an input or the result is
float64) and rounded once into the result's dtype, so ``add(a, b, alpha=0.5)``
on bfloat16 trees is one rounding, not three. The result's dtype is the
inputs' dtype; inputs of different floating dtypes are an error unless
``dtype=`` names the result's dtype. Integer and bool tensors (step counters,
position ids) are not arithmetic: they are kept when every tree holds the same
values, else an error. Float8 tensors carry a scale elsewhere in the tree, so
their raw values do not add: they are refused (dequantize first). Nothing is
mutated; tensors tied in every tree stay tied; the gradients flow (the
functions work under ``torch.func.grad`` and ``vmap``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Union

import torch

from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._fp8 import is_fp8
from fvtransform.errors import NumericError, ShapeMismatchError, UsageError
from fvtransform.tree._match import Pattern
from fvtransform.tree._ops import _eager, _map_many, aligned, show_args
from fvtransform.tree._paramtree import ParamTree

__all__ = ["add", "subtract", "scale", "lerp", "weighted_mean", "Number"]

#: A coefficient: a real number, or a 0-d floating tensor (learned soup weights, ``vmap`` over coefficients).
Number = Union[float, int, torch.Tensor]

Combine = Callable[[list[torch.Tensor]], torch.Tensor]


def _coefficient(value: object, name: str, fn: str) -> Number:
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise UsageError(
                f"fvt.{fn}: {name} must be a number or a 0-d floating tensor; found a {value.dtype} tensor of shape "
                f"{list(value.shape)}. Pass e.g. {name}=0.5"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"fvt.{fn}: {name} must be a real number; found {type(value).__name__} {value!r}. Pass e.g. {name}=0.5")
    if not math.isfinite(value):
        raise NumericError(f"fvt.{fn}: {name}={value} is not finite; pass a finite number")
    return value


def _run(fn: str, trees: list[ParamTree], combine: Combine, dtype: DTypeLike | None, only: Pattern | None) -> ParamTree:
    """``combine`` of each key's tensors, accumulated in float32/float64 and rounded once."""
    out_dtype = None if dtype is None else as_dtype(dtype)
    if out_dtype is not None and is_fp8(out_dtype):
        raise UsageError(f"fvt.{fn}: dtype={out_dtype} is float8; compute in a wider dtype, then quantize the result")

    def one(key: str, *values: torch.Tensor) -> torch.Tensor:
        first = values[0]
        for i, v in enumerate(values[1:], 1):
            if v.shape != first.shape:
                raise ShapeMismatchError(
                    f"{fn}: {key!r} has shape {list(first.shape)} in tree 0 and {list(v.shape)} in tree {i}; "
                    "the trees must be of one model. Fix: reshape or drop the key (only=...)"
                )
            if v.device != first.device:
                raise UsageError(f"fvt.{fn}: {key!r} is on {first.device} in tree 0 and on {v.device} in tree {i}; "
                                 f"move the trees to one device first: fvt.to(tree, {str(first.device)!r})")
        if not all(v.is_floating_point() for v in values):
            return _kept(fn, key, values)
        dtypes = {v.dtype for v in values}
        fp8 = [d for d in dtypes if is_fp8(d)]
        if fp8:
            raise UsageError(
                f"fvt.{fn}: {key!r} is {fp8[0]}; a float8 tensor's values mean nothing without its scale. "
                "Dequantize the tree first (compute in bfloat16 or float32), then quantize the result"
            )
        if out_dtype is None and len(dtypes) > 1:
            found = ", ".join(f"tree {i}: {v.dtype}" for i, v in enumerate(values))
            raise ShapeMismatchError(
                f"{fn}: {key!r} has different dtypes ({found}). Fix: pass dtype= for the result "
                f"(e.g. dtype={str(first.dtype).removeprefix('torch.')!r}), or cast the trees to one dtype (fvt.cast)"
            )
        target = out_dtype or first.dtype
        acc = torch.float64 if torch.float64 in dtypes or target == torch.float64 else torch.float32
        return combine([v.to(acc) for v in values]).to(target)

    return _map_many(trees, one, only)


def _kept(fn: str, key: str, values: tuple[torch.Tensor, ...]) -> torch.Tensor:
    first = values[0]
    for i, v in enumerate(values[1:], 1):
        if v.dtype != first.dtype or not torch.equal(v, first):
            raise ShapeMismatchError(
                f"{fn}: {key!r} is {first.dtype} in tree 0 and {v.dtype} in tree {i} with other values; integer and "
                "bool tensors are kept, not computed, so every tree must hold the same. Fix: leave the key out "
                "(only=...), or set it afterwards with fvt.update"
            )
    return first


@_eager
def add(tree: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], /, *, alpha: Number = 1.0,
        dtype: DTypeLike | None = None, only: Pattern | None = None) -> ParamTree:
    """``tree + alpha * other``, key by key, rounded once (adding a task vector: ``fvt.add(base, tau, alpha=0.5)``).

    Named as ``torch.add`` (with its ``alpha``); :func:`~fvtransform.combine`
    is another operation, the union of trees of disjoint keys. One rounding
    from float32 (float64 for float64 inputs) into the result's dtype.

    Args:
        tree: The first tree; the result has its keys, order and (by default) dtypes.
        other: A tree of the same keys and shapes.
        alpha: The factor of ``other`` (a number or a 0-d tensor).
        dtype: The result's dtype; needed when the inputs' floating dtypes differ.
        only: Compute only the matching keys; the others keep ``tree``'s tensors.

    Returns:
        A new tree.

    Raises:
        KeyMismatchError: The trees' keys differ (each tree's missing and extra keys are listed).
        ShapeMismatchError: A key's shapes or dtypes differ, or its integer values differ.
        UsageError: A float8 tensor, a bad ``alpha``, or tensors on two devices.

    >>> import torch, fvtransform as fvt
    >>> base = fvt.ParamTree({"w": torch.tensor([1.0, 2.0])})
    >>> fvt.add(base, {"w": torch.tensor([2.0, 2.0])}, alpha=0.5)["w"]
    tensor([2., 3.])
    """
    a = _coefficient(alpha, "alpha", "add")
    return _run("add", aligned("add", tree, (other,)), lambda v: v[0] + a * v[1], dtype, only)


@_eager
def subtract(tree: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], /, *,
             dtype: DTypeLike | None = None, only: Pattern | None = None) -> ParamTree:
    """``tree - other``, key by key, rounded once: the task vector ``fvt.subtract(tuned, base)``.

    Keep a task vector in float32 with ``dtype="float32"``: the difference of
    two bfloat16 trees is exact in float32 and loses bits in bfloat16.
    Arguments, returns and errors: as :func:`add`.

    >>> import torch, fvtransform as fvt
    >>> tuned = fvt.ParamTree({"w": torch.tensor([1.5], dtype=torch.bfloat16)})
    >>> fvt.subtract(tuned, {"w": torch.tensor([1.0], dtype=torch.bfloat16)}, dtype="float32")["w"]
    tensor([0.5000])
    """
    return _run("subtract", aligned("subtract", tree, (other,)), lambda v: v[0] - v[1], dtype, only)


@_eager
def scale(tree: Mapping[str, torch.Tensor], factor: Number, /, *, dtype: DTypeLike | None = None,
          only: Pattern | None = None) -> ParamTree:
    """``factor * tree``, rounded once (integer and bool tensors are kept).

    Arguments, returns and errors: as :func:`add`.

    >>> import torch, fvtransform as fvt
    >>> fvt.scale(fvt.ParamTree({"w": torch.tensor([1.0, -2.0])}), 0.5)["w"]
    tensor([ 0.5000, -1.0000])
    """
    f = _coefficient(factor, "factor", "scale")
    return _run("scale", aligned("scale", tree, ()), lambda v: f * v[0], dtype, only)


@_eager
def lerp(tree: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor], weight: Number, /, *,
         dtype: DTypeLike | None = None, only: Pattern | None = None) -> ParamTree:
    """``tree + weight * (other - tree)`` (``torch.lerp``), rounded once: a two-model soup, weight-space interpolation.

    ``weight=0`` gives ``tree``'s values and ``weight=1`` gives ``other``'s,
    exactly. Arguments, returns and errors: as :func:`add`.

    >>> import torch, fvtransform as fvt
    >>> a, b = fvt.ParamTree({"w": torch.zeros(2)}), fvt.ParamTree({"w": torch.ones(2)})
    >>> fvt.lerp(a, b, 0.25)["w"]
    tensor([0.2500, 0.2500])
    """
    w = _coefficient(weight, "weight", "lerp")
    return _run("lerp", aligned("lerp", tree, (other,)), lambda v: torch.lerp(v[0], v[1], w), dtype, only)


def weighted_mean(trees: Sequence[Mapping[str, torch.Tensor]], /, weights: Sequence[Number] | None = None, *,
                  dtype: DTypeLike | None = None, only: Pattern | None = None) -> ParamTree:
    """``sum_i w_i * trees[i] / sum_i w_i``, rounded once: a model soup of N trees (uniform without ``weights``).

    The sum is accumulated in float32 (float64 for float64 inputs) and divided
    once, so the mean of equal bfloat16 trees is that tree. It maps N trees to
    one, so it has no transform form (as :func:`~fvtransform.combine`).

    Args:
        trees: One or more trees of the same keys and shapes (a list).
        weights: One weight per tree (numbers or 0-d tensors; their sum must not be 0); None: equal weights.
        dtype: The result's dtype; needed when the inputs' floating dtypes differ.
        only: Average only the matching keys; the others keep the first tree's tensors.

    Returns:
        A new tree with the first tree's keys and order.

    Raises:
        KeyMismatchError: The trees' keys differ.
        ShapeMismatchError: A key's shapes or dtypes differ, or its integer values differ.
        UsageError: No trees, a tree passed alone (not in a list), weights of another count, or weights summing to 0.

    >>> import torch, fvtransform as fvt
    >>> soup = fvt.weighted_mean([{"w": torch.zeros(1)}, {"w": torch.ones(1)}], weights=[1, 3])
    >>> soup["w"]
    tensor([0.7500])
    """
    if isinstance(trees, Mapping) or not isinstance(trees, Sequence) or not trees:
        shown = show_args((trees,), {})
        raise UsageError(
            f"fvt.weighted_mean(trees, weights=None) takes a list of one or more trees; found {shown}. "
            "Call fvt.weighted_mean([tree_a, tree_b], weights=[0.5, 0.5])"
        )
    if weights is None:
        ws: list[Number] = [1.0] * len(trees)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(trees):
            raise UsageError(
                f"fvt.weighted_mean: weights must be a list of one number per tree ({len(trees)}); found "
                f"{show_args((weights,), {})}. Call fvt.weighted_mean(trees, weights=[0.5] * {len(trees)})"
            )
        ws = [_coefficient(w, f"weights[{i}]", "weighted_mean") for i, w in enumerate(weights)]
    total = sum(ws)
    if not isinstance(total, torch.Tensor) and total == 0:
        raise UsageError(f"fvt.weighted_mean: the weights {list(ws)} sum to 0; a weighted mean divides by their sum")
    checked = aligned("weighted_mean", trees[0], tuple(trees[1:]))

    def mean(values: list[torch.Tensor]) -> torch.Tensor:
        acc = values[0] * ws[0]
        for w, v in zip(ws[1:], values[1:]):
            acc = acc + w * v
        return acc / total

    return _run("weighted_mean", checked, mean, dtype, only)


weighted_mean.__fvt_eager__ = "weighted_mean"  # type: ignore[attr-defined]
