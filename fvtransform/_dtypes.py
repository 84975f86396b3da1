"""The one dtype converter: every argument that takes a dtype takes a ``torch.dtype`` or its name."""

from __future__ import annotations

from typing import Union

import torch

from fvtransform.errors import UsageError

__all__ = ["DTYPES", "DTypeLike", "as_dtype"]

#: Floating dtypes by name (the CLI's ``--dtype``), besides the ``torch.dtype`` values themselves.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64,
}

#: A floating ``torch.dtype`` or one of its names in :data:`DTYPES` (``"bfloat16"``, ``"bf16"``).
DTypeLike = Union[torch.dtype, str]


def as_dtype(dtype: DTypeLike, what: str = "dtype") -> torch.dtype:
    """``dtype`` as a floating ``torch.dtype``, from a dtype or a name in :data:`DTYPES`.

    >>> as_dtype("bf16"), as_dtype(torch.float16)
    (torch.bfloat16, torch.float16)

    Raises:
        UsageError: an unknown name, or a dtype that is not a floating one.
    """
    found = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    raise UsageError(
        f"{what} {dtype!r}: expected a floating torch.dtype or one of {sorted(DTYPES)}, "
        "e.g. torch.bfloat16 or 'bfloat16'"
    )
