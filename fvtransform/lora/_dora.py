"""DoRA: ``W' = (m / ||W + s B A||_row) * (W + s B A)``, the norm taken per output row.

The row norms of ``W + s B A`` are all an exact undo needs: ``W = W' * (n / m) - s B A``.
A merge record keeps them (one float32 per output row).
"""

from __future__ import annotations

from typing import Any

import torch

from fvtransform.errors import FormatError

__all__ = ["merge_dora", "unmerge_dora", "dora_norm", "dora_factor"]


def _full(weight: torch.Tensor, d: Any, scale: float) -> torch.Tensor:
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1).to(torch.float32)
    return w + scale * (d.B.detach().reshape(rows, -1).float() @ d.A.detach().reshape(d.A.shape[0], -1).float())


def dora_norm(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of ``W + s B A`` in float32 (L2 over everything but dim 0)."""
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1).to(torch.float32)
    d = B.detach().reshape(rows, -1).to(torch.float32) @ A.detach().reshape(A.shape[0], -1).to(torch.float32)
    return (w + scale * d).norm(dim=1)


def dora_factor(weight: torch.Tensor, d: Any, scale: float) -> torch.Tensor:
    """``m / ||W + s B A||_row`` in float32, one value per output row (what DoRA multiplies rows by)."""
    return d.magnitude.detach().reshape(-1).float() / dora_norm(weight, d.B, d.A, scale)


def _single(contribs: list[Any]) -> Any:
    if len(contribs) != 1:
        raise FormatError("a DoRA target merges alone: DoRA's magnitude rescales the whole weight")
    return contribs[0]


def merge_dora(weight: torch.Tensor, contribs: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one DoRA contribution into ``weight`` (float32, one rounding); returns ``(W', row norms)``."""
    c = _single(contribs)
    full = _full(weight, c.delta, c.scale)
    norm = full.norm(dim=1, keepdim=True)
    mag = c.delta.magnitude.detach().reshape(-1, 1).float()
    return (full * (mag / norm)).to(weight.dtype).reshape(weight.shape), norm.reshape(-1)


def unmerge_dora(merged: torch.Tensor, contribs: list[Any], norms: torch.Tensor) -> torch.Tensor:
    """``round(W' * (n / m) - s B A)``: the pre-merge weight up to rounding, from the merge's row norms."""
    c = _single(contribs)
    d = c.delta
    rows = merged.shape[0]
    w = merged.detach().reshape(rows, -1).float() * (norms.reshape(-1, 1).float() / d.magnitude.detach().reshape(-1, 1).float())
    w = w - c.scale * (d.B.detach().reshape(rows, -1).float() @ d.A.detach().reshape(d.A.shape[0], -1).float())
    return w.to(merged.dtype).reshape(merged.shape)
