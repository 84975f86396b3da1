"""Parameter trees, the operations on them, and key maps."""

from fvtransform.tree._keymap import Fuse, KeyMap, MappingPlan, Rename, Split
from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._ops import cast, combine, drop, map_tensors, partition, rename, select, to, update
from fvtransform.tree._paramtree import ParamTree, state_keys, tensors_equal

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
    "drop",
    "map_tensors",
    "matcher",
    "partition",
    "rename",
    "select",
    "state_keys",
    "tensors_equal",
    "to",
    "update",
]
