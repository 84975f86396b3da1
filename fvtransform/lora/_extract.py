"""Extracting an adapter from two trees (truncated SVD) and compressing ranks."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
import torch

from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import Delta, LoraAdapter, LowRank
from fvtransform.lora._moved import moved_keywords
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._paramtree import tensors_equal

__all__ = ["extract", "extract_with_report", "compress", "compress_with_report", "ExtractReport"]


@attrs.frozen
class ExtractReport:
    """Relative Frobenius error of each target's approximation."""

    errors: Mapping[str, float]


def _check_rank(rank: object, call: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise UsageError(f"{call.split('(')[0]}: rank={rank!r}; a rank is a whole number of at least 1, e.g. {call}")


def _check_rank_or_energy(rank: object, energy: object) -> None:
    if (rank is None) == (energy is None):
        raise UsageError(f"fvt.lora.extract: pass exactly one of rank= (an int) or energy= (a fraction in (0, 1]); found rank={rank!r}, "
                         f"energy={energy!r}. Call fvt.lora.extract(base, tuned, rank=16) or fvt.lora.extract(base, tuned, energy=0.9)")
    if rank is not None:
        _check_rank(rank, "fvt.lora.extract(base, tuned, rank=16)")
    elif isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0 < energy <= 1:
        raise UsageError(f"fvt.lora.extract: energy={energy!r}; the energy is a fraction in (0, 1], e.g. fvt.lora.extract(base, tuned, energy=0.9)")


def _truncate(S: torch.Tensor, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return max(1, min(rank, S.numel()))
    assert energy is not None  # _check_rank_or_energy ran
    power = S.double() ** 2
    cum = torch.cumsum(power, 0) / power.sum().clamp_min(1e-300)
    return int((cum < energy - 1e-12).sum().item()) + 1


def _factor(delta: torch.Tensor, rank: int | None, energy: float | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    k = _truncate(S, rank, energy)
    B = (U[:, :k] * S[:k]).float()
    A = Vh[:k].float()
    total = torch.linalg.norm(S)
    err = float(torch.linalg.norm(S[k:]) / total) if total > 0 else 0.0
    return A, B, err


@moved_keywords(return_report="fvt.lora.extract_with_report(base_tree, tuned_tree, ...) -> (adapter, report)")
def extract(
    base_tree: Mapping[str, torch.Tensor],
    tuned_tree: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    select: Pattern | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoraAdapter:
    """The adapter that best approximates ``tuned - base`` per target (SVD in float64).

    Targets are the 2-D+ keys whose weights differ (or those matching
    ``select``). Keep ``rank`` singular values, or enough for ``energy`` of the
    spectrum. ``progress(done, total)`` is called after each key.
    :func:`extract_with_report` also returns each target's relative Frobenius error.
    """
    return extract_with_report(base_tree, tuned_tree, rank=rank, energy=energy, select=select, progress=progress)[0]


def extract_with_report(
    base_tree: Mapping[str, torch.Tensor],
    tuned_tree: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
    select: Pattern | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LoraAdapter, ExtractReport]:
    """:func:`extract`, and an :class:`ExtractReport` of each target's relative Frobenius error.

    >>> import torch, fvtransform as fvt
    >>> base = fvt.ParamTree({"w": torch.zeros(4, 4)})
    >>> tuned = fvt.ParamTree({"w": torch.eye(4)})
    >>> adapter, report = fvt.lora.extract_with_report(base, tuned, rank=2)
    >>> adapter.ranks, round(report.errors["w"], 3)
    ({'w': 2}, 0.707)
    """
    _check_rank_or_energy(rank, energy)
    m = matcher(select) if select is not None else None
    targets: dict[str, Delta] = {}
    errors: dict[str, float] = {}
    missing = [k for k in base_tree if k not in tuned_tree]
    if missing:
        raise KeyMismatchError(f"extract: the tuned tree lacks {missing[:8]}")
    total = len(base_tree)
    for done, (key, w) in enumerate(base_tree.items(), 1):
        if progress is not None and done > 1:
            progress(done - 1, total)
        t = tuned_tree[key]
        if w.dim() < 2 or (m is not None and not m(key, w)):
            continue
        if w.shape != t.shape:
            raise ShapeMismatchError(f"extract: {key!r} is {list(w.shape)} in base and {list(t.shape)} in tuned")
        if m is None and tensors_equal(w, t):
            continue
        delta = (t.detach().double() - w.detach().double()).reshape(w.shape[0], -1)
        A, B, err = _factor(delta, rank, energy)
        k = A.shape[0]
        targets[key] = LowRank(A.reshape(k, *w.shape[1:]), B.reshape(w.shape[0], k, *([1] * (w.dim() - 2))), 1.0, float(k))
        errors[key] = err
    if progress is not None:
        progress(total, total)
    if not targets:
        raise KeyMismatchError("extract: no weights differ between the trees (and select= chose none)")
    adapter = LoraAdapter(targets, format="extracted")
    return adapter, ExtractReport(errors)


@moved_keywords(return_report="fvt.lora.compress_with_report(adapter, rank) -> (adapter, report)")
def compress(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """Re-factor each low-rank target to at most ``rank`` by an exact SVD of ``B @ A``.

    Never forms ``[out, in]``: QR of the factors first (``B = Qb Rb``,
    ``A^T = Qa Ra``), then the SVD of the small ``Rb Ra^T``. Compressing to
    the full rank is lossless (to float64 rounding). :func:`compress_with_report`
    also returns each target's relative Frobenius error.
    """
    return compress_with_report(adapter, rank)[0]


def compress_with_report(adapter: LoraAdapter, rank: int) -> tuple[LoraAdapter, ExtractReport]:
    """:func:`compress`, and an :class:`ExtractReport` of each target's relative Frobenius error (0 where kept as is)."""
    _check_rank(rank, "fvt.lora.compress(adapter, 16)")
    out: dict[str, Delta] = {}
    errors: dict[str, float] = {}
    for key, d in adapter.items():
        if not isinstance(d, LowRank) or d.rank <= rank and d.scale == 1.0:
            out[key] = d
            errors[key] = 0.0
            continue
        Bm = d.B.detach().double().reshape(d.B.shape[0], -1) * d.scale
        Am = d.A.detach().double().reshape(d.A.shape[0], -1)
        Qb, Rb = torch.linalg.qr(Bm)
        Qa, Ra = torch.linalg.qr(Am.T)
        U, S, Vh = torch.linalg.svd(Rb @ Ra.T)
        k = max(1, min(rank, S.numel()))
        B = (Qb @ (U[:, :k] * S[:k])).float()
        A = (Vh[:k] @ Qa.T).float()
        total = torch.linalg.norm(S)
        errors[key] = float(torch.linalg.norm(S[k:]) / total) if total > 0 else 0.0
        out[key] = LowRank(A.reshape(k, *d.A.shape[1:]), B.reshape(d.B.shape[0], k, *d.B.shape[2:]), 1.0, float(k))
    new = adapter.replace(out, format="compressed")
    return new, ExtractReport(errors)
