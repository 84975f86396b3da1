"""``fvt.lora.save``: an adapter written in a format of the table, atomically, with its exact scales."""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from pathlib import Path
import re
from typing import Any

import torch

from fvtransform.errors import UsageError
from fvtransform.lora._adapter import GENERATED, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._dora import dora_scale_layout
from fvtransform.lora._format_table import (
    BY_NAME, DIFFUSERS_META, DIFFUSERS_WEIGHTS, FVT_DORA_EPS, FVT_SCALES, PEFT_CONFIG, PEFT_WEIGHTS, TABLE, LoraFormat,
)
from fvtransform.lora._targets import ORIGINAL_NAMES, ORIGINAL_PARAMS, renamed
from fvtransform.lora._lycoris import lycoris_tensors


# ----------------------------------------------------------------------------- writing
def _module_name(target: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if target.endswith(suffix):
            return target[: -len(suffix)], suffix
    return target, ""  # a parameter named directly (Wan's scale_shift_table)


def _write_name(fmt: LoraFormat, module: str, param: bool) -> str:
    if fmt.write_names == "as-is":
        return module
    name = renamed(ORIGINAL_PARAMS if param else ORIGINAL_NAMES, module)
    return name.replace(".", "_") if fmt.write_names == "underscored" else name


def _encode(adapter: LoraAdapter, fmt: LoraFormat, component: str) -> dict[str, torch.Tensor]:
    roles = fmt.write_roles
    prefix = fmt.write_prefix.format(component=component.rstrip("."))
    out: dict[str, torch.Tensor] = {}
    for target, d in adapter.items():
        module, suffix = _module_name(target)
        name = prefix + _write_name(fmt, module, param=not suffix)
        if isinstance(d, GENERATED):
            if "lycoris" not in fmt.holds:
                raise UsageError(f"{target!r} is a LyCORIS {type(d).__name__}, which format {fmt.name!r} cannot hold; save as 'kohya' or 'comfy'")
            out.update({name + k: t for k, t in lycoris_tensors(d).items()})
        elif isinstance(d, LowRank):
            if suffix != ".weight":
                raise UsageError(f"{target!r}: a low-rank delta must target a weight")
            out[name + roles["A"]] = d.A.contiguous()
            out[name + roles["B"]] = d.B.contiguous()
            if d.magnitude is not None:
                if "dora" not in fmt.holds:
                    able = [f.name for f in TABLE if "dora" in f.holds]
                    raise UsageError(f"{target!r}: format {fmt.name!r} cannot hold DoRA magnitudes; use one of {able}")
                if roles["magnitude"].endswith(".dora_scale"):  # LyCORIS's layout, which ComfyUI broadcasts against the weight
                    out[name + roles["magnitude"]] = dora_scale_layout(d.magnitude, d.A.dim()).contiguous()
                elif d.magnitude.dim() != 1:
                    raise UsageError(f"{target!r}: a DoRA magnitude on the input axis (LyCORIS wd_on_output=False) cannot be "
                                      f"written as {fmt.name!r}, which holds per-output magnitudes; save as 'kohya'")
                else:
                    out[name + roles["magnitude"]] = d.magnitude.contiguous()
            if "alpha" in roles:
                out[name + roles["alpha"]] = torch.tensor(d.scale * d.rank, dtype=torch.float32)
        elif isinstance(d, FullDelta) and d.replaces:
            if "replace" not in fmt.holds:
                able = [f.name for f in TABLE if "replace" in f.holds]
                raise UsageError(f"{target!r} is a full replacement (modules_to_save), which format {fmt.name!r} cannot hold; use one of {able}")
            out[prefix + target] = d.D.contiguous()
        else:
            role = {".weight": "diff", ".bias": "diff_b", "": "diff_param"}[suffix]
            if role not in roles or "full" not in fmt.holds:
                able = [f.name for f in TABLE if role in f.write_roles and "full" in f.holds]
                raise UsageError(
                    f"{target!r} is a full delta (.diff / .diff_b), which format {fmt.name!r} cannot hold; save as one of {able}"
                )
            out[name + roles[role]] = d.D.contiguous()
    return out


def _peft_config(adapter: LoraAdapter) -> dict[str, Any]:
    from collections import Counter

    lows = {k: d for k, d in adapter.items() if isinstance(d, LowRank)}
    if not lows:
        raise UsageError("a PEFT adapter needs at least one low-rank target")
    dora = sorted(k for k, d in lows.items() if d.magnitude is not None)
    if dora and len(dora) != len(lows):
        plain = sorted(set(lows) - set(dora))
        raise UsageError(
            f"a PEFT config has one use_dora for all modules, but {dora[:3]} are DoRA and {plain[:3]} plain LoRA; peft would read "
            "the plain ones as DoRA. Fix: save as 'kohya' or 'comfy', or split the adapter"
        )
    ranks = Counter(d.rank for d in lows.values())
    r = ranks.most_common(1)[0][0]
    alphas = Counter(d.scale * d.rank for d in lows.values() if d.rank == r)
    alpha = alphas.most_common(1)[0][0]
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for target, d in lows.items():
        module = _module_name(target)[0]
        if d.rank != r:
            rank_pattern["^" + re.escape(module)] = d.rank
        if d.scale * d.rank != alpha or d.rank != r:
            alpha_pattern["^" + re.escape(module)] = d.scale * d.rank
    saved = sorted({_module_name(k)[0] for k, d in adapter.items() if isinstance(d, FullDelta) and d.replaces})
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted({_module_name(k)[0] for k in lows}),
        "modules_to_save": saved or None,
        "use_dora": any(d.magnitude is not None for d in lows.values()),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }


def _written_by_us(weights: Path) -> bool:
    """Whether ``weights`` is a regular safetensors file an fvtransform LoRA writer wrote (``fvt.scales`` in its header)."""
    from fvtransform.errors import FvTransformError
    from fvtransform.io._header import read_header

    try:
        return weights.is_file() and not weights.is_symlink() and FVT_SCALES in read_header(weights).metadata
    except (FvTransformError, OSError):
        return False


def _refuse_foreign(dest: Path) -> None:
    from fvtransform.errors import WriteError

    raise WriteError(f"{dest}: exists and was not written by fvtransform; refusing to replace it. "
                     "Choose another output, or pass overwrite=True (--overwrite)")


def save(adapter: LoraAdapter, path: str | os.PathLike[str], *, format: str = "peft", component: str = "transformer",
         overwrite: bool = False) -> Path:
    """Write an adapter in ``format`` (``peft``, ``diffusers``, ``diffusers-model``, ``kohya``, ``comfy``), atomically.

    ``peft`` writes a folder (``adapter_model.safetensors`` + ``adapter_config.json``);
    ``diffusers`` writes ``pytorch_lora_weights.safetensors`` (into ``path`` if it
    is a folder or has no suffix) with the adapter config in the header, keys and
    config prefixed by ``component`` (as a pipeline's ``save_lora_weights``);
    ``diffusers-model`` the same unprefixed (as a model's ``save_lora_adapter``);
    the others write one file: ``kohya`` and ``comfy`` use the original Wan module
    names that musubi-tuner and ComfyUI read. Exact scales are also kept in the
    header (``fvt.scales``), so reading the file back gives the same adapter.
    Returns the path of the weights file.

    An existing weights file (or PEFT config) is replaced only if an
    fvtransform LoRA writer wrote it (its header records ``fvt.scales``) or
    ``overwrite=True``, as the CLI's ``--overwrite``; other files of a folder
    are always kept, and a folder where a file goes is refused.

    Raises:
        UsageError: not an adapter, an unknown format or one that cannot hold the adapter, a NUL in ``path``.
        WriteError: a folder where a file goes; a file fvtransform did not write is in the way (without ``overwrite``), a full disk.
        UnsafeFileError: the destination is a symlink, FIFO, device or socket.
    """
    from fvtransform.io._atomic import atomic_file, check_path, json_bytes, write_files
    from fvtransform.io._save import tree_bytes

    if not isinstance(adapter, LoraAdapter):
        raise UsageError(f"lora.save takes a LoraAdapter; found {type(adapter).__name__}")
    fmt = BY_NAME.get(format)
    if fmt is None or not fmt.write_roles:
        raise UsageError(f"unknown LoRA format {format!r}; write one of {[f.name for f in TABLE if f.write_roles]}")
    path = check_path(path)
    scales = json.dumps({k: d.scale for k, d in adapter.items() if hasattr(d, "scale")})
    meta = {FVT_SCALES: scales}
    eps = {k: d.dora_eps for k, d in adapter.items() if isinstance(d, LowRank) and d.magnitude is not None and d.dora_eps}
    if eps:  # exact for fvtransform's own reader; peft itself reads every DoRA with eps 0 (see docs/guides/lora.md)
        meta[FVT_DORA_EPS] = json.dumps(eps)
    tensors = _encode(adapter, fmt, component)
    if fmt.scale == "config":
        folder = path
        config = _peft_config(adapter)
        files = {PEFT_WEIGHTS: tree_bytes(tensors, meta, where=folder / PEFT_WEIGHTS), PEFT_CONFIG: json_bytes(config)}
        # both files as one unit: a reader sees the old pair or the new pair; a previous fvtransform pair is replaced
        write_files(folder, files, what="PEFT LoRA folder", overwrite=overwrite,
                    owned=lambda d: set(files) if _written_by_us(d / PEFT_WEIGHTS) else set())
        return folder / PEFT_WEIGHTS
    if fmt.scale in ("metadata", "metadata-unprefixed"):
        file = path / DIFFUSERS_WEIGHTS if (path.is_dir() or not path.suffix) else path
        prefix = f"{component.rstrip('.')}." if fmt.scale == "metadata" else ""
        cfg = {f"{prefix}{k}": v for k, v in _peft_config(adapter).items()}
        meta[DIFFUSERS_META] = json.dumps(cfg, sort_keys=True)
    else:
        file = path
    write = tree_bytes(tensors, meta, where=file)
    with atomic_file(file, replace_check=None if overwrite else (lambda p: None if _written_by_us(p) else _refuse_foreign(p))) as tmp, \
            open(tmp, "xb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return file


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    from fvtransform.io._atomic import write_json_atomic

    write_json_atomic(path, doc)
