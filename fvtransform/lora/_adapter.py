"""LoraAdapter: an immutable map from a base tree's keys to weight deltas."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
import math
import types
from typing import TypedDict

import attrs
import torch

from fvtransform.errors import NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._functorch import concrete
from fvtransform.lora._report import ResolutionReport
from fvtransform.tree import _pytree

__all__ = ["LowRank", "FullDelta", "LoHa", "LoKr", "LoraAdapter", "Delta", "GENERATED", "DORA_EPS"]

#: What LyCORIS and ComfyUI add to DoRA's norms (``torch.finfo(torch.float32).eps``); PEFT adds nothing.
DORA_EPS = float(torch.finfo(torch.float32).eps)


def _check_finite(t: torch.Tensor, what: str) -> None:
    """Refuse NaN/Inf in a factor of any dtype: complex and integer factors are refused, float8 is upcast first."""
    if t.is_complex():
        raise ShapeMismatchError(f"{what} is complex ({t.dtype}); LoRA factors must be real floating point. Re-export the adapter.")
    if not t.is_floating_point():
        raise ShapeMismatchError(f"{what} has dtype {t.dtype}; LoRA factors must be floating point. Re-export the adapter.")
    if t.device.type == "meta" or not t.numel():
        return
    if t.element_size() == 1:  # float8: isfinite has no kernel for it; the upcast is exact
        t = t.float()
    low, high = torch.aminmax(concrete(t))  # one pass, no temporary (NaN propagates): ~40x cheaper than isfinite(t).all() on CPU
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        raise NumericError(f"{what} holds NaN or Inf; refusing to use it. Re-export the adapter or drop this target.")


def _check_magnitude(m: torch.Tensor, out: int, cols: int, in_exact: bool, where: str) -> None:
    """DoRA's magnitude: ``[out]`` (per output row) or ``[1, in]`` (per input column, LyCORIS ``wd_on_output=False``)."""
    ok = (m.dim() == 1 and m.shape[0] == out) or (
        m.dim() == 2 and m.shape[0] == 1 and (m.shape[1] == cols if in_exact else m.shape[1] > 0 and cols % m.shape[1] == 0)
    )
    if not ok:
        raise ShapeMismatchError(
            f"{where}: DoRA magnitude of shape {list(m.shape)} fits neither the output axis ([{out}]) nor the input axis "
            f"([1, in]) of this delta; the file's dora_scale / lora_magnitude_vector does not belong to it"
        )
    _check_finite(m, f"{where} magnitude")


def _fits_magnitude(m: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return m is None or (m.dim() == 1 and m.shape[0] == shape[0]) or (m.dim() == 2 and m.shape[1] == shape[1])


@attrs.frozen(repr=False)
class LowRank:
    """``delta = scale * B @ A`` (conv: B ``[out, r, 1...]``, A ``[r, in, k...]``).

    ``magnitude`` is DoRA's magnitude, when present: ``[out]`` per output row
    (PEFT, LyCORIS' default) or ``[1, in]`` per input column (LyCORIS
    ``wd_on_output=False``); the file loaders
    bring a file's tensor to one of these. ``dora_eps`` is added to DoRA's
    norms: 0 for PEFT, float32's epsilon for LyCORIS/ComfyUI ``dora_scale``
    files (``DORA_EPS``), as each tool computes it.
    ``alpha`` is what the file said (for writing it back); ``scale`` is what counts.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def validate(self, where: str) -> None:
        if self.A.dim() < 2 or self.B.dim() < 2:
            raise ShapeMismatchError(f"{where}: LoRA factors need at least 2 dims; A {list(self.A.shape)}, B {list(self.B.shape)}")
        if self.A.shape[0] != self.B.shape[1]:
            raise ShapeMismatchError(
                f"{where}: rank mismatch: A {list(self.A.shape)} has rank {self.A.shape[0]}, "
                f"B {list(self.B.shape)} has rank {self.B.shape[1]}; the file's A and B do not belong together"
            )
        if any(d != 1 for d in self.B.shape[2:]):
            raise ShapeMismatchError(f"{where}: B {list(self.B.shape)} must be 1x1 past its first two dims")
        if not math.isfinite(self.scale):
            raise NumericError(f"{where}: scale {self.scale} is not finite")
        _check_finite(self.A, f"{where} A")
        _check_finite(self.B, f"{where} B")
        if self.magnitude is not None:
            _check_magnitude(self.magnitude, int(self.B.shape[0]), int(self.A.shape[1]), self.A.dim() > 2, where)

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Same output rows, and A's full shape past the rank is the weight's (a flat 2-D A: the same element count)."""
        if len(shape) < 2 or self.B.shape[0] != shape[0] or not _fits_magnitude(self.magnitude, shape):
            return False
        if self.A.dim() == 2:
            return self.A.shape[1] == math.prod(shape[1:])
        return tuple(self.A.shape[1:]) == tuple(shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [self.A, self.B] + ([self.magnitude] if self.magnitude is not None else [])

    def __repr__(self) -> str:
        return f"LowRank(r={self.rank}, scale={self.scale:g})"


@attrs.frozen(repr=False)
class FullDelta:
    """A full-size tensor ``D`` for one key: added to it, or, with ``replaces=True``, put in its place.

    Added (``.diff`` for weights, ``.diff_b`` for biases): ``W + scale * D``.
    Replacing (PEFT ``modules_to_save``): merging sets the weight to ``D``,
    whole (``scale`` stays 1: PEFT ignores adapter scales for it), alone on
    its key.

    >>> import torch
    >>> FullDelta(torch.zeros(2, 3), 0.5)
    FullDelta([2, 3], scale=0.5)
    >>> FullDelta(torch.zeros(2, 3), replaces=True)
    FullDelta([2, 3], replaces=True)
    """

    D: torch.Tensor
    scale: float = 1.0
    replaces: bool = False

    @property
    def magnitude(self) -> None:
        """A full delta carries no DoRA magnitude."""
        return None

    def validate(self, where: str) -> None:
        if self.replaces and self.scale != 1.0:
            raise UsageError(f"{where}: a replacing FullDelta (modules_to_save) is applied whole; its scale must be 1, not {self.scale:g}")
        _check_finite(self.D, where)

    def fits(self, shape: tuple[int, ...]) -> bool:
        return tuple(self.D.shape) == tuple(shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.D]

    def __repr__(self) -> str:
        return f"FullDelta({list(self.D.shape)}, {'replaces=True' if self.replaces else f'scale={self.scale:g}'})"


def _f32(t: torch.Tensor, device: torch.device, keep_grad: bool = False) -> torch.Tensor:
    return (t if keep_grad else t.detach()).to(device=device, dtype=torch.float32)


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise ShapeMismatchError(f"{where}: {what}; the file's LyCORIS factors do not belong together")


def _no_rank_zero(ranks: Mapping[str, int], where: str) -> None:
    """A factor pair of rank 0 is refused, as for plain LoRA: it holds no delta, and its scale ``alpha / 0`` is undefined."""
    zero = sorted(n for n, r in ranks.items() if r == 0)
    if zero:
        raise ShapeMismatchError(f"{where}: rank 0 in {zero}; a LyCORIS factor needs rank 1 or more. Fix: drop this module")


def _shape(t: torch.Tensor | None) -> list[int] | None:
    return None if t is None else list(t.shape)


RowSource = Callable[[int, int], torch.Tensor]


@attrs.frozen(repr=False)
class LoHa:
    """LyCORIS LoHa: ``delta = scale * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard product).

    Plain: ``w1_a``/``w2_a`` ``[out, r]``, ``w1_b``/``w2_b`` ``[r, in * k...]``.
    Tucker (``t1``, ``t2`` ``[r, r, k...]``): ``w*_a`` ``[r, out]``, ``w*_b``
    ``[r, in]``, each half ``einsum('ijk, jr, ip -> prk', t, w_b, w_a)``.
    ``scale = alpha / r`` with ``r = w1_b.shape[0]`` (LyCORIS, ComfyUI).
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.w1_a.shape[1] if self.t1 is not None else self.w1_a.shape[0])

    @property
    def columns(self) -> int:
        """Width of the flattened delta (``in * prod(kernel)``)."""
        k = math.prod(self.t1.shape[2:]) if self.t1 is not None else 1
        return int(self.w1_b.shape[1]) * k

    def validate(self, where: str) -> None:
        ws = (self.w1_a, self.w1_b, self.w2_a, self.w2_b)
        _need(all(w.dim() == 2 for w in ws), where, f"LoHa factors must be 2-D; found {[list(w.shape) for w in ws]}")
        _need((self.t1 is None) == (self.t2 is None), where, "a Tucker LoHa needs both hada_t1 and hada_t2")
        _no_rank_zero({"hada_w1_b": int(self.w1_b.shape[0]), "hada_w2_b": int(self.w2_b.shape[0])}, where)
        if self.t1 is None:
            _need(self.w1_a.shape[1] == self.w1_b.shape[0] and self.w2_a.shape[1] == self.w2_b.shape[0], where,
                  f"rank mismatch: hada_w1_a {list(self.w1_a.shape)} @ hada_w1_b {list(self.w1_b.shape)}, "
                  f"hada_w2_a {list(self.w2_a.shape)} @ hada_w2_b {list(self.w2_b.shape)}")
            halves = ((self.w1_a.shape[0], self.w1_b.shape[1]), (self.w2_a.shape[0], self.w2_b.shape[1]))
        else:
            assert self.t2 is not None
            _need(self.t1.dim() >= 2 and self.t1.shape[2:] == self.t2.shape[2:], where,
                  f"hada_t1 {list(self.t1.shape)} and hada_t2 {list(self.t2.shape)} must share their kernel dims")
            _need(tuple(self.t1.shape[:2]) == (self.w1_a.shape[0], self.w1_b.shape[0])
                  and tuple(self.t2.shape[:2]) == (self.w2_a.shape[0], self.w2_b.shape[0]), where,
                  f"Tucker ranks: hada_t1 {list(self.t1.shape)} with hada_w1_a {list(self.w1_a.shape)}, hada_w1_b "
                  f"{list(self.w1_b.shape)}; hada_t2 {list(self.t2.shape)} with hada_w2_a {list(self.w2_a.shape)}, "
                  f"hada_w2_b {list(self.w2_b.shape)}")
            halves = ((self.w1_a.shape[1], self.w1_b.shape[1]), (self.w2_a.shape[1], self.w2_b.shape[1]))
        _need(halves[0] == halves[1], where, f"the Hadamard halves have shapes {list(halves[0])} and {list(halves[1])}")
        _check_scale(self.scale, where)
        for name, t in zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"), self._all()):
            if t is not None:
                _check_finite(t, f"{where} {name}")
        if self.magnitude is not None:
            in_exact = self.t1 is not None
            _check_magnitude(self.magnitude, self.out_features, int(self.w1_b.shape[1]), in_exact, where)

    def _all(self) -> tuple[torch.Tensor | None, ...]:
        return (self.w1_a, self.w1_b, self.w2_a, self.w2_b, self.t1, self.t2)

    def fits(self, shape: tuple[int, ...]) -> bool:
        if len(shape) < 2 or shape[0] != self.out_features or not _fits_magnitude(self.magnitude, shape):
            return False
        if self.t1 is None:
            return self.w1_b.shape[1] == math.prod(shape[1:])
        return self.w1_b.shape[1] == shape[1] and tuple(self.t1.shape[2:]) == tuple(shape[2:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self._all() if t is not None] + ([self.magnitude] if self.magnitude is not None else [])

    def row_source(self, device: torch.device, keep_grad: bool = False) -> RowSource:
        """``rows(start, stop)``: rows of the unscaled delta, float32 ``[stop - start, columns]``, as LyCORIS computes them.

        ``keep_grad=True`` keeps the factors' autograd graph (the differentiable merge); otherwise they are detached."""
        w1a, w1b, w2a, w2b = (_f32(t, device, keep_grad) for t in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        if self.t1 is None:
            def rows(start: int, stop: int) -> torch.Tensor:
                return (w1a[start:stop] @ w1b) * (w2a[start:stop] @ w2b)
            return rows
        assert self.t2 is not None
        t1, t2 = _f32(self.t1, device, keep_grad), _f32(self.t2, device, keep_grad)

        def tucker_rows(start: int, stop: int) -> torch.Tensor:
            h1 = torch.einsum("i j ..., j r, i p -> p r ...", t1, w1b, w1a[:, start:stop])
            h2 = torch.einsum("i j ..., j r, i p -> p r ...", t2, w2b, w2a[:, start:stop])
            return (h1 * h2).reshape(stop - start, -1)
        return tucker_rows

    def __repr__(self) -> str:
        return f"LoHa(r={self.rank}{', tucker' if self.t1 is not None else ''}, scale={self.scale:g})"


@attrs.frozen(repr=False)
class LoKr:
    """LyCORIS LoKr: ``delta = scale * kron(W1, W2)``.

    ``W1`` is ``w1`` ``[a, c]`` or ``w1_a @ w1_b``; ``W2`` is ``w2``
    ``[b, d, k...]``, ``w2_a @ w2_b`` (``[b, d * k...]``) or, with ``t2``,
    ``einsum('ijk, ip, jr -> prk', t2, w2_a, w2_b)``. The weight is
    ``[a * b, c * d, k...]``. ``scale = alpha / r`` with ``r`` the rank of the
    factorized side (``w1_b.shape[0]``, else ``w2_b.shape[0]``); with both
    sides full, ``scale = 1`` whatever the alpha (LyCORIS, ComfyUI).
    """

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    dora_eps: float = 0.0

    @property
    def rank(self) -> int | None:
        """The rank of the factorized side; None when both sides are full matrices."""
        if self.w1_b is not None:
            return int(self.w1_b.shape[0])
        return int(self.w2_b.shape[0]) if self.w2_b is not None else None

    def _w1_shape(self) -> tuple[int, int]:
        if self.w1 is not None:
            return int(self.w1.shape[0]), int(self.w1.shape[1])
        assert self.w1_a is not None and self.w1_b is not None
        return int(self.w1_a.shape[0]), int(self.w1_b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        """W2's shape: ``[b, d, k...]`` (full or Tucker) or ``[b, d * k...]`` (plain factors)."""
        if self.w2 is not None:
            return tuple(int(x) for x in self.w2.shape)
        assert self.w2_a is not None and self.w2_b is not None
        if self.t2 is not None:
            return (int(self.w2_a.shape[1]), int(self.w2_b.shape[1]), *(int(x) for x in self.t2.shape[2:]))
        return (int(self.w2_a.shape[0]), int(self.w2_b.shape[1]))

    @property
    def out_features(self) -> int:
        return self._w1_shape()[0] * self._w2_shape()[0]

    @property
    def columns(self) -> int:
        return self._w1_shape()[1] * math.prod(self._w2_shape()[1:])

    def validate(self, where: str) -> None:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        present = {n: t for n, t in zip(names, self._all()) if t is not None}
        _need((self.w1 is None) != (self.w1_a is None and self.w1_b is None) and (self.w1_a is None) == (self.w1_b is None),
              where, f"LoKr needs lokr_w1, or lokr_w1_a with lokr_w1_b; found {sorted(present)}")
        _need((self.w2 is None) != (self.w2_a is None and self.w2_b is None) and (self.w2_a is None) == (self.w2_b is None),
              where, f"LoKr needs lokr_w2, or lokr_w2_a with lokr_w2_b; found {sorted(present)}")
        _need(self.t2 is None or self.w2 is None, where, "lokr_t2 goes with lokr_w2_a/lokr_w2_b, not with a full lokr_w2")
        _no_rank_zero({n: int(present[n].shape[0]) for n in ("lokr_w1_b", "lokr_w2_b") if n in present and present[n].dim()}, where)
        for n in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"):
            if n in present:
                _need(present[n].dim() == 2, where, f"{n} must be 2-D; found {list(present[n].shape)}")
        if self.w2 is not None:
            _need(self.w2.dim() >= 2, where, f"lokr_w2 must have at least 2 dims; found {list(self.w2.shape)}")
        if self.w1_a is not None:
            _need(self.w1_a.shape[1] == self.w1_b.shape[0], where,  # type: ignore[union-attr]
                  f"rank mismatch: lokr_w1_a {_shape(self.w1_a)} @ lokr_w1_b {_shape(self.w1_b)}")
        if self.w2_a is not None and self.t2 is None:
            _need(self.w2_a.shape[1] == self.w2_b.shape[0], where,  # type: ignore[union-attr]
                  f"rank mismatch: lokr_w2_a {_shape(self.w2_a)} @ lokr_w2_b {_shape(self.w2_b)}")
        if self.t2 is not None:
            _need(self.t2.dim() >= 2 and tuple(self.t2.shape[:2]) == (self.w2_a.shape[0], self.w2_b.shape[0]), where,  # type: ignore[union-attr]
                  f"Tucker ranks: lokr_t2 {list(self.t2.shape)} with lokr_w2_a {_shape(self.w2_a)}, lokr_w2_b {_shape(self.w2_b)}")
        _check_scale(self.scale, where)
        for n, t in present.items():
            _check_finite(t, f"{where} {n}")
        if self.magnitude is not None:
            w2 = self._w2_shape()  # [b, d, k...]: d input channels; [b, d * k...]: the input width is not known
            _check_magnitude(self.magnitude, self.out_features, self._w1_shape()[1] * w2[1], len(w2) > 2, where)

    def _all(self) -> tuple[torch.Tensor | None, ...]:
        return (self.w1, self.w1_a, self.w1_b, self.w2, self.w2_a, self.w2_b, self.t2)

    def fits(self, shape: tuple[int, ...]) -> bool:
        if len(shape) < 2 or shape[0] != self.out_features or not _fits_magnitude(self.magnitude, shape):
            return False
        c, w2 = self._w1_shape()[1], self._w2_shape()
        if len(w2) > 2:  # W2 keeps its kernel dims: kron(w1[..., None...], w2)
            return len(shape) == len(w2) and c * w2[1] == shape[1] and tuple(w2[2:]) == tuple(shape[2:])
        k = math.prod(shape[2:])
        return w2[1] % k == 0 and c * (w2[1] // k) == shape[1]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in self._all() if t is not None] + ([self.magnitude] if self.magnitude is not None else [])

    def row_source(self, device: torch.device, keep_grad: bool = False) -> RowSource:
        """``rows(start, stop)`` of the unscaled ``kron(W1, W2)`` flattened to ``[out, columns]``, float32.

        Row ``i`` is ``W1[i // b]`` (outer) ``W2[i % b]``: each element one
        product, as ``torch.kron`` makes it; only the tile's rows are built. ``keep_grad``: as for LoHa.
        """
        w1 = _f32(self.w1, device, keep_grad) if self.w1 is not None else _f32(self.w1_a, device, keep_grad) @ _f32(self.w1_b, device, keep_grad)  # type: ignore[arg-type]
        if self.w2 is not None:
            w2 = _f32(self.w2, device, keep_grad)
        elif self.t2 is not None:
            w2 = torch.einsum("i j ..., i p, j r -> p r ...", _f32(self.t2, device, keep_grad), _f32(self.w2_a, device, keep_grad), _f32(self.w2_b, device, keep_grad))  # type: ignore[arg-type]
        else:
            w2 = _f32(self.w2_a, device, keep_grad) @ _f32(self.w2_b, device, keep_grad)  # type: ignore[arg-type]
        b = w2.shape[0]
        w2 = w2.reshape(b, -1)

        def rows(start: int, stop: int) -> torch.Tensor:
            idx = torch.arange(start, stop, device=device)
            return (w1[idx // b].unsqueeze(2) * w2[idx % b].unsqueeze(1)).reshape(stop - start, -1)
        return rows

    def __repr__(self) -> str:
        return f"LoKr(r={self.rank}, scale={self.scale:g})"


def _check_scale(scale: float, where: str) -> None:
    if not math.isfinite(scale):
        raise NumericError(f"{where}: scale {scale} is not finite")


#: Deltas computed densely, tile by tile, from their factors.
GENERATED = (LoHa, LoKr)

Delta = LowRank | FullDelta | LoHa | LoKr
"""What an adapter holds for one target weight: a low-rank pair, a full delta (or replacement), or a LyCORIS LoHa / LoKr."""


class AdapterSummary(TypedDict):
    """:meth:`LoraAdapter.summary`: source format, target count, delta kinds counted, distinct ranks and scales."""

    format: str
    targets: int
    kinds: dict[str, int]
    ranks: list[int]
    scales: list[float]


class LoraAdapter(Mapping[str, Delta]):
    """An immutable adapter: base key (e.g. ``blocks.0.attn1.to_q.weight``) -> delta.

    Knows its ranks, alphas, source format and metadata, and ``report`` (a
    :class:`ResolutionReport`): how :func:`fvtransform.lora.load` resolved
    its file, what a non-strict load skipped (an adapter built in memory: its
    own targets, nothing skipped). A registered pytree (leaves: the factor
    tensors), so ``tree_map`` works on it.

    ``targets`` means one thing: the mapping key -> delta, given to the
    constructor and read back as ``adapter.targets`` (read-only), so
    ``LoraAdapter(a.targets) == a``. The target keys are ``list(adapter)``.

    >>> import torch
    >>> a = LoraAdapter({"w": LowRank(torch.zeros(2, 3), torch.zeros(4, 2), scale=0.5)})
    >>> a
    LoraAdapter(1 targets, ranks {2}, format 'memory')
    >>> a.ranks
    {'w': 2}
    >>> list(a), list(LoraAdapter(a.targets))
    (['w'], ['w'])
    """

    __slots__ = ("_targets", "format", "metadata", "report")
    _targets: types.MappingProxyType[str, Delta]
    format: str
    metadata: types.MappingProxyType[str, str]
    report: ResolutionReport

    def __init__(self, targets: Mapping[str, Delta], *, format: str = "memory", metadata: Mapping[str, str] | None = None,
                 report: ResolutionReport | None = None) -> None:
        if not isinstance(targets, Mapping):
            raise UsageError(
                f"LoraAdapter(targets) takes a mapping key -> delta (LowRank, FullDelta, LoHa, LoKr); found "
                f"{type(targets).__name__}. Build it as LoraAdapter({{key: LowRank(A, B, scale)}}), or copy one with "
                "LoraAdapter(adapter.targets); the target keys are list(adapter)"
            )
        data = dict(targets)
        for k, d in data.items():
            if not isinstance(d, (LowRank, FullDelta, LoHa, LoKr)):
                raise UsageError(f"adapter target {k!r}: expected LowRank, FullDelta, LoHa or LoKr, found {type(d).__name__}")
            d.validate(f"adapter target {k!r}")
        object.__setattr__(self, "_targets", types.MappingProxyType(data))
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(metadata or {})))
        object.__setattr__(self, "report", report if report is not None else ResolutionReport(format, targets={k: k for k in data}))

    def __setattr__(self, name: str, value: object) -> None:
        from fvtransform.errors import ImmutableError

        raise ImmutableError(f"LoraAdapter is immutable: cannot set {name!r}; build a new adapter")

    def __getitem__(self, key: str) -> Delta:
        return self._targets[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    @property
    def targets(self) -> types.MappingProxyType[str, Delta]:
        """The targets, key -> delta, as the constructor takes them (read-only); the keys are ``list(adapter)``."""
        return self._targets

    @property
    def ranks(self) -> dict[str, int]:
        return {k: d.rank for k, d in self._targets.items() if isinstance(d, (LowRank, LoHa, LoKr)) and d.rank is not None}

    @property
    def scales(self) -> dict[str, float]:
        return {k: d.scale for k, d in self._targets.items()}

    @property
    def alphas(self) -> dict[str, float | None]:
        return {k: d.alpha for k, d in self._targets.items() if isinstance(d, (LowRank, LoHa, LoKr))}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._targets.values() for t in d.tensors())

    def replace(self, targets: Mapping[str, Delta] | None = None, *, format: str | None = None,
                metadata: Mapping[str, str] | None = None) -> LoraAdapter:
        """A new adapter with ``targets``, ``format`` or ``metadata`` replaced (the report is kept while the targets are)."""
        return LoraAdapter(
            self._targets if targets is None else targets,
            format=self.format if format is None else format,
            metadata=self.metadata if metadata is None else metadata,
            report=self.report if targets is None else None,
        )

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        full = sum(isinstance(d, FullDelta) for d in self._targets.values())
        extra = f", {full} full deltas" if full else ""
        return f"LoraAdapter({len(self)} targets, ranks {set(ranks) if ranks else '{}'}{extra}, format {self.format!r})"

    def summary(self) -> AdapterSummary:
        kinds = Counter(type(d).__name__ for d in self._targets.values())
        return AdapterSummary({
            "format": self.format,
            "targets": len(self),
            "kinds": dict(kinds),
            "ranks": sorted(set(self.ranks.values())),
            "scales": sorted(set(self.scales.values())),
        })


_Spec = tuple[str, str, float, "float | None", float, bool, tuple[str, ...]]
"""One target's pytree context: key, kind ("lr", "LoHa", "LoKr", "full"), scale, alpha, dora_eps,
has-magnitude (LowRank) or replaces (FullDelta), the tensor fields (LoHa, LoKr)."""
_Context = tuple[tuple[_Spec, ...], str, tuple[tuple[str, str], ...], ResolutionReport]


def _flatten(a: LoraAdapter) -> tuple[list[torch.Tensor], _Context]:
    leaves: list[torch.Tensor] = []
    spec: list[_Spec] = []
    for k, d in a._targets.items():
        if isinstance(d, LowRank):
            leaves += [d.A, d.B] + ([d.magnitude] if d.magnitude is not None else [])
            spec.append((k, "lr", d.scale, d.alpha, d.dora_eps, d.magnitude is not None, ()))
        elif isinstance(d, (LoHa, LoKr)):
            fields = [f.name for f in attrs.fields(type(d)) if isinstance(getattr(d, f.name), torch.Tensor)]
            leaves += [getattr(d, f) for f in fields]
            spec.append((k, type(d).__name__, d.scale, d.alpha, d.dora_eps, False, tuple(fields)))
        else:
            leaves.append(d.D)
            spec.append((k, "full", d.scale, None, 0.0, d.replaces, ()))
    return leaves, (tuple(spec), a.format, tuple(a.metadata.items()), a.report)


def _unflatten(leaves: Iterable[torch.Tensor], ctx: _Context) -> LoraAdapter:
    spec, fmt, meta, report = ctx
    it = iter(list(leaves))
    out: dict[str, Delta] = {}
    for k, kind, scale, alpha, eps, flag, fields in spec:
        if kind == "lr":
            A, B = next(it), next(it)
            out[k] = LowRank(A, B, scale, alpha, next(it) if flag else None, eps)
        elif kind == "LoHa":
            out[k] = LoHa(**{f: next(it) for f in fields}, scale=scale, alpha=alpha, dora_eps=eps)
        elif kind == "LoKr":
            out[k] = LoKr(**{f: next(it) for f in fields}, scale=scale, alpha=alpha, dora_eps=eps)
        else:
            out[k] = FullDelta(next(it), scale, flag)
    adapter = object.__new__(LoraAdapter)
    object.__setattr__(adapter, "_targets", types.MappingProxyType(out))
    object.__setattr__(adapter, "format", fmt)
    object.__setattr__(adapter, "metadata", types.MappingProxyType(dict(meta)))
    object.__setattr__(adapter, "report", report)
    return adapter


_pytree.register_node(LoraAdapter, _flatten, _unflatten, name="fvtransform.lora.LoraAdapter")
