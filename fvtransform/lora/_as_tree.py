"""Adapters as trees: ``fvt.select``, ``fvt.drop``, ``fvt.rename`` and ``fvt.map_tensors`` take a LoraAdapter.

The tree operations dispatch here for a :class:`LoraAdapter` (registered when
:mod:`fvtransform.lora` is imported), and return an adapter: one spelling for
trees and adapters. Keys are the adapter's target keys (the base tree's
weight keys). :func:`from_factors` turns :func:`fvtransform.lora.factors`'
plain tensors, e.g. after training them, back into an adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
import sys
from typing import Any, cast

import attrs
import torch

from fvtransform.errors import KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import Delta, LoraAdapter, LowRank
from fvtransform.lora._functorch import concrete
from fvtransform.tree import _ops
from fvtransform.tree._keymap import Fuse, KeyMap, KeyMapLike, Split
from fvtransform.tree._match import Pattern, matcher

__all__ = ["select", "drop", "rename", "map_tensors", "from_factors"]


def _no_match(pattern: object, adapter: LoraAdapter, what: str) -> KeyMismatchError:
    return KeyMismatchError(
        f"{what}={pattern!r} matched no target of the adapter ({len(adapter)} targets, e.g. "
        f"{_ops.format_keys(list(adapter)[:4])}). Fix the pattern (it matches the base tree's weight keys)"
        + (", or pass allow_empty=True." if what == "pattern" else ", or leave out only= to map every target.")
    )


def select(adapter: LoraAdapter, pattern: Pattern, *, allow_empty: bool = False) -> LoraAdapter:
    """The adapter of the targets that match ``pattern`` (a predicate gets ``(key, delta)``)."""
    m = matcher(pattern)
    _ops._missing_names(pattern, cast(Any, adapter))
    out = {k: d for k, d in adapter.items() if m(k, cast(Any, d))}
    if not out and not allow_empty:
        raise _no_match(pattern, adapter, "pattern")
    return adapter.replace(out)


def drop(adapter: LoraAdapter, pattern: Pattern, *, allow_empty: bool = False) -> LoraAdapter:
    """The adapter without the targets that match ``pattern``."""
    m = matcher(pattern)
    out = {k: d for k, d in adapter.items() if not m(k, cast(Any, d))}
    if len(out) == len(adapter) and not allow_empty:
        raise _no_match(pattern, adapter, "pattern")
    return adapter.replace(out)


def rename(adapter: LoraAdapter, rules: KeyMapLike, *, strict: bool = True) -> LoraAdapter:
    """The adapter with its target keys renamed by ``rules`` (as :func:`fvtransform.rename`; renames only)."""
    key_map = KeyMap.of(rules)
    joined = [r for r in key_map.rules if isinstance(r, (Fuse, Split))]
    if joined:
        raise UsageError(
            f"fvt.rename(adapter, rules): {joined[0]!r} fuses or splits keys; an adapter's deltas are renamed, "
            "not fused or split. Merge the adapter into the tree first (fvt.lora.merge), then fuse the tree's keys"
        )
    plan = key_map.plan({k: (1,) for k in adapter}, strict=strict)
    return adapter.replace({s.targets[0]: adapter[s.sources[0]] for s in plan.steps})


def _fields(d: Delta) -> list[str]:
    """The names of a delta's tensor fields, in declaration order (A, B, magnitude; D; LoHa/LoKr factors)."""
    return [f.name for f in attrs.fields(type(d)) if isinstance(getattr(d, f.name), torch.Tensor)]


def map_tensors(adapter: LoraAdapter, fn: Callable[..., torch.Tensor], *others: object,
                only: Pattern | None = None, with_keys: bool = False) -> LoraAdapter:
    """``fn`` over every factor tensor of the adapter (and of ``others``, adapters of the same targets and kinds).

    Scales, alphas, format and metadata are the first adapter's; the result is
    validated as any adapter (shapes, finite values).
    """
    adapters = [adapter]
    for i, other in enumerate(others, 1):
        if not isinstance(other, LoraAdapter):
            raise UsageError(
                f"fvt.map_tensors(adapter, fn, *others): argument {i} of others is {type(other).__name__}; with an "
                "adapter first, the others are adapters too (of the same targets). Call fvt.map_tensors(a, fn, b)"
            )
        missing, extra = [k for k in adapter if k not in other], [k for k in other if k not in adapter]
        if missing or extra:
            raise KeyMismatchError(
                f"map_tensors: adapter {i} lacks targets {_ops.format_keys(missing)} and has extra targets "
                f"{_ops.format_keys(extra)} against adapter 0; the adapters must have the same targets. "
                "Fix: fvt.select(adapter, list(other)) first"
            )
        adapters.append(other)
    m = matcher(only) if only is not None else None
    if only is not None and m is not None and not any(m(k, cast(Any, d)) for k, d in adapter.items()):
        raise _no_match(only, adapter, "only")
    memo: dict[tuple[int, ...], torch.Tensor] = {}
    out: dict[str, Delta] = {}
    for key, d in adapter.items():
        if m is not None and not m(key, cast(Any, d)):
            out[key] = d
            continue
        deltas = [a[key] for a in adapters]
        fields = _fields(d)
        for i, e in enumerate(deltas[1:], 1):
            if type(e) is not type(d) or _fields(e) != fields:
                raise ShapeMismatchError(
                    f"map_tensors: target {key!r} is {d!r} in adapter 0 and {e!r} in adapter {i}; the adapters must "
                    f"hold deltas of one kind and factors ({fields}) on each target"
                )
        new: dict[str, torch.Tensor] = {}
        for f in fields:
            values = [getattr(e, f) for e in deltas]
            ids = tuple(id(v) for v in values)
            if ids not in memo:
                memo[ids] = fn(key, *values) if with_keys else fn(*values)
            new[f] = memo[ids]
        out[key] = attrs.evolve(cast(Any, d), **new)  # every delta kind is an attrs class
    return adapter.replace(out)


def from_factors(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]], *,
                 format: str = "memory") -> LoraAdapter:
    """The adapter of :func:`fvtransform.lora.factors`' tensors ``{key: (A, B, scale)}``: its inverse.

    ``LowRank(A, B, float(scale))`` per key (the tensors are shared, not
    copied). Ranks stay as the factors have them (padded, if ``factors``
    padded them). Use it after training factors as plain tensors, e.g. with
    ``torch.func.grad``. ``factors(from_factors(f))`` gives ``f`` back.

    Args:
        factors: key -> ``(A [r, in...], B [out, r, 1...], scale)``; ``scale`` a number or a 0-d tensor.
        format: The adapter's ``format`` label.

    Returns:
        A :class:`LoraAdapter` (validated: shapes and finite values).

    Raises:
        UsageError: ``factors`` is not such a mapping.
        NumericError: A scale is not finite.
        ShapeMismatchError: A pair's ranks differ, or a factor is not floating point.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> a = fvt.lora.init_adapter(tree, targets="l.weight", rank=2, generator=torch.Generator().manual_seed(0))
    >>> b = fvt.lora.from_factors(fvt.lora.factors(a))
    >>> b["l.weight"].A is a["l.weight"].A, b["l.weight"].scale
    (True, 1.0)
    """
    if not isinstance(factors, Mapping) or isinstance(factors, LoraAdapter):
        raise UsageError(
            f"fvt.lora.from_factors(factors) takes the mapping key -> (A, B, scale) that fvt.lora.factors returns; "
            f"found {type(factors).__name__}. Call fvt.lora.from_factors(fvt.lora.factors(adapter))"
        )
    out: dict[str, Delta] = {}
    for key, item in factors.items():
        if not (isinstance(item, (tuple, list)) and len(item) == 3 and all(isinstance(t, torch.Tensor) for t in item[:2])):
            raise UsageError(
                f"fvt.lora.from_factors: factors[{key!r}] must be (A, B, scale) with A and B tensors; found "
                f"{_ops.show_args((item,), {})}"
            )
        A, B, s = item
        if isinstance(s, torch.Tensor):
            if s.numel() != 1:
                raise UsageError(f"fvt.lora.from_factors: the scale of {key!r} is a tensor of shape {list(s.shape)}; "
                                 "it must be one number (a 0-d tensor)")
            s = float(concrete(s.detach()))
        elif isinstance(s, bool) or not isinstance(s, (int, float)):
            raise UsageError(f"fvt.lora.from_factors: the scale of {key!r} is {type(s).__name__}; pass a number")
        if not math.isfinite(s):
            raise NumericError(f"fvt.lora.from_factors: the scale of {key!r} is {s}; a scale must be finite")
        out[key] = LowRank(A, B, float(s))
    return LoraAdapter(out, format=format)


_ops.register_kind(LoraAdapter, sys.modules[__name__])  # fvt.select(adapter, ...) runs select above
