"""Checks of arguments many functions take (``strict=``, ``device=``): one wording, a UsageError naming the call."""

from __future__ import annotations

import torch

from fvtransform.errors import UsageError

__all__ = ["check_device", "check_strict"]


def check_strict(strict: object, fn: str) -> bool:
    """``strict`` itself when it is a bool; anything else (``"no"``, ``0``, ``None``) is a caller mistake.

    A truthy string such as ``"no"`` would otherwise mean strict, the opposite of what was meant.

    >>> check_strict(False, "fvt.load")
    False

    Raises:
        UsageError: naming ``fn`` and the right call.
    """
    if isinstance(strict, bool):
        return strict
    raise UsageError(f"{fn}: strict must be True or False; found {type(strict).__name__} {strict!r:.40}. "
                     f"Fix: {fn}(..., strict=False) to allow and report leftovers, strict=True (the default) to refuse them")


def check_device(device: object, fn: str) -> torch.device | str:
    """``device`` unchanged when torch can parse it (``"cpu"``, ``"cuda:0"``, a ``torch.device``).

    >>> check_device("cpu", "fvt.load_model")
    'cpu'

    Raises:
        UsageError: not a device torch knows, naming it and ``fn``.
    """
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            pass
        else:
            return device
    raise UsageError(f"{fn}: device {device!r:.60} is not a device torch knows. Fix: device='cpu', 'cuda', "
                     "'cuda:1' or a torch.device")
