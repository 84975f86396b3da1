"""Shard plans: plain values that give every key its placements on each mesh dimension.

A plan is an ordered list of rules ``(pattern, placements)``; the first rule
whose pattern matches a key wins. Resolving a plan against a tree's shapes and
a mesh shape checks it (every rule used, every placement on a dim the tensor
has, one placement per mesh dim) and needs no process group, so a plan can be
printed, tested and its per-rank bytes predicted anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import itertools
import math
from typing import Any, Union

import attrs
import torch
from torch.distributed.tensor import Replicate, Shard

from fvtransform._messages import format_keys
from fvtransform.errors import PlanError, UsageError
from fvtransform.tree._match import Pattern, matcher

__all__ = ["ShardPlan", "ResolvedPlan", "fsdp_plan", "tp_plan", "get_plan", "chunk_range", "local_ranges", "Placements", "PlanLike"]

Placements = tuple[Union[Shard, Replicate], ...]


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` when ``size`` is split as ``torch.chunk`` splits it.

    DTensor shards this way: chunks of ``ceil(size / parts)``; the last ones
    can be smaller or empty.

    >>> [chunk_range(5, 4, i)[0] for i in range(4)], chunk_range(5, 4, 3)
    ([0, 2, 4, 5], (5, 5))
    """
    step = math.ceil(size / parts) if parts else 0
    start = min(size, step * index)
    return start, min(size, start + step)


def local_ranges(shape: Sequence[int], mesh_shape: Sequence[int], placements: Placements, coordinate: Sequence[int]) -> list[tuple[int, int]]:
    """Per tensor dim, the ``[start, stop)`` a mesh coordinate holds (mesh dims applied left to right)."""
    ranges = [(0, int(s)) for s in shape]
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):
            start, stop = ranges[p.dim]
            a, b = chunk_range(stop - start, mesh_shape[mesh_dim], coordinate[mesh_dim])
            ranges[p.dim] = (start + a, start + b)
    return ranges


def _pattern(p: Any) -> str:
    if callable(p) and not isinstance(p, str):
        return f"<{getattr(p, '__name__', 'predicate')}>"
    return str(p)


def _show(p: Shard | Replicate) -> str:
    return f"Shard({p.dim})" if isinstance(p, Shard) else "Replicate()"


def _indices(indices: Iterable[int]) -> frozenset[int]:
    return frozenset(indices)


class ResolvedPlan(dict[str, Placements]):
    """A resolved :class:`ShardPlan`: placements per key, and ``unused_rules``, the required rules that matched no key.

    ``unused_rules`` is empty after a strict :meth:`ShardPlan.resolve` (an unused rule raises there).
    """

    unused_rules: tuple[str, ...]

    def __init__(self, placements: Mapping[str, Placements], unused_rules: Sequence[str] = ()) -> None:
        super().__init__(placements)
        self.unused_rules = tuple(unused_rules)


@attrs.frozen
class ShardPlan:
    """Ordered rules ``(pattern, placements)``; the first match wins; ``default`` for keys no rule matches.

    ``placements`` has one entry per mesh dimension. ``default=None`` makes an
    unmatched key an error. ``optional`` holds the indices of rules that may
    match no key (the built-in plans mark every rule optional, as a
    :class:`~fvtransform.KeyMap` marks rules ``optional=True``).

    >>> from torch.distributed.tensor import Shard, Replicate
    >>> plan = ShardPlan((("*.weight", (Shard(0),)),), default=(Replicate(),))
    >>> plan.resolve({"a.weight": torch.empty(4, 2), "a.bias": torch.empty(4)}, mesh_shape=(2,))
    {'a.weight': (Shard(dim=0),), 'a.bias': (Replicate(),)}
    """

    rules: tuple[tuple[Pattern, Placements], ...]
    default: Placements | None = None
    name: str = "custom"
    optional: frozenset[int] = attrs.field(default=frozenset(), converter=_indices)

    def __repr__(self) -> str:
        lines = [f"ShardPlan {self.name!r}:"]
        lines += [f"  {_pattern(pattern):<40} -> {', '.join(_show(p) for p in pl)}{' (optional)' if i in self.optional else ''}"
                  for i, (pattern, pl) in enumerate(self.rules)]
        lines.append(f"  {'(default)':<40} -> {', '.join(_show(p) for p in self.default) if self.default else 'error'}")
        return "\n".join(lines)

    def resolve(self, tree: Mapping[str, torch.Tensor], *, mesh_shape: Sequence[int], strict: bool = True) -> ResolvedPlan:
        """Placements per key, checked against the tensors' ranks and the mesh; no process group needed.

        ``tree`` maps keys to tensors (or anything with ``.shape``). ``strict``
        (the default): every rule not marked optional must match a key;
        ``strict=False`` allows unused rules and lists them in the result's
        ``unused_rules``.

        Raises:
            PlanError: with ``strict``, a required rule that matches no key; placements
                whose count differs from the mesh's dims, a ``Shard(d)`` on a
                tensor with fewer than ``d + 1`` dims, or a key no rule matches
                and no default.
        """
        ndim = len(mesh_shape)
        preds = [matcher(p) for p, _ in self.rules]
        for pattern, pl in self.rules:
            if len(pl) != ndim:
                raise PlanError(f"plan {self.name!r}: rule {pattern!r} has {len(pl)} placements, the mesh has {ndim} dims {tuple(mesh_shape)}")
        if self.default is not None and len(self.default) != ndim:
            raise PlanError(f"plan {self.name!r}: the default has {len(self.default)} placements, the mesh has {ndim} dims {tuple(mesh_shape)}")
        used = [False] * len(self.rules)
        out: dict[str, Placements] = {}
        unmatched, bad = [], []
        for key, t in tree.items():
            for i, pred in enumerate(preds):
                if pred(key, t):
                    used[i] = True
                    pl = self.rules[i][1]
                    break
            else:
                if self.default is None:
                    unmatched.append(key)
                    continue
                pl = self.default
            dims = len(t.shape)
            for p in pl:
                if isinstance(p, Shard) and not (0 <= p.dim < dims):
                    bad.append(f"{key} {list(t.shape)}: Shard({p.dim})")
            out[key] = pl
        if unmatched:
            raise PlanError(f"plan {self.name!r}: no rule matches {format_keys(unmatched)} and the plan has no default; add a rule or a default")
        if bad:
            raise PlanError(
                f"plan {self.name!r}: placements on a dim the tensor lacks: {format_keys(bad)}; "
                "give those tensors a rule of their own (Replicate(), or Shard of a dim they have)"
            )
        unused = [_pattern(self.rules[i][0]) for i, u in enumerate(used) if not u and i not in self.optional]
        if strict and unused:
            raise PlanError(
                f"plan {self.name!r}: rules that match no key: {unused}; remove them or fix their patterns, "
                "or pass strict=False to list them in the result's unused_rules"
            )
        return ResolvedPlan(out, unused)

    def bytes_per_rank(self, tree: Mapping[str, torch.Tensor], *, mesh_shape: Sequence[int]) -> list[int]:
        """Predicted local bytes of each rank (row-major rank order), from shapes alone; ties counted once."""
        resolved = self.resolve(tree, mesh_shape=mesh_shape, strict=False)
        seen: set[int] = set()
        totals = [0] * math.prod(mesh_shape)
        coords = list(itertools.product(*[range(s) for s in mesh_shape]))
        for key, t in tree.items():
            if id(t) in seen:
                continue
            seen.add(id(t))
            item = t.element_size()
            for r, c in enumerate(coords):
                ranges = local_ranges(t.shape, mesh_shape, resolved[key], c)
                totals[r] += math.prod(b - a for a, b in ranges) * item
        return totals


def fsdp_plan(mesh_ndim: int = 1) -> ShardPlan:
    """Dim 0 of every tensor sharded (0-d tensors replicated); on a 2-D mesh, replicate x shard (HSDP)."""
    shard = (Shard(0),) if mesh_ndim == 1 else (Replicate(),) * (mesh_ndim - 1) + (Shard(0),)
    rep = (Replicate(),) * mesh_ndim
    return ShardPlan(((_scalar, rep), ("*", shard)), name="fsdp", optional={0, 1})


def _scalar(_key: str, t: Any) -> bool:
    """0-d tensors (they have no dim to shard)."""
    return len(t.shape) == 0



#: Column-wise (output features split) and row-wise (input features split) linears of the reference model
#: and of diffusers' Wan transformer (the same names).
_COLWISE = ["blocks.*.attn*.to_q", "blocks.*.attn*.to_k", "blocks.*.attn*.to_v", "blocks.*.ffn.net.0.proj"]
_ROWWISE = ["blocks.*.attn*.to_out.0", "blocks.*.ffn.net.2"]


def tp_plan(mesh_ndim: int = 1) -> ShardPlan:
    """Tensor parallelism for the reference model and diffusers' Wan transformer (last mesh dim).

    Column-wise q, k, v and the first feed-forward projection (weight and bias
    ``Shard(0)``); row-wise attention output and second projection (weight
    ``Shard(1)``, bias replicated); everything else replicated. The q/k RMS
    norms span all heads, so they stay replicated.
    """
    lead = (Replicate(),) * (mesh_ndim - 1)
    rules: list[tuple[list[str], Placements]] = []
    rules += [([f"{m}.weight" for m in _COLWISE] + [f"{m}.bias" for m in _COLWISE], lead + (Shard(0),))]
    rules += [([f"{m}.weight" for m in _ROWWISE], lead + (Shard(1),))]
    return ShardPlan(tuple((tuple(p), pl) for p, pl in rules), default=(Replicate(),) * mesh_ndim, name="tp", optional=range(len(rules)))


PlanLike = Union[ShardPlan, str, None]


def get_plan(plan: PlanLike, mesh_ndim: int) -> ShardPlan:
    """``None`` or ``"fsdp"`` -> :func:`fsdp_plan`; ``"tp"`` -> :func:`tp_plan`; a ShardPlan as is."""
    if plan is None or plan == "fsdp":
        return fsdp_plan(mesh_ndim)
    if plan == "tp":
        return tp_plan(mesh_ndim)
    if isinstance(plan, ShardPlan):
        return plan
    raise UsageError(f"plan must be a ShardPlan, 'fsdp', 'tp' or None; found {plan!r}")
