"""Merging adapters into trees: float32 accumulation, one rounding, row tiles.

For each targeted weight, the deltas of every adapter are summed in float32
(``W + sum_i s_i * B_i @ A_i``) over tiles of rows, and rounded once into the
weight's dtype. The contributions are put in a canonical order (by scale and
the factors' kinds, dtypes and shapes; a digest of the factors' bytes only
between contributions those facts cannot tell apart) before summing, so merging
a set of adapters gives the same bits whatever order the set is passed in.

The tiles are written in place into float32 buffers: the fast path, for plain
tensors that need no gradient. Where a weight or a factor needs one (it
requires grad under autograd, or is a ``torch.func`` wrapped tensor), that
target is merged out of place instead (:func:`delta_autograd`): the same
formula, order and single rounding, differentiable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import hashlib
import itertools
import math
from typing import Any, Union

import attrs
import torch

from fvtransform._messages import close_matches
from fvtransform.errors import FormatError, KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import GENERATED, Delta, FullDelta, LoraAdapter, LoHa, LoKr, LowRank
from fvtransform.lora._donate import check_donatable
from fvtransform.lora._functorch import concrete, is_wrapped
from fvtransform.lora._moved import moved_keywords
from fvtransform.lora._record import MergeRecord, _apply_correction, _Correction, _make_correction
from fvtransform.lora._dora import merge_dora, merge_dora_autograd, overflow_limit, overflows, unmerge_dora
from fvtransform.io._safetensors import _tensor_bytes
from fvtransform._fp8 import is_fp8
from fvtransform.lora._fp8_merge import (
    Fp8Options, check_scale_keys, check_scaled_plain, check_targets, fp8_options, merge_tree_key, record_fp8, refuse_kind,
)
from fvtransform.tree._paramtree import ParamTree

__all__ = ["merge", "merge_with_record", "unmerge", "restore", "normalize_adapters", "delta_rows", "delta_autograd", "needs_grad", "describe", "AdapterSet", "Workspace"]

AdapterSet = Union[LoraAdapter, Sequence[tuple[LoraAdapter, float]]]

#: Bytes of float32 work space per tile (the extra memory of a merge).
TILE_BYTES = 4 * 1024 * 1024  # tile buffers stay in a 32 MiB L3 cache


def normalize_adapters(adapters: AdapterSet, scale: float = 1.0) -> list[tuple[LoraAdapter, float]]:
    """``adapter`` or ``[(adapter, scale), ...]`` -> a list of pairs (global scale applied).

    One way to give a scale: pairs carry their own, so a ``scale`` other than 1 with pairs is a
    :class:`~fvtransform.errors.UsageError`, as is a scale that is not a number.
    """
    _check_scale(scale, "scale")
    if isinstance(adapters, LoraAdapter):
        return [(adapters, float(scale))]
    out = []
    for item in adapters:
        if isinstance(item, LoraAdapter):
            out.append((item, float(scale)))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], LoraAdapter):
            _check_scale(item[1], "a pair's scale")
            if scale != 1.0:
                raise UsageError(
                    f"two scales given: pairs [(adapter, {item[1]!r}), ...] and scale={scale!r}; give a scale one way. "
                    f"Put it in each pair, fvt.lora.merge(tree, [(adapter, {float(item[1]) * float(scale):g}), ...]), "
                    f"or pass one adapter and scale: fvt.lora.merge(tree, adapter, {scale!r})"
                )
            out.append((item[0], float(item[1])))
        else:
            raise UsageError(f"expected a LoraAdapter or (LoraAdapter, scale) pairs; found {type(item).__name__}")
    return out


def _check_scale(scale: object, what: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise UsageError(f"{what} must be a number; found {type(scale).__name__} {scale!r}. Pass it as a float, e.g. 0.5")


def check_tree_first(name: str, tree: object, second: object) -> None:
    """``fvt.lora.<name>(adapter, tree)``: the tree goes first; raise a :class:`UsageError` that shows the call."""
    if isinstance(tree, (LoraAdapter, MergeRecord)) or (not isinstance(tree, Mapping) and isinstance(second, Mapping)):
        what = "record" if isinstance(tree, MergeRecord) else "adapter"
        raise UsageError(
            f"fvt.lora.{name}(tree, {what}, ...) takes the tree first; found {type(tree).__name__} first. "
            f"Call fvt.lora.{name}(tree, {what})"
        )


def _digest(t: torch.Tensor) -> bytes:
    with torch._C._DisableFuncTorch():  # _tensor_bytes's own ops on the value must not be wrapped again
        return hashlib.blake2b(_tensor_bytes(concrete(t)), digest_size=16).digest()


def needs_grad(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any tensor needs the differentiable path: requires grad (with grad mode on) or is ``torch.func`` wrapped."""
    grad_mode = torch.is_grad_enabled()
    return any((grad_mode and t.requires_grad) or is_wrapped(t) for t in tensors)


def _accumulation_dtype(weight: torch.Tensor, contribs: list[_Contribution]) -> torch.dtype:
    """float32; float64 where the weight or a factor is float64 (so ``gradcheck`` in float64 sees float64 sums)."""
    dtypes = {weight.dtype, *(t.dtype for c in contribs for t in c.delta.tensors())}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def describe(d: Delta) -> str:
    """A delta's factor shapes, for messages."""
    if isinstance(d, LowRank):
        mag = f", magnitude {list(d.magnitude.shape)}" if d.magnitude is not None else ""
        return f"A {list(d.A.shape)}, B {list(d.B.shape)}{mag}"
    if isinstance(d, FullDelta):
        return f"{'replacement' if d.replaces else 'delta'} {list(d.D.shape)}"
    names = [f.name for f in attrs.fields(type(d)) if isinstance(getattr(d, f.name), torch.Tensor)]
    return f"{type(d).__name__} " + ", ".join(f"{n} {list(getattr(d, n).shape)}" for n in names)


@attrs.frozen
class _Contribution:
    scale: float  # effective: adapter scale * user scale
    delta: Delta
    order_key: tuple[Any, ...]  # cheap facts: scale, kind, factor dtypes and shapes (no pass over the bytes)


def _order_key(eff: float, d: Delta) -> tuple[Any, ...]:
    return (eff, type(d).__name__, tuple((str(t.dtype), tuple(t.shape)) for t in d.tensors()))


def _factor_digest(c: _Contribution) -> bytes:
    return b"".join(_digest(t) for t in c.delta.tensors())


def _canonical(contribs: list[_Contribution]) -> None:
    """Sort ``contribs`` into the canonical order, in place: by :func:`_order_key`; the factors' bytes are
    hashed only to order contributions whose keys tie (the order then depends on nothing but the values)."""
    contribs.sort(key=lambda c: c.order_key)
    ordered: list[_Contribution] = []
    for _, group in itertools.groupby(contribs, key=lambda c: c.order_key):
        tied = list(group)
        ordered.extend(sorted(tied, key=_factor_digest) if len(tied) > 1 else tied)
    contribs[:] = ordered


def _collect(tree: Mapping[str, torch.Tensor], pairs: list[tuple[LoraAdapter, float]]) -> dict[str, list[_Contribution]]:
    per_key: dict[str, list[_Contribution]] = {}
    missing: list[str] = []
    for adapter, s in pairs:
        for key, d in adapter.items():
            if key not in tree:
                missing.append(key)
                continue
            shape = tuple(tree[key].shape)
            if not d.fits(shape):
                raise ShapeMismatchError(f"adapter target {key!r}: {describe(d)} does not fit the weight {list(shape)}")
            eff = s * d.scale
            d = _drop_zero_ranks(d)
            per_key.setdefault(key, []).append(_Contribution(eff, d, _order_key(eff, d)))
    if missing:
        hints = {k: close_matches(k, tree) for k in missing[:5]}
        raise KeyMismatchError(
            f"adapter targets are not in the tree: {sorted(missing)[:12]}"
            + (f" (closest: {hints})" if any(hints.values()) else "")
            + ". Load the adapter with base= to resolve its names against the model."
        )
    for contribs in per_key.values():
        if len(contribs) > 1:
            _canonical(contribs)
    return per_key


def _drop_zero_ranks(d: Delta) -> Delta:
    """``d`` without the ranks whose A row and B column are both all zero (the padding of ``pad_rank``).

    They add exact zeros, but a longer product may be summed in another grouping (BLAS), a
    last-bits difference; dropped first, merging ``pad_rank(a, r)`` gives the bits of merging ``a``.
    DoRA targets are kept as they are.
    """
    if not isinstance(d, LowRank) or d.magnitude is not None or d.rank == 0 or is_wrapped(d.A) or is_wrapped(d.B):
        return d  # under torch.func (vmap: ranks zero in one member only) the ranks are kept: exact zeros either way
    used = _nonzero_rows(d.A.reshape(d.rank, -1), 1) | _nonzero_rows(d.B.reshape(d.B.shape[0], d.rank), 0)
    if bool(used.all()):
        return d
    keep = used.nonzero().flatten()
    return LowRank(d.A.index_select(0, keep), d.B.index_select(1, keep), d.scale, d.alpha)


#: The dtypes torch's ``aminmax`` takes on every device (not float8, not integers).
_AMINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _nonzero_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Which slices of ``t`` along the other axis hold a nonzero (NaN counts): one ``aminmax`` reduction, no
    full-size boolean temporary (``ne(0).any`` measured 4-100x slower on rank-32 factors)."""
    if t.dtype not in _AMINMAX_DTYPES or t.shape[dim] == 0:
        return t.ne(0).any(dim=dim)  # float8/integer factors (no aminmax kernel), or nothing to reduce (a 0-row weight)
    lo, hi = torch.aminmax(t, dim=dim)
    return (lo != 0) | (hi != 0)  # a NaN compares unequal to 0: kept


def _factors(contribs: list[_Contribution], device: torch.device, sign: float) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[float, torch.Tensor]]]:
    """Concatenated float32 factors (B scaled) for the low-rank parts, and the full deltas."""
    bs, as_, fulls = [], [], []
    for c in contribs:
        d = c.delta
        if isinstance(d, GENERATED):
            if d.magnitude is not None:
                raise FormatError("DoRA targets merge through fvt.lora.merge's DoRA path, not the linear one")
            continue  # computed per tile by delta_rows
        if isinstance(d, LowRank):
            if d.magnitude is not None:
                raise FormatError("DoRA targets merge through fvt.lora.merge's DoRA path, not the linear one")
            b = d.B.detach().to(device=device, dtype=torch.float32).reshape(d.B.shape[0], d.B.shape[1])
            bs.append(b * (sign * c.scale))
            as_.append(d.A.detach().to(device=device, dtype=torch.float32).reshape(d.A.shape[0], math.prod(d.A.shape[1:])))
        else:
            fulls.append((sign * c.scale, d.D))
    if not bs:
        return None, None, fulls
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0), fulls


class Workspace:
    """Float32 tile buffers per device, reused across the targets of one call.

    Allocating a fresh tile per row block costs page faults on every tile
    (large allocations come straight from the OS); buffers kept for the call
    do not. ``slot`` tells apart the buffers used at the same time.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def tile(self, device: torch.device, rows: int, cols: int, slot: int = 0) -> torch.Tensor:
        need = rows * cols
        buf = self._buffers.get((device, slot))
        if buf is None or buf.numel() < need:
            buf = torch.empty(max(need, TILE_BYTES // 4), dtype=torch.float32, device=device)
            self._buffers[(device, slot)] = buf
        return buf[:need].view(rows, cols)


def delta_rows(
    contribs: list[_Contribution],
    weight: torch.Tensor,
    *,
    sign: float = 1.0,
    out: torch.Tensor | None = None,
    work: Workspace | None = None,
    columns: tuple[int, int] | None = None,
    where: str = "merged weight",
) -> torch.Tensor:
    """``round(W + sign * sum deltas)`` computed in float32 tile by tile; writes into ``out`` if given.

    Each row tile is one fused ``addmm`` of the full width (``W + B @ A``):
    the bits of an element do not depend on which rows are computed with it.
    ``columns=(c0, c1)`` says ``weight`` holds only those columns of a 2-D
    weight whose full-width ``A`` the contributions carry (a column shard):
    the sum is made full width (other columns zero) and sliced, so the
    element bits equal an unsharded merge's (a product's bits can depend on
    its width, measured).

    LoHa and LoKr deltas are built tile by tile (only the tile's rows of the
    dense delta, in a second tile buffer), scaled and added as LyCORIS does
    (``W + (scale * delta)``). Each float32 tile is checked before it is
    rounded into the output: no NaN/Inf and nothing that rounds to Inf in the
    output dtype (one ``amax`` over a cached tile, not a pass over the model),
    unless a bound from the factors shows that no finite weight can overflow
    (then nothing is checked: the common case costs nothing).

    Raises:
        NumericError: the result is not finite in the output dtype (an fp16 overflow); ``where`` names the key.
    """
    rows = weight.shape[0]
    cols = math.prod(weight.shape[1:])  # not -1: a weight without rows has columns too
    flat_w = weight.detach().reshape(rows, cols)
    if out is None:
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
    flat_out = out.view(rows, cols)
    B, A, fulls = _factors(contribs, weight.device, sign)
    flat_fulls = [(s, D.detach().reshape(rows, cols)) for s, D in fulls]
    gens = [(sign * c.scale, c.delta.row_source(weight.device)) for c in contribs if isinstance(c.delta, GENERATED)]
    if gens and columns is not None:
        raise UsageError(f"{where}: LoHa/LoKr deltas do not merge into column shards; merge them before sharding")
    limit = overflow_limit(out.dtype)
    if limit is not None and weight.dtype.is_floating_point and torch.finfo(weight.dtype).max + _delta_bound(contribs) < limit:
        limit = None  # no finite weight plus these deltas can reach Inf: the per-tile check is skipped
    work = work if work is not None else Workspace()
    width = A.shape[1] if A is not None else cols
    tile = max(1, TILE_BYTES // max(1, width * 4))
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        if B is not None and A is not None and columns is not None:  # a column shard: the full-width sum, then its columns
            full = work.tile(weight.device, stop - start, width, slot=1)
            full.zero_()
            full[:, columns[0] : columns[1]].copy_(flat_w[start:stop])
            full.addmm_(B[start:stop], A)
            acc = full[:, columns[0] : columns[1]]
        else:
            acc = work.tile(weight.device, stop - start, cols)
            acc.copy_(flat_w[start:stop])
            if B is not None and A is not None:  # _factors gives both or neither
                acc.addmm_(B[start:stop], A)
        for s, D in flat_fulls:
            acc.add_(D[start:stop].to(device=acc.device, dtype=torch.float32), alpha=s)
        for s, rows_of in gens:
            acc.add_(rows_of(start, stop).mul_(s))
        if overflows(acc, limit):
            raise NumericError(
                f"{where}: the merged weight holds Inf/NaN in {out.dtype} (rows {start}:{stop}); the deltas overflow it "
                "(or the base already held Inf/NaN). Lower the scale or merge into a wider dtype (dtype=torch.float32)."
            )
        flat_out[start:stop].copy_(acc)
    return out


def _dense(d: Delta, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The unscaled delta of a LowRank / LoHa / LoKr ``d`` as ``[out, cols]`` in ``dtype``, keeping its graph."""
    if isinstance(d, LowRank):
        B = d.B.to(device=weight.device, dtype=dtype).reshape(d.B.shape[0], d.B.shape[1])
        return B @ d.A.to(device=weight.device, dtype=dtype).reshape(d.A.shape[0], math.prod(d.A.shape[1:]))
    assert isinstance(d, GENERATED)
    return d.row_source(weight.device, keep_grad=True)(0, weight.shape[0]).to(dtype)


def delta_autograd(contribs: list[_Contribution], weight: torch.Tensor, *, sign: float = 1.0, where: str = "merged weight") -> torch.Tensor:
    """:func:`delta_rows` out of place and differentiable: ``round(W + sign * sum deltas)`` for inputs that need grad.

    The same sum in the same order as the tiled path (one ``addmm`` of the concatenated low-rank
    factors, then full deltas, then LoHa/LoKr deltas), accumulated in float32 (float64 where an input is
    float64) and rounded once into the weight's dtype; nothing is written in place, so autograd and
    ``torch.func`` transforms (``grad``, ``vjp``, ``jacrev``) see every step. No tiling: the extra memory
    is the float32 weight (autograd keeps the factors anyway).

    Raises:
        NumericError: the result is not finite in the weight's dtype; ``where`` names the key.
    """
    dtype = _accumulation_dtype(weight, contribs)
    rows = weight.shape[0]
    acc = weight.reshape(rows, math.prod(weight.shape[1:])).to(dtype)
    low = [c for c in contribs if isinstance(c.delta, LowRank)]
    if low:
        if any(c.delta.magnitude is not None for c in low):
            raise FormatError("DoRA targets merge through fvt.lora.merge's DoRA path, not the linear one")
        bs = [c.delta.B.to(device=weight.device, dtype=dtype).reshape(c.delta.B.shape[0], c.delta.B.shape[1]) * (sign * c.scale)
              for c in low if isinstance(c.delta, LowRank)]
        as_ = [c.delta.A.to(device=weight.device, dtype=dtype).reshape(c.delta.A.shape[0], acc.shape[1]) for c in low
               if isinstance(c.delta, LowRank)]
        acc = torch.addmm(acc, torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    for c in contribs:
        if isinstance(c.delta, FullDelta):
            acc = acc.add(c.delta.D.to(device=weight.device, dtype=dtype).reshape(acc.shape), alpha=sign * c.scale)
    for c in contribs:
        if isinstance(c.delta, GENERATED):
            acc = acc + _dense(c.delta, weight, dtype) * (sign * c.scale)
    if overflows(concrete(acc), overflow_limit(weight.dtype)):
        raise NumericError(
            f"{where}: the merged weight holds Inf/NaN in {weight.dtype}; the deltas overflow it "
            "(or the base already held Inf/NaN). Lower the scale or merge into a wider dtype (dtype=torch.float32)."
        )
    return acc.to(weight.dtype).reshape(weight.shape)


def _delta_bound(contribs: list[_Contribution]) -> float:
    """An upper bound of ``|sum s * delta|`` per element, from the factors (inf where none is cheap: LoHa/LoKr).

    ``|s B A|_ij <= |s| * rank * max |B| * max |A|``: loose, but two ``aminmax`` passes over the factors
    (no float64 copy, no ``abs`` copy), and enough to skip the per-tile check where the output dtype's
    range is far beyond any weight plus delta (bfloat16, float32).
    """
    total = 0.0
    for c in contribs:
        d = c.delta
        if isinstance(d, LowRank) and d.A.numel() and d.B.numel():
            total += abs(c.scale) * d.rank * _max_abs(d.B) * _max_abs(d.A)
        elif isinstance(d, FullDelta) and d.D.numel():
            total += abs(c.scale) * _max_abs(d.D)
        elif not isinstance(d, (LowRank, FullDelta)):
            return float("inf")
    return total * (1 + 1e-6)  # the float64 products above round; the margin keeps the bound above


def _max_abs(t: torch.Tensor) -> float:
    """``max |t|`` (NaN -> nan, so no comparison with it proves anything)."""
    t = t.detach()
    if t.dtype not in _AMINMAX_DTYPES:  # float8 factors: no aminmax kernel
        t = t.float()
    lo, hi = torch.aminmax(t)
    return max(-float(lo), float(hi)) if not (math.isnan(float(lo)) or math.isnan(float(hi))) else math.nan


@moved_keywords(return_record="fvt.lora.merge_with_record(tree, adapters, scale) -> (merged, record)")
def merge(
    tree: Mapping[str, torch.Tensor],
    adapters: AdapterSet,
    scale: float = 1.0,
    *,
    donate: bool = False,
    fp8_scale: str = "keep",
    rounding: str = "nearest",
    seed: int | None = None,
    saturate: bool = False,
) -> ParamTree:
    """Merge one adapter, or a set ``[(adapter, scale), ...]``, into a tree.

    Returns a new tree: targeted weights are ``round(W + sum s * B @ A)``
    computed in float32 over row tiles (extra memory: one tile) and rounded
    once into the weight's dtype; untouched tensors are shared by identity and
    the input is not mutated. The result does not depend on the order of the
    set, bit for bit. :func:`merge_with_record` also returns the record that
    :func:`restore` uses to give back the original bits.

    Donation (``donate=True``), as in JAX: the caller gives up ``tree``, and its
    targeted tensors are consumed: the merged weights are written into their
    storage (no second copy of the model). Any other tree or module that holds
    those tensors sees the merged values, e.g. the parent a tree was derived
    from with ``fvt.select``, or the module ``ParamTree.from_module`` read.
    Donate only a tree nothing else uses. What the merge can see it refuses
    (:class:`~fvtransform.errors.UsageError`): a targeted tensor that is
    tied to other keys (``tree.aliases()``) or shares its storage with another
    key (views of one buffer).

    Float8 targets (plain, or scaled with ``<module>.scale_weight``) are
    dequantised per tile in float32, merged and quantised back once to their
    float8 dtype: with the existing scale (``fp8_scale="keep"``) or a new amax
    scale (``"recompute"``, the scale key updated); to nearest, or
    ``rounding="stochastic"`` with ``seed=`` (deterministic per seed and key).
    A result beyond the float8 range is a :class:`~fvtransform.errors.NumericError`
    unless ``saturate=True`` clamps it. These options apply to float8 targets only.

    >>> import torch, fvtransform as fvt
    >>> from fvtransform.lora import LoraAdapter, LowRank
    >>> tree = fvt.ParamTree({"w": torch.zeros(2, 2), "b": torch.zeros(2)})
    >>> a = LoraAdapter({"w": LowRank(torch.ones(1, 2), torch.ones(2, 1), scale=0.5)})
    >>> fvt.lora.merge(tree, a)["w"]
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])
    >>> fvt.lora.merge(tree, a)["b"] is tree["b"]
    True
    """
    fp8 = fp8_options(fp8_scale, rounding, seed, saturate)
    return _merge(tree, adapters, scale, donate=donate, record=False, fp8=fp8)[0]


merge.__fvt_eager__ = "lora.merge"  # type: ignore[attr-defined]


def merge_with_record(
    tree: Mapping[str, torch.Tensor],
    adapters: AdapterSet,
    scale: float = 1.0,
    *,
    fp8_scale: str = "keep",
    rounding: str = "nearest",
    seed: int | None = None,
    saturate: bool = False,
) -> tuple[ParamTree, MergeRecord]:
    """:func:`merge`, and the :class:`MergeRecord` that :func:`restore` uses to give back the original bits.

    The record needs the original weights, so nothing is donated. For float8
    targets the record holds the bit steps back to the original bytes (and
    scale), so :func:`restore` is exact without rounding again.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.randn(4, 3), "l.bias": torch.zeros(4)})
    >>> adapter = fvt.lora.random_adapter(tree, targets="*.weight", rank=2)
    >>> merged, record = fvt.lora.merge_with_record(tree, adapter)
    >>> fvt.lora.restore(merged, record) == tree
    True
    """
    fp8 = fp8_options(fp8_scale, rounding, seed, saturate)
    merged, record = _merge(tree, adapters, scale, donate=False, record=True, fp8=fp8)
    assert record is not None
    return merged, record


def _merge(tree: Mapping[str, torch.Tensor], adapters: AdapterSet, scale: float, *, donate: bool,
           record: bool, fp8: Fp8Options = Fp8Options()) -> tuple[ParamTree, MergeRecord | None]:
    check_tree_first("merge_with_record" if record else "merge", tree, adapters)
    base = tree if isinstance(tree, ParamTree) else ParamTree(tree)
    pairs = normalize_adapters(adapters, scale)
    per_key = _collect(base, pairs)
    if donate:
        check_donatable(base, per_key)
    out = dict(base.items())
    corrections: dict[str, _Correction] = {}
    digests: dict[str, bytes] = {}
    target_bytes = 0
    work = Workspace()
    norms: dict[str, torch.Tensor] = {}
    fp8_keys = [k for k in per_key if is_fp8(base[k].dtype)]
    check_targets(fp8_keys, fp8, "fvt.lora.merge")
    if fp8_keys:
        check_scale_keys(base, "merge")
    direct: set[str] = set()
    for key, contribs in per_key.items():
        w = base[key]
        if key in fp8_keys:  # dequantise per tile, add, quantise back once (lora/_fp8_merge.py)
            refuse_kind(contribs, key, needs_grad([w, *(t for c in contribs for t in c.delta.tensors())]), _is_dtensor(w))
            out[key], scales = merge_tree_key(base, key, contribs, fp8, donate=donate, work=work)
            if record:
                target_bytes += record_fp8(base, key, out[key], scales, corrections, digests, direct)
            out.update(scales)
            continue
        check_scaled_plain(base, key)  # a scale beside a weight that is not float8; a float8 dtype not read
        dora = _is_dora(contribs)
        replace = _is_replace(key, contribs)
        if _is_dtensor(w):
            if replace:
                raise UsageError(f"{key!r}: full replacements (modules_to_save) are not merged into sharded (DTensor) weights; unshard first")
            if record:
                raise UsageError(f"{key!r}: merge_with_record is not available for sharded (DTensor) weights; unshard first, "
                                  "or call fvt.lora.merge and undo it with fvt.lora.unmerge")
            out[key] = _merge_sharded(key, contribs, w, sign=1.0, donate=donate, work=work)
            continue
        grad = needs_grad([w, *(t for c in contribs for t in c.delta.tensors())])
        if replace:
            full = contribs[0].delta
            assert isinstance(full, FullDelta)  # _is_replace: a replacing FullDelta, alone on its key
            new = (full.D if grad else full.D.detach()).to(device=w.device, dtype=w.dtype).clone()
        elif dora and grad:
            d = contribs[0].delta
            assert not isinstance(d, FullDelta)  # _is_dora: a delta with a magnitude
            new, norms[key] = merge_dora_autograd(w, contribs, _dense(d, w, _accumulation_dtype(w, contribs)), where=f"{key!r}")
        elif dora:
            new, norms[key] = merge_dora(w, contribs, where=f"{key!r}")
        elif grad:
            new = delta_autograd(contribs, w, where=f"{key!r}")
        else:
            writable = donate and w.is_contiguous() and not getattr(w, "requires_grad", False)
            new = delta_rows(contribs, w, out=w.detach() if writable else None, work=work, where=f"{key!r}")
        if record:
            value = concrete(new)
            back = (value if replace else unmerge_dora(value, contribs, norms[key], where=f"{key!r}") if dora
                    else delta_rows(contribs, value, sign=-1.0, work=work, where=f"{key!r}"))
            corrections[key] = _make_correction(concrete(w), back)
            digests[key] = _digest(value)
            target_bytes += w.numel() * w.element_size()
        out[key] = new
    # keep tied weights tied: every alias of a merged tensor gets the merged tensor
    merged = ParamTree._wrap(_retie(base, out, per_key))
    if record:
        return merged, MergeRecord(tuple(pairs), corrections, digests, target_bytes, norms, frozenset(direct))
    return merged, None


def _is_dtensor(t: Any) -> bool:
    """A DTensor, told without importing torch.distributed.tensor (0.4 s) where none is used."""
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def _is_dora(contribs: list[_Contribution]) -> bool:
    return any(not isinstance(c.delta, FullDelta) and c.delta.magnitude is not None for c in contribs)


def _merge_sharded(key: str, contribs: list[_Contribution], w: Any, *, sign: float, donate: bool, work: Workspace) -> Any:
    """merge_sharded, with LoHa/LoKr refused up front and numeric errors naming the key."""
    from fvtransform.lora._sharded import merge_sharded

    if any(isinstance(c.delta, (LoHa, LoKr)) for c in contribs):
        raise UsageError(f"{key!r}: LoHa/LoKr deltas are merged before sharding (fvt.lora.merge on the full weight, then shard)")
    try:
        return merge_sharded(contribs, w, sign=sign, donate=donate, work=work)
    except NumericError as e:
        raise NumericError(f"{key!r}: {e}") from None


def _is_replace(key: str, contribs: list[_Contribution]) -> bool:
    """A PEFT ``modules_to_save`` replacement: alone on its weight, at scale 1 (as peft's merge_and_unload)."""
    if not any(isinstance(c.delta, FullDelta) and c.delta.replaces for c in contribs):
        return False
    if len(contribs) != 1:
        raise UsageError(f"{key!r}: a full replacement (modules_to_save) cannot be merged together with other deltas on that weight")
    if contribs[0].scale != 1.0:
        raise UsageError(f"{key!r}: a full replacement (modules_to_save) is applied whole; merge it with scale 1, not {contribs[0].scale:g}")
    return True


def _retie(base: ParamTree, out: dict[str, torch.Tensor], changed: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if not base.aliases():
        return out
    new_of = {id(base[k]): out[k] for k in changed}
    return {k: new_of.get(id(base[k]), v) if k not in changed else v for k, v in out.items()}


def unmerge(
    tree: Mapping[str, torch.Tensor],
    adapters: AdapterSet,
    scale: float = 1.0,
    *,
    donate: bool = False,
) -> ParamTree:
    """Subtract adapters from a tree merged elsewhere: ``round(W' - sum s * B @ A)`` in float32.

    The error against the pre-merge weights is at most one unit in the last
    place of the larger of ``|W|`` and ``|W'|``. For the exact original, use
    the record of :func:`merge_with_record` with :func:`restore`. ``donate=True`` means what it means
    for :func:`merge` (the donated tensors are consumed) and is refused on the same shared tensors.
    """
    check_tree_first("unmerge", tree, adapters)
    base = tree if isinstance(tree, ParamTree) else ParamTree(tree)
    pairs = normalize_adapters(adapters, scale)
    per_key = _collect(base, pairs)
    if donate:
        check_donatable(base, per_key)
    out = dict(base.items())
    work = Workspace()
    for key, contribs in per_key.items():
        w = base[key]
        if is_fp8(w.dtype):
            raise UsageError(f"{key!r} is {w.dtype}: an arithmetic unmerge rounds to float8 again and loses up to one float8 "
                             "step per element; undo a float8 merge exactly with merged, record = fvt.lora.merge_with_record(...) "
                             "and fvt.lora.restore(merged, record)")
        if _is_dora(contribs):
            raise UsageError(f"{key!r}: DoRA merges are undone with the record of fvt.lora.merge_with_record")
        if _is_replace(key, contribs):
            raise UsageError(f"{key!r}: full-replacement (modules_to_save) merges are undone with the record of fvt.lora.merge_with_record")
        if _is_dtensor(w):
            out[key] = _merge_sharded(key, contribs, w, sign=-1.0, donate=donate, work=work)
            continue
        if needs_grad([w, *(t for c in contribs for t in c.delta.tensors())]):
            out[key] = delta_autograd(contribs, w, sign=-1.0, where=f"{key!r}")
            continue
        writable = donate and w.is_contiguous()
        out[key] = delta_rows(contribs, w, sign=-1.0, out=w.detach() if writable else None, work=work, where=f"{key!r}")
    return ParamTree._wrap(_retie(base, out, per_key))


unmerge.__fvt_eager__ = "lora.unmerge"  # type: ignore[attr-defined]


def restore(tree: Mapping[str, torch.Tensor], record: MergeRecord) -> ParamTree:
    """The tree as it was before the merge that made ``record``, bit for bit.

    ``tree`` must hold the merged weights that merge returned (checked by a
    digest); other keys pass through untouched.
    """
    check_tree_first("restore", tree, record)
    base = tree if isinstance(tree, ParamTree) else ParamTree(tree)
    per_key = _collect(base, list(record.pairs))
    out = dict(base.items())
    work = Workspace()
    for key, contribs in per_key.items():
        if _digest(base[key]) != record.merged_digest[key]:
            raise UsageError(
                f"restore: {key!r} is not the merged weight this record was made for; "
                "restore takes the tree that fvt.lora.merge_with_record returned"
            )
        if _is_replace(key, contribs) or key in record.direct:
            back = base[key]  # the correction holds the bit steps back from the merged bytes
        elif key in record.dora_norms:
            back = unmerge_dora(base[key], contribs, record.dora_norms[key], where=f"{key!r}")
        else:
            back = delta_rows(contribs, base[key], sign=-1.0, work=work, where=f"{key!r}")
        out[key] = _apply_correction(back, record.corrections[key])
    for key in sorted(record.direct - set(per_key)):  # a recomputed float8 scale
        if key not in base or _digest(base[key]) != record.merged_digest[key]:
            raise UsageError(f"restore: {key!r} is not the merged scale this record was made for; "
                             "restore takes the tree that fvt.lora.merge_with_record returned")
        out[key] = _apply_correction(base[key], record.corrections[key])
    return ParamTree._wrap(_retie(base, out, {**per_key, **dict.fromkeys(record.direct)}))


restore.__fvt_eager__ = "lora.restore"  # type: ignore[attr-defined]
