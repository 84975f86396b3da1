"""Merging into sharded weights (DTensors): the small factors are sliced to each rank's part.

A rank holding rows ``r0:r1`` and columns ``c0:c1`` of ``W`` needs columns
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

from fvtransform.errors import PlanError
from fvtransform.lora._adapter import FullDelta, LowRank

__all__ = ["merge_sharded"]


def _slice_delta(d: Any, rows: tuple[int, int], cols: tuple[int, int] | None) -> Any:
    r0, r1 = rows
    if isinstance(d, LowRank):  # A stays full width: delta_rows slices the product (same bits as unsharded)
        return LowRank(d.A, d.B[r0:r1], d.scale, d.alpha, d.magnitude)
    D = d.D[r0:r1] if cols is None else d.D[r0:r1, cols[0] : cols[1]]
    return FullDelta(D)


def merge_sharded(contribs: list[Any], weight: Any, *, sign: float, donate: bool, work: Any) -> Any:
    """``round(W + sign * sum deltas)`` for a DTensor ``weight``, computed on each rank's local slice."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    from fvtransform.distributed._plan import local_ranges
    from fvtransform.lora._merge import delta_rows

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    for p in placements:
        if not isinstance(p, (Shard, Replicate)):
            raise PlanError(f"cannot merge into a weight placed as {p}; redistribute it to Shard/Replicate first")
    if any(isinstance(p, Shard) and p.dim > 1 for p in placements) or (
        weight.dim() > 2 and any(isinstance(p, Shard) and p.dim == 1 for p in placements)
    ):
        raise PlanError(f"merging into {list(weight.shape)} placed as {placements}: only dim 0, or dim 1 of a 2-D weight, may be sharded")
    if any(isinstance(c.delta, LowRank) and c.delta.magnitude is not None for c in contribs):
        raise PlanError("DoRA needs the norms of whole rows; merge DoRA adapters before sharding")
    ranges = local_ranges(weight.shape, tuple(mesh.shape), placements, tuple(mesh.get_coordinate()))
    rows = ranges[0]
    cols = ranges[1] if weight.dim() == 2 and ranges[1] != (0, weight.shape[1]) else None
    local_contribs = [attrs.evolve(c, delta=_slice_delta(c.delta, rows, cols)) for c in contribs]
    local = weight.to_local()
    writable = donate and local.is_contiguous() and not local.requires_grad
    new_local = delta_rows(local_contribs, local, sign=sign, out=local.detach() if writable else None, work=work, columns=cols)
    return DTensor.from_local(new_local, mesh, placements, run_check=False, shape=weight.shape, stride=weight.stride())
