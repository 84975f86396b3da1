"""Hostile model folders for ``fvt.load_model``: weights that do not fit the class the config names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.models import init_weights

from _corpus import Case


def _folder(root: Path, name: str, edit: dict[str, torch.Tensor]) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "fvt-video-dit"}))
    tree = fvt.ParamTree(init_weights(fvt.build("fvt-video-dit"), seed=0))
    fvt.save(fvt.update(tree, edit, allow_new=True), folder / "model.safetensors")
    return folder


def cases(root: Path) -> list[Case]:
    return [
        Case("a weight of another shape than the config's model", _folder(root, "wrong_shape", {"proj_out.bias": torch.zeros(3)}),
             E.ShapeMismatchError, r"wrong_shape: the weights do not fit .*\nshape of 'proj_out.bias': expected \[\d+\], found \[3\]",
             fvt.load_model),
        Case("a key the class neither has nor declares ignorable", _folder(root, "stray_key", {"blocks.0.position_ids": torch.arange(4)}),
             E.KeyMismatchError, r"stray_key: the weights do not fit .*\nunexpected \(1\): \['blocks.0.position_ids'\]",
             fvt.load_model),
    ]
