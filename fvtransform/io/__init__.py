"""Checkpoint I/O: lazy safetensors loading, atomic saves, the shipped key maps, model folders."""

from fvtransform import _unlisted
from fvtransform.io._check import CheckReport, check
from fvtransform.io._header import TensorInfo
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
from fvtransform.io._load_pipeline import Pipeline, PipelineEntry, load_pipeline
from fvtransform.io._save import save

__all__ = [
    "CheckReport",
    "Checkpoint",
    "LoadNote",
    "LoadReport",
    "LoadedModel",
    "Pipeline",
    "PipelineEntry",
    "REFERENCE_QKV_FUSE",
    "TensorInfo",
    "WAN_DIFFUSERS_TO_ORIGINAL",
    "WAN_ORIGINAL_TO_DIFFUSERS",
    "check",
    "detect_layout",
    "hunyuan_video_original_to_diffusers",
    "load",
    "load_model",
    "load_pipeline",
    "open_checkpoint",
    "original_key_map",
    "pipeline_components",
    "save",
]

__getattr__ = _unlisted.module_getattr("io")  # a name this module no longer lists shows the public way
