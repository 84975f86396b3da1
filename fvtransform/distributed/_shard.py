"""shard / unshard: trees of full tensors <-> trees of DTensors, with DTensor's own chunking.

Every rank slices its own part of each tensor (a view where the layout
allows, so a memory-mapped tree is read only where a rank's slice lies) and
wraps it with ``DTensor.from_local`` and the global shape and stride: no
communication. Tied keys stay tied (one DTensor under several keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from fvtransform._dtypes import DTypeLike, as_dtype
from fvtransform.distributed._plan import Placements, PlanLike, get_plan, local_ranges
from fvtransform.errors import PlanError, UsageError
from fvtransform.tree._keymap import MappingPlan
from fvtransform.io._safetensors import _strides
from fvtransform.tree._paramtree import ParamTree

__all__ = ["shard", "shard_mapped", "unshard", "local_slice"]


def local_slice(t: torch.Tensor, mesh_shape: tuple[int, ...], placements: Placements, coordinate: tuple[int, ...]) -> torch.Tensor:
    """This coordinate's part of ``t`` under ``placements``: a view (``narrow``), never a copy."""
    out = t
    for dim, (start, stop) in enumerate(local_ranges(t.shape, mesh_shape, placements, coordinate)):
        if (start, stop) != (0, t.shape[dim]):
            out = out.narrow(dim, start, stop - start)
    return out


def _coordinate(mesh: DeviceMesh) -> tuple[int, ...]:
    c = mesh.get_coordinate()
    if c is None:
        raise UsageError(f"this rank ({torch.distributed.get_rank()}) is not part of the mesh {mesh}; shard on the ranks of the mesh")
    return tuple(c)


def _check_mesh(mesh: Any) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise UsageError(f"mesh must be a torch.distributed DeviceMesh (init_device_mesh('cpu', (n,))); found {type(mesh).__name__}")


def _wrap(local: torch.Tensor, mesh: DeviceMesh, placements: Any, shape: tuple[int, ...], dtype: torch.dtype | None) -> DTensor:
    """A rank's local part (cast to ``dtype`` if floating, made contiguous) as a DTensor of global ``shape``."""
    if dtype is not None and local.dtype.is_floating_point and local.dtype != dtype:
        local = local.to(dtype)  # only this rank's part is read
    if not local.is_contiguous():
        local = local.contiguous()  # column slices: only this rank's part is copied
    return DTensor.from_local(local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_strides(shape))


def shard(tree: Mapping[str, torch.Tensor], mesh: DeviceMesh, plan: PlanLike = None, *, dtype: DTypeLike | None = None) -> ParamTree:
    """A new tree of DTensors: each rank keeps its own slice of every tensor, as ``plan`` places it.

    ``plan=None`` (or ``"fsdp"``) shards dim 0 (replicate x shard on a 2-D
    mesh); ``"tp"`` is the tensor-parallel plan; or a :class:`ShardPlan`. The
    plan is resolved and checked before anything is sliced. Every rank must
    pass the same full tree (a loaded checkpoint or the same seeded init):
    nothing is communicated. ``dtype`` casts floating slices (only the local
    part is read; a ``torch.dtype`` or its name). The input is not mutated.

    Raises:
        PlanError: the plan does not fit the tree or the mesh.
        UsageError: ``mesh`` is not a DeviceMesh, this rank is not in it, ``plan`` is not a plan, a tensor is
            already a DTensor.
    """
    _check_mesh(mesh)
    resolved = get_plan(plan, mesh.ndim).resolve(tree, mesh_shape=tuple(mesh.shape))
    return _shard_resolved(tree, mesh, resolved, None if dtype is None else as_dtype(dtype))


def _shard_resolved(tree: Mapping[str, torch.Tensor], mesh: DeviceMesh, resolved: Mapping[str, Placements],
                    dtype: torch.dtype | None) -> ParamTree:
    mesh_shape, coord = tuple(mesh.shape), _coordinate(mesh)
    memo: dict[int, DTensor] = {}
    first_key: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tree.items():
        if id(t) in memo:
            if tuple(memo[id(t)].placements) != tuple(resolved[key]):
                raise PlanError(
                    f"tied keys {first_key[id(t)]!r} and {key!r} share one tensor but the plan places them differently "
                    f"({tuple(memo[id(t)].placements)} vs {tuple(resolved[key])}); give tied keys the same rule"
                )
            out[key] = memo[id(t)]
            continue
        first_key[id(t)] = key
        if isinstance(t, DTensor):
            raise UsageError(f"{key!r} is already a DTensor {t.placements}; unshard it first or redistribute it")
        placements = resolved[key]
        memo[id(t)] = out[key] = _wrap(local_slice(t.detach(), mesh_shape, placements, coord), mesh, placements, tuple(t.shape), dtype)
    return ParamTree._wrap(out)


def shard_mapped(tree: Mapping[str, torch.Tensor], mapping: MappingPlan, mesh: DeviceMesh, plan: PlanLike = None, *,
                 dtype: torch.dtype | None = None) -> ParamTree:
    """``shard(mapping.apply(tree), mesh, plan)`` without materialising fused tensors.

    ``mapping`` is a :class:`~fvtransform.MappingPlan`. A fused target
    (q, k, v -> qkv) that the plan shards along the fuse dimension becomes,
    on each rank, the concatenation of that rank's slices of every piece, as
    a column-parallel fused layer expects; the DTensor says so with
    ``_StridedShard(dim, split_factor=pieces)`` (pieces of equal size only).
    Other fused targets are built from each piece's local slice too.
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    _check_mesh(mesh)
    fused = {s.targets[0]: s for s in mapping.steps if s.kind == "fuse"}
    plain = MappingPlan(tuple(s for s in mapping.steps if s.kind != "fuse")).apply(tree)  # renames, split views
    shapes: dict[str, Any] = dict(plain)
    for key, step in fused.items():
        pieces = [tree[k] for k in step.sources]
        shape = list(pieces[0].shape)
        shape[step.dim] = sum(p.shape[step.dim] for p in pieces)
        shapes[key] = torch.empty(shape, dtype=pieces[0].dtype, device="meta")
    mesh_shape = tuple(mesh.shape)
    shapes = {k: shapes[k] for k in mapping.target_keys()}  # the mapping's order
    resolved = get_plan(plan, mesh.ndim).resolve(shapes, mesh_shape=mesh_shape)
    rest = _shard_resolved(plain, mesh, resolved, dtype)
    coord = _coordinate(mesh)
    out: dict[str, torch.Tensor] = {}
    for key in shapes:
        if key not in fused:
            out[key] = rest[key]
            continue
        step, placements = fused[key], resolved[key]
        along = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == step.dim]
        pieces = [tree[k].detach() for k in step.sources]
        if len(along) > 1:
            raise PlanError(f"{key!r}: a fused target may be sharded along its fuse dim {step.dim} on one mesh dim only")
        if along and len({p.shape[step.dim] for p in pieces}) != 1:
            raise PlanError(
                f"{key!r}: pieces {list(step.sources)} differ in size along dim {step.dim} "
                f"({[p.shape[step.dim] for p in pieces]}); a DTensor cannot describe their per-rank concatenation. "
                "Shard the unfused keys, or fuse after sharding in the model"
            )
        local = torch.cat([local_slice(p, mesh_shape, placements, coord) for p in pieces], dim=step.dim)
        final = tuple(_StridedShard(step.dim, split_factor=len(pieces)) if i in along else p for i, p in enumerate(placements))
        out[key] = _wrap(local, mesh, final, tuple(shapes[key].shape), dtype)
    return ParamTree._wrap(out)


def unshard(tree: Mapping[str, torch.Tensor], *, dst: int | None = None) -> ParamTree:
    """Full tensors again: on every rank (``dst=None``), or on rank ``dst`` only (the others get an empty tree).

    Collective: every rank of the mesh must call it. Plain tensors pass
    through. Tied keys stay tied. The input is not mutated.
    """
    memo: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tree.items():
        if id(t) not in memo:
            memo[id(t)] = t.full_tensor() if isinstance(t, DTensor) else t
        out[key] = memo[id(t)]
    if dst is not None and torch.distributed.get_rank() != dst:
        return ParamTree._wrap({})
    return ParamTree._wrap(out)


shard.__fvt_eager__ = "shard"  # type: ignore[attr-defined]
unshard.__fvt_eager__ = "unshard"  # type: ignore[attr-defined]
