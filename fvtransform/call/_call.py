"""The functional-call boundary: run a module on a tree, strictly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fvtransform.errors import KeyMismatchError, format_keys
from fvtransform.tree._paramtree import ParamTree, state_keys

__all__ = ["call", "call_with_buffers", "check_keys"]


def check_keys(module: nn.Module, tree: Mapping[str, torch.Tensor], *, what: str = "tree") -> dict[str, tuple[str, str]]:
    """Raise :class:`KeyMismatchError` unless ``tree`` has exactly the module's state keys."""
    expected = state_keys(module)
    missing = [k for k in expected if k not in tree]
    unexpected = [k for k in tree if k not in expected]
    if missing or unexpected:
        lines = [f"{what} does not fit {type(module).__name__}:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {format_keys(missing)}")
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): {format_keys(unexpected)}")
        lines.append(
            "Fix: load the checkpoint that belongs to this model, rename keys with fvt.rename, "
            "or select the keys you need with fvt.select."
        )
        raise KeyMismatchError("\n".join(lines))
    return expected


def _prepare(module: nn.Module, tree: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    expected = check_keys(module, tree)
    params: dict[str, torch.Tensor] = {}
    buffer_keys: list[str] = []
    clones: dict[int, torch.Tensor] = {}
    for key, (kind, _owner) in expected.items():
        value = tree[key]
        if kind == "buffer":
            # A module may update buffers in place (BatchNorm): never the caller's tensor.
            if id(value) not in clones:
                clones[id(value)] = value.clone()
            value = clones[id(value)]
            buffer_keys.append(key)
        params[key] = value
    return params, buffer_keys


def call(module: nn.Module, tree: Mapping[str, torch.Tensor], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``module(*args, **kwargs)`` with the tensors of ``tree``, strictly.

    The tree must hold exactly the module's parameters and persistent buffers
    (``torch.func.functional_call`` alone silently falls back to the module's
    own tensors for missing keys). Non-persistent buffers (rotary tables,
    position ids) come from the module. Buffers are cloned at the boundary, so
    a module that updates them in place does not change the tree; use
    :func:`call_with_buffers` to get the updated buffers back. The module
    object and the tree are not mutated.

    >>> import torch, fvtransform as fvt
    >>> lin = torch.nn.Linear(2, 1)
    >>> tree = fvt.ParamTree({"weight": torch.ones(1, 2), "bias": torch.zeros(1)})
    >>> fvt.call(lin, tree, torch.tensor([[1.0, 2.0]]))
    tensor([[3.]])
    >>> fvt.call(lin, {"weight": torch.ones(1, 2)}, torch.zeros(1, 2))
    Traceback (most recent call last):
    ...
    fvtransform.errors.KeyMismatchError: tree does not fit Linear:
      missing (1): ['bias']
    Fix: load the checkpoint that belongs to this model, rename keys with fvt.rename, or select the keys you need with fvt.select.
    """
    params, _ = _prepare(module, tree)
    return torch.func.functional_call(module, params, args, kwargs, tie_weights=True, strict=False)


def call_with_buffers(
    module: nn.Module, tree: Mapping[str, torch.Tensor], /, *args: Any, **kwargs: Any
) -> tuple[Any, ParamTree]:
    """Like :func:`call`, and also return a new tree holding the updated buffers.

    >>> import torch, fvtransform as fvt
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> tree = fvt.ParamTree.from_module(bn)
    >>> _, new = fvt.call_with_buffers(bn, tree, torch.randn(4, 2))
    >>> int(new["num_batches_tracked"]), int(tree["num_batches_tracked"])
    (1, 0)
    """
    params, buffer_keys = _prepare(module, tree)
    out = torch.func.functional_call(module, params, args, kwargs, tie_weights=True, strict=False)
    base = tree if isinstance(tree, ParamTree) else ParamTree(tree)
    return out, base.update({k: params[k] for k in buffer_keys})
