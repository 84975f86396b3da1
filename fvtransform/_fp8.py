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

The scaled-fp8 checkpoint LAYOUT (as ComfyUI writes and reads it) is data here too:

* a linear weight ``<layer>.weight`` stored in float8 with its per-tensor float32 scale beside it,
  ``<layer>.scale_weight`` (shape ``[]`` or ``[1]``: torch's ``load_state_dict`` loads a ``[1]`` tensor into a
  0-dim parameter), the real weight being ``weight.float() * scale_weight``;
* optionally ``<layer>.scale_input`` (the activation scale for fp8 matrix multiplication; a value of 1.0 is
  ignored by ComfyUI's readers, and a dequantising reader never needs it);
* one marker key ``<model prefix>scaled_fp8`` (``scaled_fp8`` for a diffusion-model-only file,
  ``model.diffusion_model.scaled_fp8`` in a full checkpoint): its DTYPE names the float8 dtype of the weights
  (``float32`` means ``float8_e4m3fn``), its values are unused (2 elements ask for full-precision matrix
  multiplication).

Read in ComfyUI (comfyanonymous/ComfyUI): ``comfy/model_detection.py`` ``model_config_from_unet`` (pops
``{prefix}scaled_fp8``, float32 -> float8_e4m3fn), ``comfy/ops.py`` ``scaled_fp8_ops`` (``scale_weight`` /
``scale_input`` parameters of shape ``()`` float32; forward ``linear(x, weight.to(dtype) * scale_weight)``),
``comfy/utils.py`` ``convert_old_quants`` (``scale_weight`` -> ``weight_scale``, ``scale_input`` dropped when 1.0).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "FP8_DTYPES",
    "is_fp8",
    "is_other_float8",
    "OTHER_FLOAT8",
    "fp8_max",
    "amax_scale",
    "dequantize_tensor",
    "quantize_tensor",
    "dequantize_into",
    "Fp8Overflow",
    "WEIGHT_SUFFIX",
    "SCALE_WEIGHT",
    "SCALE_INPUT",
    "MARKER",
    "MARKER_DTYPES",
    "SCALE_DTYPES",
    "SCALE_SHAPES",
    "scale_key",
    "input_scale_key",
    "weight_key_of",
    "marker_prefix",
    "marker_fp8_dtype",
    "Fp8Layout",
    "split_layout",
    "FP8_NAMES",
    "as_fp8_dtype",
    "nonfinite_count",
    "Upcast",
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


#: Float8 (and smaller) dtypes torch has that fvtransform does not read: refused with a typed error.
OTHER_FLOAT8: tuple[torch.dtype, ...] = tuple(
    getattr(torch, name) for name in ("float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2")
    if hasattr(torch, name)
)


def is_other_float8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is a float8 (or float4) dtype outside :data:`FP8_DTYPES` (e.g. ``float8_e4m3fnuz``)."""
    return dtype in OTHER_FLOAT8


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of a float8 ``dtype`` (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def amax_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A float32 scalar ``max|x| / fp8_max(dtype)`` (1.0 for an all-zero or empty ``x``).

    Rounded up where float32 division would put ``max|x| / scale`` just above the float8 range.
    """
    amax = x.detach().abs().amax().float() if x.numel() else torch.zeros((), dtype=torch.float32)
    if not bool(torch.isfinite(amax)):
        raise Fp8Overflow(float(amax), fp8_max(dtype))
    if float(amax) == 0.0:
        return torch.ones((), dtype=torch.float32, device=x.device)
    scale = (amax / fp8_max(dtype)).to(torch.float32)
    if float(amax / scale) > fp8_max(dtype):  # float32 rounding of the division: max|x| / scale must stay in range
        scale = torch.nextafter(scale, torch.full_like(scale, float("inf")))
    return scale


#: From this many elements on, a CPU dequantisation goes through float16 bits (:func:`dequantize_into`) in
#: chunks of ``_CHUNK`` elements: torch's float8 conversion is not vectorised on CPU (the chunks are the same bits,
#: several times faster; each chunk's float32 scratch stays in cache).
_FAST_FROM = 1 << 12
_CHUNK = 1 << 20

#: Per thread: the int16 and float32 scratch of the chunked dequantisation, per device (reused: no page faults).
_SCRATCH = threading.local()


def _scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = _SCRATCH.__dict__.setdefault("buffers", {})
    if device not in buffers or buffers[device][0].numel() < _CHUNK:
        buffers[device] = (torch.empty(_CHUNK, dtype=torch.int16, device=device),
                           torch.empty(_CHUNK, dtype=torch.float32, device=device))
    return buffers[device]


def dequantize_tensor(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``w`` (float8) as ``dtype``: ``(w.float() * scale.float()).to(dtype)``, one rounding; no scale: an exact cast.

    Large CPU tensors to bfloat16, float16 or float32 are made chunk by chunk through float16 bits
    (:func:`dequantize_into`): the bits of the elementwise computation (a NaN code gives a NaN).
    """
    if (w.device.type == "cpu" and w.numel() >= _FAST_FROM and w.dtype in FP8_DTYPES and not w.requires_grad
            and dtype in (torch.bfloat16, torch.float16, torch.float32)):
        out = torch.empty(w.shape, dtype=dtype)
        flat_w, flat_out = w.detach().contiguous().view(-1), out.view(-1)
        half, wide = _scratch(w.device)
        n = flat_w.numel()
        check = not _known_finite(w)  # the NaN scan of an Upcast's first use covers later ones
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            if dtype == torch.float32:
                dequantize_into(flat_w[start:stop], scale, flat_out[start:stop], half, check=check)
            else:
                acc = wide[: stop - start]
                dequantize_into(flat_w[start:stop], scale, acc, half, check=check)
                flat_out[start:stop].copy_(acc)
        return out
    return _dequantize_elementwise(w, scale, dtype)


def _dequantize_elementwise(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return w.to(dtype)
    out = w.to(torch.float32)
    out.mul_(scale.to(device=w.device, dtype=torch.float32))
    return out if dtype == torch.float32 else out.to(dtype)


#: Per float8 dtype: (mantissa bits, exponent of the smallest normal value).
_FORMATS: dict[torch.dtype, tuple[int, int]] = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}

#: Random bits drawn per element by stochastic rounding: the probability of rounding up is the distance from the
#: float8 value below, in steps of ``2**-16`` of the gap (rounded up: a bias of less than ``2**-16`` of a step).
_RANDOM_BITS = 16


def _check_range(y: torch.Tensor, limit: float) -> float:
    """The largest magnitude of ``y`` (NaN if any NaN), from one ``aminmax`` (no temporary of ``y``'s size)."""
    if not y.numel():
        return 0.0
    lo, hi = torch.aminmax(y)
    return float(torch.maximum(-lo, hi))  # NaN propagates


def quantize_tensor(
    x: torch.Tensor,
    dtype: torch.dtype,
    scale: torch.Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    saturate: bool = False,
    out: torch.Tensor | None = None,
    overwrite: bool = False,
    in_range: bool = False,
) -> torch.Tensor:
    """``x / scale`` rounded once to the float8 ``dtype`` (to nearest, or stochastically with ``generator``).

    Args:
        out: a float8 tensor of ``x``'s shape to write into (returned).
        overwrite: ``x`` is a float32 scratch buffer the caller gives away (stochastic rounding works in it).
        in_range: the caller has proved every ``|x / scale|`` finite and within the float8 range (no check).

    Raises:
        Fp8Overflow: a magnitude beyond the float8 range (or NaN/Inf) and ``saturate`` is False.
    """
    y = x.to(torch.float32)
    if scale is not None:
        y = y / scale.to(device=y.device, dtype=torch.float32)
    elif generator is not None and not (overwrite and y is x):
        y = y.clone()
    limit = fp8_max(dtype)
    largest = 0.0 if in_range else _check_range(y, limit)
    if largest != largest or largest > limit:  # NaN compares unequal to itself
        if not saturate or largest != largest:
            raise Fp8Overflow(largest, limit)
        y = y.clamp_(-limit, limit) if (overwrite or y is not x) else y.clamp(-limit, limit)
    if out is None:
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
    if generator is not None:
        _round_stochastically_(y, dtype, generator)  # y now holds float8 values: the cast below is exact
    out.copy_(y)  # torch's float32 -> float8 cast: round to nearest, ties to even
    return out


def _round_stochastically_(y: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> None:
    """Round float32 ``y`` (in place, within the float8 range) to one of its two float8 neighbours at random.

    On the bit pattern: a float8 value keeps the top ``m`` mantissa bits of a float32 of the same exponent, so
    adding ``_RANDOM_BITS`` random bits just below them and clearing the low ``23 - m`` bits rounds the magnitude
    up with probability equal to its distance from the float8 value below (a carry moves to the next binade, as
    it should). Below the smallest normal ``2**emin`` the float8 step is fixed (subnormals): those magnitudes are
    shifted by ``2**emin`` first (into the binade whose step is the same) and back after, both exact but the
    first's float32 rounding, far below one random step. One draw of 64 bits gives four elements their bits.
    """
    mant, emin = _FORMATS[dtype]
    drop = 23 - mant
    bits = y.view(torch.int32)
    sign = bits & -(2**31)
    bits.bitwise_and_(2**31 - 1)  # y = |y|
    low = 2.0**emin
    small = y < low
    y.add_(small, alpha=low)
    n = y.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=y.device).random_(-(2**63), None, generator=generator)
    noise = draws.view(torch.int16)[:n].view(y.shape).to(torch.int32).bitwise_and_(0xFFFF)
    bits.add_(noise.bitwise_left_shift_(drop - _RANDOM_BITS))
    bits.bitwise_and_(-(1 << drop))
    y.add_(small, alpha=-low)
    bits.bitwise_or_(sign)


def dequantize_into(w: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor, scratch: torch.Tensor,
                    *, check: bool = True) -> None:
    """Write ``dequantize_tensor(w, scale, float32)`` into float32 ``out`` (same shape), the same bits, faster on CPU.

    Every float8 value is a float16 value times a power of two with the float16 bits a shift of the float8 bits
    (float8_e5m2: the top byte of a float16; float8_e4m3fn: ``(code & 0x7F) << 7`` and the sign, times 256, its
    subnormals included), and float16 -> float32 is a fast exact cast; the factor 256 is folded into the scale
    (a product of the same real numbers, rounded once). ``scratch`` is an int16 buffer of ``w.numel()``
    elements. A float8_e4m3fn NaN code (no float16 counterpart) takes the elementwise path (``check=False``: the
    caller knows ``w`` holds none).
    """
    codes = w.view(torch.int8)
    half = scratch[: w.numel()].view(w.shape)
    factor = 1.0
    if w.dtype == torch.float8_e5m2:
        half.copy_(codes).bitwise_left_shift_(8)
    else:
        if w.dtype != torch.float8_e4m3fn or (check and int(half.copy_(codes).bitwise_and_(0x7F).max()) == 0x7F):
            out.copy_(_dequantize_elementwise(w, scale, torch.float32))
            return
        half.copy_(codes).bitwise_left_shift_(7).bitwise_and_(~0x4000)  # the sign extension leaves bit 14 set
        factor = 256.0
    out.copy_(half.view(torch.float16))
    if scale is None:
        if factor != 1.0:
            out.mul_(factor)
        return
    s = scale.detach().reshape(()).to(device=out.device, dtype=torch.float32)
    folded = s * factor
    if factor != 1.0 and not bool(torch.isfinite(folded)):  # a scale near float32's maximum: two exact steps
        out.mul_(factor)
        folded = s
    out.mul_(folded)


# --- the scaled-fp8 layout (ComfyUI's), as data -------------------------------------------------------------

WEIGHT_SUFFIX = "weight"
"""The last key segment of a weight that may carry a scale."""

SCALE_WEIGHT = "scale_weight"
"""The last key segment of a weight's per-tensor scale: ``<layer>.scale_weight`` beside ``<layer>.weight``."""

SCALE_INPUT = "scale_input"
"""The last key segment of a layer's activation scale (fp8 matmul only; a dequantising reader ignores it)."""

MARKER = "scaled_fp8"
"""The last key segment of the marker; the key is ``<model prefix>scaled_fp8`` (the prefix may be empty)."""

MARKER_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.float8_e4m3fn: torch.float8_e4m3fn,
    torch.float8_e5m2: torch.float8_e5m2,
    torch.float32: torch.float8_e4m3fn,  # ComfyUI: a float32 marker means float8_e4m3fn
}
"""The marker tensor's dtype -> the float8 dtype of the scaled weights."""

SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Dtypes a scale may have (ComfyUI writes float32; it multiplies after ``.to(weight dtype)``, so any float reads)."""

SCALE_SHAPES: tuple[tuple[int, ...], ...] = ((), (1,))
"""Shapes a per-tensor scale may have (ComfyUI's parameter is 0-dim; torch loads a ``[1]`` tensor into it)."""

_SCALE_SUFFIXES: tuple[str, ...] = (SCALE_WEIGHT, SCALE_INPUT)


def _layer_of(key: str, suffix: str) -> str | None:
    """``"a.b"`` for ``"a.b.<suffix>"``, ``""`` for ``"<suffix>"`` itself, None otherwise."""
    if key == suffix:
        return ""
    tail = "." + suffix
    return key[: -len(tail)] if key.endswith(tail) else None


def _with_suffix(layer: str, suffix: str) -> str:
    return f"{layer}.{suffix}" if layer else suffix


def scale_key(weight_key: str) -> str:
    """The ``scale_weight`` key of a weight key: ``"blocks.0.ffn.0.weight"`` -> ``"blocks.0.ffn.0.scale_weight"``.

    Raises:
        ValueError: ``weight_key`` does not end in ``weight`` (a bias or a norm scale has no fp8 scale).
    """
    layer = _layer_of(weight_key, WEIGHT_SUFFIX)
    if layer is None:
        raise ValueError(f"{weight_key!r} is not a weight key (it must end in '.{WEIGHT_SUFFIX}')")
    return _with_suffix(layer, SCALE_WEIGHT)


def input_scale_key(weight_key: str) -> str:
    """The ``scale_input`` key of a weight key: ``"proj.weight"`` -> ``"proj.scale_input"``."""
    layer = _layer_of(weight_key, WEIGHT_SUFFIX)
    if layer is None:
        raise ValueError(f"{weight_key!r} is not a weight key (it must end in '.{WEIGHT_SUFFIX}')")
    return _with_suffix(layer, SCALE_INPUT)


def weight_key_of(key: str) -> str | None:
    """The weight key a ``scale_weight`` / ``scale_input`` key belongs to; None for any other key."""
    for suffix in _SCALE_SUFFIXES:
        layer = _layer_of(key, suffix)
        if layer is not None:
            return _with_suffix(layer, WEIGHT_SUFFIX)
    return None


def marker_prefix(key: str) -> str | None:
    """The model prefix of a marker key (``"model.diffusion_model."`` or ``""``); None if ``key`` is no marker."""
    layer = _layer_of(key, MARKER)
    if layer is None:
        return None
    return f"{layer}." if layer else ""


def marker_fp8_dtype(marker_dtype: torch.dtype) -> torch.dtype | None:
    """The float8 dtype a marker of ``marker_dtype`` names (float32 -> float8_e4m3fn); None if it names none."""
    return MARKER_DTYPES.get(marker_dtype)


@dataclass(frozen=True)
class Fp8Layout:
    """How a set of keys splits under the scaled-fp8 layout (keys only; dtypes and shapes are checked elsewhere).

    Attributes:
        scales: weight key -> its ``scale_weight`` key, for every scale whose weight is present.
        input_scales: weight key -> its ``scale_input`` key, for every input scale whose weight is present.
        orphans: ``scale_weight`` / ``scale_input`` keys whose weight key is absent, sorted.
        markers: marker keys (``scaled_fp8`` under any prefix), sorted.
    """

    scales: dict[str, str]
    input_scales: dict[str, str]
    orphans: tuple[str, ...]
    markers: tuple[str, ...]

    @property
    def layout_keys(self) -> frozenset[str]:
        """Every key that is layout, not a tensor of the model: scales, input scales, orphans and markers."""
        return frozenset(self.scales.values()) | frozenset(self.input_scales.values()) | frozenset(
            self.orphans
        ) | frozenset(self.markers)

    @property
    def is_scaled(self) -> bool:
        """Whether any scale or marker key is present."""
        return bool(self.scales or self.input_scales or self.orphans or self.markers)


def split_layout(keys: Iterable[str]) -> Fp8Layout:
    """Split ``keys`` into weights with scales, orphan scales and marker(s), by key name alone."""
    present = set(keys)
    scales: dict[str, str] = {}
    input_scales: dict[str, str] = {}
    orphans: list[str] = []
    markers: list[str] = []
    for key in sorted(present):
        if marker_prefix(key) is not None:
            markers.append(key)
            continue
        weight = weight_key_of(key)
        if weight is None:
            continue
        if weight not in present:
            orphans.append(key)
        elif _layer_of(key, SCALE_WEIGHT) is not None:
            scales[weight] = key
        else:
            input_scales[weight] = key
    return Fp8Layout(scales, input_scales, tuple(orphans), tuple(markers))


# --- names, the finite check, and the tensor that dequantises when used -----------------------------------

FP8_NAMES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn, "e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2, "e5m2": torch.float8_e5m2, "fp8_e5m2": torch.float8_e5m2,
}
"""Float8 dtypes by name (the names ``quantize_fp8(dtype=...)`` takes, besides the dtypes themselves)."""

#: Per float8 dtype: (mask, value) such that ``bits & mask == value`` is a NaN or an Inf code.
#: e4m3fn has no Inf; its NaN is S.1111.111. e5m2 is IEEE-like: exponent 11111 is Inf or NaN.
_NONFINITE_BITS: dict[torch.dtype, tuple[int, int]] = {
    torch.float8_e4m3fn: (0x7F, 0x7F),
    torch.float8_e5m2: (0x7C, 0x7C),
}


def as_fp8_dtype(dtype: torch.dtype | str) -> torch.dtype | None:
    """A float8 dtype from a dtype or a name in :data:`FP8_NAMES`; None if it names none."""
    if isinstance(dtype, torch.dtype):
        return dtype if is_fp8(dtype) else None
    return FP8_NAMES.get(dtype.removeprefix("torch."))


#: Float8 tensors already scanned, with their version counter then and their largest magnitude code: a weight
#: used at every step of a sampling loop is read for NaN/Inf once, not at every forward (an in-place write bumps
#: the version: read again).
_FINITE: dict[int, tuple[weakref.ref[torch.Tensor], int, int]] = {}


def _known_finite(x: torch.Tensor) -> bool:
    entry = _FINITE.get(id(x))
    return entry is not None and entry[0]() is x and entry[1] == x._version


def _mark_finite(x: torch.Tensor, top: int = 0x7F) -> None:
    key = id(x)
    _FINITE[key] = (weakref.ref(x, lambda _r: _FINITE.pop(key, None)), x._version, top)


def largest_code(x: torch.Tensor) -> int:
    """The float8 code (sign bit cleared) of the largest magnitude in float8 ``x`` (codes order as magnitudes do);
    remembered for a tensor found finite."""
    entry = _FINITE.get(id(x))
    if entry is not None and entry[0]() is x and entry[1] == x._version:
        return entry[2]
    top = int((x.view(torch.uint8) & 0x7F).max()) if x.numel() else 0
    mask, value = _NONFINITE_BITS[x.dtype]
    if top & mask != value:
        _mark_finite(x, top)
    return top


def nonfinite_count(x: torch.Tensor) -> int:
    """How many elements of ``x`` are NaN or Inf (float8 has no ``isfinite`` kernel: its bit codes are read)."""
    if not x.numel():
        return 0
    code = _NONFINITE_BITS.get(x.dtype)
    if code is not None:
        if _known_finite(x):
            return 0
        mask, value = code
        if largest_code(x) & mask != value:  # the largest magnitude code is a NaN/Inf code iff any is
            return 0
        return int(((x.view(torch.uint8) & mask) == value).sum())
    if not x.dtype.is_floating_point:
        return 0
    return int((~torch.isfinite(x)).sum())


class Upcast(torch.Tensor):
    """A float8 tensor (and its scale) that looks like a ``dtype`` tensor and dequantises each time it is used.

    Every torch operation on it first makes ``dequantize_tensor(data, scale, dtype)`` (one rounding, the same
    bits every time) and runs on that plain tensor, which is dropped after the operation: a forward pass
    holds one layer's weight in the compute dtype at a time, never the model. The float8 bytes are checked
    for NaN/Inf on first use (``on_nonfinite`` is called with the count, and raises), and its largest value times
    the scale for an overflow of ``dtype`` (``on_overflow`` is called with the value and the dtype, and raises).

    Attributes:
        fp8: the float8 tensor (shared, never written).
        scale: its per-tensor scale, or None (a plain cast).
        key: the tree key it stands for (named in errors).
    """

    fp8: torch.Tensor
    scale: torch.Tensor | None
    key: str

    @staticmethod
    def __new__(
        cls, fp8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, key: str,
        on_nonfinite: object = None, on_overflow: object = None,
    ) -> Upcast:
        return torch.Tensor._make_wrapper_subclass(
            cls, fp8.shape, strides=fp8.stride(), dtype=dtype, device=fp8.device, requires_grad=False
        )

    def __init__(
        self, fp8: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, key: str,
        on_nonfinite: object = None, on_overflow: object = None,
    ) -> None:
        self.fp8 = fp8
        self.scale = scale
        self.key = key
        self._on_nonfinite = on_nonfinite
        self._on_overflow = on_overflow
        self._checked = False

    def materialize(self) -> torch.Tensor:
        """The dequantised tensor (a new plain tensor each call; the same bits every call)."""
        if not self._checked:
            bad = nonfinite_count(self.fp8)
            if bad and callable(self._on_nonfinite):
                self._on_nonfinite(self.key, bad)
            if not bad and callable(self._on_overflow):  # the largest magnitude, dequantised the same way, is finite
                top = torch.tensor([largest_code(self.fp8)], dtype=torch.uint8).view(self.fp8.dtype)
                peak = _dequantize_elementwise(top, None if self.scale is None else self.scale.cpu(), self.dtype)
                if not bool(torch.isfinite(peak).all()):
                    scale = 1.0 if self.scale is None else float(self.scale.detach().reshape(()).double())
                    self._on_overflow(self.key, float(top.double()) * scale, self.dtype)
            self._checked = True
        return dequantize_tensor(self.fp8, self.scale, self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl  # type: ignore[assignment]

    @classmethod
    def __torch_dispatch__(  # type: ignore[override]  # torch declares it as a plain function
        cls, func: Any, types: Iterable[type], args: tuple[Any, ...] = (), kwargs: dict[Any, Any] | None = None
    ) -> Any:
        from torch.utils._pytree import tree_map

        def plain(x: object) -> object:
            return x.materialize() if isinstance(x, Upcast) else x

        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))

    def __repr__(self, *, tensor_contents: object = None) -> str:  # type: ignore[override]
        scaled = "scaled " if self.scale is not None else ""
        return (f"Upcast({self.key!r}: {scaled}{str(self.fp8.dtype).removeprefix('torch.')} "
                f"{list(self.shape)} -> {str(self.dtype).removeprefix('torch.')}, dequantised when used)")

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:  # pickled as its values
        return (_rebuild_plain, (self.materialize(),))

    def __deepcopy__(self, memo: dict[int, object]) -> torch.Tensor:  # a copy is the dequantised values
        return self.materialize()


def _rebuild_plain(t: torch.Tensor) -> torch.Tensor:
    return t
