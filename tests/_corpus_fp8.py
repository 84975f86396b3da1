"""Hostile and broken float8 checkpoints (issue 17): a scaled-fp8 layout that does not hold together.

Each file is a small scaled-fp8 checkpoint (``l.weight`` float8 with ``l.scale_weight`` and the
``scaled_fp8`` marker) with one thing broken; ``fvt.load`` checks the layout and names the file and key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

_E4M3 = torch.float8_e4m3fn


def _base() -> dict[str, torch.Tensor]:
    return {
        "l.weight": torch.tensor([[1.0, -2.0], [0.5, 4.0]]).to(_E4M3), "l.scale_weight": torch.tensor(0.5),
        "l.bias": torch.zeros(2), "scaled_fp8": torch.empty(0, dtype=_E4M3),
    }


def _file(root: Path, name: str, edit: dict[str, Any]) -> Path:
    data = {**_base(), **edit}
    data = {k: v for k, v in data.items() if v is not None}
    path = root / f"{name}.safetensors"
    fvt.save(fvt.ParamTree(data), path)
    return path


def cases(root: Path) -> list[Case]:
    def case(name: str, edit: dict[str, Any], error: type, match: str, action: Any = fvt.load) -> Case:
        return Case(f"fp8: {name}", _file(root, name.replace(" ", "_"), edit), error, match, action)

    return [
        case("scale of shape 4", {"l.scale_weight": torch.ones(4)}, E.ShapeMismatchError,
             r"scale_of_shape_4\.safetensors: scale 'l\.scale_weight' of 'l\.weight' is float32 of shape \[4\]"),
        case("integer scale", {"l.scale_weight": torch.ones((), dtype=torch.int32)}, E.ShapeMismatchError,
             r"integer_scale\.safetensors: scale 'l\.scale_weight' of 'l\.weight' is int32"),
        case("nan scale", {"l.scale_weight": torch.tensor(float("nan"))}, E.NumericError,
             r"nan_scale\.safetensors: scale 'l\.scale_weight' of 'l\.weight' is nan"),
        case("inf input scale", {"l.scale_input": torch.tensor([float("inf")])}, E.NumericError,
             r"inf_input_scale\.safetensors: scale 'l\.scale_input' of 'l\.weight' is inf"),
        case("scale without weight", {"k.scale_weight": torch.ones(())}, E.KeyMismatchError,
             r"scale_without_weight\.safetensors: scale key\(s\) without their weight: \['k\.scale_weight'\]"),
        case("weight without scale", {"l.scale_weight": None}, E.KeyMismatchError,
             r"weight_without_scale\.safetensors: the marker 'scaled_fp8' says .* \['l\.weight'\]"),
        case("marker of bfloat16", {"scaled_fp8": torch.empty(0, dtype=torch.bfloat16)}, E.FormatError,
             r"marker_of_bfloat16\.safetensors: marker 'scaled_fp8' has dtype bfloat16"),
        case("scale beside a bf16 weight", {"l.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, E.ShapeMismatchError,
             r"scale_beside_a_bf16_weight\.safetensors: 'l\.weight' has the scale 'l\.scale_weight' but is bfloat16"),
        case("select cuts the scale", {}, E.KeyMismatchError,
             r"select_cuts_the_scale\.safetensors: the selection keeps \['l\.weight'\] without their scales",
             lambda p: fvt.load(p, select="*.weight")),
        case("dtype cast of a scaled file", {}, E.UsageError,
             r"dtype_cast_of_a_scaled_file\.safetensors: load\(dtype=bfloat16\) would cast scaled float8 weights",
             lambda p: fvt.load(p, dtype="bfloat16")),
    ]
