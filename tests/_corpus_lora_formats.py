"""Hostile LoRA files and adapter configs: wrong types, out-of-range values, bad alpha tensors, hostile patterns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

_BASE = {"l.weight": torch.zeros(4, 3)}


def _load(p: Path) -> Any:
    return fvt.lora.load(p, base=fvt.ParamTree(_BASE))


def _peft(root: Path, name: str, config_text: str, rank: int = 2, extra: dict[str, torch.Tensor] | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"base_model.model.l.lora_A.weight": torch.ones(rank, 3), "base_model.model.l.lora_B.weight": torch.ones(4, rank), **(extra or {})}
    fvt.save(fvt.ParamTree(tensors), folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(config_text)
    return folder


def _file(root: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = root / f"{name}.safetensors"
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def cases(root: Path) -> list[Case]:
    out: list[Case] = []

    def cfg(name: str, doc: Any, error: type, key: str, raw: str | None = None) -> None:
        path = _peft(root, name, raw if raw is not None else json.dumps(doc))
        out.append(Case(f"adapter_config {name}", path, error, rf"{name}/adapter_config.json.*{key}", _load))

    cfg("r_string", {"r": "two", "lora_alpha": 4}, E.FormatError, r"'r': expected a whole number")
    cfg("alpha_null", {"r": 2, "lora_alpha": None}, E.FormatError, r"'lora_alpha': expected a number")
    cfg("rank_pattern_list", {"r": 2, "rank_pattern": ["l"]}, E.FormatError, r"'rank_pattern' must be an object")
    cfg("r_zero", {"r": 0}, E.FormatError, r"'r': rank 0 is out of range")
    cfg("r_negative", {"r": -4}, E.FormatError, r"'r': rank -4 is out of range")
    cfg("alpha_nan", None, E.FormatError, r"key 'lora_alpha': NaN is not JSON", raw='{"r": 2, "lora_alpha": NaN}')
    cfg("r_huge", {"r": 10**30}, E.FormatError, r"'r': rank 1000000000000000000000000000000 is out of range")
    cfg("r_digits", None, E.FormatError, r"key 'r': an integer of 5001 digits", raw='{"r": 1' + "0" * 5000 + "}")
    cfg("alpha_bool", {"r": 2, "lora_alpha": True}, E.FormatError, r"'lora_alpha': expected a number .*found True")
    cfg("rslora_string", {"r": 2, "use_rslora": "yes"}, E.FormatError, r"'use_rslora' must be true or false")
    cfg("mts_string", {"r": 2, "modules_to_save": "head"}, E.FormatError, r"'modules_to_save' must be a list")
    cfg("alpha_pattern_value", {"r": 2, "alpha_pattern": {"l": "x"}}, E.FormatError, r"alpha_pattern\['l'\]: expected a number")
    cfg("pattern_backref", {"r": 2, "rank_pattern": {r"(l)\1": 2}}, E.FormatError, r"rank_pattern.*uses groupref")
    cfg("pattern_too_long", {"r": 2, "rank_pattern": {"l" * 1000: 2}}, E.FormatError, r"rank_pattern.*longer than 256")
    # a pattern that takes a backtracking engine ages (2**45 tries) on a long name, then a rank the config gets wrong
    long = "l" * 60
    folder = root / "pattern_catastrophic"
    folder.mkdir()
    fvt.save(fvt.ParamTree({f"base_model.model.{long}.lora_A.weight": torch.ones(2, 3), f"base_model.model.{long}.lora_B.weight": torch.ones(4, 2)}),
             folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"r": 5, "rank_pattern": {"(l|l)" * 45 + "x": 2}}))
    out.append(Case("adapter_config catastrophic pattern", folder, E.ShapeMismatchError,
                    rf"pattern_catastrophic/adapter_model.safetensors: '{long}' has rank 2 in the file, but .*pattern_catastrophic/adapter_config.json says r=5",
                    lambda p: fvt.lora.load(p, base=fvt.ParamTree({f"{long}.weight": torch.zeros(4, 3)}))))
    cfg("config_array", [1, 2], E.FormatError, r"the document must be an object; found an array")
    # configs that contradict their weights: peft would not load them, so neither does fvtransform
    cfg("targets_regex_other", {"r": 2, "target_modules": "x|y"}, E.FormatError, r"'target_modules' \(x\|y\) does not match 'l'")
    cfg("targets_catastrophic", {"r": 2, "target_modules": "(l|l)" * 45 + "x"}, E.FormatError, r"'target_modules' .* does not match 'l'")
    cfg("targets_backref", {"r": 2, "target_modules": r"(l)\1"}, E.FormatError, r"'target_modules'.*uses groupref")
    cfg("excluded", {"r": 2, "target_modules": ["l"], "exclude_modules": ["l"]}, E.FormatError, r"'exclude_modules' .* excludes 'l'")
    cfg("peft_type_loha", {"r": 2, "peft_type": "LOHA"}, E.FormatError, r"'peft_type' is 'LOHA'")
    cfg("use_dora_no_magnitude", {"r": 2, "use_dora": True}, E.FormatError, r"'use_dora' is true, but .* no lora_magnitude_vector")
    cfg("layers_pattern_regex", {"r": 2, "target_modules": ["l"], "layers_to_transform": [0], "layers_pattern": "b.*"}, E.FormatError,
        r"'layers_pattern' must be a plain")
    cfg("alpha_huge", {"r": 2, "lora_alpha": 1e308}, E.FormatError, r"'lora_alpha'.*alpha 1e\+308 with rank 2 gives scale")

    def lora(name: str, tensors: dict[str, torch.Tensor], error: type, key: str, metadata: dict[str, str] | None = None) -> None:
        path = _file(root, name, tensors, metadata)
        out.append(Case(f"LoRA file {name}", path, error, rf"{name}\.safetensors.*{key}", _load))

    A, B = torch.ones(2, 3), torch.ones(4, 2)
    comfy = {"diffusion_model.l.lora_A.weight": A, "diffusion_model.l.lora_B.weight": B}
    lora("alpha_empty", {**comfy, "diffusion_model.l.alpha": torch.zeros(0)}, E.FormatError, r"'diffusion_model.l.alpha' must hold one number; found shape \[0\]")
    lora("alpha_two", {**comfy, "diffusion_model.l.alpha": torch.ones(2)}, E.FormatError, r"'diffusion_model.l.alpha' must hold one number; found shape \[2\]")
    lora("alpha_inf", {**comfy, "diffusion_model.l.alpha": torch.tensor(float("inf"))}, E.FormatError, r"'diffusion_model.l.alpha' is inf")
    lora("rank_zero", {"l.lora_A.weight": torch.zeros(0, 3), "l.lora_B.weight": torch.zeros(4, 0)}, E.ShapeMismatchError, r"'l.lora_A.weight': rank 0")
    lora("twice", {"l.lora_A.weight": A, "l.lora_A.default.weight": A, "l.lora_B.weight": B}, E.KeyMismatchError,
         r"keys 'l.lora_A(.default)?.weight' and 'l.lora_A(.default)?.weight' both give the A of 'l'")
    lora("down_and_A", {"l.lora_A.weight": A, "l.lora_down.weight": A, "l.lora_B.weight": B}, E.KeyMismatchError,
         r"keys 'l.lora_A.weight' and 'l.lora_down.weight' both give the A")
    lora("header_not_json", {"l.lora_A.weight": A, "l.lora_B.weight": B}, E.FormatError, r"header 'lora_adapter_metadata': not valid JSON",
         metadata={"lora_adapter_metadata": "{nope"})
    lora("header_r_string", {"l.lora_A.weight": A, "l.lora_B.weight": B}, E.FormatError, r"header 'lora_adapter_metadata': 'r': expected a whole number",
         metadata={"lora_adapter_metadata": json.dumps({"r": "2"})})
    lora("fvt_scales_list", {"l.lora_A.weight": A, "l.lora_B.weight": B}, E.FormatError, r"header 'fvt.scales': the document must be an object; found an array",
         metadata={"fvt.scales": "[1, 2]"})
    lora("fastvideo_rank_wrong", {"l.lora_A.weight": A, "l.lora_B.weight": B, "l.lora_rank": torch.tensor([7], dtype=torch.int32)},
         E.ShapeMismatchError, r"'l.lora_rank' says rank 7, but the factors have rank 2")
    lora("fastvideo_alpha_two", {"l.lora_A.weight": A, "l.lora_B.weight": B, "l.lora_rank": torch.tensor([2], dtype=torch.int32),
                                 "l.lora_alpha": torch.ones(2)}, E.FormatError, r"'l.lora_alpha' must hold one number")
    lora("fastvideo_rank_fraction", {"l.lora_A.weight": A, "l.lora_B.weight": B, "l.lora_rank": torch.tensor(2.5)},
         E.FormatError, r"'l.lora_rank' is 2.5; a LoRA rank is a whole number")
    lora("kohya_alpha_zero", {**comfy, "diffusion_model.l.alpha": torch.tensor(0.0)}, E.FormatError,
         r"'diffusion_model.l.alpha' is 0: sd-scripts and musubi-tuner read alpha 0 as alpha = rank")
    return out
