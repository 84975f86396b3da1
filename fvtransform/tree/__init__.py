"""Parameter trees and the operations on them."""

from fvtransform.tree._match import Pattern, matcher
from fvtransform.tree._ops import cast, combine, drop, map_tensors, partition, rename, select, to, update
from fvtransform.tree._paramtree import ParamTree, state_keys, tensors_equal
from fvtransform.tree._rename import ComposedRename, Rename, RenameRules

__all__ = [
    "ComposedRename",
    "ParamTree",
    "Pattern",
    "Rename",
    "RenameRules",
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
