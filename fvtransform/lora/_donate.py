"""Donation (``merge(..., donate=True)``): the donated tensors are consumed, as in JAX.

The merged weights are written into the donated tensors' storage, so every
tree or module that holds them sees the change. What a merge can see is
refused here: a targeted tensor tied to other keys, or sharing its storage
with another key.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fvtransform.errors import UsageError
from fvtransform.tree._paramtree import ParamTree

__all__ = ["check_donatable"]


def _storage(t: torch.Tensor) -> int | None:
    """The address of the storage ``t`` views; None where there is none to share (meta, DTensor, a tensor subclass)."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) or t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr()


def check_donatable(base: ParamTree, per_key: Mapping[str, object]) -> None:
    """Refuse a donation that would visibly change tensors other keys hold: tied keys, or views of one storage."""
    tied = [g for g in base.aliases() if any(k in per_key for k in g)]
    if tied:
        raise UsageError(
            f"donate=True would write merged weights into tensors tied to other keys: {[list(g) for g in tied[:4]]}; "
            "donation consumes the donated tensors, and every key (and module) sharing them would change. "
            "Fix: merge without donate=True (a new tensor for each target), or untie the weights first"
        )
    owners: dict[int, list[str]] = {}
    for k, v in base.items():
        ptr = _storage(v)
        if ptr is not None and v.numel():
            owners.setdefault(ptr, []).append(k)
    shared = sorted({tuple(ks) for k in per_key if (p := _storage(base[k])) is not None and len(ks := owners.get(p, [])) > 1})
    if shared:
        raise UsageError(
            f"donate=True would write merged weights into storage that other keys view: {[list(g) for g in shared[:4]]}; "
            "donation consumes the donated tensors, and every view of their storage would change. "
            "Fix: merge without donate=True, or donate a tree whose targets own their storage (e.g. fvt.map_tensors(tree, torch.clone))"
        )
