"""The merge record: what ``restore`` needs to give back the pre-merge weights bit for bit."""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from fvtransform.lora._adapter import LoraAdapter

__all__ = ["MergeRecord"]


@attrs.frozen
class _Correction:
    """Bits to fix after an unmerge: sparse (indices, values) and/or dense int8 steps."""

    indices: torch.Tensor | None
    values: torch.Tensor | None
    dense: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.indices, self.values, self.dense) if t is not None)


_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_INT_OF[t.element_size()])


def _make_correction(original: torch.Tensor, unmerged: torch.Tensor) -> _Correction:
    wo, wu = _bits(original).reshape(-1), _bits(unmerged).reshape(-1)
    wrong = (wo != wu).nonzero().flatten()
    n, count = wo.numel(), wrong.numel()
    idx_dtype = torch.int32 if n < 2**31 else torch.int64
    sparse_cost = count * (torch.empty((), dtype=idx_dtype).element_size() + original.element_size())
    if sparse_cost <= n:  # cheaper than one int8 per element
        return _Correction(wrong.to(idx_dtype), wo[wrong].clone(), None)
    step = wo.to(torch.int64) - wu.to(torch.int64)
    fits = step.abs() <= 127
    dense = torch.where(fits, step, torch.zeros_like(step)).to(torch.int8)
    bad = (~fits).nonzero().flatten()
    return _Correction(bad.to(idx_dtype), wo[bad].clone(), dense)


def _apply_correction(t: torch.Tensor, corr: _Correction) -> torch.Tensor:
    bits = _bits(t).reshape(-1)
    if corr.dense is not None:
        bits = (bits.to(torch.int64) + corr.dense.to(torch.int64)).to(bits.dtype)
    else:
        bits = bits.clone()
    if corr.indices is not None and corr.values is not None and corr.indices.numel():
        bits[corr.indices.long()] = corr.values
    return bits.view(t.dtype).view(t.shape)


@attrs.frozen
class MergeRecord:
    """What :func:`restore` needs to give back the pre-merge weights bit for bit.

    Holds the adapters and scales (references, not copies) and, per target,
    the few bits where an unmerge would not land exactly on the original.
    ``nbytes`` is the record's own memory; ``targets_nbytes`` that of a copy of
    the targeted weights, for comparison.
    """

    pairs: tuple[tuple[LoraAdapter, float], ...]
    corrections: Mapping[str, _Correction]
    merged_digest: Mapping[str, bytes]
    targets_nbytes: int
    dora_norms: Mapping[str, torch.Tensor] = attrs.field(factory=dict)  # DoRA targets: row (or input-column) norms of W + s delta
    direct: frozenset[str] = frozenset()  # float8 targets and their scales: restored from the merged bits, no unmerge

    @property
    def nbytes(self) -> int:
        norms = sum(t.numel() * t.element_size() for t in self.dora_norms.values())
        return sum(c.nbytes for c in self.corrections.values()) + norms
