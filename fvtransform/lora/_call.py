"""On-the-fly LoRA: run a module with adapters applied, nothing merged.

A ``TorchFunctionMode`` watches the linear and convolution calls of the
forward pass; when the weight is (by identity) a targeted tensor of the tree,
it adds ``scale * B(A(x))``. The module object is never changed: no layers
replaced, no hooks registered. A target that no linear or convolution used is
an error, so an adapter is never silently ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fvtransform._compiler import disabled
from fvtransform._call._call import _as_module, _Forward, _prepare, check_not_meta, Out
from fvtransform._messages import format_keys
from fvtransform.errors import KeyMismatchError, UsageError
from fvtransform.lora._adapter import GENERATED, Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._dora import dense_delta, dora_factor
from fvtransform.lora._merge import _is_dtensor, normalize_adapters

__all__ = ["call"]

_LINEAR = {F.linear, torch._C._nn.linear}
_CONV = {F.conv1d: F.conv1d, F.conv2d: F.conv2d, F.conv3d: F.conv3d, torch.conv1d: F.conv1d, torch.conv2d: F.conv2d, torch.conv3d: F.conv3d}


#: A pair's scale: a number (dynamo guards on its value) or a 0-d floating tensor (a graph input: no recompiles).
Scale = float | torch.Tensor
#: What ``fvt.lora.call`` takes: an adapter or ``[(adapter, scale), ...]`` with number or 0-d tensor scales.
CallAdapters = LoraAdapter | Sequence[tuple[LoraAdapter, Scale]]


class _Dense:
    """A dense delta built inside the call (a plain class: dynamo cannot trace building a frozen attrs object)."""

    def __init__(self, D: torch.Tensor) -> None:
        self.D = D


class _BiasDelta(_Dense):
    """A bias delta, applied where its weight is used (broadcast over the output)."""


class _ShardedLowRank:
    """Factors as DTensors placed to match a sharded weight: A takes its column placement, B its row one."""

    def __init__(self, d: LowRank, weight: Any) -> None:
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        mesh, placements = weight.device_mesh, tuple(weight.placements)
        rows = tuple(Shard(0) if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in placements)
        cols = tuple(Shard(1) if isinstance(p, Shard) and p.dim == 1 else Replicate() for p in placements)
        if any(not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim > 1) for p in placements) or d.A.dim() != 2:
            raise UsageError(f"on-the-fly LoRA on a weight placed as {placements}: only Shard(0), Shard(1) and Replicate() of linear weights")
        # each rank slices its own part of the small factors: no communication
        self.A = distribute_tensor(d.A, mesh, cols, src_data_rank=None)
        self.B = distribute_tensor(d.B, mesh, rows, src_data_rank=None)


class _DoraPart:
    """A DoRA target: its delta and the factor ``m / ||W + s delta||`` (computed once per call).

    ``axis`` 0: one factor per output row (scales the output); 1: one per
    input channel (scales the input: ``(x * f) (W + s delta)^T``).
    """

    def __init__(self, d: Any, factor: torch.Tensor, axis: int) -> None:
        self.d = d
        self.factor = factor
        self.axis = axis


def _dense(d: Any, weight: torch.Tensor) -> _Dense:
    """A LoHa/LoKr delta as its dense, unscaled float32 delta (built once per call, like LyCORIS' conv bypass)."""
    return _Dense(dense_delta(d, tuple(weight.shape), weight.device))


class _LoraMode(TorchFunctionMode):
    def __init__(self, by_weight: Mapping[int, tuple[str, list[tuple[Scale, Any]]]]) -> None:
        super().__init__()
        self.by_weight = by_weight
        self.used: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        hit = None
        if func in _LINEAR or func in _CONV:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.by_weight.get(id(weight)) if weight is not None else None
        in_axis = [p for p in hit[1] if isinstance(p[1], _DoraPart) and p[1].axis == 1] if hit is not None else []
        if in_axis and hit is not None:  # the input is rescaled: the base call itself changes
            self.used.add(hit[0])
            out = self._dora_input_axis(func, in_axis[0][0], in_axis[0][1], args, kwargs)
            x = args[0] if args else kwargs["input"]
            for scale, d in hit[1]:
                if not isinstance(d, _DoraPart):
                    out = out + scale * _delta(func, x, d, args, kwargs)
            return out
        out = func(*args, **kwargs)
        if func in _LINEAR or func in _CONV:
            if hit is not None:
                key, parts = hit
                self.used.add(key)
                x = args[0] if args else kwargs["input"]
                for scale, d in parts:
                    if isinstance(d, _DoraPart):
                        out = self._dora(func, x, out, scale, d, args, kwargs)
                    elif isinstance(d, _ShardedLowRank):
                        out = out + scale * F.linear(F.linear(x, d.A.to(x.dtype)), d.B.to(x.dtype))
                    elif func in _LINEAR and type(d) is LowRank and d.A.dim() == 2:
                        out = _linear_lowrank(x, out, scale, d)
                    else:
                        out = out + scale * _delta(func, x, d, args, kwargs)
        return out

    def _dora(self, func: Any, x: torch.Tensor, out: torch.Tensor, scale: Scale, part: _DoraPart, args: Any, kwargs: Any) -> torch.Tensor:
        """``f * (x W^T + s B A x) + b`` with ``f = m / ||W + s B A||`` per output row, as PEFT computes it."""
        shape = (-1,) if func in _LINEAR else (1, -1, *([1] * (x.dim() - 2)))
        f = part.factor.to(out.dtype).reshape(shape)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        base = out if bias is None else out - bias.reshape(shape)
        lora = _delta(func, x, part.d, args, kwargs)
        return out + (f - 1) * base + f * (scale * lora)

    def _dora_input_axis(self, func: Any, scale: Scale, part: _DoraPart, args: Any, kwargs: Any) -> torch.Tensor:
        """``W' = (W + s delta) * f`` per input channel, so ``y = op(x * f, W) + s * delta(x * f)`` (+ bias once)."""
        args = list(args)
        x = args[0] if args else kwargs["input"]
        weight = args[1] if len(args) > 1 else kwargs["weight"]
        f = part.factor.to(x.dtype)
        if func in _LINEAR:
            xs = x * f
        else:
            groups = x.shape[1] // weight.shape[1]
            xs = x * f.repeat(groups).reshape(1, -1, *([1] * (x.dim() - 2)))
        if args:
            args[0] = xs
        else:
            kwargs = {**kwargs, "input": xs}
        return func(*args, **kwargs) + scale * _delta(func, xs, part.d, args, kwargs)


def _linear_lowrank(x: torch.Tensor, out: torch.Tensor, scale: Scale, d: LowRank) -> torch.Tensor:
    """``out + scale * (x A^T) B^T`` with the add fused into one matmul (``addmm``), no extra output pass.

    A tensor scale multiplies the small ``x A^T`` (rank columns) instead: ``addmm``'s ``alpha`` is a number.
    """
    h = F.linear(x, d.A.to(x.dtype)).reshape(-1, d.A.shape[0])
    if isinstance(scale, torch.Tensor):
        h, scale = h * scale.to(h.dtype), 1.0
    flat = out.reshape(-1, out.shape[-1])
    fused = torch.addmm(flat, h, d.B.to(x.dtype).reshape(d.B.shape[0], -1).t(), alpha=scale)
    return fused.reshape(out.shape)


def _delta(func: Any, x: torch.Tensor, d: Any, args: Any, kwargs: Any) -> torch.Tensor:
    if isinstance(d, _BiasDelta):
        D = d.D.to(x.dtype)
        return D if func in _LINEAR else D.reshape(1, -1, *([1] * (x.dim() - 2)))
    if isinstance(d, (FullDelta, _Dense)):
        if func in _LINEAR:
            return F.linear(x, d.D.to(x.dtype))
        conv = _CONV[func]
        rest = list(args[3:]) if len(args) > 3 else []
        return conv(x, d.D.to(x.dtype), None, *rest, **{k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")})
    A, B = d.A.to(x.dtype), d.B.to(x.dtype)
    if func in _LINEAR:
        return F.linear(F.linear(x, A.reshape(A.shape[0], -1)), B.reshape(B.shape[0], -1))
    conv = _CONV[func]
    rest = list(args[3:]) if len(args) > 3 else []
    extra = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
    h = conv(x, A, None, *rest, **extra)
    return conv(h, B, None)


def call(
    module: _Forward[Out],
    tree: Mapping[str, torch.Tensor],
    adapters: CallAdapters,
    /,
    *args: object,
    compute_dtype: torch.dtype | str | None = None,
    **kwargs: object,
) -> Out:
    """Run ``module`` on ``tree`` with adapters applied on the fly: ``base(x) + s * B(A(x))``.

    LyCORIS LoHa/LoKr targets are applied as their dense delta, built once
    per call (``base(x) + s * op(x, delta)``, as LyCORIS' own bypass does for
    convolutions).

    ``adapters`` is an adapter or ``[(adapter, scale), ...]``. Nothing is
    merged; the module and the trees are not changed. Full deltas and bias
    deltas are applied too (bias deltas through the weight's call), and DoRA
    targets as PEFT and LyCORIS compute them (``m / ||W + s delta||`` per
    output row, or per input channel for LyCORIS ``wd_on_output=False``, worked out
    once per call). Every target must be used by a linear or convolution
    call of the forward pass, or the call raises. Under tensor parallelism
    (DTensor weights of a ``parallelize_module``-prepared module), the
    factors are placed like their weight (A by its columns, B by its rows):
    each rank uses its own slice and nothing is gathered.

    Switching adapters is passing another one: no module is built or
    changed. A pair's scale may be a 0-d floating tensor.

    A float8 base runs as in :func:`fvtransform.call`: each weight is
    dequantised to ``compute_dtype`` (default: the module's own dtype) as its
    layer runs, and the adapter is added on top.

    Under ``torch.compile`` the call traces: the low-rank products are in
    the graph. Tensors are graph inputs, so another adapter with the same
    targets, ranks and own scales (alpha / rank) reuses the graph; give
    the pair scales as 0-d tensors to change them without recompiling (a
    number is guarded on its value: its first change recompiles once).
    DoRA targets (their norm check reads tensor values) and sharded
    (DTensor) weights are not traced: the call warns and runs eagerly.

    >>> import torch, fvtransform as fvt
    >>> from fvtransform.lora import LoraAdapter, LowRank
    >>> lin = torch.nn.Linear(2, 2, bias=False)
    >>> tree = fvt.ParamTree({"weight": torch.eye(2)})
    >>> a = LoraAdapter({"weight": LowRank(torch.ones(1, 2), torch.ones(2, 1), scale=1.0)})
    >>> fvt.lora.call(lin, tree, a, torch.tensor([[1.0, 0.0]]))
    tensor([[2., 1.]])
    """
    mod = _as_module(module, tree, "lora.call", "adapters, *args, **kwargs")
    params, _ = _prepare(mod, tree, compute_dtype=compute_dtype, fn="lora.call")
    check_not_meta(params, args, kwargs, "lora.call")
    plain, tensor_scales = _split_tensor_scales(adapters)
    pairs = normalize_adapters(plain)
    if torch.compiler.is_compiling():
        why = _untraceable(pairs, params)
        if why is not None:
            return _eager(why, module, tree, adapters, *args, compute_dtype=compute_dtype, **kwargs)
    replaced = _replacements(pairs, params)
    params = {**params, **replaced}
    by_weight: dict[int, tuple[str, list[tuple[Scale, Any]]]] = {}
    bias_of: dict[str, str] = {}
    for (adapter, s), ts in zip(pairs, tensor_scales):
        for key, d in adapter.items():
            if key not in params:
                raise KeyMismatchError(f"adapter target {key!r} is not in the tree; load the adapter with base=")
            if isinstance(d, FullDelta) and d.replaces:
                if ts is not None:
                    raise UsageError(f"{key!r}: a full replacement (modules_to_save) is used whole, at scale 1; found a tensor scale")
                continue
            if key in replaced:
                raise UsageError(f"{key!r}: a full replacement (modules_to_save) cannot be combined with other deltas on that weight")
            if not isinstance(d, FullDelta) and d.magnitude is not None:
                entry = by_weight.setdefault(id(params[key]), (key, []))
                if entry[1]:
                    raise UsageError(f"{key!r}: a DoRA target takes one adapter alone (its magnitude rescales the whole weight)")
                if _is_dtensor(params[key]):
                    raise UsageError(f"{key!r}: on-the-fly DoRA needs whole rows and columns; merge DoRA adapters before sharding")
                dora_scale = s * d.scale * (1.0 if ts is None else float(ts))  # eager only: DoRA is not traced
                factor, axis = dora_factor(params[key], d, dora_scale, where=f"{key!r}")
                lin = _dense(d, params[key]) if isinstance(d, GENERATED) else d
                entry[1].append((dora_scale, _DoraPart(lin, factor, axis)))
                continue
            hit = by_weight.get(id(params[key]))
            if hit is not None and any(isinstance(p, _DoraPart) for _, p in hit[1]):
                raise UsageError(f"{key!r}: a DoRA target takes one adapter alone (its magnitude rescales the whole weight)")
            if key.endswith(".bias") and isinstance(d, FullDelta):
                weight_key = key[: -len(".bias")] + ".weight"
                if weight_key not in params:
                    raise KeyMismatchError(f"bias delta {key!r} has no weight {weight_key!r} in the tree")
                bias_of[key] = weight_key
                wid = id(params[weight_key])
                entry = by_weight.setdefault(wid, (weight_key, []))
                entry[1].append((_times(s * d.scale, ts), _BiasDelta(d.D)))
                continue
            entry = by_weight.setdefault(id(params[key]), (key, []))
            effective = _times(s * d.scale, ts)
            part: Delta | _ShardedLowRank | _Dense = d
            if isinstance(d, GENERATED):
                if _is_dtensor(params[key]):
                    raise UsageError(f"{key!r}: on-the-fly LoHa/LoKr on a sharded weight is not supported; merge it before sharding")
                part = _dense(d, params[key])
            elif _is_dtensor(params[key]) and isinstance(d, LowRank):
                part = _ShardedLowRank(d, params[key])
            entry[1].append((effective, part))
    mode = _LoraMode(by_weight)
    with mode:
        out = torch.func.functional_call(mod, params, args, kwargs, tie_weights=True, strict=False)
    unused = [k for _, (k, _) in by_weight.items() if k not in mode.used]
    if unused:
        raise KeyMismatchError(
            f"adapter targets not used by any linear or convolution call: {format_keys(unused)}; "
            "on-the-fly LoRA cannot reach them. Merge the adapter with fvt.lora.merge instead."
        )
    return out


def _replacements(pairs: list[tuple[Any, float]], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT ``modules_to_save``: the tensors that stand in for base parameters (at scale 1, one per key)."""
    out: dict[str, torch.Tensor] = {}
    for adapter, s in pairs:
        for key, d in adapter.items():
            if not (isinstance(d, FullDelta) and d.replaces):
                continue
            if key not in params:
                raise KeyMismatchError(f"adapter target {key!r} is not in the tree; load the adapter with base=")
            if key in out or s != 1.0:
                raise UsageError(f"{key!r}: a full replacement (modules_to_save) is used whole, once, at scale 1 (found scale {s:g})")
            out[key] = d.D.to(device=params[key].device, dtype=params[key].dtype)
    return out


def _times(scale: float, tensor: torch.Tensor | None) -> Scale:
    """A pair's number scale times its tensor scale, when it has one (then a 0-d tensor)."""
    return scale if tensor is None else tensor * scale


def _split_tensor_scales(adapters: CallAdapters) -> tuple[Any, list[torch.Tensor | None]]:
    """Pairs with 0-d tensor scales -> the same pairs at scale 1 (for ``normalize_adapters``) and those tensors."""
    if isinstance(adapters, LoraAdapter) or not isinstance(adapters, (list, tuple)):
        return adapters, [None]
    plain: list[object] = []
    tensors: list[torch.Tensor | None] = []
    for item in adapters:
        scale = item[1] if isinstance(item, (tuple, list)) and len(item) == 2 else None
        if not isinstance(scale, torch.Tensor):
            plain.append(item)
            tensors.append(None)
            continue
        if scale.dim() != 0 or not scale.is_floating_point():
            raise UsageError(
                f"fvt.lora.call: a pair's tensor scale must be a 0-d floating tensor; found {scale.dtype} of shape "
                f"{list(scale.shape)}. Fix: [(adapter, torch.tensor(0.8)), ...] or a number"
            )
        plain.append((item[0], 1.0))
        tensors.append(scale)
    return plain, tensors


def _untraceable(pairs: list[tuple[LoraAdapter, float]], params: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``torch.compile`` cannot trace this call (the first reason), or None."""
    for adapter, _ in pairs:
        for key, d in adapter.items():
            if not isinstance(d, FullDelta) and d.magnitude is not None:
                return f"{key!r} is a DoRA target (its weight-norm check reads tensor values)"
            if key in params and _is_dtensor(params[key]):
                return f"{key!r} is a sharded (DTensor) weight"
    return None


@disabled
def _eager(why: str, module: _Forward[Out], tree: Mapping[str, torch.Tensor], adapters: CallAdapters, /, *args: object,
           compute_dtype: torch.dtype | str | None = None, **kwargs: object) -> Out:
    """The explicit fallback under ``torch.compile``: warn, then run this call eagerly (a graph break)."""
    warnings.warn(
        f"fvt.lora.call under torch.compile: {why}, so this call is not traced and runs eagerly (a graph break). "
        "Fix: merge these targets first (fvt.lora.merge) to compile them, or call outside torch.compile",
        stacklevel=2,
    )
    return call(module, tree, adapters, *args, compute_dtype=compute_dtype, **kwargs)
