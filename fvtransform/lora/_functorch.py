"""Reading values under ``torch.func`` wrappers (``grad``, ``vjp``, ``vmap``), for checks and digests.

A wrapped tensor has no storage, and ``bool()`` of one fails under ``vmap``.
Checks (finiteness, overflow, zero norms) and digests read the value beneath
every wrapper instead: under ``vmap``, all batch members at once.
"""

from __future__ import annotations

import torch

__all__ = ["is_wrapped", "unwrapped", "concrete"]


def is_wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.func`` wrapped tensor (a grad-tracking or batched tensor)."""
    return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor under every ``torch.func`` wrapper of ``t`` (``t`` itself when there is none)."""
    while is_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def concrete(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values, detached, beneath any ``torch.func`` wrappers (under ``vmap``: every batch member)."""
    with torch._C._DisableFuncTorch():  # under torch.func even a plain tensor's detach() is wrapped
        return unwrapped(t).detach()
