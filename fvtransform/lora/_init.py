"""A fresh LoRA for training, initialised as PEFT initialises one: Kaiming-uniform A, zero B."""

from __future__ import annotations

from collections.abc import Mapping
import math

import torch

from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._fp8 import is_fp8
from fvtransform.errors import KeyMismatchError, UsageError
from fvtransform.lora._adapter import Delta, LoraAdapter, LowRank
from fvtransform.lora._compiled import MAX_PAD_RANK, _check_rank
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._ops import format_keys

__all__ = ["init_adapter"]


def init_adapter(
    tree: Mapping[str, torch.Tensor],
    *,
    targets: Pattern,
    rank: int,
    alpha: float | None = None,
    generator: torch.Generator | None = None,
    dtype: DTypeLike = torch.float32,
) -> LoraAdapter:
    """A new adapter to train on ``tree``'s matching weights: ``A`` Kaiming-uniform, ``B`` zero, so ``delta = 0``.

    As PEFT's default (``init_lora_weights=True``, ``reset_lora_parameters``):
    ``A`` is drawn by ``torch.nn.init.kaiming_uniform_(A, a=sqrt(5))``, i.e.
    uniform in ``±1/sqrt(fan_in)`` with ``fan_in = prod(weight.shape[1:])``
    (``in``, or ``in * k...`` for a conv), and ``B`` is zeros; ``scale =
    alpha / rank``. A is ``[rank, *weight.shape[1:]]`` and B
    ``[out, rank, 1...]``, as :class:`LowRank` holds a conv. Values are drawn
    in float32 from ``generator`` (targets in the tree's order, one draw each)
    and rounded once into ``dtype``; with the same generator state PEFT's A
    for one layer is the same bits (tests check it). Tied weights get one
    target (the first key).

    Args:
        tree: The base tree.
        targets: Which weights (a key pattern); each must have 2 or more dims.
        rank: The rank, 1 to 65536.
        alpha: LoRA alpha; None means ``rank`` (scale 1).
        generator: The random source; None uses torch's global generator (as ``torch.nn.init`` does).
        dtype: The factors' floating dtype (float32 by default, as training wants).

    Returns:
        A :class:`LoraAdapter` of fresh tensors (they do not require grad: use
        ``torch.func.grad`` on the adapter, or ``requires_grad_()`` its
        tensors for an optimizer).

    Raises:
        KeyMismatchError: ``targets`` matches no weight with 2 or more dims.
        UsageError: ``rank``, ``alpha``, ``generator`` or ``dtype`` is not valid.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.zeros(4, 3), "l.bias": torch.zeros(4)})
    >>> a = fvt.lora.init_adapter(tree, targets="*.weight", rank=2, generator=torch.Generator().manual_seed(0))
    >>> a["l.weight"].A.shape, a["l.weight"].B.abs().sum().item(), a["l.weight"].scale
    (torch.Size([2, 3]), 0.0, 1.0)
    """
    _check_rank(rank, "fvt.lora.init_adapter", MAX_PAD_RANK)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
                              or alpha == 0):
        raise UsageError(f"fvt.lora.init_adapter: alpha must be a finite, non-zero number or None; found {alpha!r}. "
                         "Pass e.g. alpha=8 (scale = alpha / rank)")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UsageError(f"fvt.lora.init_adapter: generator must be a torch.Generator; found {type(generator).__name__}. "
                         "Pass generator=torch.Generator().manual_seed(0)")
    out_dtype = as_dtype(dtype)
    if is_fp8(out_dtype):
        raise UsageError(f"fvt.lora.init_adapter: dtype={out_dtype} is float8; train the factors in float32 or "
                         "bfloat16 and quantize after training")
    m = matcher(targets)
    a = float(rank) if alpha is None else float(alpha)
    seen: set[int] = set()
    out: dict[str, Delta] = {}
    for key, w in tree.items():
        if w.dim() < 2 or not m(key, w) or id(w) in seen:
            continue
        seen.add(id(w))
        if generator is not None and w.device.type != generator.device.type:
            raise UsageError(f"fvt.lora.init_adapter: {key!r} is on {w.device}, the generator on {generator.device}; "
                             f"pass a generator of that device: torch.Generator({w.device.type!r})")
        A = torch.empty((rank, *w.shape[1:]), dtype=torch.float32, device=w.device)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        B = torch.zeros((w.shape[0], rank) + (1,) * (w.dim() - 2), dtype=out_dtype, device=w.device)
        out[key] = LowRank(A.to(out_dtype), B, a / rank, a)
    if not out:
        shown = format_keys([k for k, w in tree.items() if w.dim() >= 2][:6])
        raise KeyMismatchError(f"fvt.lora.init_adapter: targets={targets!r} matched no weight with 2 or more dims "
                               f"(weights look like {shown}). Fix the pattern")
    return LoraAdapter(out, format="memory")
