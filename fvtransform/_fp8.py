"""Float8 tensor arithmetic shared by the fp8 transforms, the on-the-fly call and the merges (private).

One definition of each step, so every path rounds the same way:

* ``dequantize_tensor(w, scale, dtype)``: ``w`` (float8) times its per-tensor ``scale`` in float32, then one
  rounding to ``dtype`` (the forward of a dequantised tree and the upcast-as-the-layer-runs call use this, so
  they agree bit for bit);
* ``quantize_tensor(x, dtype, scale)``: ``x / scale`` in float32, then one rounding to float8 — to nearest (ties
  to even, torch's cast) or stochastically (``generator`` given: round up with probability equal to the
  distance from the value below, so the expected result is ``x / scale``);
* ``amax_scale(x, dtype)``: the per-tensor scale that maps ``max |x|`` onto the largest finite float8 value.

Values beyond the float8 range are refused unless ``saturate=True`` (torch's own cast saturates
``float8_e4m3fn`` silently — even ``inf`` becomes 448 — and turns ``float8_e5m2`` overflow into ``inf``).
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_DTYPES",
    "is_fp8",
    "fp8_max",
    "amax_scale",
    "dequantize_tensor",
    "quantize_tensor",
    "Fp8Overflow",
]

FP8_DTYPES: tuple[torch.dtype, ...] = (torch.float8_e4m3fn, torch.float8_e5m2)


class Fp8Overflow(ValueError):
    """A value beyond the float8 range (private; callers turn it into a NumericError naming the key).

    Attributes:
        largest: the largest magnitude found (after dividing by the scale).
        limit: the largest finite value of the float8 dtype.
    """

    def __init__(self, largest: float, limit: float) -> None:
        super().__init__(f"largest magnitude {largest:g} exceeds the float8 range (max {limit:g})")
        self.largest = largest
        self.limit = limit


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the float8 dtypes fvtransform reads and writes."""
    return dtype in FP8_DTYPES


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of a float8 ``dtype`` (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def amax_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 scalar ``max|x| / fp8_max(dtype)`` (1.0 for an all-zero or empty ``x``)."""
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), dtype=torch.float32)
    if not bool(torch.isfinite(amax)):
        raise Fp8Overflow(float(amax), fp8_max(dtype))
    if float(amax) == 0.0:
        return torch.ones((), dtype=torch.float32, device=x.device)
    return (amax / fp8_max(dtype)).to(torch.float32)


def dequantize_tensor(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``w`` (float8) as ``dtype``: ``(w.float() * scale.float()).to(dtype)``, one rounding; no scale: an exact cast."""
    if scale is None:
        return w.to(dtype)
    out = w.to(torch.float32) * scale.to(device=w.device, dtype=torch.float32)
    return out if dtype == torch.float32 else out.to(dtype)


def _neighbour(q: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The float8 value ``step`` (±1, int16) codes away from nonnegative ``q`` (same dtype), through its bits."""
    bits = q.view(torch.uint8).to(torch.int16) + step
    return bits.clamp(0, 255).to(torch.uint8).view(q.dtype)


def quantize_tensor(
    x: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    saturate: bool = False,
) -> torch.Tensor:
    """``x / scale`` rounded once to the float8 ``dtype`` (to nearest, or stochastically with ``generator``).

    Raises:
        Fp8Overflow: a magnitude beyond the float8 range (or NaN/Inf) and ``saturate`` is False.
    """
    y = x.to(torch.float32)
    if scale is not None:
        y = y / scale.to(device=y.device, dtype=torch.float32)
    limit = fp8_max(dtype)
    if y.numel():
        largest = float(y.abs().amax())
        if largest != largest or largest > limit:  # NaN compares unequal to itself
            if not saturate or largest != largest:
                raise Fp8Overflow(largest, limit)
            y = y.clamp(-limit, limit)
    if generator is None:
        return y.to(dtype)
    mag = y.abs()
    near = mag.to(dtype)  # round to nearest: the neighbour on one side of mag
    near_f = near.to(torch.float32)
    above = near_f > mag
    one = torch.ones((), dtype=torch.int16, device=y.device)
    other = _neighbour(near, torch.where(above, -one, one))  # the neighbour on the other side
    other_f = other.to(torch.float32)
    lo_f = torch.where(above, other_f, near_f)
    hi_f = torch.where(above, near_f, other_f)
    gap = hi_f - lo_f
    exact = near_f == mag
    p_up = torch.where(exact | (gap == 0), torch.zeros_like(mag), (mag - lo_f) / torch.where(gap == 0, 1.0, gap))
    u = torch.rand(mag.shape, generator=generator, dtype=torch.float32, device=y.device)
    up = u < p_up
    picked = torch.where(up, hi_f, lo_f)
    picked = torch.where(exact, near_f, picked)
    return (torch.where(y < 0, -picked, picked)).to(dtype)
