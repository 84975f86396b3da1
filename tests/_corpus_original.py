"""Hostile single-file checkpoints for ``fvt.load_model(file, config=...)`` (original layouts, issue 16)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

WAN = {"_class_name": "WanTransformer3DModel"}
HUNYUAN = {"_class_name": "HunyuanVideoTransformer3DModel", "num_attention_heads": 2, "attention_head_dim": 4,
           "mlp_ratio": 2.0}
WAN_KEYS = {"head.modulation": torch.zeros(1, 2, 8), "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}


def _file(root: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = root / f"{name}.safetensors"
    fvt.save(fvt.ParamTree(tensors), path, metadata=metadata)
    return path


def _with(config: Any) -> Callable[[Path], Any]:
    return lambda p: fvt.load_model(p, config=config)


def cases(root: Path) -> list[Case]:
    root.mkdir(parents=True, exist_ok=True)
    hy_ok = {"double_blocks.0.img_attn_qkv.weight": torch.zeros(24, 8)}
    return [
        Case("single file: keys of no known layout", _file(root, "unknown_layout", {"encoder.w": torch.zeros(2)}),
             E.KeyMismatchError, r"unknown_layout\.safetensors: unknown layout .*\['encoder.w'\].*Fix:", _with(WAN)),
        Case("single file: original and diffusers Wan keys mixed",
             _file(root, "mixed_layout", {**WAN_KEYS, "blocks.1.attn1.to_q.weight": torch.zeros(8, 8)}),
             E.KeyMismatchError, r"mixed_layout\.safetensors: mixed layout: .*'blocks.1.attn1.to_q.weight'", _with(WAN)),
        Case("single file: only some keys carry ComfyUI's prefix",
             _file(root, "mixed_prefix", {"model.diffusion_model.head.modulation": torch.zeros(1, 2, 8),
                                          "blocks.0.self_attn.q.weight": torch.zeros(8, 8)}),
             E.KeyMismatchError, r"mixed_prefix\.safetensors: mixed layout: 1 keys carry the prefix .*"
                                 r"'blocks.0.self_attn.q.weight'", _with(WAN)),
        Case("single file: a Wan file with a HunyuanVideo config", _file(root, "other_family", WAN_KEYS),
             E.FormatError, r"other_family\.safetensors: the file is in the wan-original layout.*another family",
             _with(HUNYUAN)),
        Case("single file: fused linear1 of the wrong total size",
             _file(root, "fused_wrong_size", {**hy_ok, "single_blocks.0.linear1.weight": torch.zeros(30, 8)}),
             E.ShapeMismatchError, r"fused_wrong_size\.safetensors: in the hunyuan-video-original layout.*"
                                   r"'single_blocks.0.linear1.weight': size 30 .*sizes \[8, 8, 8, 16\]", _with(HUNYUAN)),
        Case("single file: a config whose head count is not a number",
             _file(root, "bad_heads", {**hy_ok, "single_blocks.0.linear1.weight": torch.zeros(40, 8)}),
             E.FormatError, r"config=: 'num_attention_heads' must be a positive integer .*found '2'",
             _with({**HUNYUAN, "num_attention_heads": "2"})),
        Case("single file: metadata config that is not a JSON object",
             _file(root, "metadata_config_array", WAN_KEYS, {"config": json.dumps([1, 2])}),
             E.FormatError, r"metadata_config_array\.safetensors: metadata 'config'", _with(None)),
        Case("single file: metadata config naming no class",
             _file(root, "metadata_config_no_class", WAN_KEYS, {"config": json.dumps({"num_layers": 1})}),
             E.FormatError, r"metadata_config_no_class\.safetensors: the config \(.*metadata 'config'\) names no model "
                            r"class \('_class_name'\)", _with(None)),
    ]
