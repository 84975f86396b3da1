"""Many LoRAs in one batch: each sample of one forward pass with its own adapter, nothing merged.

The batched sibling of :func:`fvtransform.lora.call` (same interception of
linear and convolution calls). Per targeted call, the factors of each
sample's adapter are gathered from an :class:`~fvtransform.lora.AdapterStack`
by ``index`` (punica's BGMV layout: ``A[k(i)]``, ``B[k(i)]``) and the delta
``s_i * x_i A_{k(i)}^T B_{k(i)}^T`` is one batched product, added to the base
output in the same kernel (``baddbmm``). The per-sample scale
``s_i = scales[k(i)] * own_{k(i)}`` is a tensor (0 where ``index`` is -1 or
the adapter does not target the key), so the index and the scales are graph
inputs under ``torch.compile``: changing them does not recompile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from fvtransform._compiler import disabled
from fvtransform._call._call import Out, _as_module, _Forward, _prepare, check_not_meta
from fvtransform._messages import format_keys
from fvtransform.errors import KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora._functorch import is_wrapped
from fvtransform.lora._merge import _is_dtensor
from fvtransform.lora._stack import AdapterStack, _Slot

__all__ = ["call_batched"]

_LINEAR = {F.linear, torch._C._nn.linear}
_CONV = {F.conv1d: F.conv1d, F.conv2d: F.conv2d, F.conv3d: F.conv3d, torch.conv1d: F.conv1d, torch.conv2d: F.conv2d,
         torch.conv3d: F.conv3d}
#: Integer dtypes an index may have.
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class _Target:
    """One key in a call: its name, the gathered factors ``A [b, R, in...]``, ``B [b, out, R]`` and scales ``[b]``.

    DoRA keys also carry each sample's magnitude ``mag [b, out]``, ``eps [b]`` and ``dora [b]`` (1: the
    sample's adapter has DoRA here), float32.
    """

    def __init__(self, key: str, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor) -> None:
        self.key, self.A, self.B, self.scale = key, A, B, scale
        self.mag: torch.Tensor | None = None
        self.eps: torch.Tensor | None = None
        self.dora: torch.Tensor | None = None


class _BatchedMode(TorchFunctionMode):
    """``groups``: None (gather each sample's factors), or the samples of each adapter (one product per group, eager)."""

    def __init__(self, by_weight: Mapping[int, _Target], batch: int, groups: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.by_weight = by_weight
        self.batch = batch
        self.groups = groups
        self.used: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func not in _LINEAR and func not in _CONV:
            return out
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        t = self.by_weight.get(id(weight)) if weight is not None else None
        if t is None:
            return out
        self.used.add(t.key)
        x = args[0] if args else kwargs["input"]
        if x.dim() < 2 or x.shape[0] != self.batch:
            raise UsageError(
                f"fvt.lora.call_batched: the input of {t.key!r} has shape {list(x.shape)}, whose first dim is not the "
                f"batch of {self.batch} samples that index has; each sample's adapter applies along dim 0. Fix: keep "
                "the batch first through the model (no flattening of batch and tokens before this layer), or "
                "merge this target"
            )
        if t.dora is not None:
            if func not in _LINEAR:
                raise UsageError(f"fvt.lora.call_batched: {t.key!r} holds DoRA and is used by a convolution; "
                                 "per-sample DoRA takes linear layers. Fix: merge the DoRA adapters of this target")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _linear_dora(x, out, t, args[1] if len(args) > 1 else kwargs["weight"], bias)
        if func in _LINEAR:
            return _linear(x, out, t) if self.groups is None else _linear_grouped(x, out, t, self.groups)
        return _conv(_CONV[func], x, out, t, args, kwargs)


def _linear(x: torch.Tensor, out: torch.Tensor, t: _Target) -> torch.Tensor:
    """``out_i + s_i (x_i A_i^T) B_i^T`` for every sample ``i``: two batched products, the add fused in the second."""
    b, dtype = x.shape[0], x.dtype
    A = t.A.to(dtype).reshape(b, t.A.shape[1], -1)
    h = torch.bmm(x.reshape(b, -1, A.shape[2]), A.transpose(1, 2))  # [b, tokens, R]
    h = h * t.scale.to(dtype).reshape(b, 1, 1)
    fused = torch.baddbmm(out.reshape(b, -1, out.shape[-1]), h, t.B.to(dtype).transpose(1, 2))
    return fused.reshape(out.shape)


#: Floats of ``W + s B A`` (all samples) one chunk of DoRA's row norms may hold: 64 MiB.
_NORM_CHUNK = 1 << 24


def _linear_dora(x: torch.Tensor, out: torch.Tensor, t: _Target, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """PEFT's DoRA per sample: ``out + (f - 1) * (out - bias) + f * s * B A x`` with ``f = m / (||W + s B A|| + eps)``.

    ``f`` is 1 for samples whose adapter has no DoRA here (or index -1). The row norms of each sample's
    ``W + s B A`` are computed as ``fvt.lora.call`` computes them (float32, detached, as PEFT treats the norm),
    a chunk of rows at a time (``_NORM_CHUNK`` floats for the whole batch). A sum of squares from the factors
    (``||W||^2 + 2 s <W, B A> + s^2 ||B A||^2``) costs as much and loses precision where ``s B A`` nearly
    cancels a row of ``W`` (a property test found a 4e-5 relative error), so it is not used.
    """
    assert t.mag is not None and t.eps is not None and t.dora is not None
    b, dtype = x.shape[0], x.dtype
    with torch.no_grad():
        W = weight.detach().float().reshape(weight.shape[0], -1)
        A, B, s = t.A.detach().float().reshape(b, t.A.shape[1], -1), t.B.detach().float(), t.scale.detach().float()
        step = max(1, _NORM_CHUNK // max(1, b * W.shape[1]))  # rows of W + s B A per sample held at once
        norm = torch.cat([(W[i : i + step] + s[:, None, None] * torch.bmm(B[:, i : i + step], A)).norm(dim=2)
                          for i in range(0, W.shape[0], step)], dim=1) + t.eps[:, None]
        used = t.dora[:, None] > 0
        if not torch.compiler.is_compiling() and bool((used & (norm == 0)).any()):
            sample = int((used & (norm == 0)).any(dim=1).nonzero()[0, 0])
            raise NumericError(f"fvt.lora.call_batched: {t.key!r}: sample {sample}'s DoRA weight W + s B A has a row of "
                               "norm 0; m / ||W + s B A|| is undefined. Fix: another scale, or drop that adapter")
        f = torch.where(used, t.mag / torch.where(used, norm, 1.0), 1.0)
    fx = f.to(dtype).unsqueeze(1)  # [b, 1, out]
    Ax = t.A.to(dtype).reshape(b, t.A.shape[1], -1)
    h = torch.bmm(x.reshape(b, -1, Ax.shape[2]), Ax.transpose(1, 2)) * t.scale.to(dtype).reshape(b, 1, 1)
    lora = torch.bmm(h, t.B.to(dtype).transpose(1, 2))
    flat = out.reshape(b, -1, out.shape[-1])
    base = flat if bias is None else flat - bias.to(dtype)
    return (flat + (fx - 1) * base + fx * lora).reshape(out.shape)


def _linear_grouped(x: torch.Tensor, out: torch.Tensor, t: _Target, groups: list[torch.Tensor]) -> torch.Tensor:
    """The alternative measured by benchmarks/batched_lora_bench.py: one low-rank product per adapter's samples.

    As PEFT's mixed batch does; eager only (the groups come from the index's values).
    """
    b, dtype = x.shape[0], x.dtype
    xs, flat = x.reshape(b, -1, x.shape[-1]), out.reshape(b, -1, out.shape[-1])  # out: this call's own new tensor
    for sel in groups:
        first = int(sel[0])
        A, B = t.A[first].to(dtype).reshape(t.A.shape[1], -1), t.B[first].to(dtype)
        h = xs[sel].reshape(-1, A.shape[1]) @ A.t() * t.scale[first].to(dtype)
        flat.index_add_(0, sel, (h @ B.t()).reshape(sel.shape[0], -1, flat.shape[-1]))
    return flat.reshape(out.shape)


def _conv(conv: Any, x: torch.Tensor, out: torch.Tensor, t: _Target, args: Any, kwargs: Any) -> torch.Tensor:
    """Per-sample ``A_i`` as one grouped convolution (groups = batch), then ``B_i`` (1x1) as a batched product."""
    names = ("stride", "padding", "dilation", "groups")
    given = dict(zip(names, args[3:]))
    given.update({k: v for k, v in kwargs.items() if k in names})
    if given.get("groups", 1) != 1:
        raise UsageError(f"fvt.lora.call_batched: {t.key!r} is a grouped convolution (groups={given['groups']}); "
                         "per-sample adapters take groups=1 convolutions. Fix: merge this target")
    b, dtype, R = x.shape[0], x.dtype, t.A.shape[1]
    weight = args[1] if len(args) > 1 else kwargs["weight"]
    A = t.A.to(dtype).reshape(b * R, *weight.shape[1:])
    h = conv(x.reshape(1, b * x.shape[1], *x.shape[2:]), A, None, given.get("stride", 1), given.get("padding", 0),
             given.get("dilation", 1), b)  # [1, b * R, *spatial]
    h = h.reshape(b, R, -1) * t.scale.to(dtype).reshape(b, 1, 1)
    fused = torch.baddbmm(out.reshape(b, out.shape[1], -1), t.B.to(dtype), h)
    return fused.reshape(out.shape)


def _check_index(index: object, n: int, names: tuple[str, ...]) -> torch.Tensor:
    if isinstance(index, torch.Tensor) and not torch.compiler.is_compiling() and is_wrapped(index):
        raise UsageError("fvt.lora.call_batched with a vmapped index: the call is already the batched form. Fix: call "
                         "it once on the whole batch with a [batch] index (vmap over other dims of the inputs works)")
    if not isinstance(index, torch.Tensor) or index.dtype not in _INDEX_DTYPES or index.dim() != 1:
        found = f"{index.dtype} tensor of shape {list(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise UsageError(
            f"fvt.lora.call_batched: index must be a 1-D integer tensor, one adapter position per sample (-1: none); "
            f"found {found}. Fix: index=torch.tensor([0, 2, -1, 1])"
        )
    if not torch.compiler.is_compiling() and index.numel():
        low, high = int(index.min()), int(index.max())
        if low < -1 or high >= n:
            bad = low if low < -1 else high
            at = int((index == bad).nonzero()[0, 0])
            raise UsageError(
                f"fvt.lora.call_batched: index[{at}] = {bad} is not an adapter position of the stack "
                f"(0..{n - 1}: {list(names)}) nor -1 (no adapter). Fix: index values in -1..{n - 1}"
            )
    return index


def _check_scales(scales: object, n: int) -> torch.Tensor | None:
    if scales is None:
        return None
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point() or tuple(scales.shape) != (n,):
        found = f"{scales.dtype} tensor of shape {list(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise UsageError(
            f"fvt.lora.call_batched: scales must be a 1-D floating tensor with one scale per adapter of the stack "
            f"({n}); found {found}. Fix: scales=torch.ones({n}) (a tensor: changing it does not recompile)"
        )
    return scales


def call_batched(
    module: _Forward[Out],
    tree: Mapping[str, torch.Tensor],
    adapters: AdapterStack,
    /,
    *args: object,
    index: torch.Tensor,
    scales: torch.Tensor | None = None,
    **kwargs: object,
) -> Out:
    """Run ``module`` on a batch with one adapter per sample: sample ``i`` gets ``adapters[index[i]]``, nothing merged.

    For every targeted linear or convolution call, sample ``i``'s output is
    ``base_i + scales[k] * own_k * B_k A_k x_i`` with ``k = index[i]`` and
    ``own_k`` the adapter's own scale (alpha / rank) on that key: what
    ``fvt.lora.call(module, tree, [(adapters[k], scales[k])], x_i)`` computes,
    up to the rounding of the input's dtype. ``index[i] = -1`` gives that
    sample the base output exactly (for finite inputs); so does an adapter
    that does not target a key. The batch is dim 0 of every targeted call's
    input (an error names the key where it is not).

    Under ``torch.compile`` the call traces into one graph for given stack
    shapes (ranks, targets, capacity): ``index`` and ``scales`` are tensors,
    so changing their values does not recompile. Index values are checked
    eagerly only (reading them would break the graph): under compile an
    out-of-range value fails in torch's indexing, untyped.

    Under tensor parallelism (DTensor weights of a ``parallelize_module``-prepared
    module, linear weights placed as ``Shard(0)``, ``Shard(1)`` or ``Replicate()``)
    the gathered factors are placed like their weight, as ``fvt.lora.call``
    places one adapter's: each rank uses its own slice, nothing is gathered;
    such a call is not traced by ``torch.compile`` (it warns and runs eagerly).

    DoRA targets (linear weights, per-output-row magnitudes) run per sample
    as PEFT computes them: ``f * (x W^T + s B A x) + b`` with
    ``f = m / ||W + s B A||`` per row of the sample's adapter, the norms
    worked out at each call, a chunk of rows at a time.

    Not supported (typed errors): a vmapped index (this call is the batched
    form itself), other weight placements, DoRA on convolutions or on sharded
    weights, grouped convolutions.

    Args:
        module: The model (its own tensors are not used).
        tree: The base weights, as for :func:`fvtransform.call`.
        adapters: An :class:`~fvtransform.lora.AdapterStack` (:func:`fvtransform.lora.stack`).
        *args: The module's positional inputs, batch first.
        index: ``[batch]`` integer tensor: the stack position of each sample's adapter, -1 for none.
        scales: ``[len(adapters)]`` floating tensor, each adapter's scale (default 1).
        **kwargs: The module's keyword inputs (``index`` and ``scales`` are this call's own: a module input of
            either name goes positionally).

    Returns:
        What ``module.forward`` returns.

    Raises:
        UsageError: a bad index (dtype, shape, a value outside -1..len-1) or scales, an input whose first dim is not
            the batch, an unsupported weight.
        KeyMismatchError: a stack target is not in the tree, or no linear or convolution used it.
        ShapeMismatchError: a stack target's factors do not fit the tree's weight.

    >>> import torch, fvtransform as fvt
    >>> lin = torch.nn.Linear(2, 2, bias=False)
    >>> tree = fvt.ParamTree({"weight": torch.eye(2)})
    >>> up = fvt.lora.LoraAdapter({"weight": fvt.lora.LowRank(torch.ones(1, 2), torch.ones(2, 1), scale=1.0)})
    >>> s = fvt.lora.stack({"up": up})
    >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    >>> fvt.lora.call_batched(lin, tree, s, x, index=torch.tensor([0, -1]))
    tensor([[2., 1.],
            [1., 0.]])
    """
    return _run(module, tree, adapters, args, kwargs, index, scales, grouped=False)


def _run(module: _Forward[Out], tree: Mapping[str, torch.Tensor], adapters: AdapterStack, args: tuple[object, ...],
         kwargs: dict[str, object], index: torch.Tensor, scales: torch.Tensor | None, *, grouped: bool) -> Out:
    """:func:`call_batched`; ``grouped=True`` runs the per-adapter-group linear path (the benchmark's alternative)."""
    mod = _as_module(module, tree, "lora.call_batched", "stack, *args, index=..., **kwargs")
    if not isinstance(adapters, AdapterStack):
        raise UsageError(f"fvt.lora.call_batched takes an AdapterStack; found {type(adapters).__name__}. "
                         "Fix: fvt.lora.call_batched(module, tree, fvt.lora.stack([a, b]), x, index=...)")
    params, _ = _prepare(mod, tree)
    check_not_meta(params, args, kwargs, "lora.call_batched")
    if torch.compiler.is_compiling() and any(_is_dtensor(params[k]) for k in adapters._slots if k in params):
        return _eager(module, tree, adapters, args, kwargs, index, scales, grouped)
    n = len(adapters)
    idx = _check_index(index, n, adapters.names).to(device=adapters.device, dtype=torch.long)
    per_adapter = _check_scales(scales, n)
    per_adapter = adapters._ones if per_adapter is None else per_adapter.to(device=adapters.device, dtype=torch.float32)
    safe = idx.clamp(min=0)
    rows = adapters._row_index[safe]  # [b] buffer rows
    on = (idx >= 0).to(torch.float32) * per_adapter[safe]  # 0 for index -1
    by_weight: dict[int, _Target] = {}
    for key, slot in adapters._slots.items():
        w = params.get(key)
        _check_target(key, w, slot, adapters)
        assert w is not None
        if id(w) in by_weight:
            raise UsageError(f"fvt.lora.call_batched: {key!r} and {by_weight[id(w)].key!r} are one tied tensor; "
                             "target it under one name")
        target = _Target(key, slot.A[rows], slot.B[rows], slot.own[rows] * on)
        if slot.dora is not None and slot.mag is not None and slot.eps is not None:
            if _is_dtensor(w):
                raise UsageError(f"fvt.lora.call_batched: {key!r} holds DoRA (of {_who(stack=adapters, key=key)}) and "
                                 "is sharded; DoRA needs whole rows. Fix: merge DoRA adapters before sharding")
            target.mag, target.eps, target.dora = slot.mag[rows], slot.eps[rows], slot.dora[rows] * (idx >= 0)
        by_weight[id(w)] = _placed(target, w) if _is_dtensor(w) else target
    groups = [(idx == k).nonzero().flatten() for k in idx.unique().tolist() if k >= 0] if grouped else None
    mode = _BatchedMode(by_weight, int(idx.shape[0]), groups)
    with mode:
        out: Out = torch.func.functional_call(mod, params, args, kwargs, tie_weights=True, strict=False)
    unused = sorted(t.key for t in by_weight.values() if t.key not in mode.used)
    if unused:
        raise KeyMismatchError(
            f"fvt.lora.call_batched: stack targets not used by any linear or convolution call: {format_keys(unused)} "
            f"(adapters {_who(adapters, unused[0])}); per-sample LoRA cannot reach them. Merge those adapters instead"
        )
    return out


@disabled
def _eager(module: _Forward[Out], tree: Mapping[str, torch.Tensor], adapters: AdapterStack, args: tuple[object, ...],
           kwargs: dict[str, object], index: torch.Tensor, scales: torch.Tensor | None, grouped: bool) -> Out:
    """Sharded weights under ``torch.compile``: warn, then run this call eagerly (a graph break), as ``fvt.lora.call`` does."""
    warnings.warn(
        "fvt.lora.call_batched under torch.compile: the stack targets sharded (DTensor) weights, so this call is not "
        "traced and runs eagerly (a graph break). Fix: merge these targets first, or call outside torch.compile",
        stacklevel=3,
    )
    return _run(module, tree, adapters, args, kwargs, index, scales, grouped=grouped)


def _placed(t: _Target, weight: Any) -> _Target:
    """The gathered factors as DTensors placed like their sharded weight (as ``fvt.lora.call`` places one adapter's).

    Weight rows sharded (``Shard(0)``, colwise): ``B [b, out, R]`` by its out dim; columns (``Shard(1)``,
    rowwise): ``A [b, R, in]`` by its in dim; the rest replicated. Each rank slices its own part: no communication.
    """
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    on_b = tuple(Shard(1) if isinstance(p, Shard) and p.dim == 0 else Replicate() for p in placements)
    on_a = tuple(Shard(2) if isinstance(p, Shard) and p.dim == 1 else Replicate() for p in placements)
    every = tuple(Replicate() for _ in placements)
    return _Target(t.key, distribute_tensor(t.A, mesh, on_a, src_data_rank=None),
                   distribute_tensor(t.B, mesh, on_b, src_data_rank=None), distribute_tensor(t.scale, mesh, every, src_data_rank=None))


def _who(stack: AdapterStack, key: str) -> str:
    return ", ".join(stack.describe(i) for i in stack.targets(key)) or "none"


def _check_target(key: str, w: torch.Tensor | None, slot: _Slot, stack: AdapterStack) -> None:
    if w is None:
        raise KeyMismatchError(
            f"fvt.lora.call_batched: stack target {key!r} (of {_who(stack, key)}) is not in the tree; "
            "these adapters were made for another model. Fix: load them with base=tree, or drop them from the stack"
        )
    if _is_dtensor(w):
        from torch.distributed.tensor import Replicate, Shard

        placements = tuple(getattr(w, "placements"))
        bad = [p for p in placements if not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim > 1)]
        if bad or w.dim() != 2:
            raise UsageError(f"fvt.lora.call_batched: {key!r} is placed as {placements}; under tensor "
                             "parallelism per-sample adapters take linear weights placed as Shard(0), Shard(1) or "
                             "Replicate(). Fix: merge this target, or unshard")
    shape = tuple(w.shape)
    flat = len(slot.in_shape) == 1 and len(shape) > 2 and slot.in_shape[0] == _prod(shape[1:])
    if len(shape) < 2 or shape[0] != slot.out_features or (slot.in_shape != shape[1:] and not flat):
        raise ShapeMismatchError(
            f"fvt.lora.call_batched: stack target {key!r} (of {_who(stack, key)}) has out {slot.out_features}, in "
            f"{list(slot.in_shape)}; the tree's weight is {list(shape)}. These adapters were made for another model"
        )


def _prod(dims: tuple[int, ...]) -> int:
    out = 1
    for d in dims:
        out *= int(d)
    return out
