"""The float64 oracle of a float8 merge, shared by tests/test_fp8_merge.py and property_tests: the float8 grid,
the exact merged value with a bound of the float32 path's error, and the grid neighbours of a value."""

from __future__ import annotations

import torch

from fvtransform.lora import LowRank


def fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """The nonnegative finite float8 values, indexed by their code (0..127, increasing)."""
    g = torch.arange(128, dtype=torch.uint8).view(dtype).to(torch.float64)
    return g[torch.isfinite(g)]


def merged_f64(w8: torch.Tensor, scale: torch.Tensor | None, d: LowRank, s: float = 1.0,
               new_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W*scale + s*B@A) / new_scale`` (default: the same scale) in float64 and a bound of the float32 path's error on it."""
    sc = 1.0 if scale is None else float(scale.double())
    q = sc if new_scale is None else float(new_scale.double())
    eff = s * d.scale
    w = w8.double() * sc
    B, A = d.B.double().reshape(d.B.shape[0], -1), d.A.double().reshape(d.A.shape[0], -1)
    y = (w + eff * B @ A) / q
    eps = torch.finfo(torch.float32).eps
    mag = (w.abs() + abs(eff) * B.abs() @ A.abs()) / q
    return y, (d.rank + 3) * eps * mag + eps * y.abs()


def fp8_neighbours(y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float64 ``y``: the nearest float8 value (ties to the even code), the two grid neighbours (all signed),
    and the midpoint between the neighbours (a magnitude). Beyond the largest value both neighbours are it."""
    grid = fp8_grid(dtype)
    mag = y.abs()
    lo_i = (torch.searchsorted(grid, mag, right=True) - 1).clamp(0, grid.numel() - 1)
    hi_i = (lo_i + 1).clamp(max=grid.numel() - 1)
    lo, hi = grid[lo_i], grid[hi_i]
    mid = (lo + hi) / 2
    pick_hi = (mag > mid) | ((mag == mid) & (hi_i % 2 == 0) & (hi_i != lo_i))
    sign = torch.where(y < 0, -1.0, 1.0).double()
    return sign * torch.where(pick_hi, hi, lo), sign * lo, sign * hi, mid
