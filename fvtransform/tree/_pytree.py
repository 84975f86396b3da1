"""A small compatibility wrapper over ``torch.utils._pytree``.

torch's pytree module is private and its registration function has changed
name and keywords across releases; this file is the one place that knows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.utils._pytree as _torch_pytree

__all__ = ["register_node", "tree_flatten", "tree_unflatten", "tree_map"]

tree_flatten = _torch_pytree.tree_flatten
tree_unflatten = _torch_pytree.tree_unflatten
tree_map = _torch_pytree.tree_map


def register_node(
    cls: type,
    flatten: Callable[[Any], tuple[list[Any], Any]],
    unflatten: Callable[[Iterable[Any], Any], Any],
    *,
    name: str,
    flatten_with_keys: Callable[[Any], tuple[list[tuple[Any, Any]], Any]] | None = None,
) -> None:
    """Register ``cls`` as a pytree node with torch (once; idempotent)."""
    if cls in _torch_pytree.SUPPORTED_NODES:
        return
    register = getattr(_torch_pytree, "register_pytree_node", None)
    if register is None:  # pragma: no cover - very old torch
        register = _torch_pytree._register_pytree_node
    kwargs: dict[str, Any] = {"serialized_type_name": name}
    if flatten_with_keys is not None:
        kwargs["flatten_with_keys_fn"] = flatten_with_keys
    try:
        register(cls, flatten, unflatten, **kwargs)
    except TypeError:  # pragma: no cover - older keyword set
        register(cls, flatten, unflatten)


def mapping_key(name: str) -> Any:
    """The key-path entry torch uses for a mapping key."""
    return _torch_pytree.MappingKey(name)
