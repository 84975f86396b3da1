"""DoRA: ``W' = (m / ||W + s B A||_row) * (W + s B A)``, the norm taken per output row.

The row norms of ``W + s B A`` are all an exact undo needs: ``W = W' * (n / m) - s B A``.
A merge record keeps them (one float32 per output row).
"""

from __future__ import annotations

from typing import Any

import torch

from fvtransform.errors import FormatError

__all__ = ["merge_dora", "unmerge_dora", "dora_factor"]


def _product(d: Any) -> torch.Tensor:
    """``B @ A`` in float32, as ``[out, in...]`` flattened to 2-D."""
    return d.B.detach().reshape(d.B.shape[0], -1).float() @ d.A.detach().reshape(d.A.shape[0], -1).float()


def _full(weight: torch.Tensor, d: Any, scale: float) -> torch.Tensor:
    """``W + s B A`` in float32, flattened to 2-D."""
    return weight.detach().reshape(weight.shape[0], -1).float() + scale * _product(d)


def dora_factor(weight: torch.Tensor, d: Any, scale: float) -> torch.Tensor:
    """``m / ||W + s B A||_row`` in float32, one value per output row (what DoRA multiplies rows by)."""
    return d.magnitude.detach().reshape(-1).float() / _full(weight, d, scale).norm(dim=1)


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
    w = merged.detach().reshape(merged.shape[0], -1).float() * (norms.reshape(-1, 1).float() / d.magnitude.detach().reshape(-1, 1).float())
    return (w - c.scale * _product(d)).to(merged.dtype).reshape(merged.shape)
