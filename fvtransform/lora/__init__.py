"""LoRA as tree transforms: adapters, formats, merge / unmerge / restore, combine, call, extract.

>>> import torch, fvtransform as fvt
>>> tree = fvt.ParamTree({"l.weight": torch.randn(4, 3), "l.bias": torch.zeros(4)})
>>> adapter = fvt.lora.random_adapter(tree, targets="*.weight", rank=2)
>>> merged, record = fvt.lora.merge(tree, adapter, return_record=True)
>>> fvt.lora.restore(merged, record) == tree
True
"""

from fvtransform.lora._adapter import Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._call import call
from fvtransform.lora._compiled import call_factors, factors, pad_rank
from fvtransform.lora._combine import combine, random_adapter, scale_adapter
from fvtransform.lora._extract import ExtractReport, compress, extract
from fvtransform.lora._formats import FORMATS, ResolutionReport, detect_format, load, save
from fvtransform.lora._merge import MergeRecord, merge, restore, unmerge
from fvtransform.lora._stream import merge_checkpoint

__all__ = [
    "FORMATS",
    "Delta",
    "ExtractReport",
    "FullDelta",
    "LoraAdapter",
    "LowRank",
    "MergeRecord",
    "ResolutionReport",
    "call",
    "call_factors",
    "combine",
    "compress",
    "detect_format",
    "extract",
    "factors",
    "load",
    "merge",
    "merge_checkpoint",
    "pad_rank",
    "random_adapter",
    "restore",
    "save",
    "scale_adapter",
    "unmerge",
]
