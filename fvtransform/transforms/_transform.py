"""Transforms: small values with one signature, ``ParamTree -> ParamTree``.

Like optax's gradient transformations, a transform is built by a factory and
composed with :func:`chain`. A transform is a frozen value: it prints what it
will do and can be kept, compared by name, and reused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import inspect
from typing import Any, TypeVar

import attrs
import torch

from fvtransform._args import check_strict
from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform.errors import UsageError
from fvtransform.tree import _ops
from fvtransform.tree._keymap import KeyMap, KeyMapLike
from fvtransform.tree._match import Pattern
from fvtransform.tree._paramtree import ParamTree

__all__ = ["Transform", "chain", "select", "drop", "rename", "cast", "to", "map_tensors", "update", "as_transform", "factory"]

TreeFn = Callable[[ParamTree], ParamTree]
F = TypeVar("F", bound=Callable[..., Any])


def _is_tree(value: object) -> bool:
    if isinstance(value, ParamTree):
        return True
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


def factory(now: str, *, takes_tensors: bool = False) -> Callable[[F], F]:
    """Mark a transform factory; a tree passed to it is a :class:`UsageError` that shows the eager call ``now``.

    ``now`` is the eager function's dotted name after ``fvt.`` (``"select"``,
    ``"lora.merge"``). ``takes_tensors``: the factory's own argument is a
    mapping of tensors (``update``), so only a tree *and* that argument is a mix-up.
    """

    def wrap(fn: F) -> F:
        positional = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

        @functools.wraps(fn)
        def make(*args: Any, **kwargs: Any) -> Any:
            if args and _is_tree(args[0]) and (not takes_tensors or len(args) > len(positional)):
                rest = _ops.show_args(args[1:], kwargs) if (args[1:] or kwargs) else "..."
                shape = ", ".join(p.name for p in positional)
                raise UsageError(
                    f"fvt.transforms.{fn.__name__}({shape}) builds a step for fvt.chain and takes no tree; "
                    f"to run it now on the tree use fvt.{now}(tree, {rest})"
                )
            return fn(*args, **kwargs)

        make.__fvt_factory__ = fn.__name__  # type: ignore[attr-defined]
        return make  # type: ignore[return-value]

    return wrap


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
        if not isinstance(tree, Mapping):
            raise UsageError(
                f"the step {self.name} runs on a tree (a ParamTree or a dict of tensors); found "
                f"{type(tree).__name__}. Call it as step(tree), e.g. step(fvt.ParamTree.from_module(module))"
            )
        if not isinstance(tree, ParamTree):
            tree = ParamTree(tree)
        out = self.fn(tree)
        if not isinstance(out, ParamTree):
            raise UsageError(
                f"transform {self.name} returned {type(out).__name__}; a transform must return a ParamTree"
            )
        return out

    def __repr__(self) -> str:
        return self.name


def as_transform(fn: TreeFn | Transform) -> Transform:
    """Wrap any callable ``tree -> tree`` as a :class:`Transform`.

    An eager operation (``fvt.select``) or an uncalled factory
    (``fvt.transforms.select``) is a :class:`~fvtransform.errors.UsageError`
    that shows the factory call.
    """
    if isinstance(fn, Transform):
        return fn
    eager = getattr(fn, "__fvt_eager__", None)
    if eager is not None:
        raise UsageError(f"fvt.{eager} is an eager call: " + _ops.eager_misuse(eager, _shape(fn), (), {}))
    made = getattr(fn, "__fvt_factory__", None)
    if made is not None:
        raise UsageError(
            f"fvt.transforms.{made} is a factory: call it to make the step, fvt.transforms.{made}({_shape(fn)})"
        )
    if isinstance(fn, (list, tuple)):
        raise UsageError(
            f"fvt.chain(*steps) takes the steps as separate arguments; found a {type(fn).__name__} of "
            f"{len(fn)}. Unpack it: fvt.chain(*steps)"
        )
    if not callable(fn):
        raise UsageError(f"a transform is a callable ParamTree -> ParamTree; found {type(fn).__name__}")
    return Transform(fn, getattr(fn, "__name__", repr(fn)))


def chain(*transforms: TreeFn | Transform) -> Transform:
    """Compose transforms left to right: ``chain(f, g)(t) == g(f(t))``.

    A step is a :class:`Transform` or any callable ``tree -> tree``; an eager
    operation (``fvt.select``) or an uncalled factory (``fvt.transforms.select``)
    is a :class:`~fvtransform.errors.UsageError` that shows the factory call.

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


def _shape(fn: Callable[..., Any]) -> str:
    params = inspect.signature(fn).parameters.values()
    return ", ".join(("*" if p.kind is p.VAR_POSITIONAL else "") + p.name for p in params if p.default is p.empty)


def _fmt(*args: Any, **kwargs: Any) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items() if v is not None]
    return ", ".join(parts)


@factory("select")
def select(pattern: Pattern, *, allow_empty: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.select`."""
    return Transform(lambda t: _ops.select(t, pattern, allow_empty=allow_empty), f"select({_fmt(pattern)})")


@factory("drop")
def drop(pattern: Pattern, *, allow_empty: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.drop`."""
    return Transform(lambda t: _ops.drop(t, pattern, allow_empty=allow_empty), f"drop({_fmt(pattern)})")


@factory("rename")
def rename(rules: KeyMapLike, *, strict: bool = True) -> Transform:
    """Transform form of :func:`fvtransform.rename`."""
    key_map = KeyMap.of(rules)  # checked now, when the step is built
    strict = check_strict(strict, "fvt.transforms.rename")
    return Transform(lambda t: _ops.rename(t, key_map, strict=strict), f"rename({key_map!r})")


@factory("cast")
def cast(dtype: DTypeLike, *, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.cast`; the dtype (or its name) is checked when the step is built."""
    dtype = as_dtype(dtype)
    return Transform(lambda t: _ops.cast(t, dtype, only=only), f"cast({_fmt(dtype, only=only)})")


@factory("to")
def to(device: torch.device | str, *, only: Pattern | None = None) -> Transform:
    """Transform form of :func:`fvtransform.to`."""
    return Transform(lambda t: _ops.to(t, device, only=only), f"to({_fmt(device, only=only)})")


@factory("map_tensors")
def map_tensors(fn: Callable[..., torch.Tensor], *others: Mapping[str, torch.Tensor], only: Pattern | None = None,
                with_keys: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.map_tensors`: ``fn`` over the tree and ``others`` (aligned keys)."""
    name = getattr(fn, "__name__", "fn")
    more = "".join(f", <{len(o)} keys>" for o in others)
    return Transform(
        lambda t: _ops.map_tensors(t, fn, *others, only=only, with_keys=with_keys), f"map_tensors({name}{more})"
    )


@factory("update", takes_tensors=True)
def update(other: Mapping[str, torch.Tensor], *, allow_new: bool = False) -> Transform:
    """Transform form of :func:`fvtransform.update`."""
    return Transform(lambda t: _ops.update(t, other, allow_new=allow_new), f"update({len(other)} keys)")
