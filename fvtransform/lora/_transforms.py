"""LoRA merge and unmerge as :class:`~fvtransform.Transform` steps for ``chain``."""

from __future__ import annotations

from fvtransform.lora._merge import AdapterSet, merge, unmerge
from fvtransform.transforms._transform import Transform

__all__ = ["merge_transform", "unmerge_transform"]


def merge_transform(adapters: AdapterSet, scale: float = 1.0) -> Transform:
    """``chain`` step: merge ``adapters`` at ``scale``."""
    return Transform(lambda t: merge(t, adapters, scale), f"lora.merge(scale={scale:g})")


def unmerge_transform(adapters: AdapterSet, scale: float = 1.0) -> Transform:
    """``chain`` step: unmerge ``adapters`` at ``scale``."""
    return Transform(lambda t: unmerge(t, adapters, scale), f"lora.unmerge(scale={scale:g})")
