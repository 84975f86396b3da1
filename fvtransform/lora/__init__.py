"""LoRA as tree transforms: adapters, formats, merge / unmerge / restore, combine, call, extract.

>>> import torch, fvtransform as fvt
>>> tree = fvt.ParamTree({"l.weight": torch.randn(4, 3), "l.bias": torch.zeros(4)})
>>> adapter = fvt.lora.random_adapter(tree, targets="*.weight", rank=2)
>>> merged, record = fvt.lora.merge_with_record(tree, adapter)
>>> fvt.lora.restore(merged, record) == tree
True
"""

from fvtransform.lora._adapter import Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._as_tree import from_factors
from fvtransform.lora._batched import call_batched
from fvtransform.lora._call import call
from fvtransform.lora._compiled import call_factors, factors, pad_rank
from fvtransform.lora._combine import combine, random_adapter, scale_adapter
from fvtransform.lora._extract import ExtractReport, compress, compress_with_report, extract, extract_with_report
from fvtransform.lora._detect import detect_format
from fvtransform.lora._experts import split_experts
from fvtransform.lora._format_table import FORMATS
from fvtransform.lora._init import init_adapter
from fvtransform.lora._load import load
from fvtransform.lora._report import ResolutionReport
from fvtransform.lora._write import save
from fvtransform.lora._merge import merge, merge_with_record, restore, unmerge
from fvtransform.lora._norms import UpdateNorms, update_norms
from fvtransform.lora._record import MergeRecord
from fvtransform.lora._stack import AdapterStack, stack
from fvtransform.lora._stream import merge_checkpoint

__all__ = [
    "FORMATS",
    "AdapterStack",
    "Delta",
    "ExtractReport",
    "FullDelta",
    "LoraAdapter",
    "LowRank",
    "MergeRecord",
    "ResolutionReport",
    "UpdateNorms",
    "call",
    "call_batched",
    "call_factors",
    "combine",
    "compress",
    "compress_with_report",
    "detect_format",
    "extract",
    "extract_with_report",
    "factors",
    "from_factors",
    "init_adapter",
    "load",
    "merge",
    "merge_checkpoint",
    "merge_with_record",
    "pad_rank",
    "random_adapter",
    "restore",
    "save",
    "scale_adapter",
    "split_experts",
    "stack",
    "unmerge",
    "update_norms",
]
