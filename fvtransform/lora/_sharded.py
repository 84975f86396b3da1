"""Merging into sharded weights (DTensors): the small factors are sliced to each rank's part.

A rank holding rows ``r0:r1`` (or, for a fused q/k/v weight sharded per
segment, its rows of every segment) and columns ``c0:c1`` of ``W`` needs columns
``c0:c1`` of ``B[r0:r1] @ A``: the base weights are never gathered, and the
result is the same DTensor layout with each rank's slice merged (float32, one
rounding), bit for bit what an unsharded merge gives for those elements. For
a column shard the product is made full width and sliced (a BLAS product's
bits can depend on its width); that costs the product's compute once per
column shard, for the small tile-sized product only.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

from fvtransform.errors import UsageError
from fvtransform.lora._adapter import FullDelta, LowRank

__all__ = ["merge_sharded"]


def _slice_delta(d: Any, rows: Any, cols: tuple[int, int] | None) -> Any:
    """``rows`` is a ``(start, stop)`` range or a tensor of row indices (segments of a fused weight)."""
    take = (lambda t: t[rows[0] : rows[1]]) if isinstance(rows, tuple) else (lambda t: t.index_select(0, rows))
    if isinstance(d, LowRank):  # A stays full width: delta_rows sums full width and slices (same bits as unsharded)
        return LowRank(d.A, take(d.B), d.scale, d.alpha, d.magnitude)
    D = take(d.D)
    return FullDelta(D if cols is None else D[:, cols[0] : cols[1]])


def _strided_rows(weight: Any, placements: tuple, mesh: Any) -> torch.Tensor | None:
    """Row indices a rank holds of a fused weight sharded per segment (``_StridedShard(0, split_factor=n)``)."""
    from fvtransform.distributed._plan import chunk_range

    strided = [(i, p) for i, p in enumerate(placements) if type(p).__name__ == "_StridedShard"]
    if not strided:
        return None
    if len(strided) > 1 or strided[0][1].dim != 0 or len(placements) != 1:
        raise UsageError(f"merging into a weight placed as {placements}: per-segment sharding is supported on dim 0 of a 1-D mesh")
    n = strided[0][1].split_factor
    seg = weight.shape[0] // n
    a, b = chunk_range(seg, mesh.shape[0], mesh.get_coordinate()[0])
    return torch.cat([torch.arange(j * seg + a, j * seg + b) for j in range(n)])


def merge_sharded(contribs: list[Any], weight: Any, *, sign: float, donate: bool, work: Any) -> Any:
    """``round(W + sign * sum deltas)`` for a DTensor ``weight``, computed on each rank's local slice."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from fvtransform.distributed._plan import local_ranges
    from fvtransform.lora._merge import _is_dora, delta_rows

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    for p in placements:
        if not isinstance(p, (Shard, Replicate)) and type(p).__name__ != "_StridedShard":
            raise UsageError(f"cannot merge into a weight placed as {p}; redistribute it to Shard/Replicate first")
    if any(isinstance(p, Shard) and p.dim > 1 for p in placements) or (
        weight.dim() > 2 and any(isinstance(p, Shard) and p.dim == 1 for p in placements)
    ):
        raise UsageError(f"merging into {list(weight.shape)} placed as {placements}: only dim 0, or dim 1 of a 2-D weight, may be sharded")
    if _is_dora(contribs):
        raise UsageError("DoRA needs the norms of whole rows; merge DoRA adapters before sharding")
    strided = _strided_rows(weight, placements, mesh)
    ranges = local_ranges(weight.shape, tuple(mesh.shape), placements, tuple(mesh.get_coordinate()))
    rows: Any = ranges[0] if strided is None else strided
    cols = ranges[1] if weight.dim() == 2 and ranges[1] != (0, weight.shape[1]) else None
    local_contribs = [attrs.evolve(c, delta=_slice_delta(c.delta, rows, cols)) for c in contribs]
    local = weight.to_local()
    writable = donate and local.is_contiguous() and not local.requires_grad
    new_local = delta_rows(local_contribs, local, sign=sign, out=local.detach() if writable else None, work=work, columns=cols)
    return DTensor.from_local(new_local, mesh, placements, run_check=False, shape=weight.shape, stride=weight.stride())
