"""DoRA: ``W' = (m / ||W + s B A||_row) * (W + s B A)``, the norm taken per output row."""

from __future__ import annotations

from typing import Any

import torch

from fvtransform.errors import FormatError

__all__ = ["merge_dora", "dora_norm"]


def dora_norm(weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of ``W + s B A`` in float32 (L2 over everything but dim 0)."""
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1).to(torch.float32)
    d = B.detach().reshape(rows, -1).to(torch.float32) @ A.detach().reshape(A.shape[0], -1).to(torch.float32)
    return (w + scale * d).norm(dim=1)


def merge_dora(weight: torch.Tensor, contribs: list[Any]) -> torch.Tensor:
    """Merge one DoRA contribution into ``weight`` (float32, one rounding)."""
    if len(contribs) != 1:
        raise FormatError("a DoRA target merges alone: DoRA's magnitude rescales the whole weight")
    c = contribs[0]
    d = c.delta
    rows = weight.shape[0]
    w = weight.detach().reshape(rows, -1).to(torch.float32)
    full = w + c.scale * (d.B.detach().reshape(rows, -1).float() @ d.A.detach().reshape(d.A.shape[0], -1).float())
    norm = full.norm(dim=1, keepdim=True)
    mag = d.magnitude.detach().reshape(rows, 1).float()
    return (full * (mag / norm)).to(weight.dtype).reshape(weight.shape)
