"""Combining adapters exactly (rank concatenation) and making test adapters."""

from __future__ import annotations

import math

from collections.abc import Mapping, Sequence

import attrs
import torch

from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import GENERATED, Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.tree._match import Pattern, matcher

__all__ = ["combine", "random_adapter", "scale_adapter"]


def combine(pairs: Sequence[tuple[LoraAdapter, float]]) -> LoraAdapter:
    """One adapter whose delta is ``sum_i w_i * delta_i``, exactly.

    Factors are concatenated along the rank: ``B = [w1 s1 B1, w2 s2 B2]``,
    ``A = [A1; A2]`` with scale 1, so ``merge(t, combine(pairs))`` equals
    merging the set (up to float32 rounding). Negative weights work. The rank
    of a target is the sum of the ranks; :func:`fvtransform.lora.compress`
    lowers it.

    >>> import torch
    >>> a = LoraAdapter({"w": LowRank(torch.ones(1, 2), torch.ones(3, 1), scale=2.0)})
    >>> c = combine([(a, 1.0), (a, -0.5)])
    >>> c["w"].rank, c["w"].scale
    (2, 1.0)
    """
    if not pairs:
        raise UsageError("combine needs at least one (adapter, weight) pair")
    out: dict[str, Delta] = {}
    for item in pairs:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], LoraAdapter)):
            raise UsageError(f"combine takes (LoraAdapter, weight) pairs; found {item!r}")
    for adapter, weight in pairs:
        w = float(weight)
        for key, d in adapter.items():
            prev = out.get(key)
            if isinstance(d, GENERATED):
                raise UsageError(f"{key!r}: LyCORIS {type(d).__name__} deltas do not combine by rank concatenation; merge them instead")
            if isinstance(d, LowRank):
                if d.magnitude is not None:
                    raise UsageError(f"{key!r}: DoRA adapters do not combine linearly (their magnitude rescales the weight)")
                A, B = d.A.float(), d.B.float() * (w * d.scale)
                if prev is None:
                    out[key] = LowRank(A, B, 1.0)
                elif isinstance(prev, LowRank):
                    if prev.A.shape[1:] != A.shape[1:]:
                        raise ShapeMismatchError(f"{key!r}: adapters have A shapes {list(prev.A.shape)} and {list(A.shape)}")
                    out[key] = LowRank(torch.cat([prev.A, A]), torch.cat([prev.B, B], dim=1), 1.0)
                else:
                    raise UsageError(f"{key!r}: cannot combine a full delta with a low-rank one; merge them instead")
            elif not isinstance(d, FullDelta) or d.replaces:
                what = "replacing FullDelta (modules_to_save)" if isinstance(d, FullDelta) else type(d).__name__
                raise UsageError(f"{key!r}: a {what} target does not combine linearly; merge it instead")
            else:
                D = d.D.float() * (w * d.scale)
                if prev is None:
                    out[key] = FullDelta(D, 1.0)
                elif isinstance(prev, FullDelta):
                    out[key] = FullDelta(prev.D + D, 1.0)
                else:
                    raise UsageError(f"{key!r}: cannot combine a full delta with a low-rank one; merge them instead")
    return LoraAdapter(out, format="combined", metadata={"combined_from": str(len(pairs))})


def scale_adapter(adapter: LoraAdapter, weight: float) -> LoraAdapter:
    """The same adapter with every scale multiplied by ``weight``."""
    if not isinstance(adapter, LoraAdapter) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise UsageError(
            f"fvt.lora.scale_adapter(adapter, weight) takes the adapter and a number; found "
            f"{type(adapter).__name__}, {type(weight).__name__}. Call fvt.lora.scale_adapter(adapter, 0.5)"
        )
    out: dict[str, Delta] = {}
    for k, d in adapter.items():
        if isinstance(d, FullDelta) and d.replaces:
            raise UsageError(f"{k!r}: a replacing FullDelta has no scale to change (modules_to_save are used whole)")
        out[k] = attrs.evolve(d, scale=d.scale * weight)
    return adapter.replace(out)


def random_adapter(
    tree: Mapping[str, torch.Tensor],
    *,
    targets: Pattern,
    rank: int,
    alpha: float | None = None,
    seed: int = 0,
    dtype: DTypeLike = torch.float32,
    scale_b: float = 0.01,
) -> LoraAdapter:
    """A seeded random adapter for the matching 2-D+ weights of ``tree`` (for demos and tests).

    >>> import torch, fvtransform as fvt
    >>> t = fvt.ParamTree({"l.weight": torch.zeros(4, 3), "l.bias": torch.zeros(4)})
    >>> random_adapter(t, targets="*.weight", rank=2).ranks
    {'l.weight': 2}
    """
    dtype = as_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    m = matcher(targets)
    out: dict[str, Delta] = {}
    for key, w in tree.items():
        if w.dim() < 2 or not m(key, w):
            continue
        a_shape = (rank, *w.shape[1:])
        b_shape = (w.shape[0], rank) + (1,) * (w.dim() - 2)
        A = (torch.randn(a_shape, generator=gen) / max(1, math.prod(w.shape[1:])) ** 0.5).to(dtype)  # fan-in; no row needed
        B = (torch.randn(b_shape, generator=gen) * scale_b).to(dtype)
        a = float(rank) if alpha is None else float(alpha)
        out[key] = LowRank(A, B, a / rank, a)
    if not out:
        raise KeyMismatchError(f"targets={targets!r} matched no weight of the tree with 2 or more dims")
    return LoraAdapter(out, format="memory")
