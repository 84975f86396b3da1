"""Checkpoint I/O: lazy safetensors loading, atomic saves, the shipped key maps, model folders."""

from fvtransform.io._check import CheckReport, check
from fvtransform.io._files import WeightFiles, find_weight_files, read_index
from fvtransform.io._header import Header, TensorInfo, read_header
from fvtransform.io._load import Checkpoint, load, open_checkpoint
from fvtransform.tree._mappings import REFERENCE_QKV_FUSE, WAN_DIFFUSERS_TO_ORIGINAL, WAN_ORIGINAL_TO_DIFFUSERS
from fvtransform.io._model import LoadedModel, LoadNote, LoadReport, load_model
from fvtransform.io._pipeline import pipeline_components
from fvtransform.io._load_pipeline import Pipeline, PipelineEntry, load_pipeline
from fvtransform.io._save import parse_size, save

__all__ = [
    "CheckReport",
    "Checkpoint",
    "Header",
    "LoadNote",
    "LoadReport",
    "LoadedModel",
    "Pipeline",
    "PipelineEntry",
    "REFERENCE_QKV_FUSE",
    "TensorInfo",
    "WAN_DIFFUSERS_TO_ORIGINAL",
    "WAN_ORIGINAL_TO_DIFFUSERS",
    "WeightFiles",
    "check",
    "find_weight_files",
    "load",
    "load_model",
    "load_pipeline",
    "open_checkpoint",
    "parse_size",
    "pipeline_components",
    "read_header",
    "read_index",
    "save",
]
