"""Merging adapters into float8 weights, plain or scaled (private; used by merge, merge_with_record and merge_checkpoint).

Per row tile: dequantise the float8 weight to float32 (``w * scale``, :func:`fvtransform._fp8.dequantize_tensor`),
add ``sum s * B @ A`` in float32 (the same factors and order as :func:`fvtransform.lora._merge.delta_rows`),
and quantise back ONCE to the weight's float8 dtype (:func:`fvtransform._fp8.quantize_tensor`), dividing by

* the existing ``<module>.scale_weight`` (``fp8_scale="keep"``, the default: the file stays compatible with
  every reader of the scaled layout), or
* a recomputed amax scale (``fp8_scale="recompute"``: a first pass over the tiles finds ``max |W' |``, the second
  quantises; the scale key is updated, in its own dtype and shape).

``rounding="stochastic"`` rounds up with probability equal to the distance from the float8 value below (unbiased
to 2**-16 of a step), from a ``torch.Generator`` seeded per key with ``blake2b(seed, key)``: the draws of a key do not depend on the other
keys, their order or threads; within a key they are consumed in row tiles whose size depends on the row width only,
so the in-memory merge and the disk-to-disk merge give the same bytes per seed (on one device kind: CUDA and CPU
generators differ). ComfyUI seeds each key with ``string_to_seed(key)`` (comfy/model_patcher.py) and draws its own
uniforms (comfy/float.py), so its stochastic bytes are not ours; its result and ours are each one of the same two
float8 neighbours of the float32 sum (tests/fixtures/fp8_merge). A value beyond the float8 maximum but below
``max + ulp/2`` rounds to the maximum (as to nearest); beyond that it is a NumericError unless ``saturate``.

An arithmetic unmerge from float8 is refused: subtracting the delta and rounding again loses up to one float8 step
(12.5% relative for e4m3fn) per element and never lands back on the original in general. The record of
``merge_with_record`` restores the original bytes (and scale) exactly.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import torch

from fvtransform._fp8 import (
    SCALE_DTYPES, SCALE_SHAPES, Fp8Overflow, amax_scale, dequantize_into, dequantize_tensor, fp8_max, is_fp8, is_other_float8, largest_code, nonfinite_count,
    quantize_tensor, scale_key, split_layout, weight_key_of,
)
from fvtransform.errors import FormatError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._adapter import GENERATED, FullDelta

__all__ = [
    "Fp8Options", "fp8_options", "scale_key_of", "check_scale", "check_scale_keys", "key_seed", "merge_fp8",
    "check_targets", "refuse_kind", "FP8_SCALES", "ROUNDINGS", "merge_tree_key", "check_scaled_plain", "record_fp8",
    "Fp8Plan", "rounding_limit", "refuse_other_float8",
]

#: The workspace slot of the int16 scratch of :func:`fvtransform._fp8.dequantize_into` (slot 1 is delta_rows').
_SCRATCH = 3

#: ``fp8_scale=`` values: what happens to a scaled weight's scale.
FP8_SCALES = ("keep", "recompute")
#: ``rounding=`` values: how the float32 sum is rounded to float8.
ROUNDINGS = ("nearest", "stochastic")


@attrs.frozen
class Fp8Options:
    """How a merge writes float8 targets (checked by :func:`fp8_options`)."""

    fp8_scale: str = "keep"
    rounding: str = "nearest"
    seed: int = 0
    saturate: bool = False

    @property
    def default(self) -> bool:
        return self == Fp8Options()


def fp8_options(fp8_scale: str = "keep", rounding: str = "nearest", seed: int | None = None, saturate: bool = False) -> Fp8Options:
    """The checked float8 merge options.

    Raises:
        UsageError: an unknown ``fp8_scale`` or ``rounding``, a seed that is not a nonnegative int, a ``seed``
            with ``rounding="nearest"`` (it would be ignored), a ``saturate`` that is not a bool.
    """
    if fp8_scale not in FP8_SCALES:
        raise UsageError(f"fp8_scale={fp8_scale!r}: expected one of {list(FP8_SCALES)} ('keep' keeps each scale_weight, "
                         "'recompute' sets it from the merged weight's amax)")
    if rounding not in ROUNDINGS:
        raise UsageError(f"rounding={rounding!r}: expected one of {list(ROUNDINGS)}, e.g. rounding='stochastic', seed=0")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"seed={seed!r}: expected a nonnegative int, e.g. seed=0")
    if seed is not None and rounding == "nearest":
        raise UsageError(f"seed={seed!r} is used by stochastic rounding only; pass rounding='stochastic', seed={seed!r} "
                         "(or drop seed= for rounding to nearest)")
    if not isinstance(saturate, bool):
        raise UsageError(f"saturate={saturate!r}: expected True or False")
    return Fp8Options(fp8_scale, rounding, 0 if seed is None else seed, saturate)


def scale_key_of(weight_key: str) -> str | None:
    """``<module>.weight`` -> ``<module>.scale_weight`` (:func:`fvtransform._fp8.scale_key`); None for another key."""
    try:
        return scale_key(weight_key)
    except ValueError:
        return None


def check_scale_keys(keys: Iterable[str], where: str) -> None:
    """Refuse a ``<module>.scale_weight`` (or ``scale_input``) without its ``<module>.weight``.

    Raises:
        FormatError: naming the scale key and the missing weight.
    """
    orphans = split_layout(keys).orphans
    if orphans:
        k = orphans[0]
        weight = weight_key_of(k)
        raise FormatError(f"{where}: scale key {k!r} has no weight {weight!r}; a scaled-float8 checkpoint holds "
                          f"each scale beside its weight (stray scales: {list(orphans)[:8]}). Fix the checkpoint "
                          "(drop the stray scale or restore the weight)")


def check_scale(scale: torch.Tensor, key: str, where: str) -> None:
    """A per-tensor scale: one element, floating (not float8), finite and positive.

    Raises:
        FormatError: a wrong shape or dtype (naming the key, expected and found).
        NumericError: NaN, Inf, zero or negative.
    """
    if tuple(scale.shape) not in SCALE_SHAPES:
        raise FormatError(f"{where}: scale {key!r} has shape {list(scale.shape)}; expected one element (shape [] or [1]), "
                          "a per-tensor scale. Per-channel or block scales are not the scaled-float8 layout")
    if scale.dtype not in SCALE_DTYPES:
        raise FormatError(f"{where}: scale {key!r} is {scale.dtype}; expected one of {[str(d) for d in SCALE_DTYPES]}. "
                          "Rewrite it as float32")
    value = float(scale.detach().reshape(()).float())
    if not math.isfinite(value) or value <= 0:
        raise NumericError(f"{where}: scale {key!r} is {value}; expected a finite positive scale. "
                           "The checkpoint is damaged: re-quantise the weight (fvt.quantize_fp8)")


def key_seed(seed: int, key: str) -> int:
    """The generator seed of ``key``: 63 bits of ``blake2b(f"{seed}\\0{key}")`` (independent of key order and threads)."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def check_targets(fp8_keys: list[str], options: Fp8Options, what: str) -> None:
    """Refuse float8 options where no target is float8 (they would be ignored).

    Raises:
        UsageError: non-default float8 options and no float8 target.
    """
    if not fp8_keys and not options.default:
        raise UsageError(f"{what}: fp8_scale=, rounding=, seed= and saturate= apply to float8 weights, and no targeted "
                         "weight is float8; drop those options")


def refuse_kind(contribs: list, key: str, grad: bool, sharded: bool) -> None:
    """Refuse what the float8 merge does not do: DoRA, full replacements, autograd, DTensor shards.

    Raises:
        UsageError: naming the key and the way that works.
    """
    why = ("a DTensor (sharded) weight" if sharded else "a weight or factor that needs grad" if grad
           else "a DoRA adapter" if any(not isinstance(c.delta, FullDelta) and c.delta.magnitude is not None for c in contribs)
           else "a full replacement (modules_to_save)" if any(isinstance(c.delta, FullDelta) and c.delta.replaces for c in contribs)
           else None)
    if why is not None:
        raise UsageError(f"{key!r} is float8 and this merge has {why}, which merges into float8 only after "
                         "dequantising: fvt.dequantize(tree), merge, then fvt.quantize_fp8")


def _factors(contribs: list, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[float, torch.Tensor]]]:
    from fvtransform.lora._merge import _factors as factors

    return factors(contribs, device, 1.0)


def merge_fp8(
    contribs: list,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    options: Fp8Options,
    *,
    key: str,
    where: str,
    out: torch.Tensor | None = None,
    work: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` (float8) merged with ``contribs``: the new float8 weight, and the new scale (None: unchanged).

    Raises:
        UsageError: ``fp8_scale="recompute"`` on a plain float8 weight (no scale key to update).
        NumericError: a merged value beyond the float8 range (after the scale) without ``saturate``, or NaN/Inf.
    """
    from fvtransform.lora._merge import TILE_BYTES, Workspace

    dtype = weight.dtype
    if options.fp8_scale == "recompute" and scale is None:
        raise UsageError(f"{where}: fp8_scale='recompute' updates a scale_weight, and this float8 weight has none (plain "
                         "layout). Use fp8_scale='keep', or quantise to the scaled layout first (fvt.quantize_fp8)")
    ws = work if isinstance(work, Workspace) else Workspace()
    rows = weight.shape[0] if weight.dim() else 1
    flat_w = weight.detach().reshape(rows, -1)
    cols = flat_w.shape[1]
    device = weight.device
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=device)
    flat_out = out.view(rows, -1)
    s32 = None if scale is None else scale.detach().reshape(()).to(device=device, dtype=torch.float32)  # dequantises
    B, A, fulls = _factors(contribs, device)
    flat_fulls = [(s, D.detach().reshape(rows, -1)) for s, D in fulls]
    gens = [(c.scale, c.delta.row_source(device)) for c in contribs if isinstance(c.delta, GENERATED)]
    tile = max(1, TILE_BYTES // max(1, cols * 4))
    fast = device.type == "cpu"
    detached = weight.detach()
    base_bad = nonfinite_count(detached)  # one scan of the bytes, not one per tile
    check = not fast or base_bad > 0
    in_range = not base_bad and options.fp8_scale == "keep" and _proved_in_range(detached, s32, contribs)

    def values(start: int, stop: int) -> torch.Tensor:
        acc = ws.tile(device, stop - start, cols)
        if fast:  # through float16 bits: the bits of dequantize_tensor, without torch's slow float8 upcast
            scratch = ws.tile(device, 1, ((stop - start) * cols + 1) // 2, slot=_SCRATCH).view(-1).view(torch.int16)
            dequantize_into(flat_w[start:stop], s32, acc, scratch, check=check)
        else:
            acc.copy_(dequantize_tensor(flat_w[start:stop], s32, torch.float32))  # always the weight's own scale
        if B is not None and A is not None:
            acc.addmm_(B[start:stop], A)
        for s, D in flat_fulls:
            acc.add_(D[start:stop].to(device=device, dtype=torch.float32), alpha=s)
        for s, rows_of in gens:
            acc.add_(rows_of(start, stop).mul_(s))
        return acc

    new_scale = None
    if options.fp8_scale == "recompute":
        assert scale is not None
        peaks = []
        for start in range(0, rows, tile):
            acc = values(start, min(rows, start + tile))
            peak = acc.abs().amax() if acc.numel() else torch.zeros((), device=device)
            if not bool(torch.isfinite(peak)):
                raise NumericError(_nonfinite_message(where, start, min(rows, start + tile), base_bad))
            peaks.append(peak)
        new_scale = _stored_scale(amax_scale(torch.stack(peaks), dtype), scale, dtype, torch.stack(peaks).amax())
    q32 = s32 if new_scale is None else new_scale.reshape(()).to(device=device, dtype=torch.float32)  # quantises
    generator = None
    if options.rounding == "stochastic":
        generator = torch.Generator(device=device)
        generator.manual_seed(key_seed(options.seed, key))
    for start in range(0, rows, tile):
        stop = min(rows, start + tile)
        acc = values(start, stop)
        if q32 is not None:  # quantize_tensor's division by the scale (float32, IEEE), in place in the tile buffer
            acc.div_(q32)
        try:
            _quantize(acc, dtype, None, generator, options.saturate, out=flat_out[start:stop], in_range=in_range)
        except Fp8Overflow as e:
            if math.isnan(e.largest) or (math.isinf(e.largest) and not bool(torch.isfinite(values(start, stop)).all())):
                raise NumericError(_nonfinite_message(where, start, stop, base_bad)) from None
            after = "" if q32 is None else f" after dividing by the scale {float(q32):g}"
            raise NumericError(
                f"{where}: the merged weight overflows {dtype}: largest magnitude {e.largest:g}{after} exceeds its range "
                f"±{e.limit:g} (rows {start}:{stop}). Lower the LoRA scale, pass fp8_scale='recompute' (a new scale_weight), "
                "or saturate=True to clamp to the float8 range"
            ) from None
    return out, new_scale


def _nonfinite_message(where: str, start: int, stop: int, base_bad: int) -> str:
    """What a NaN/Inf in the merged rows means: the float8 base holds NaN/Inf codes, or the adapter's factors do."""
    if base_bad:
        return (f"{where}: the float8 base weight holds {base_bad} NaN/Inf value(s) (rows {start}:{stop} merged to "
                "NaN/Inf); the checkpoint is damaged. Fix: re-export it from its full-precision source")
    return (f"{where}: the merged weight holds NaN/Inf (rows {start}:{stop}) and the float8 base is finite: the adapter's "
            "factors hold NaN/Inf or overflow float32. Fix: check the LoRA (torch.isfinite on its lora_A / lora_B "
            "tensors) or lower its scale")


def refuse_other_float8(key: str, dtype: torch.dtype, where: str) -> None:
    """Refuse a merge into a float8 dtype fvtransform does not read (``float8_e4m3fnuz``, ...).

    Raises:
        FormatError: naming the key, its dtype and the dtypes that merge.
    """
    if is_other_float8(dtype):
        raise FormatError(f"{where}: {key!r} is {str(dtype).removeprefix('torch.')}, a float8 dtype fvtransform does not "
                          "merge into (expected float8_e4m3fn or float8_e5m2, or a full-precision weight). Fix: convert "
                          "the weight to one of those first")


def rounding_limit(dtype: torch.dtype) -> float:
    """The smallest magnitude that does not round to the largest float8 value: ``max + ulp(max) / 2`` (464 for
    e4m3fn, 61440 for e5m2) — below it, a value beyond ``max`` rounds to ``max`` (a rounding, not an overflow;
    the same limit as ``lora/_dora.overflow_limit`` for float16)."""
    fi = torch.finfo(dtype)
    return float(fi.max) + float(fi.eps) * 2.0 ** math.floor(math.log2(float(fi.max))) / 2


def _proved_in_range(weight: torch.Tensor, scale: torch.Tensor | None, contribs: list) -> bool:
    """Whether no merged value can leave the float8 range: ``(max|W| + bound of |sum s * delta|) / scale`` within it,
    with a margin for float32's roundings (then the per-tile range check is skipped: a LoRA well inside the range
    costs no pass; a base whose largest value sits at the float8 maximum is checked tile by tile)."""
    from fvtransform.lora._merge import _delta_bound

    if not weight.numel():
        return True
    top = torch.tensor([largest_code(weight)], dtype=torch.uint8).view(weight.dtype)
    s = 1.0 if scale is None else float(scale.double())
    bound = (float(top.double()) * s + _delta_bound(contribs)) * (1 + 2.0**-10)
    return bound / s <= fp8_max(weight.dtype)  # NaN (a NaN factor) is False


def _quantize(acc: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None, generator: torch.Generator | None,
              saturate: bool, out: torch.Tensor | None = None, in_range: bool = False) -> torch.Tensor:
    """:func:`fvtransform._fp8.quantize_tensor`, where values above ``max`` but below :func:`rounding_limit` round to ``max``.

    Raises:
        Fp8Overflow: a value at or beyond the rounding limit (or NaN/Inf) without ``saturate``.
    """
    try:
        return quantize_tensor(acc, dtype, scale, generator=generator, saturate=saturate, out=out, overwrite=True,
                               in_range=in_range)
    except Fp8Overflow as e:  # raised before acc is touched
        if not e.largest < rounding_limit(dtype):  # NaN fails too
            raise
        return quantize_tensor(acc, dtype, scale, generator=generator, saturate=True, out=out, overwrite=True)


def _stored_scale(exact: torch.Tensor, old: torch.Tensor, dtype: torch.dtype, amax: torch.Tensor) -> torch.Tensor:
    """The recomputed scale in the old scale's dtype and shape, bumped up by ulps until the float32 quotient
    ``amax / scale`` (the largest value quantised) is within the float8 range: its own rounding never overflows."""
    stored = exact.to(old.dtype)
    peak = amax.to(torch.float32).cpu()
    while float(peak / stored.cpu().to(torch.float32)) > fp8_max(dtype):
        stored = torch.nextafter(stored.float(), torch.tensor(math.inf)).to(old.dtype) if old.dtype == torch.float32 else \
            (stored.float() * (1 + 2 * torch.finfo(old.dtype).eps)).to(old.dtype)
    return stored.reshape(old.shape).to(old.device)


def merge_tree_key(
    tree: Mapping[str, torch.Tensor], key: str, contribs: list, options: Fp8Options, *, donate: bool, work: object,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Merge the float8 target ``key`` of an in-memory tree; returns its new weight and the updated scale keys.

    Raises:
        FormatError / NumericError: a malformed scale (see :func:`check_scale`); NumericError: an overflow.
    """
    w = tree[key]
    sk = scale_key_of(key)
    scale = tree[sk] if sk is not None and sk in tree else None
    if scale is not None:
        assert sk is not None
        check_scale(scale, sk, f"merge {key!r}")
    writable = donate and w.is_contiguous()
    new, new_scale = merge_fp8(contribs, w, scale, options, key=key, where=f"{key!r}",
                               out=w.detach() if writable else None, work=work)
    return new, ({} if new_scale is None or sk is None else {sk: new_scale})


def check_scaled_plain(tree: Mapping[str, torch.Tensor], key: str) -> None:
    """Refuse a scale key beside a targeted weight that is not float8 (its meaning would be lost silently), and a
    float8 dtype fvtransform does not read.

    Raises:
        ShapeMismatchError: naming the weight, its dtype and the scale key (as :func:`fvt.dequantize` does).
        FormatError: another float8 dtype (``float8_e4m3fnuz``, ...).
    """
    refuse_other_float8(key, tree[key].dtype, "fvt.lora.merge")
    sk = scale_key_of(key)
    if sk is not None and sk in tree:
        raise ShapeMismatchError(f"{key!r} is {tree[key].dtype} and has a scale {sk!r}; the scaled layout holds float8 "
                                 "weights only, so a merge cannot tell what the weight means (a reader multiplies it by "
                                 "the scale). Fix: drop the scale key, or dequantise it first (fvt.dequantize)")


def record_fp8(tree: Mapping[str, torch.Tensor], key: str, new: torch.Tensor, extra: Mapping[str, torch.Tensor],
               corrections: dict, digests: dict, direct: set[str]) -> int:
    """Record what restores a float8 target exactly: the bit steps from the merged to the original bytes (and scale).

    No arithmetic unmerge (it would round again): restore applies the steps to the merged bytes. Returns the
    targets' byte count for the record's ``targets_nbytes``.
    """
    from fvtransform.lora._merge import _digest
    from fvtransform.lora._record import _make_correction

    size = 0
    for k, value in [(key, new), *extra.items()]:
        corrections[k] = _make_correction(tree[k].detach(), value)
        digests[k] = _digest(value)
        direct.add(k)
        size += tree[k].numel() * tree[k].element_size()
    return size


class Fp8Plan:
    """The float8 part of a disk-to-disk merge: which keys it writes, checked before any output exists.

    A recomputed scale is written under its own key, wherever the file puts it: the first of the weight and
    its scale to be produced merges the weight; the other is handed over once (memory: one merged weight).
    """

    def __init__(self, ckpt: Any, per_key: Mapping[str, list], options: Fp8Options, dtype: torch.dtype | None,
                 base: object, device: torch.device | None) -> None:
        self._ckpt, self._per_key, self._options, self._device = ckpt, per_key, options, device
        keys = set(ckpt.keys())
        self._targets = [k for k in per_key if is_fp8(ckpt.info(k).dtype)]
        self._target_set = set(self._targets)
        check_targets(self._targets, options, "fvt.lora.merge_checkpoint")
        self._scale: dict[str, str] = {}  # float8 target -> its scale key
        self._weight_of: dict[str, str] = {}  # recomputed scale key -> its weight
        for k in per_key:
            refuse_other_float8(k, ckpt.info(k).dtype, str(ckpt.file_of(k)))
            sk = scale_key_of(k)
            if k not in self._target_set and sk is not None and sk in keys:
                raise ShapeMismatchError(f"{ckpt.file_of(k)}: {k!r} is {ckpt.info(k).dtype} and has a scale {sk!r}; the "
                                         "scaled layout holds float8 weights only (a reader multiplies it by the scale). "
                                         "Fix: drop the scale key, or dequantise it first (fvt.dequantize)")
        if not self._targets:
            return
        if dtype is not None:
            raise UsageError(f"{base}: dtype={dtype} with float8 targets ({self._targets[0]!r}, ...): a cast would drop the "
                             "scaled layout's meaning. Merge in float8 (no dtype=), or dequantise first (fvt.dequantize)")
        check_scale_keys(list(keys), str(base))
        for k in per_key:
            sk = scale_key_of(k)
            if k not in self._target_set:
                continue
            refuse_kind(per_key[k], k, grad=False, sharded=False)
            if sk is not None and sk in keys:
                check_scale(ckpt.tensor(sk), sk, str(ckpt.file_of(sk)))
                self._scale[k] = sk
                if options.fp8_scale == "recompute":
                    self._weight_of[sk] = k
            elif options.fp8_scale == "recompute":
                raise UsageError(f"{ckpt.file_of(k)}: {k!r}: fp8_scale='recompute' updates a scale_weight, and this float8 "
                                 "weight has none (plain layout). Use fp8_scale='keep'")
        self._made: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def owns(self, key: str) -> bool:
        """Whether ``key`` is written by the float8 merge (a target, or a recomputed scale)."""
        return key in self._target_set or key in self._weight_of

    def produce(self, key: str, work: object) -> torch.Tensor:
        """The merged float8 weight or the recomputed scale of ``key``."""
        weight = self._weight_of.get(key, key)
        with self._lock:
            if weight not in self._made:
                self._made[weight] = self._merge(weight, work)
            parts = self._made[weight]
            t = parts.pop(key)
            if not parts:
                del self._made[weight]
        return t

    def _merge(self, key: str, work: object) -> dict[str, torch.Tensor]:
        ckpt, away = self._ckpt, self._device is not None and self._device.type != "cpu"
        w = ckpt.tensor(key)
        sk = self._scale.get(key)
        scale = ckpt.tensor(sk) if sk is not None else None
        if away:
            w = w.to(self._device)
        new, new_scale = merge_fp8(self._per_key[key], w, scale, self._options, key=key,
                                   where=f"{ckpt.file_of(key)}: {key!r}", work=work)
        parts = {key: new.cpu() if away else new}
        if sk is not None and sk in self._weight_of:
            assert new_scale is not None
            parts[sk] = new_scale.cpu()
        return parts
