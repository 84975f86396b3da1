"""Parameter trees, the operations on them, and key maps."""

from fvtransform import _unlisted
from fvtransform.tree._fp8 import dequantize, quantize_fp8
from fvtransform.tree._keymap import Fuse, KeyMap, MappingPlan, Rename, Split
from fvtransform.tree._match import Pattern
from fvtransform.tree._ops import cast, combine, drop, map_tensors, partition, rename, select, to, update
from fvtransform.tree._paramtree import ParamTree, tensors_equal

__all__ = [
    "Fuse",
    "KeyMap",
    "MappingPlan",
    "ParamTree",
    "Pattern",
    "Rename",
    "Split",
    "cast",
    "combine",
    "dequantize",
    "drop",
    "map_tensors",
    "partition",
    "quantize_fp8",
    "rename",
    "select",
    "tensors_equal",
    "to",
    "update",
]

__getattr__ = _unlisted.module_getattr("tree")  # a name this module no longer lists shows the public way
