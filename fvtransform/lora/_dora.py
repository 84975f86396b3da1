"""DoRA: ``W' = (m / ||W + s delta||) * (W + s delta)``, the norm per output row or per input column.

PEFT and LyCORIS' default (``wd_on_output=True``) keep one magnitude per output
row (``m`` of shape ``[out]``); LyCORIS ``wd_on_output=False`` keeps one per
input column (``[1, in]``; for a convolution the norm of an input channel runs
over the output channels and the kernel). ``delta`` is any low-rank, LoHa or
LoKr delta, computed tile by tile over row blocks:

* output axis: a row tile holds whole rows, so each tile is normed, rescaled
  and written in one pass;
* input axis: the column norms need every row, so a first pass sums the
  squares of each column over all row tiles, and a second recomputes each
  tile and rescales it.

Either way the extra memory is a few tiles, and merging in memory and
streaming a checkpoint give the same bits. The norms are all an exact undo
needs: ``W = W' * (n / m) - s delta``; a merge record keeps them (float32).
"""

from __future__ import annotations

from collections.abc import Callable
import math
from typing import Any

import torch

from fvtransform.errors import NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._functorch import concrete

__all__ = ["merge_dora", "merge_dora_autograd", "unmerge_dora", "dora_factor", "canonical_magnitude", "magnitude_axis", "dora_scale_layout", "dense_delta", "overflow_limit", "overflows"]

#: Bytes of float32 work space per DoRA tile.
TILE_BYTES = 4 * 1024 * 1024

Rows = Callable[[int, int], torch.Tensor]


def canonical_magnitude(raw: torch.Tensor, out: int, in_features: int, where: str) -> torch.Tensor:
    """A file's DoRA magnitude as ``[out]`` (per output row) or ``[1, in]`` (per input column).

    PEFT writes ``[out]``, LyCORIS ``[out, 1, ...]`` or ``[1, in, 1, ...]``.
    ``in_features`` is the weight's dim 1 (input channels of a convolution).

    Raises:
        ShapeMismatchError: a magnitude whose shape fits neither axis.
    """
    if raw.numel() == out and (raw.dim() <= 1 or raw.shape[0] == out) and all(d == 1 for d in raw.shape[1:]):
        return raw.reshape(out)
    if raw.dim() >= 2 and raw.shape[0] == 1 and raw.shape[1] == in_features and raw.numel() == in_features:
        return raw.reshape(1, in_features)
    raise ShapeMismatchError(
        f"{where}: DoRA magnitude of shape {list(raw.shape)} fits neither the output axis ([{out}] or [{out}, 1...]) "
        f"nor the input axis ([1, {in_features}, 1...]) of its weight; the file's dora_scale does not belong to this module"
    )


def dora_scale_layout(mag: torch.Tensor, ndim: int) -> torch.Tensor:
    """A canonical magnitude in the layout LyCORIS writes and ComfyUI reads: ``[out, 1...]`` or ``[1, in, 1...]``.

    ``ndim`` is the weight's number of dims (4 for a Conv2d): ComfyUI divides
    ``dora_scale`` by a norm of that many dims, so a 1-D or 2-D magnitude on a
    convolution would broadcast wrongly there.

    >>> dora_scale_layout(torch.ones(3), 4).shape, dora_scale_layout(torch.ones(1, 5), 3).shape
    (torch.Size([3, 1, 1, 1]), torch.Size([1, 5, 1]))
    """
    ndim = max(2, ndim)
    if mag.dim() == 1:
        return mag.reshape(mag.shape[0], *([1] * (ndim - 1)))
    return mag.reshape(1, mag.shape[-1], *([1] * (ndim - 2)))


def magnitude_axis(mag: torch.Tensor) -> int:
    """0: per output row (``[out]``); 1: per input column (``[1, in]``)."""
    return 0 if mag.dim() == 1 else 1


def _rows_fn(d: Any, device: torch.device) -> Rows:
    """Rows of the unscaled delta, float32 ``[n, cols]``."""
    if hasattr(d, "row_source"):
        return d.row_source(device)
    B = d.B.detach().to(device=device, dtype=torch.float32).reshape(d.B.shape[0], -1)
    A = d.A.detach().to(device=device, dtype=torch.float32).reshape(d.A.shape[0], -1)
    return lambda s, e: B[s:e] @ A


def _single(contribs: list[Any]) -> Any:
    if len(contribs) != 1:
        raise UsageError("a DoRA target merges alone: DoRA's magnitude rescales the whole weight")
    return contribs[0]


class _Plan:
    """One DoRA target's tiling: the weight as 2-D, the delta's rows, the magnitude and its axis."""

    def __init__(self, weight: torch.Tensor, d: Any, scale: float, where: str) -> None:
        self.where = where
        self.rows = weight.shape[0]
        self.flat = weight.detach().reshape(self.rows, -1)
        self.cols = self.flat.shape[1]
        self.delta = _rows_fn(d, weight.device)
        self.scale = scale
        mag = d.magnitude.detach().to(device=weight.device, dtype=torch.float32)
        self.axis = magnitude_axis(mag)
        self.kernel = 1
        if self.axis == 1:
            in_features = weight.shape[1]
            if mag.shape[1] != in_features:
                raise ShapeMismatchError(f"{where}: DoRA magnitude {list(mag.shape)} does not fit the input axis of {list(weight.shape)}")
            self.kernel = self.cols // in_features
        elif mag.shape[0] != self.rows:
            raise ShapeMismatchError(f"{where}: DoRA magnitude {list(mag.shape)} does not fit the output axis of {list(weight.shape)}")
        self.mag = mag.reshape(-1)
        self.eps = float(getattr(d, "dora_eps", 0.0))
        self.tile = max(1, TILE_BYTES // max(1, self.cols * 4))

    def full(self, start: int, stop: int) -> torch.Tensor:
        """``W + s delta`` for rows ``start:stop``, float32."""
        return self.flat[start:stop].float() + self.scale * self.delta(start, stop)

    def spans(self) -> range:
        return range(0, self.rows, self.tile)

    def column_norms(self) -> torch.Tensor:
        """First pass of the input axis: per input channel, ``sqrt(sum over rows (and kernel) of squares)``."""
        sq = torch.zeros(self.cols, dtype=torch.float32, device=self.flat.device)
        for s in self.spans():
            t = self.full(s, min(self.rows, s + self.tile))
            sq += (t * t).sum(dim=0)
        return sq.reshape(-1, self.kernel).sum(dim=1).sqrt() + self.eps

    def check(self, norms: torch.Tensor) -> None:
        bad = (norms == 0) | ~torch.isfinite(norms)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            what = "row" if self.axis == 0 else "input column"
            raise NumericError(
                f"{self.where}: the merged weight's {what} {i} has norm {float(norms[i])}; DoRA divides by it "
                "(m / ||W + s delta||), which would give NaN/Inf. Drop this target or fix the adapter/base."
            )

    def factor(self, norms_cols: torch.Tensor) -> torch.Tensor:
        """``m / n`` per flattened column (input axis)."""
        return (self.mag / norms_cols).repeat_interleave(self.kernel)


def merge_dora(weight: torch.Tensor, contribs: list[Any], *, out: torch.Tensor | None = None, where: str = "DoRA target") -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one DoRA contribution into ``weight`` (float32, one rounding into ``out``'s dtype); returns ``(W', norms)``.

    ``norms`` are the row norms (output axis) or input-channel norms (input
    axis) of ``W + s delta``, float32, plus the delta's ``dora_eps``.

    Raises:
        NumericError: a zero (or non-finite) norm, or a result that is not finite in the output dtype.
    """
    c = _single(contribs)
    p = _Plan(weight, c.delta, c.scale, where)
    if out is None:
        out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    flat_out = out.view(p.rows, -1)
    if p.axis == 1:
        norms = p.column_norms()
        p.check(norms)
        f = p.factor(norms)
        for s in p.spans():
            e = min(p.rows, s + p.tile)
            _store(flat_out[s:e], p.full(s, e) * f, where)
        return out, norms
    parts = []
    for s in p.spans():
        e = min(p.rows, s + p.tile)
        t = p.full(s, e)
        n = t.norm(dim=1, keepdim=True) + p.eps
        p.check(n.reshape(-1))
        parts.append(n.reshape(-1))
        _store(flat_out[s:e], t * (p.mag[s:e].reshape(-1, 1) / n), where)
    return out, torch.cat(parts)


def merge_dora_autograd(weight: torch.Tensor, contribs: list[Any], delta: torch.Tensor, *, where: str = "DoRA target") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_dora` out of place, for inputs that need gradients (autograd or ``torch.func``).

    ``delta`` is the unscaled dense delta ``[out, cols]`` in the accumulation dtype (float32, or float64
    where the inputs are), carrying its autograd graph. The same formula, ``(m / ||W + s delta||) * (W + s delta)``
    with the norm per output row or per input channel plus ``dora_eps``, rounded once into the weight's dtype;
    gradients flow to the weight, the factors and the magnitude (the norm is not detached: this is the
    derivative of the merge, not PEFT's training-time approximation). Returns ``(W', norms)``, norms detached.

    Raises:
        NumericError: a zero (or non-finite) norm, or a result that is not finite in the weight's dtype.
    """
    c = _single(contribs)
    rows = weight.shape[0]
    full = weight.reshape(rows, -1).to(delta.dtype) + c.scale * delta
    mag = c.delta.magnitude.to(device=weight.device, dtype=delta.dtype)
    eps = float(getattr(c.delta, "dora_eps", 0.0))
    axis = magnitude_axis(mag)
    if axis == 1:
        kernel = full.shape[1] // weight.shape[1]
        norms = (full * full).sum(dim=0).reshape(-1, kernel).sum(dim=1).sqrt() + eps
        factor = (mag.reshape(-1) / norms).repeat_interleave(kernel)
    else:
        norms = full.norm(dim=1) + eps
        factor = (mag.reshape(-1) / norms).reshape(-1, 1)
    values = concrete(norms)  # under vmap: every batch member's norms
    bad = (values == 0) | ~torch.isfinite(values)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        which = f" {i}" if values.numel() == norms.numel() else " (in a vmap batch member)"
        raise NumericError(
            f"{where}: the merged weight's {'row' if axis == 0 else 'input column'}{which} has norm {float(values.reshape(-1)[i])}; DoRA divides by it "
            "(m / ||W + s delta||), which would give NaN/Inf. Drop this target or fix the adapter/base."
        )
    merged = full * factor
    if overflows(concrete(merged), overflow_limit(weight.dtype)):
        raise NumericError(f"{where}: the merged weight overflows {weight.dtype} (Inf/NaN); lower the scale or merge into a wider dtype")
    return merged.to(weight.dtype).reshape(weight.shape), norms.detach().to(torch.float32)


def overflow_limit(dtype: torch.dtype) -> float | None:
    """The smallest magnitude that rounds to Inf in ``dtype`` (``max + ulp(max) / 2``); None: not checked (float8, ints)."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        return None
    if dtype.itemsize > 4:  # the float32 tiles cannot exceed float64: only NaN/Inf count
        return math.inf
    fi = torch.finfo(dtype)
    return float(fi.max) + fi.eps * 2.0 ** math.floor(math.log2(fi.max)) / 2


def overflows(tile: torch.Tensor, limit: float | None) -> bool:
    """Whether a float32 tile holds NaN/Inf or a value that rounds to Inf below ``limit``.

    One ``amax`` over the tile (NaN propagates): about 40 times cheaper than
    ``isfinite(...).all()`` on CPU (measured, torch 2.13).
    """
    return limit is not None and tile.numel() > 0 and not bool(tile.abs().amax() < limit)


def _store(dst: torch.Tensor, tile: torch.Tensor, where: str) -> None:
    if overflows(tile, overflow_limit(dst.dtype)):
        raise NumericError(f"{where}: the merged weight overflows {dst.dtype} (Inf/NaN); lower the scale or merge into a wider dtype")
    dst.copy_(tile)


def unmerge_dora(merged: torch.Tensor, contribs: list[Any], norms: torch.Tensor, *, where: str = "DoRA target") -> torch.Tensor:
    """``round(W' * (n / m) - s delta)``: the pre-merge weight up to rounding, from the merge's norms."""
    c = _single(contribs)
    p = _Plan(merged, c.delta, c.scale, where)
    out = torch.empty(merged.shape, dtype=merged.dtype, device=merged.device)
    flat_out = out.view(p.rows, -1)
    n = norms.to(device=merged.device, dtype=torch.float32)
    inv = (n / p.mag).repeat_interleave(p.kernel) if p.axis == 1 else None
    for s in p.spans():
        e = min(p.rows, s + p.tile)
        w = p.flat[s:e].float()
        w = w * inv if inv is not None else w * (n[s:e] / p.mag[s:e]).reshape(-1, 1)
        flat_out[s:e].copy_(w - p.scale * p.delta(s, e))
    return out


def dora_factor(weight: torch.Tensor, d: Any, scale: float, where: str = "DoRA target") -> tuple[torch.Tensor, int]:
    """``(m / ||W + s delta||, axis)`` in float32: per output row (axis 0) or per input channel (axis 1)."""
    p = _Plan(weight, d, scale, where)
    if p.axis == 1:
        norms = p.column_norms()
    else:
        norms = torch.cat([p.full(s, min(p.rows, s + p.tile)).norm(dim=1) for s in p.spans()]) + p.eps
    p.check(norms)
    return p.mag / norms, p.axis


def dense_delta(d: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The whole unscaled delta of ``d`` shaped like the weight, float32 (on-the-fly LoHa/LoKr)."""
    return _rows_fn(d, device)(0, shape[0]).reshape(shape)

