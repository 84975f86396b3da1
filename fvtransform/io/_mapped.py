"""Write a tree through a :class:`~fvtransform.KeyMap` without building the mapped tree: fused only when written.

``fvt.save(tree, path, rename=key_map)`` plans every stage of the map on
shapes alone, writes the safetensors header from the planned shapes, then makes
each mapped tensor only when its bytes are written and drops it: a renamed key
is the tree's tensor, a split key a view of its source, a fused key one
``torch.cat`` made then. The peak is one fused tensor, not the mapped model
(the inverse of a HunyuanVideo or fused-qkv map fuses most of the weights).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import BinaryIO

import torch

from fvtransform.errors import ShapeMismatchError
from fvtransform.io._safetensors import TensorSpec, tensor_specs, write_safetensors
from fvtransform.tree._keymap import KeyMap, Step

__all__ = ["mapped_specs", "mapped_tree_bytes"]

Produce = Callable[[str], torch.Tensor]


def _stage(made_by: dict[str, tuple[Step, int]], prev: Produce) -> Produce:
    def produce(name: str) -> torch.Tensor:
        step, j = made_by[name]
        if step.kind == "rename":
            return prev(step.sources[0])
        if step.kind == "fuse":
            return torch.cat([prev(k) for k in step.sources], dim=step.dim)
        src = prev(step.sources[0])
        if src.shape[step.dim] != sum(step.sizes):
            raise ShapeMismatchError(
                f"split {step.sources[0]!r}: size {src.shape[step.dim]} along dim {step.dim}, but the plan's pieces "
                f"sum to {sum(step.sizes)} ({list(step.sizes)})"
            )
        return torch.split(src, list(step.sizes), dim=step.dim)[j]

    return produce


def mapped_specs(
    tree: Mapping[str, torch.Tensor], key_map: KeyMap, *, where: object, strict: bool = True
) -> tuple[dict[str, TensorSpec], Produce]:
    """The dtype and shape of every key of ``key_map(tree)``, and a function making one of its tensors on demand.

    Every stage is planned on shapes only (stages that compose into no one plan
    are fine); a fuse of pieces of different dtypes is refused, as the file
    would hold another dtype than its pieces.
    """
    specs = tensor_specs(tree, where)
    produce: Produce = tree.__getitem__
    for stage in key_map.stages:
        plan = KeyMap((stage,)).plan({k: s.shape for k, s in specs.items()}, strict=strict)
        made_by: dict[str, tuple[Step, int]] = {}
        new: dict[str, TensorSpec] = {}
        for step in plan.steps:
            dtypes = [specs[k].dtype for k in step.sources]
            if len(set(dtypes)) > 1:
                raise ShapeMismatchError(
                    f"{where}: cannot fuse {list(step.sources)} into {step.targets[0]!r}: the pieces have dtypes "
                    f"{[str(d) for d in dtypes]}. Fix: cast the tree to one dtype first (fvt.cast)."
                )
            for j, (target, shape) in enumerate(zip(step.targets, step.out_shapes([specs[k].shape for k in step.sources]))):
                new[target] = TensorSpec(dtypes[0], tuple(shape))
                made_by[target] = (step, j)
        specs, produce = new, _stage(made_by, produce)
    return specs, produce


def mapped_tree_bytes(
    tree: Mapping[str, torch.Tensor], key_map: KeyMap, metadata: Mapping[str, str], *, where: object,
    strict: bool = True,
) -> Callable[[BinaryIO], int]:
    """A writer of ``key_map(tree)`` as one safetensors file, each mapped tensor made when written."""
    specs, produce = mapped_specs(tree, key_map, where=where, strict=strict)
    return lambda f: write_safetensors(f, specs, produce, metadata, where=where)
