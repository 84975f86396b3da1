"""Transform factories: each returns a :class:`Transform`, a step for :func:`chain`.

Each tree operation has one eager function, ``fvt.X(tree, ...)``, and one
factory here, ``fvt.transforms.X(...)``: ``fvt.transforms.X(args)(tree) == fvt.X(tree, args)``.
"""

from fvtransform import _unlisted
from fvtransform.transforms._fp8 import dequantize, quantize_fp8
from fvtransform.transforms._lora import merge_lora, unmerge_lora
from fvtransform.transforms._transform import (
    Transform,
    cast,
    chain,
    drop,
    map_tensors,
    rename,
    select,
    to,
    update,
)

__all__ = [
    "Transform",
    "cast",
    "chain",
    "dequantize",
    "drop",
    "map_tensors",
    "merge_lora",
    "quantize_fp8",
    "rename",
    "select",
    "to",
    "unmerge_lora",
    "update",
]

__getattr__ = _unlisted.module_getattr("transforms")  # a name this module no longer lists shows the public way
