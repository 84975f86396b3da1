"""LoRA for ``torch.compile``: fixed-rank factors as plain tensors, and a call that traces into one graph.

:func:`fvtransform.lora.call` traces under ``torch.compile`` too, one graph per
set of ranks. To serve adapters of several ranks from one graph, :func:`factors` turns
adapters into a dict of plain tensors ``{key: (A, B, scale)}`` zero-padded to
one rank with the scale as a 0-d tensor, and :func:`call_factors` runs the
module with ``W + scale * B @ A`` built inside the traced function. Adapters of
the same targets and padded rank then have the same shapes and no Python
values to guard on: one compiled graph serves them all (tests count the
compiled frames). Zero padding adds exact zeros to every sum; only a BLAS
kernel's summation grouping may differ with the rank (last-bit float32
differences, measured by the property tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import attrs
import torch

from fvtransform._call._call import Out, _Forward
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import LoraAdapter, LowRank
from fvtransform.lora._merge import AdapterSet, normalize_adapters

__all__ = ["pad_rank", "factors", "call_factors", "Factors"]

#: key -> (A [r, in...], B [out, r, 1...], scale as a 0-d float32 tensor)
Factors = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def pad_rank(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """A new adapter whose low-rank targets all have rank ``rank``: A and B padded with zeros.

    ``B @ A`` is unchanged up to the summation grouping of the matrix product
    (the padding multiplies zeros; a BLAS kernel may group a longer sum
    differently, a last-bit float32 difference); scales, alphas and
    magnitudes are kept. The input is not mutated.

    ``rank`` is a whole number from 1 to 65536 (the
    largest rank a LoRA config may declare): padding past ``min(out, in)``
    never adds anything, but a common rank for targets of several sizes is
    useful, so the bound is absolute; an absurd rank fails before any allocation.

    Raises:
        ShapeMismatchError: a target's rank is above ``rank``, or ``rank`` is
            not a whole number in range.

    >>> import torch, fvtransform as fvt
    >>> from fvtransform.lora import LoraAdapter, LowRank
    >>> a = LoraAdapter({"w": LowRank(torch.ones(1, 3), torch.ones(2, 1), scale=0.5)})
    >>> p = fvt.lora.pad_rank(a, 4)
    >>> p["w"].rank, torch.equal(p["w"].B @ p["w"].A, a["w"].B @ a["w"].A)
    (4, True)
    """
    _check_rank(rank, "pad_rank", MAX_PAD_RANK)
    return _pad(adapter, rank)


#: The largest rank :func:`pad_rank` pads to (the config readers' cap on a LoRA rank).
MAX_PAD_RANK = 1 << 16


def _check_rank(rank: Any, where: str, bound: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= bound:
        raise UsageError(
            f"{where}: rank must be a whole number from 1 to {bound} (a LoRA rank above min(out, in) adds nothing); "
            f"found {rank!r}. Fix: pass a rank within that range"
        )


def _pad(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """``pad_rank`` without the bound (``factors`` pads concatenations to their own total rank)."""
    out: dict[str, Any] = {}
    for key, d in adapter.items():
        if not isinstance(d, LowRank) or d.rank == rank:
            out[key] = d
            continue
        if d.rank > rank:
            raise ShapeMismatchError(f"pad_rank: {key!r} has rank {d.rank}, more than {rank}; compress it first (fvt.lora.compress)")
        extra = rank - d.rank
        A = torch.cat([d.A, d.A.new_zeros((extra, *d.A.shape[1:]))], dim=0)
        B = torch.cat([d.B, d.B.new_zeros((d.B.shape[0], extra, *d.B.shape[2:]))], dim=1)
        out[key] = attrs.evolve(d, A=A, B=B)
    return LoraAdapter(out, format=adapter.format, metadata=adapter.metadata)


def factors(adapters: AdapterSet, *, rank: int | None = None, scale: float = 1.0) -> Factors:
    """Plain tensors for :func:`call_factors`: ``{key: (A, B, scale)}``, each padded to ``rank``.

    ``adapters`` is an adapter or ``[(adapter, scale), ...]``; several
    adapters on one key are concatenated along the rank (exact, like
    :func:`fvtransform.lora.combine`), their scales folded into float32 B.
    ``rank=None`` pads to the largest rank present. DoRA and full deltas are
    refused (merge them instead).
    """
    per_key: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for adapter, s in normalize_adapters(adapters, scale):
        for key, d in adapter.items():
            if not isinstance(d, LowRank) or d.magnitude is not None:
                raise UsageError(
                    f"{key!r}: factors() takes plain low-rank targets; merge DoRA, LoHa/LoKr and full deltas with fvt.lora.merge"
                )
            per_key.setdefault(key, []).append((d.A, d.B, s * d.scale))
    out: Factors = {}
    width = max((sum(A.shape[0] for A, _, _ in parts) for parts in per_key.values()), default=0)
    if rank is None:
        rank = width
    else:
        _check_rank(rank, "factors", max(width, MAX_PAD_RANK))
    for key, parts in per_key.items():
        if len(parts) == 1:
            A, B, s = parts[0]
        else:  # scales go into B, in float32, so one scale tensor serves the concatenation
            A = torch.cat([p[0].float() for p in parts], dim=0)
            B = torch.cat([p[1].float() * p[2] for p in parts], dim=1)
            s = 1.0
        padded = _pad(LoraAdapter({key: LowRank(A, B, 1.0)}), rank)[key]
        assert isinstance(padded, LowRank)  # _pad keeps a LowRank target a LowRank
        out[key] = (padded.A, padded.B, torch.tensor(s, dtype=torch.float32))
    return out


def call_factors(module: _Forward[Out], tree: Mapping[str, torch.Tensor], fac: Factors, /, *args: object, **kwargs: object) -> Out:
    """Run ``module`` on ``tree`` with ``W + scale * B @ A`` for every key of ``fac``; traceable by ``torch.compile``.

    The effective weights are computed in float32 and rounded once into the
    weight's dtype, inside the call (the tree is not changed). Compile it as
    ``torch.compile(lambda t, f, x: fvt.lora.call_factors(m, t, f, x))``: a
    new adapter with the same targets and padded rank reuses the graph.
    """
    from fvtransform._call._call import _prepare

    mod = cast(torch.nn.Module, module)  # _Forward[Out] is an nn.Module as the type checker sees its forward
    params, _ = _prepare(mod, tree)
    params = dict(params)
    for key, (A, B, s) in fac.items():
        if key not in params:
            raise KeyMismatchError(f"factor target {key!r} is not in the tree; load the adapter with base=")
        w = params[key]
        delta = B.reshape(B.shape[0], -1).float() @ A.reshape(A.shape[0], -1).float()
        params[key] = (w.float() + s * delta.reshape(w.shape)).to(w.dtype)
    out: Out = torch.func.functional_call(mod, params, args, kwargs, tie_weights=True, strict=False)
    return out


