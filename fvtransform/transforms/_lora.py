"""LoRA merge and unmerge as transform factories, for :func:`~fvtransform.chain`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fvtransform.transforms._transform import Transform, factory

if TYPE_CHECKING:
    from fvtransform.lora._merge import AdapterSet

__all__ = ["merge_lora", "unmerge_lora"]


@factory("lora.merge")
def merge_lora(adapters: AdapterSet, scale: float = 1.0) -> Transform:
    """Transform form of :func:`fvtransform.lora.merge`: merge ``adapters`` at ``scale``.

    >>> import torch, fvtransform as fvt
    >>> tree = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> adapter = fvt.lora.random_adapter(tree, targets="l.weight", rank=2)
    >>> step = fvt.transforms.merge_lora(adapter, 0.5)
    >>> step
    merge_lora(scale=0.5)
    >>> step(tree) == fvt.lora.merge(tree, adapter, 0.5)
    True
    """
    from fvtransform.lora._merge import merge, normalize_adapters

    normalize_adapters(adapters, scale)  # the adapters and the scale are checked when the step is built
    return Transform(lambda t: merge(t, adapters, scale), f"merge_lora(scale={scale:g})")


@factory("lora.unmerge")
def unmerge_lora(adapters: AdapterSet, scale: float = 1.0) -> Transform:
    """Transform form of :func:`fvtransform.lora.unmerge`: subtract ``adapters`` at ``scale``."""
    from fvtransform.lora._merge import normalize_adapters, unmerge

    normalize_adapters(adapters, scale)  # the adapters and the scale are checked when the step is built
    return Transform(lambda t: unmerge(t, adapters, scale), f"unmerge_lora(scale={scale:g})")
