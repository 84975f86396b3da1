"""Tree operations. Each returns a new ParamTree; none mutates its input.

Tensors an operation does not change are shared by identity, and tensors
tied under several keys stay tied (one result per distinct input tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
import inspect
import re
from typing import Any, TypeVar

import torch

from fvtransform._dtypes import as_dtype, DTypeLike, DTYPES
from fvtransform._messages import close_matches, format_keys
from fvtransform.errors import KeyMismatchError, UsageError
from fvtransform.tree._keymap import KeyMap, KeyMapLike
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._paramtree import ParamTree

__all__ = ["select", "drop", "partition", "combine", "rename", "cast", "to", "map_tensors", "update"]

F = TypeVar("F", bound=Callable[..., Any])

#: Eager operations that have no transform form (they do not map one tree to one tree).
_NO_FACTORY = frozenset({"partition", "combine", "save", "shard", "unshard", "lora.restore"})
#: Eager operations whose factory has another name than ``fvt.transforms.<name>``.
_FACTORY_OF = {"lora.merge": "merge_lora", "lora.unmerge": "unmerge_lora"}
#: A glob's wildcard characters: a list entry without them names one key.
_GLOB = re.compile(r"[*?\[]")


def show_args(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """Arguments as a call shows them, each shortened to one readable piece."""

    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 60 and "\n" not in r else f"<{type(v).__name__}>"

    return ", ".join([short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()])


def _eager(fn: F) -> F:
    """Mark a tree operation as eager and turn a factory-style call of it into a :class:`UsageError`.

    ``fvt.select("a.*")`` (no tree) raises an error that shows both the eager
    call and the factory ``fvt.transforms.select('a.*')``.
    """
    name = fn.__name__
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_ONLY]
    required = sum(p.default is p.empty for p in params)
    shape = ", ".join(p.name for p in params if p.default is p.empty)

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        if len(args) < required or not isinstance(args[0], Mapping):
            swapped = [i for i, a in enumerate(args) if _holds_tensors(a)]
            if swapped and not isinstance(args[0], Mapping):  # fvt.select("a.*", tree): the tree goes first
                rest = args[: swapped[0]] + args[swapped[0] + 1 :]
                raise UsageError(
                    f"fvt.{name}({shape}) takes the tree first; found {type(args[0]).__name__} first. "
                    f"Call fvt.{name}(tree, {show_args(rest, kwargs)})"
                )
            raise UsageError(eager_misuse(name, shape, args, kwargs))
        return fn(*args, **kwargs)

    call.__fvt_eager__ = name  # type: ignore[attr-defined]
    return call  # type: ignore[return-value]


def _holds_tensors(value: object) -> bool:
    if isinstance(value, ParamTree):
        return True
    return isinstance(value, Mapping) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value.values())


def eager_misuse(name: str, shape: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The message for an eager operation called without a tree (or passed, uncalled, to chain)."""
    head = f"fvt.{name}({shape}) runs now, on a tree"
    if name in _NO_FACTORY:
        return head + f"; it has no transform form. Call it on trees: fvt.{name}({shape})"
    given = show_args(args, kwargs) if (args or kwargs) else "..."
    return head + f"; inside chain use fvt.transforms.{_FACTORY_OF.get(name, name)}({given})"


def _as_tree(tree: Mapping[str, torch.Tensor]) -> ParamTree:
    return tree if isinstance(tree, ParamTree) else ParamTree(tree)


def _missing_names(pattern: Pattern, tree: ParamTree) -> None:
    """Every plain key named in a list pattern must be in the tree (a glob may match nothing of its own)."""
    if isinstance(pattern, (str, re.Pattern)) or callable(pattern):
        return
    missing = [p for p in pattern if isinstance(p, str) and not _GLOB.search(p) and p not in tree]
    if missing:
        hints = {k: close_matches(k, tree) for k in missing}
        said = "; ".join(f"{k!r} (did you mean {h}?)" if h else repr(k) for k, h in hints.items())
        raise KeyMismatchError(
            f"select: named keys not in the tree: {said}. Every key a list names must be there; "
            "fix the name, or use a glob pattern for keys that may be absent."
        )


def _no_match(pattern: Any, tree: ParamTree) -> KeyMismatchError:
    return KeyMismatchError(
        f"pattern {pattern!r} matched no key of the tree ({len(tree)} keys, e.g. "
        f"{format_keys(list(tree)[:4])}). Fix the pattern, or pass allow_empty=True."
    )


@_eager
def select(tree: Mapping[str, torch.Tensor], pattern: Pattern, /, *, allow_empty: bool = False) -> ParamTree:
    """The sub-tree of keys that match ``pattern`` (glob, regex, list or predicate).

    Returns a new tree sharing the selected tensors; the input is not mutated.
    A pattern that matches nothing is an error unless ``allow_empty=True``; a
    plain key named in a list pattern that is not in the tree is always an error.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"a.w": torch.zeros(1), "b.w": torch.zeros(1)})
    >>> list(fvt.select(t, "a.*"))
    ['a.w']
    """
    tree = _as_tree(tree)
    m = matcher(pattern)
    _missing_names(pattern, tree)
    out = {k: v for k, v in tree.items() if m(k, v)}
    if not out and not allow_empty:
        raise _no_match(pattern, tree)
    return ParamTree._wrap(out)


@_eager
def drop(tree: Mapping[str, torch.Tensor], pattern: Pattern, /, *, allow_empty: bool = False) -> ParamTree:
    """The tree without the keys that match ``pattern``.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"a.w": torch.zeros(1), "b.w": torch.zeros(1)})
    >>> list(fvt.drop(t, "a.*"))
    ['b.w']
    """
    tree = _as_tree(tree)
    m = matcher(pattern)
    out = {k: v for k, v in tree.items() if not m(k, v)}
    if len(out) == len(tree) and not allow_empty:
        raise _no_match(pattern, tree)
    return ParamTree._wrap(out)


@_eager
def partition(tree: Mapping[str, torch.Tensor], pattern: Pattern, /) -> tuple[ParamTree, ParamTree]:
    """Split into ``(matching, rest)``; ``combine(*partition(t, p)) == t``.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"a": torch.zeros(1), "b": torch.ones(1)})
    >>> yes, no = fvt.partition(t, "a")
    >>> list(yes), list(no), fvt.combine(yes, no) == t
    (['a'], ['b'], True)
    """
    tree = _as_tree(tree)
    m = matcher(pattern)
    yes: dict[str, torch.Tensor] = {}
    no: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        (yes if m(k, v) else no)[k] = v
    return ParamTree._wrap(yes), ParamTree._wrap(no)


def combine(*trees: Mapping[str, torch.Tensor]) -> ParamTree:
    """The union of disjoint trees, in argument order. A key in two trees is an error.

    >>> import torch, fvtransform as fvt
    >>> a = fvt.ParamTree({"x": torch.zeros(1)})
    >>> fvt.combine(a, a)
    Traceback (most recent call last):
    ...
    fvtransform.errors.KeyMismatchError: combine: key 'x' is in tree 0 and tree 1; combine takes disjoint trees. Use fvt.update(a, b) to replace values.
    """
    for t in trees:
        if not isinstance(t, Mapping):
            raise UsageError(
                f"fvt.combine(*trees) joins trees; found {type(t).__name__} {show_args((t,), {})}. "
                "Pass only trees: fvt.combine(a, b)"
            )
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, int] = {}
    for i, t in enumerate(trees):
        for k, v in t.items():
            if k in owner:
                raise KeyMismatchError(
                    f"combine: key {k!r} is in tree {owner[k]} and tree {i}; combine takes "
                    "disjoint trees. Use fvt.update(a, b) to replace values."
                )
            owner[k] = i
            out[k] = v
    return ParamTree._wrap(out)


combine.__fvt_eager__ = "combine"  # type: ignore[attr-defined]


@_eager
def rename(tree: Mapping[str, torch.Tensor], rules: KeyMapLike, /, *, strict: bool = True) -> ParamTree:
    """Rename (and fuse or split) keys by a :class:`~fvtransform.KeyMap`; order is kept.

    ``rules`` is anything :meth:`KeyMap.of <fvtransform.KeyMap.of>` takes: a
    KeyMap, a dict of names or templates, or ``(source, target)`` pairs. A
    dict or pairs keep the keys they do not name. With ``strict=True`` every
    rule not marked optional must match a key and every key must be claimed;
    ``strict=False`` allows both (use ``KeyMap.plan`` to see the leftovers).
    Two keys renamed to one name is always an error.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"blocks.0.q.weight": torch.zeros(1), "head.w": torch.zeros(1)})
    >>> list(fvt.rename(t, [("blocks.{i}.q.{p}", "layers.{i}.to_q.{p}")]))
    ['layers.0.to_q.weight', 'head.w']
    """
    tree = _as_tree(tree)
    return KeyMap.of(rules)(tree, strict=strict)


def _map_distinct(
    tree: ParamTree, fn: Callable[[str, torch.Tensor], torch.Tensor], only: Pattern | None
) -> ParamTree:
    m = matcher(only) if only is not None else None
    if m is not None and not any(m(k, v) for k, v in tree.items()):
        raise KeyMismatchError(
            f"only={only!r} matched no key of the tree ({len(tree)} keys, e.g. "
            f"{format_keys(list(tree)[:4])}). Fix the pattern, or leave out only= to change every tensor."
        )
    memo: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        if m is not None and not m(k, v):
            out[k] = v
            continue
        key = id(v)
        if key not in memo:
            memo[key] = fn(k, v)
        out[k] = memo[key]
    return ParamTree._wrap(out)


@_eager
def cast(tree: Mapping[str, torch.Tensor], dtype: DTypeLike, /, *, only: Pattern | None = None) -> ParamTree:
    """Cast floating-point tensors to ``dtype`` (integer and bool tensors are kept).

    ``dtype`` is a floating ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``).
    Tensors already of ``dtype`` are shared by identity; ``only=`` restricts the
    cast to matching keys (a pattern that matches no key is an error). Casts
    tensor by tensor.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"w": torch.zeros(2), "ids": torch.arange(2)})
    >>> {k: v.dtype for k, v in fvt.cast(t, torch.bfloat16).items()}
    {'w': torch.bfloat16, 'ids': torch.int64}
    """
    tree = _as_tree(tree)
    target = as_dtype(dtype)
    from fvtransform.tree._fp8 import refuse_scaled_cast

    refuse_scaled_cast(tree, target, only)  # scaled float8 weights need their scale: fvt.dequantize

    def one(_k: str, v: torch.Tensor) -> torch.Tensor:
        if not v.dtype.is_floating_point or v.dtype == target:
            return v
        return v.detach().to(target)

    return _map_distinct(tree, one, only)


@_eager
def to(
    tree: Mapping[str, torch.Tensor],
    device: torch.device | str,
    /,
    *,
    only: Pattern | None = None,
    non_blocking: bool = False,
) -> ParamTree:
    """Move tensors to ``device``; tensors already there are shared by identity.

    ``only=`` restricts the move to matching keys (a pattern that matches no key
    is an error). A dtype is not a device: change dtypes with :func:`fvtransform.cast`.

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"w": torch.zeros(2)})
    >>> fvt.to(t, "cpu")["w"] is t["w"]
    True
    """
    tree = _as_tree(tree)
    if isinstance(device, torch.dtype) or (isinstance(device, str) and device.removeprefix("torch.") in DTYPES):
        raise UsageError(
            f"fvt.to(tree, device) moves tensors to a device; {device!r} is a dtype. "
            f"Change dtypes with fvt.cast(tree, {device!r})"
        )
    dev = torch.device(device)

    def one(_k: str, v: torch.Tensor) -> torch.Tensor:
        if v.device == dev or (dev.index is None and v.device.type == dev.type):
            return v
        return v.detach().to(dev, non_blocking=non_blocking)

    return _map_distinct(tree, one, only)


@_eager
def map_tensors(
    tree: Mapping[str, torch.Tensor],
    fn: Callable[..., torch.Tensor],
    /,
    *,
    only: Pattern | None = None,
    with_keys: bool = False,
) -> ParamTree:
    """Apply ``fn(tensor)`` (or ``fn(key, tensor)`` with ``with_keys=True``) to each tensor.

    Tied tensors are mapped once and stay tied. ``fn`` must not mutate its input.
    ``only=`` restricts it to matching keys (a pattern that matches no key is an error).

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"w": torch.ones(2)})
    >>> fvt.map_tensors(t, lambda x: x * 2)["w"]
    tensor([2., 2.])
    """
    tree = _as_tree(tree)
    if with_keys:
        return _map_distinct(tree, fn, only)
    return _map_distinct(tree, lambda _k, v: fn(v), only)


@_eager
def update(
    tree: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    /,
    *,
    allow_new: bool = False,
) -> ParamTree:
    """``tree`` with the values of ``other``; key order of ``tree`` is kept.

    Keys of ``other`` that ``tree`` lacks are an error unless ``allow_new=True``
    (then they are appended in ``other``'s order).

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"a": torch.zeros(1), "b": torch.zeros(1)})
    >>> fvt.update(t, {"b": torch.ones(1)})["b"]
    tensor([1.])
    """
    tree = _as_tree(tree)
    extra = [k for k in other if k not in tree]
    if extra and not allow_new:
        raise KeyMismatchError(
            f"update: keys not in the tree: {format_keys(extra)}. "
            "Pass allow_new=True to add them, or use fvt.combine for disjoint trees."
        )
    out = dict(tree.items())
    for k, v in other.items():
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"update: value for {k!r} is {type(v).__name__}, expected torch.Tensor")
        out[k] = v
    return ParamTree._wrap(out)
