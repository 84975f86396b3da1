"""Which file of a folder (or of a repo's folder) holds the LoRA: one order for ``fvt.lora.load`` and the hub.

The order is diffusers' ``_best_guess_weight_name`` (what ``lora_state_dict`` and
``load_lora_weights`` pick), plus PEFT's file name, and strict where diffusers guesses.
"""

from __future__ import annotations

from collections.abc import Iterable

from fvtransform.errors import NotFoundError, UsageError
from fvtransform.lora._format_table import DIFFUSERS_WEIGHTS, PEFT_WEIGHTS

__all__ = ["pick_lora_file", "LORA_FILE_NAMES"]

#: The known names, most preferred first (the offline cache is probed in this order).
LORA_FILE_NAMES: tuple[str, ...] = (DIFFUSERS_WEIGHTS, PEFT_WEIGHTS)
#: diffusers never picks a file whose name holds one of these (not a LoRA checkpoint).
NOT_LORA: tuple[str, ...] = ("scheduler", "optimizer", "checkpoint")


def pick_lora_file(names: Iterable[str], label: str, weight_name: str | None = None) -> str:
    """The LoRA weights file among ``names`` (the top-level file names of a folder).

    1. ``weight_name``, when given (it must be one of ``names``).
    2. The candidates: the ``*.safetensors`` names holding none of ``scheduler``,
       ``optimizer``, ``checkpoint`` (diffusers' filter).
    3. If some end in ``pytorch_lora_weights.safetensors`` (diffusers'
       ``save_lora_weights``): those (diffusers' first choice);
    4. else ``adapter_model.safetensors`` (PEFT's ``save_pretrained``), if present;
    5. else every candidate.

    One left: that one. Several: :class:`UsageError` listing them and naming
    ``weight_name=`` (diffusers warns and takes the first in the folder's
    listing order; fvtransform does not guess). None: :class:`NotFoundError`.

    >>> pick_lora_file(["adapter_model.safetensors", "pytorch_lora_weights.safetensors"], "folder")
    'pytorch_lora_weights.safetensors'
    >>> pick_lora_file(["optimizer.safetensors", "my_lora.safetensors", "README.md"], "folder")
    'my_lora.safetensors'
    """
    names = sorted(names)
    if weight_name is not None:
        if weight_name not in names:
            raise NotFoundError(f"{label}: no file {weight_name!r}; files: {names}. Fix: pass one of them as weight_name=")
        return weight_name
    candidates = [n for n in names if n.endswith(".safetensors") and not any(s in n for s in NOT_LORA)]
    diffusers = [n for n in candidates if n.endswith(DIFFUSERS_WEIGHTS)]
    if diffusers:
        candidates = diffusers
    elif PEFT_WEIGHTS in candidates:
        candidates = [PEFT_WEIGHTS]
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise UsageError(f"{label}: several LoRA candidates {candidates}; pass weight_name= to choose one")
    raise NotFoundError(f"{label}: no LoRA weights (*.safetensors) found; files: {names[:12]}")
