"""Transforms: small values with one signature, ``ParamTree -> ParamTree``.

Like optax's gradient transformations, a transform is built by a factory and
composed with :func:`chain`. A transform is a frozen value: it prints what it
will do and can be kept, compared by name, and reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch

from fvtransform.errors import FormatError
from fvtransform.tree import _ops
from fvtransform.tree._match import Pattern
from fvtransform.tree._paramtree import ParamTree

__all__ = ["Transform", "chain", "select", "drop", "rename", "cast", "to", "map_tensors", "update", "as_transform"]

TreeFn = Callable[[ParamTree], ParamTree]


@attrs.frozen
class Transform:
    """A named tree-to-tree function. Call it on a tree to get a new tree.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"w": torch.zeros(2)})
    >>> step = fvt.transforms.cast(torch.float16)
    >>> step
    cast(torch.float16)
    >>> step(t)["w"].dtype
    torch.float16
    """

    fn: TreeFn = attrs.field(repr=False)
    name: str

    def __call__(self, tree: Mapping[str, torch.Tensor], /) -> ParamTree:
        if not isinstance(tree, ParamTree):
            tree = ParamTree(tree)
        out = self.fn(tree)
        if not isinstance(out, ParamTree):
            raise FormatError(
                f"transform {self.name} returned {type(out).__name__}; a transform must return a ParamTree"
            )
        return out

    def __repr__(self) -> str:
        return self.name


def as_transform(fn: TreeFn | Transform) -> Transform:
    """Wrap any callable ``tree -> tree`` as a :class:`Transform`."""
    if isinstance(fn, Transform):
        return fn
    if not callable(fn):
        raise FormatError(f"a transform is a callable ParamTree -> ParamTree; found {type(fn).__name__}")
    return Transform(fn, getattr(fn, "__name__", repr(fn)))


def chain(*transforms: TreeFn | Transform) -> Transform:
    """Compose transforms left to right: ``chain(f, g)(t) == g(f(t))``.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"a.w": torch.zeros(2), "b.w": torch.zeros(2)})
    >>> pipeline = fvt.chain(fvt.transforms.select("a.*"), fvt.transforms.cast(torch.bfloat16))
    >>> pipeline
    chain(select('a.*'), cast(torch.bfloat16))
    >>> pipeline(t)
    ParamTree(1 tensors, 4 B, bfloat16: 1, devices: cpu)
    """
    steps = [as_transform(t) for t in transforms]

    def run(tree: ParamTree) -> ParamTree:
        for step in steps:
            tree = step(tree)
        return tree

    return Transform(run, "chain(" + ", ".join(repr(s) for s in steps) + ")")


def _fmt(*args: Any, **kwargs: Any) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items() if v is not None]
    return ", ".join(parts)


def select(pattern: Pattern, *, allow_empty: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.select`."""
    return Transform(lambda t: _ops.select(t, pattern, allow_empty=allow_empty), f"select({_fmt(pattern)})")


def drop(pattern: Pattern, *, allow_empty: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.drop`."""
    return Transform(lambda t: _ops.drop(t, pattern, allow_empty=allow_empty), f"drop({_fmt(pattern)})")


def rename(rules: Any, *, strict: bool = True) -> Transform:
    """Transform form of :func:`fvtransform.rename`."""
    return Transform(lambda t: _ops.rename(t, rules, strict=strict), f"rename({_fmt(rules)})")


def cast(dtype: torch.dtype, *, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.cast`."""
    return Transform(lambda t: _ops.cast(t, dtype, only=only), f"cast({_fmt(dtype, only=only)})")


def to(device: torch.device | str, *, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.to`."""
    return Transform(lambda t: _ops.to(t, device, only=only), f"to({_fmt(device, only=only)})")


def map_tensors(fn: Callable[..., torch.Tensor], *, only: Pattern | None = None, with_keys: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.map_tensors`."""
    name = getattr(fn, "__name__", "fn")
    return Transform(
        lambda t: _ops.map_tensors(t, fn, only=only, with_keys=with_keys), f"map_tensors({name})"
    )


def update(other: Mapping[str, torch.Tensor], *, allow_new: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.update`."""
    return Transform(lambda t: _ops.update(t, other, allow_new=allow_new), f"update({len(other)} keys)")
