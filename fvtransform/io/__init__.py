"""Checkpoint I/O: lazy safetensors loading, atomic saves, the shipped key maps, model folders."""

from fvtransform.io._check import CheckReport, check
from fvtransform.io._files import WeightFiles, find_weight_files, read_index
from fvtransform.io._header import Header, TensorInfo, read_header
from fvtransform.io._load import Checkpoint, load, open_checkpoint
from fvtransform.tree._mappings import (
    REFERENCE_QKV_FUSE,
    WAN_DIFFUSERS_TO_ORIGINAL,
    WAN_ORIGINAL_TO_DIFFUSERS,
    hunyuan_video_original_to_diffusers,
)
from fvtransform.io._model import LoadedModel, LoadNote, LoadReport, load_model
from fvtransform.io._original import detect_layout, original_key_map
from fvtransform.io._pipeline import pipeline_components
from fvtransform.io._save import parse_size, save

__all__ = [
    "CheckReport",
    "Checkpoint",
    "Header",
    "LoadNote",
    "LoadReport",
    "LoadedModel",
    "REFERENCE_QKV_FUSE",
    "TensorInfo",
    "WAN_DIFFUSERS_TO_ORIGINAL",
    "WAN_ORIGINAL_TO_DIFFUSERS",
    "WeightFiles",
    "check",
    "detect_layout",
    "find_weight_files",
    "hunyuan_video_original_to_diffusers",
    "load",
    "load_model",
    "open_checkpoint",
    "original_key_map",
    "parse_size",
    "pipeline_components",
    "read_header",
    "read_index",
    "save",
]
