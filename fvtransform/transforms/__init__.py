"""Transform factories: each returns a :class:`Transform` for :func:`chain`."""

from fvtransform.transforms._transform import (
    Transform,
    as_transform,
    cast,
    chain,
    drop,
    map_tensors,
    rename,
    select,
    to,
    update,
)

__all__ = ["Transform", "as_transform", "cast", "chain", "drop", "map_tensors", "rename", "select", "to", "update"]
