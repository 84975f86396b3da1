"""Float8 trees: check the scaled-fp8 layout, dequantise lazily, quantise to either layout, run (issue 17).

The arithmetic (one rounding each way, the amax scale, overflow) is :mod:`fvtransform._fp8`; the layout's
key names are data there too. This module applies them to trees:

* :func:`check_layout` refuses a tree whose layout is broken (a scale of the wrong shape or dtype, or not
  finite, a scale without its weight, a weight without its scale under the marker, a marker naming no
  float8 dtype), naming where and the key;
* :func:`dequantize` gives a tree whose float8 tensors are :class:`~fvtransform._fp8.Upcast` values,
  dequantised when used, one at a time, never the whole model at once; the layout keys are gone;
* :func:`quantize_fp8` writes the ``scaled`` layout (weight, ``scale_weight``, marker) as ComfyUI reads it,
  or the ``plain`` one (a cast, overflow refused unless ``saturate=True``);
* :func:`runnable` is what ``fvt.call`` / ``fvt.lora.call`` run on: layout keys the module does not have are
  taken out, float8 tensors become ``Upcast`` values in the compute dtype.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch

from fvtransform import _fp8
from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._messages import format_keys
from fvtransform.errors import FormatError, KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._ops import _as_tree, _eager
from fvtransform.tree._paramtree import ParamTree

__all__ = ["dequantize", "quantize_fp8", "check_layout", "check_file", "maybe_fp8", "runnable", "compute_dtype_of", "describe", "refuse_scaled_cast"]

Layout = Literal["scaled", "plain"]
_LAYOUTS: tuple[str, ...] = ("scaled", "plain")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


#: Float8 tensors loaded from a file (id -> (weak reference, the file)): a NaN found when one is first used
#: names its file, not "tree".
_SOURCES: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}


def note_sources(tensors: Mapping[str, torch.Tensor], path: object) -> None:
    """Remember the file of each float8 tensor ``fvt.load`` returns (named by a NaN/Inf error when it is used)."""
    for t in tensors.values():
        if isinstance(t, torch.Tensor) and _fp8.is_fp8(t.dtype) and id(t) not in _SOURCES:
            _note(t, str(path))


def _note(t: torch.Tensor, path: str) -> None:
    key = id(t)
    _SOURCES[key] = (weakref.ref(t, lambda _r: _SOURCES.pop(key, None)), path)


def _source(t: torch.Tensor, default: object = "tree") -> object:
    entry = _SOURCES.get(id(t))
    return entry[1] if entry is not None and entry[0]() is t else default


def _nonfinite(where: object) -> Callable[[str, int], None]:
    """The ``on_nonfinite`` callback of an Upcast: a NumericError naming where and the key."""

    def raise_it(key: str, count: int) -> None:
        raise NumericError(
            f"{where}: float8 tensor {key!r} holds {count} NaN/Inf value(s); expected finite weights. "
            "Fix: re-export the checkpoint from its full-precision source (the float8 file is damaged)"
        )

    return raise_it


def _overflow(where: object) -> Callable[[str, float, torch.dtype], None]:
    """The ``on_overflow`` callback of an Upcast: its largest value times the scale is beyond the compute dtype."""

    def raise_it(key: str, largest: float, dtype: torch.dtype) -> None:
        raise NumericError(
            f"{where}: float8 tensor {key!r} times its scale reaches {largest:g}, beyond {_name(dtype)}'s largest "
            f"finite value {torch.finfo(dtype).max:g} (it would become Inf). Fix: dequantise to a wider dtype "
            "(torch.bfloat16 or torch.float32; compute_dtype= for fvt.call)"
        )

    return raise_it


def _upcast(v: torch.Tensor, scale: torch.Tensor | None, target: torch.dtype, key: str) -> _fp8.Upcast:
    where = _source(v)
    return _fp8.Upcast(v, scale, target, key, _nonfinite(where), on_overflow=_overflow(where))


def _refuse_other_float8(tree: Mapping[str, torch.Tensor], where: object) -> None:
    """Refuse float8 dtypes fvtransform does not read (float8_e4m3fnuz, float8_e5m2fnuz, float8_e8m0fnu, ...).

    Raises:
        FormatError: naming the key and its dtype.
    """
    for k, v in tree.items():
        if isinstance(v, torch.Tensor) and _fp8.is_other_float8(v.dtype):
            raise FormatError(
                f"{where}: {k!r} is {_name(v.dtype)}, a float8 dtype fvtransform does not read (expected "
                f"{' or '.join(_name(d) for d in _fp8.FP8_DTYPES)}). Fix: convert it with its own tool "
                "(e.g. tensor.float()) before fvtransform, or re-export the checkpoint"
            )


def _marker_dtype(tree: Mapping[str, torch.Tensor], marker: str, where: object) -> torch.dtype:
    found = tree[marker].dtype
    dtype = _fp8.marker_fp8_dtype(found)
    if dtype is None:
        raise FormatError(
            f"{where}: marker {marker!r} has dtype {_name(found)}, which names no float8 dtype; expected "
            f"one of {[_name(d) for d in _fp8.MARKER_DTYPES]} (float32 means float8_e4m3fn). "
            "Fix: rewrite the marker with the weights' float8 dtype, or drop it for a plain float8 file"
        )
    return dtype


def _check_scale(scale: torch.Tensor, key: str, weight_key: str, weight: torch.Tensor, where: object) -> None:
    if tuple(scale.shape) not in _fp8.SCALE_SHAPES or scale.dtype not in _fp8.SCALE_DTYPES:
        raise ShapeMismatchError(
            f"{where}: scale {key!r} of {weight_key!r} is {_name(scale.dtype)} of shape {list(scale.shape)}; "
            f"expected one per-tensor value: shape [] or [1], dtype float32 (or {', '.join(_name(d) for d in _fp8.SCALE_DTYPES[1:])}). "
            "Fix: a per-channel or block scale is another layout; re-export with one float32 scale per weight"
        )
    if not _fp8.is_fp8(weight.dtype):
        raise ShapeMismatchError(
            f"{where}: {weight_key!r} has the scale {key!r} but is {_name(weight.dtype)}; expected a float8 "
            "weight beside its scale. Fix: drop the scale key, or quantise the weight (fvt.quantize_fp8)"
        )
    if scale.device.type != "meta" and (_fp8.nonfinite_count(scale) or not float(scale.float().reshape(())) > 0):
        raise NumericError(
            f"{where}: scale {key!r} of {weight_key!r} is {float(scale.float().reshape(()))}; expected a finite "
            "positive number. Fix: re-export the checkpoint (its scales are damaged)"
        )


def check_layout(tree: Mapping[str, torch.Tensor], *, where: object = "tree", skip: frozenset[str] = frozenset()) -> _fp8.Fp8Layout:
    """The tree's scaled-fp8 layout, checked; ``skip``: keys that are no layout (a module's own parameters).

    Raises:
        FormatError: a marker whose dtype names no float8 dtype or another than its scaled weights'.
        KeyMismatchError: a scale key without its weight; under a marker, a 2-D float8 ``.weight`` without
            its ``scale_weight``.
        ShapeMismatchError: a scale of another shape than ``[]`` / ``[1]`` or a non-float dtype, or beside a
            weight that is not float8.
        NumericError: a scale that is NaN, Inf, zero or negative.
    """
    layout = _fp8.split_layout(tree)
    if skip:  # a module's own parameter named like a layout key is its parameter, not layout
        layout = _fp8.Fp8Layout(
            {w: k for w, k in layout.scales.items() if k not in skip},
            {w: k for w, k in layout.input_scales.items() if k not in skip},
            tuple(k for k in layout.orphans if k not in skip),
            tuple(k for k in layout.markers if k not in skip),
        )
    if layout.orphans:
        first = layout.orphans[0]
        raise KeyMismatchError(
            f"{where}: scale key(s) without their weight: {format_keys(list(layout.orphans))}; expected "
            f"{_fp8.weight_key_of(first)!r} beside {first!r}. Fix: keep each weight with its scale "
            "(select or rename both), or drop the stray scale keys"
        )
    for marker in layout.markers:
        named = _marker_dtype(tree, marker, where)
        prefix = _fp8.marker_prefix(marker) or ""
        other = [w for w in layout.scales if w.startswith(prefix) and _fp8.is_fp8(tree[w].dtype) and tree[w].dtype != named]
        if other:
            raise FormatError(
                f"{where}: the marker {marker!r} ({_name(tree[marker].dtype)}) says the scaled weights are "
                f"{_name(named)}, but {other[0]!r} is {_name(tree[other[0]].dtype)} ({len(other)} such weight(s)); a "
                "reader would take its bytes for the marker's dtype. Fix: rewrite the marker with the weights' "
                f"dtype (torch.empty(0, dtype=torch.{_name(tree[other[0]].dtype)})), or re-quantise the weights"
            )
        unscaled = [
            k for k, v in tree.items()
            if k.startswith(prefix) and k not in skip and k.endswith("." + _fp8.WEIGHT_SUFFIX)
            and _fp8.is_fp8(v.dtype) and v.dim() == 2 and k not in layout.scales
        ]
        if unscaled:
            raise KeyMismatchError(
                f"{where}: the marker {marker!r} says the float8 weights are scaled, but {len(unscaled)} have no "
                f"scale: {format_keys(unscaled)} (expected e.g. {_fp8.scale_key(unscaled[0])!r}). Fix: add their "
                "scale_weight keys (1.0 for an unscaled weight), or drop the marker for a plain float8 file"
            )
    for weight_key, key in {**layout.scales, **layout.input_scales}.items():
        _check_scale(tree[key], key, weight_key, tree[weight_key], where)
    return layout


def _scale_of(tree: Mapping[str, torch.Tensor], layout: _fp8.Fp8Layout, key: str) -> torch.Tensor | None:
    sk = layout.scales.get(key)
    return None if sk is None else tree[sk].reshape(())


def compute_dtype_of(dtype: DTypeLike, fn: str) -> torch.dtype:
    """A call's ``compute_dtype`` as a torch dtype (a floating dtype, not float8).

    Raises:
        UsageError: not a dtype name, or a float8 dtype.
    """
    return _compute_dtype(dtype, fn, "compute_dtype")


def _compute_dtype(dtype: DTypeLike, fn: str, arg: str = "dtype") -> torch.dtype:
    target = as_dtype(dtype, f"{fn}: {arg}")
    if _fp8.is_fp8(target):
        raise UsageError(
            f"{fn}: {arg}={_name(target)} is a float8 dtype; dequantising gives a compute dtype. "
            f"Fix: {arg}=torch.bfloat16 (or float16, float32); to quantise use fvt.quantize_fp8(tree, dtype=...)"
        )
    return target


@_eager
def dequantize(tree: Mapping[str, torch.Tensor], /, dtype: DTypeLike = torch.bfloat16) -> ParamTree:
    """A tree whose float8 tensors become ``dtype`` (times their ``scale_weight``), lazily; layout keys removed.

    Each float8 weight ``W`` with a scale ``s`` becomes ``(W.float() * s).to(dtype)`` (one rounding), a plain
    float8 tensor ``W.to(dtype)``; the ``scale_weight`` / ``scale_input`` keys and the ``scaled_fp8`` marker
    are left out. The values are dequantised when they are used (each operation on one makes it, and drops it
    after): a lazily loaded checkpoint stays on disk and no full-precision copy of the model is ever made
    (``fvt.save`` writes them one at a time). Other tensors are shared by identity. The layout is checked
    first (see :func:`check_layout`); a NaN/Inf float8 value raises when its tensor is first used.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.tensor([[1.0, -7.0]]), "l.bias": torch.zeros(1)})
    >>> q = fvt.quantize_fp8(tree)
    >>> sorted(q)
    ['l.bias', 'l.scale_weight', 'l.weight', 'scaled_fp8']
    >>> back = fvt.dequantize(q, torch.float32)
    >>> sorted(back), back["l.weight"].dtype, back["l.weight"] + 0
    (['l.bias', 'l.weight'], torch.float32, tensor([[ 1., -7.]]))

    Raises:
        UsageError: ``dtype`` is a float8 or non-floating dtype.
        FormatError: a float8 dtype fvtransform does not read (``float8_e4m3fnuz``, ...).
        FormatError, KeyMismatchError, ShapeMismatchError, NumericError: a broken layout (see :func:`check_layout`).
        NumericError: when a value is used: NaN/Inf float8 bytes, or a value times its scale beyond ``dtype``.
    """
    tree = _as_tree(tree)
    target = _compute_dtype(dtype, "fvt.dequantize")
    _refuse_other_float8(tree, "fvt.dequantize")
    layout = check_layout(tree)
    return ParamTree._wrap(_upcast_tree(tree, layout, lambda _k: target))


def _upcast_tree(tree: Mapping[str, torch.Tensor], layout: _fp8.Fp8Layout,
                 want: Callable[[str], torch.dtype | None]) -> dict[str, torch.Tensor]:
    """``tree`` less its layout keys, each float8 value as an Upcast to ``want(key)`` (None: kept in float8).

    A tensor tied under several keys becomes one Upcast per (dtype, scale tensor), so ties stay ties.
    """
    memo: dict[tuple[int, torch.dtype, int | None], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in tree.items():
        if k in layout.layout_keys:
            continue
        if isinstance(v, torch.Tensor) and _fp8.is_fp8(v.dtype):
            dtype = want(k)
            if dtype is not None:
                sk = layout.scales.get(k)
                tie = (id(v), dtype, None if sk is None else id(tree[sk]))
                if tie not in memo:
                    memo[tie] = _upcast(v, _scale_of(tree, layout, k), dtype, k)
                v = memo[tie]
        out[k] = v
    return out


def _is_weight_key(k: str) -> bool:
    """``<layer>.weight``, or ``weight`` itself (the tree of a bare ``nn.Linear``)."""
    return k == _fp8.WEIGHT_SUFFIX or k.endswith("." + _fp8.WEIGHT_SUFFIX)


def _targets(tree: ParamTree, only: Pattern | None) -> list[str]:
    if only is None:
        found = [k for k, v in tree.items()
                 if _is_weight_key(k) and v.dim() == 2 and v.dtype.is_floating_point and not _fp8.is_fp8(v.dtype)]
        if not found:
            raise KeyMismatchError(
                f"fvt.quantize_fp8: the tree has no 2-D floating '*.weight' to quantise ({len(tree)} keys, e.g. "
                f"{format_keys(list(tree)[:4])}); a marker over nothing would claim a layout the tree does not have. "
                "Fix: pick the tensors with only= (e.g. only='blocks.*.weight'), or quantise a tree with linear weights"
            )
        return found
    m = matcher(only)
    picked = [k for k, v in tree.items() if m(k, v)]
    if not picked:
        raise KeyMismatchError(
            f"fvt.quantize_fp8: only={only!r} matched no key of the tree ({len(tree)} keys, e.g. "
            f"{format_keys(list(tree)[:4])}). Fix the pattern, or leave out only= for every 2-D '.weight'."
        )
    wrong = [k for k in picked if not tree[k].dtype.is_floating_point or _fp8.is_fp8(tree[k].dtype)]
    if wrong:
        raise UsageError(
            f"fvt.quantize_fp8: only={only!r} picks {format_keys(wrong)}, which are "
            f"{_name(tree[wrong[0]].dtype)}; only full-precision floating tensors are quantised. "
            "Fix: narrow only= (e.g. 'blocks.*.weight')"
        )
    return picked


@_eager
def quantize_fp8(
    tree: Mapping[str, torch.Tensor],
    /,
    dtype: torch.dtype | str = "float8_e4m3fn",
    *,
    layout: Layout = "scaled",
    scale: float | None = None,
    only: Pattern | None = None,
    saturate: bool = False,
    seed: int | None = None,
) -> ParamTree:
    """Quantise the weights of linear layers to float8, in the ``scaled`` (ComfyUI's) or ``plain`` layout.

    The quantised keys are every 2-D floating ``*.weight`` (linear layers), or those ``only=`` picks (a pattern
    as :func:`fvtransform.select` takes). ``layout="scaled"``: each weight ``W`` becomes ``W / s`` rounded once
    to float8 with ``s = max|W| / max(float8)`` (or the given ``scale``), ``<layer>.scale_weight`` (float32,
    shape ``[]``) follows it, and the marker ``scaled_fp8`` (of the float8 dtype, no elements) ends the tree:
    the keys ComfyUI reads. ``layout="plain"``: a cast (no scale keys). A value beyond the float8 range is a
    :class:`~fvtransform.errors.NumericError` unless ``saturate=True`` clamps it. ``seed``: stochastic
    rounding (round up with probability equal to the distance from the value below, in steps of 2**-16 of the
    gap; the same seed gives the same bytes), for accumulated small updates; default round to nearest. A tree
    whose every key is under ``model.diffusion_model.`` (a full checkpoint) gets the marker under that prefix, as
    ComfyUI reads it. Other tensors are shared.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.tensor([[1.0, 500.0]])})
    >>> fvt.quantize_fp8(tree, layout="plain")
    Traceback (most recent call last):
    ...
    fvtransform.errors.NumericError: fvt.quantize_fp8: 'l.weight' has magnitude 500 beyond float8_e4m3fn's largest finite value 448. Fix: use layout='scaled' (a scale maps it into range), or pass saturate=True to clamp to ±448
    >>> fvt.quantize_fp8(tree, layout="plain", saturate=True)["l.weight"].float()
    tensor([[  1., 448.]])

    Raises:
        UsageError: an unknown ``dtype`` or ``layout``, a ``scale`` that is not a positive finite float32 number or
            given with ``layout="plain"``, a ``seed`` that is not a nonnegative int, a tree that is already scaled, a
            target that is not a full-precision tensor.
        KeyMismatchError: ``only`` matches no key, or (without ``only``) the tree has no 2-D floating weight.
        NumericError: a value beyond the float8 range (without ``saturate``), or NaN/Inf in a weight.
    """
    tree = _as_tree(tree)
    fp8 = _fp8.as_fp8_dtype(dtype) if isinstance(dtype, (str, torch.dtype)) else None
    if fp8 is None:
        raise UsageError(
            f"fvt.quantize_fp8: dtype {dtype!r} is no float8 dtype; expected torch.float8_e4m3fn or "
            f"torch.float8_e5m2 (or one of {sorted(_fp8.FP8_NAMES)}). Fix: fvt.quantize_fp8(tree, 'float8_e4m3fn')"
        )
    if layout not in _LAYOUTS:
        raise UsageError(f"fvt.quantize_fp8: layout={layout!r}; expected one of {list(_LAYOUTS)}. "
                         "Fix: layout='scaled' (weights with scale_weight and the scaled_fp8 marker) or layout='plain'")
    if scale is not None:
        if layout == "plain":
            raise UsageError("fvt.quantize_fp8: scale= is for layout='scaled' (a plain float8 file has no scales). "
                             "Fix: fvt.quantize_fp8(tree, layout='scaled', scale=...) or leave out scale=")
        if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < float(scale) < float("inf"))
                or not 0 < float(torch.tensor(float(scale), dtype=torch.float32)) < float("inf")):
            raise UsageError(f"fvt.quantize_fp8: scale={scale!r}; expected a positive finite number that float32 holds "
                             "(the scale_weight is float32: about 1.4e-45 to 3.4e38), or None for each weight's "
                             "max|W| / max(float8). Fix: scale=0.01")
    check_seed(seed, "fvt.quantize_fp8")
    present = _fp8.split_layout(tree)
    if present.is_scaled:
        raise UsageError(
            f"fvt.quantize_fp8: the tree is already in the scaled-fp8 layout ({format_keys(sorted(present.layout_keys))}). "
            "Fix: fvt.quantize_fp8(fvt.dequantize(tree, torch.float32), ...) to quantise it again"
        )
    targets = set(_targets(tree, only))
    if layout == "scaled":
        not_weights = [k for k in targets if _fp8.weight_key_of(k) is not None or not _is_weight_key(k)]
        if not_weights:
            raise UsageError(
                f"fvt.quantize_fp8: layout='scaled' gives each weight a '<layer>.scale_weight' key, so only "
                f"'*.weight' keys can be quantised; only= picks {format_keys(sorted(not_weights))}. "
                "Fix: narrow only= to weights, or use layout='plain'"
            )
    gen = None if seed is None else torch.Generator().manual_seed(_generator_seed(seed))
    fixed = None if scale is None else torch.tensor(float(scale), dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    memo: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for k, v in tree.items():
        if k not in targets:
            out[k] = v
            continue
        if id(v) not in memo:
            memo[id(v)] = _quantize_one(k, v.detach(), fp8, layout, fixed, saturate, gen)
        q, s = memo[id(v)]
        out[k] = q
        if s is not None:
            out[_fp8.scale_key(k)] = s
    if layout == "scaled":
        out[_marker_key(tree)] = torch.empty(0, dtype=fp8)
    return ParamTree._wrap(out)


#: Model prefixes of full checkpoints whose marker carries the prefix (ComfyUI reads ``{prefix}scaled_fp8``).
MODEL_PREFIXES: tuple[str, ...] = ("model.diffusion_model.",)


def _marker_key(tree: Mapping[str, torch.Tensor]) -> str:
    """``<prefix>scaled_fp8`` when every key is under one model prefix of a full checkpoint, else ``scaled_fp8``."""
    for prefix in MODEL_PREFIXES:
        if tree and all(k.startswith(prefix) for k in tree):
            return prefix + _fp8.MARKER
    return _fp8.MARKER


def check_seed(seed: object, fn: str) -> None:
    """A stochastic-rounding seed: None or a nonnegative int (not a bool).

    Raises:
        UsageError: naming the value and a seed that works.
    """
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise UsageError(f"{fn}: seed={seed!r}; expected a nonnegative int (or None for rounding to nearest). Fix: seed=0")


def _generator_seed(seed: int) -> int:
    """A ``torch.Generator`` seed for ``seed``: itself below 2**63, else 63 bits of its blake2b digest."""
    if seed < 2**63:
        return seed
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def _quantize_one(
    key: str, v: torch.Tensor, fp8: torch.dtype, layout: str, fixed: torch.Tensor | None, saturate: bool,
    gen: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    limit = _fp8.fp8_max(fp8)
    try:
        s = None if layout == "plain" else (fixed if fixed is not None else _fp8.amax_scale(v, fp8))
        q = _fp8.quantize_tensor(v, fp8, s, generator=gen, saturate=saturate)
    except _fp8.Fp8Overflow as e:
        if (e.largest != e.largest or e.largest == float("inf")) and not bool(torch.isfinite(v).all()):
            raise NumericError(
                f"fvt.quantize_fp8: {key!r} holds NaN or Inf; expected finite values to quantise. "
                f"Fix: find where the non-finite values come from (torch.isfinite(tree[{key!r}])) before quantising"
            ) from None
        fix = ("pass saturate=True to clamp, or a larger scale=" if fixed is not None else
               f"use layout='scaled' (a scale maps it into range), or pass saturate=True to clamp to ±{limit:g}")
        scaled = "" if fixed is None else f" (divided by scale={float(fixed):g})"
        raise NumericError(
            f"fvt.quantize_fp8: {key!r} has magnitude {e.largest:g}{scaled} beyond {_name(fp8)}'s largest finite "
            f"value {limit:g}. Fix: {fix}"
        ) from None
    return q, (None if s is None else s.to(torch.float32).reshape(()).clone())


_LAYOUT_TAILS: tuple[str, ...] = (_fp8.SCALE_WEIGHT, _fp8.SCALE_INPUT, _fp8.MARKER)


def maybe_fp8(tree: Mapping[str, torch.Tensor]) -> bool:
    """Whether the tree holds a float8 tensor or a key named like the scaled-fp8 layout (a cheap first look)."""
    return any(isinstance(v, torch.Tensor) and v.dtype in _fp8.FP8_DTYPES for v in tree.values()) or any(
        k.endswith(_LAYOUT_TAILS) for k in tree
    )


def runnable(
    tree: Mapping[str, torch.Tensor],
    own: Mapping[str, torch.Tensor],
    compute_dtype: DTypeLike | None,
    fn: str,
) -> Mapping[str, torch.Tensor]:
    """What a module runs on: the layout keys it does not have removed, float8 tensors as Upcast values.

    ``own``: the module's state (key -> its tensor). A float8 value for a key the module keeps in float8
    stays float8; any other becomes ``compute_dtype`` (or, when None, the module's own dtype for that key).
    A tree with no float8 tensor and no layout key is returned as it is.
    """
    skip = frozenset(k for k in tree if k in own)
    layout = check_layout(tree, skip=skip)
    has_fp8 = any(_fp8.is_fp8(v.dtype) for v in tree.values() if isinstance(v, torch.Tensor))
    if not has_fp8 and not layout.is_scaled:
        return tree
    target = None if compute_dtype is None else _compute_dtype(compute_dtype, f"fvt.{fn}", "compute_dtype")

    def want(k: str) -> torch.dtype | None:
        ref = own.get(k)
        dtype = target if target is not None else (ref.dtype if ref is not None else None)
        if dtype is not None and _fp8.is_fp8(dtype) and layout.scales.get(k) is None:
            return None  # the module keeps this tensor in float8 itself
        if dtype is None or _fp8.is_fp8(dtype):
            raise UsageError(
                f"fvt.{fn}: {k!r} is float8 and the module gives no compute dtype for it. "
                f"Fix: fvt.{fn}(module, tree, ..., compute_dtype=torch.bfloat16)"
            )
        return dtype

    return _upcast_tree(tree, layout, want)


def refuse_scaled_cast(tree: Mapping[str, torch.Tensor], target: torch.dtype, only: Pattern | None) -> None:
    """``fvt.cast`` of a float8 weight that has a ``scale_weight`` would drop the scale: refused, showing dequantize."""
    if not any(v.dtype in _fp8.FP8_DTYPES for v in tree.values()):
        return
    scaled = [w for w in _fp8.split_layout(tree).scales if tree[w].dtype != target]
    m = None if only is None else matcher(only)
    hit = [w for w in scaled if m is None or m(w, tree[w])]
    if hit:
        raise UsageError(
            f"fvt.cast(tree, {_name(target)}) would cast scaled float8 weights without their scale_weight "
            f"({format_keys(hit)}): every value off by its scale. Fix: fvt.dequantize(tree, {_name(target)!r}) "
            "applies the scales (lazily) and drops the scale keys"
        )


def check_file(
    tensors: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype], kept: list[str], dtype: torch.dtype | None,
    where: object,
) -> None:
    """``fvt.load``'s check of a float8 checkpoint (``tensors``: all its keys, lazily, ``dtypes`` theirs from the
    header; ``kept``: those selected).

    The layout is checked on the whole file (naming it); a selection that keeps a weight without its scale,
    and a ``dtype=`` cast of scaled weights (the scale would be lost: a silent wrong scale), are refused.
    """
    if not any(d in _fp8.FP8_DTYPES for d in dtypes.values()) and not any(k.endswith(_LAYOUT_TAILS) for k in dtypes):
        return  # no float8 tensor, no layout key: nothing is mapped for this check
    layout = check_layout(tensors, where=where)
    keep = set(kept)
    cut = [w for w, sk in layout.scales.items() if w in keep and sk not in keep]
    if cut:
        raise KeyMismatchError(
            f"{where}: the selection keeps {format_keys(cut)} without their scales "
            f"({format_keys([layout.scales[w] for w in cut])}); the weights would read as unscaled float8. "
            "Fix: select the scale keys too (e.g. select=['blocks.*']), or load everything and fvt.dequantize it"
        )
    if dtype is not None and any(w in keep for w in layout.scales):
        raise UsageError(
            f"{where}: load(dtype={_name(dtype)}) would cast scaled float8 weights without their scale_weight. "
            f"Fix: fvt.dequantize(fvt.load(path), {_name(dtype)!r}) (lazy, scales applied), or "
            "fvt.call(module, fvt.load(path), ..., compute_dtype=...) to run it in float8"
        )


def describe(
    dtypes: Mapping[str, torch.dtype], read: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """What ``fvtransform inspect`` says of a checkpoint's float8 content; None if none.

    ``read``: reads one tensor (lazily); given, each one-element scale is read and those that are not finite
    and positive are listed under ``"damaged_scales"`` (key -> value), the scales ``fvt.load`` refuses.

    Returns ``{"weights", "scaled", "plain", "scale_input", "markers": {key: float8 dtype name}, "dtypes": {name: n},
    "orphan_scales", "damaged_scales"}``.
    """
    fp8 = [k for k, d in dtypes.items() if _fp8.is_fp8(d)]
    layout = _fp8.split_layout(dtypes)
    if not fp8 and not layout.is_scaled:
        return None
    markers = {m: _name(_fp8.marker_fp8_dtype(dtypes[m]) or dtypes[m]) for m in layout.markers}
    weights = [k for k in fp8 if k not in layout.markers]
    counts: dict[str, int] = {}
    for k in weights:
        counts[_name(dtypes[k])] = counts.get(_name(dtypes[k]), 0) + 1
    scaled = sum(1 for k in weights if k in layout.scales)
    damaged: dict[str, str] = {}
    for key in [*layout.scales.values(), *layout.input_scales.values()]:
        if read is None:
            break
        scale = read(key)
        if scale.numel() == 1 and scale.dtype.is_floating_point:
            value = float(scale.detach().float().reshape(()))
            if not (value > 0 and math.isfinite(value)):
                damaged[key] = str(value)
    return {
        "damaged_scales": damaged,
        "weights": len(weights), "scaled": scaled, "plain": len(weights) - scaled,
        "scale_input": len(layout.input_scales), "markers": markers, "orphan_scales": list(layout.orphans),
        "dtypes": counts,
    }
