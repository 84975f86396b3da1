"""Corpus cases for ``fvt.load_pipeline`` (issue 16): hostile or broken pipeline folders.

A component folder linking out of the pipeline, a component name that is a path, a FIFO for a
component's config.json, a config that asks for code, a model component without weights: each a
specific error naming the pipeline file or folder and the component.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

_WAN = ["diffusers", "WanTransformer3DModel"]


def _pipe(root: Path, name: str, index: dict[str, Any]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **index}))
    return folder


def cases(root: Path) -> list[Case]:
    out: list[Case] = []

    def case(name: str, error: type, match: str, folder: Path) -> None:
        out.append(Case(f"pipeline: {name}", folder, error, match, fvt.load_pipeline))

    outside = root / "outside_folder"
    outside.mkdir(parents=True)
    (outside / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel"}))
    p = _pipe(root, "component_link_out", {"transformer": _WAN})
    os.symlink(outside, p / "transformer")
    case("component_link_out", E.UnsafeFileError,
         r"component_link_out/model_index\.json: pipeline component folder 'transformer' resolves to .*outside_folder", p)

    p = _pipe(root, "component_path_name", {"../transformer": _WAN})
    case("component_path_name", E.UnsafeFileError,
         r"component_path_name/model_index\.json names component '\.\./transformer', which is not a plain folder name", p)

    p = _pipe(root, "component_config_fifo", {"transformer": _WAN})
    (p / "transformer").mkdir()
    os.mkfifo(p / "transformer" / "config.json")
    case("component_config_fifo", E.UnsafeFileError,
         r"component_config_fifo: component 'transformer' \(diffusers\.WanTransformer3DModel\): .*transformer/config\.json.*FIFO", p)

    p = _pipe(root, "component_config_runs_code", {"transformer": ["diffusers", "os:system"]})
    (p / "transformer").mkdir()
    (p / "transformer" / "config.json").write_text(json.dumps({"_class_name": "os:system", "command": "touch /tmp/x"}))
    fvt.save(fvt.ParamTree({"w": torch.zeros(2)}), p / "transformer" / "diffusion_pytorch_model.safetensors")
    case("component_config_runs_code", E.RegistryError,
         r"component_config_runs_code: component 'transformer' \(diffusers\.os:system\): .*transformer/config\.json: key '_class_name' names 'os:system'", p)

    p = _pipe(root, "component_without_weights", {"vae": ["diffusers", "AutoencoderKLWan"]})
    (p / "vae").mkdir()
    (p / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "base_dim": 8, "z_dim": 4}))
    case("component_without_weights", E.NotFoundError,
         r"component_without_weights: component 'vae' \(diffusers\.AutoencoderKLWan\): .*vae", p)
    return out
