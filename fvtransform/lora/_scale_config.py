"""Where a LoRA's scale comes from: adapter_config.json, the diffusers header, alpha tensors, fvtransform's exact scales.

Every value from a file is checked (type, range, finiteness) before it is used; the conventions are
``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) and a missing alpha means ``alpha = r``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import attrs
import torch

from fvtransform._json import loads_json
from fvtransform.errors import FormatError, ShapeMismatchError
from fvtransform.lora._format_table import (
    DIFFUSERS_META, FVT_SCALES, LoraFormat,
)
from fvtransform.lora._patterns import compile_patterns, pattern_value
from fvtransform.lora._peft_targets import PeftTargets, check_peft_type, check_targeted, peft_targets


#: Bounds on untrusted config values (a rank above this is not a LoRA).
MAX_RANK = 1 << 16
#: The largest |alpha / r| a file or config may give: far above any trained LoRA's; larger is a broken or hostile file.
MAX_SCALE = 1e6
MAX_PATTERNS = 4096


@attrs.frozen
class ScaleConfig:
    """A validated PEFT-style config: where it came from, r, alpha, rsLoRA, patterns, modules_to_save."""

    where: str
    r: int
    alpha: float
    rslora: bool
    rank_patterns: list[tuple[Any, Any]]
    alpha_patterns: list[tuple[Any, Any]]
    modules_to_save: tuple[str, ...]
    selection: PeftTargets = attrs.field(factory=PeftTargets)
    use_dora: bool = False


def _rank_value(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FormatError(f"{where}: expected a whole number (the LoRA rank); found {value!r} ({type(value).__name__})")
    if not 1 <= value <= MAX_RANK:
        raise FormatError(f"{where}: rank {value} is out of range; a LoRA rank is between 1 and {MAX_RANK}")
    return value


def _alpha_value(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FormatError(f"{where}: expected a number (the LoRA alpha); found {value!r} ({type(value).__name__})")
    try:
        out = float(value)
    except OverflowError:
        out = math.inf
    if not math.isfinite(out):
        raise FormatError(f"{where}: alpha {value!r} is not a finite number; fix the config")
    return out


def _patterns(doc: Mapping[str, Any], key: str, check: Callable[[Any, str], Any], where: str) -> list[tuple[Any, Any]]:
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, dict):
        raise FormatError(f"{where}: {key!r} must be an object of pattern -> value; found {type(value).__name__}")
    if len(value) > MAX_PATTERNS:
        raise FormatError(f"{where}: {key!r} has {len(value)} patterns, more than {MAX_PATTERNS}")
    checked = {p: check(v, f"{where}: {key}[{str(p)[:60]!r}]") for p, v in value.items()}
    return compile_patterns(checked, f"{where}: {key!r}")


def _scale_config(doc: Any, where: str) -> ScaleConfig:
    """Validate a PEFT-style config (types, ranges, patterns); PEFT's defaults (r=8, lora_alpha=8) fill gaps."""
    if not isinstance(doc, dict):
        raise FormatError(f"{where}: expected a JSON object; found {type(doc).__name__}")
    r = _rank_value(doc.get("r", 8), f"{where}: 'r'")
    alpha = _alpha_value(doc.get("lora_alpha", 8), f"{where}: 'lora_alpha'")
    rslora = doc.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise FormatError(f"{where}: 'use_rslora' must be true or false; found {rslora!r}")
    use_dora = doc.get("use_dora", False)
    if not isinstance(use_dora, bool):
        raise FormatError(f"{where}: 'use_dora' must be true or false; found {str(use_dora)[:40]!r}")
    check_peft_type(doc, where)
    mts = doc.get("modules_to_save") or []
    if not isinstance(mts, list) or not all(isinstance(m, str) and m for m in mts):
        raise FormatError(f"{where}: 'modules_to_save' must be a list of module names; found {mts!r:.80}")
    return ScaleConfig(
        where, r, alpha, rslora,
        _patterns(doc, "rank_pattern", _rank_value, where),
        _patterns(doc, "alpha_pattern", _alpha_value, where),
        tuple(mts),
        peft_targets(doc, where),
        use_dora,
    )


def _header_config(meta: Mapping[str, str], prefix: str, label: str) -> ScaleConfig | None:
    """The PEFT config diffusers keeps in the header, with ``prefix`` (``transformer.``) or none."""
    raw = meta.get(DIFFUSERS_META)
    if raw is None:
        return None
    where = f"{label}: header {DIFFUSERS_META!r}"
    packed = loads_json(raw, source=where, expect=dict)
    if prefix:
        packed = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
        if not packed:
            return None
    return _scale_config(packed, where)


def config_for(fmt: LoraFormat, config: Any, config_label: str, meta: Mapping[str, str], component: str, label: str) -> ScaleConfig | None:
    if fmt.scale == "config" and config is not None:
        return _scale_config(config, config_label)
    if fmt.scale == "metadata":
        if config is not None:
            return _scale_config(config, config_label)
        return _header_config(meta, component.rstrip(".") + ".", label)
    if fmt.scale == "metadata-unprefixed":
        return _header_config(meta, "", label)
    return None


def exact_scales(meta: Mapping[str, str], label: str, field: str = FVT_SCALES) -> dict[str, float]:
    """fvtransform's own exact scales (``fvt.scales`` in the header; or DoRA eps, ``fvt.dora_eps``), checked."""
    if field not in meta:
        return {}
    where = f"{label}: header {field!r}"
    doc = loads_json(meta[field], source=where, expect=dict)
    return {k: _alpha_value(v, f"{where}[{k!r}]") for k, v in doc.items()}


def eps_value(value: float, where: str) -> float:
    if not 0.0 <= value <= 1e-3:
        raise FormatError(f"{where}: DoRA eps {value!r} is out of range (0 to 1e-3); fvtransform writes 0 or float32 eps. "
                          "Fix: drop the header entry")
    return value


def _scalar(roles: Mapping[str, tuple[str, torch.Tensor]], role: str, label: str) -> tuple[str, float]:
    key, t = roles[role]
    if t.numel() != 1:
        raise FormatError(f"{label}: {key!r} must hold one number; found shape {list(t.shape)} ({t.numel()} elements)")
    if t.dtype == torch.bool or t.is_complex():
        raise FormatError(f"{label}: {key!r} must be a real number; found dtype {t.dtype}")
    value = float(t.reshape(()).item())
    if not math.isfinite(value):
        raise FormatError(f"{label}: {key!r} is {value}, not a finite number; fix or drop it")
    return key, value


def lowrank_scale(
    fmt: LoraFormat, module: str, rank: int, roles: Mapping[str, tuple[str, torch.Tensor]], cfg: ScaleConfig | None, label: str,
    exact: bool = False,
) -> tuple[float, float]:
    """``(scale, alpha)`` as the format's tool computes them; ``|scale|`` is at most :data:`MAX_SCALE`.

    ``exact``: the file is fvtransform's own and records the exact scale (``fvt.scales``), which replaces
    this one, so an alpha of 0 or a large scale written from it is not ambiguous.
    """
    scale, alpha, where = _lowrank_scale_of(fmt, module, rank, roles, cfg, label, exact)
    if not exact and not abs(scale) <= MAX_SCALE:
        raise FormatError(
            f"{where}: alpha {alpha:g} with rank {rank} gives scale {scale:g} for {module!r}, beyond {MAX_SCALE:g}; no trained "
            "LoRA has such a scale. Fix: correct the alpha"
        )
    return scale, alpha


def _lowrank_scale_of(
    fmt: LoraFormat, module: str, rank: int, roles: Mapping[str, tuple[str, torch.Tensor]], cfg: ScaleConfig | None, label: str,
    exact: bool = False,
) -> tuple[float, float, str]:
    """``(scale, alpha, where the alpha came from)``."""
    if fmt.scale == "fastvideo":
        where = f"{label}: {roles['fv_alpha'][0]!r}" if "fv_alpha" in roles else label
        return (*_fastvideo_scale(rank, roles, label), where)
    if "alpha" in roles:
        key, alpha = _scalar(roles, "alpha", label)
        if alpha == 0 and not exact:
            raise FormatError(
                f"{label}: {key!r} is 0: sd-scripts and musubi-tuner read alpha 0 as alpha = rank (scale 1), diffusers and "
                "ComfyUI as scale 0, so the intended scale is unknown. Fix: re-save with the alpha you mean (alpha = rank for scale 1)"
            )
        return alpha / rank, alpha, f"{label}: {key!r}"
    if cfg is None:
        return 1.0, float(rank), label
    r = pattern_value(module, cfg.rank_patterns, cfg.r)
    alpha = float(pattern_value(module, cfg.alpha_patterns, cfg.alpha))
    if r != rank:
        raise ShapeMismatchError(
            f"{label}: {module!r} has rank {rank} in the file, but {cfg.where} says r={r}; the config does not belong to these weights"
        )
    return (alpha / math.sqrt(rank) if cfg.rslora else alpha / rank), alpha, f"{cfg.where}: 'lora_alpha'"


def _fastvideo_scale(rank: int, roles: Mapping[str, tuple[str, torch.Tensor]], label: str) -> tuple[float, float]:
    """FastVideo: ``alpha / lora_rank`` from the per-module tensors (its merge script and its LoRA layers)."""
    if "fv_rank" in roles:
        key, r = _scalar(roles, "fv_rank", label)
        if r != int(r):
            raise FormatError(f"{label}: {key!r} is {r:g}; a LoRA rank is a whole number. Fix: store the factors' rank {rank}")
        if r != rank:
            raise ShapeMismatchError(f"{label}: {key!r} says rank {r:g}, but the factors have rank {rank}")
    if "fv_alpha" not in roles:
        return 1.0, float(rank)
    key, alpha = _scalar(roles, "fv_alpha", label)
    if alpha == 0 or alpha != int(alpha):
        # FastVideo's layers use int(alpha) and skip the scale for alpha 0; its merge script uses the float: they disagree
        raise FormatError(
            f"{label}: {key!r} is {alpha:g}; FastVideo's LoRA layers and its merge script scale a zero or fractional "
            "alpha differently, so the intended scale is unknown. Fix: store a whole, non-zero alpha"
        )
    return alpha / rank, alpha


def check_config_applies(cfg: ScaleConfig, module: str, roles: Mapping[str, tuple[str, torch.Tensor]]) -> None:
    """Refuse weights the PEFT config would not load as they are: untargeted modules, DoRA flags that contradict the file."""
    key = roles["A"][0]
    check_targeted(cfg.selection, module, cfg.where, key)
    has_mag = "magnitude" in roles
    if cfg.use_dora and not has_mag:
        raise FormatError(
            f"{cfg.where}: 'use_dora' is true, but the file has no lora_magnitude_vector for {module!r} ({key!r}); peft would keep "
            "the magnitude it initialised from the base, which is not this file's adapter. Fix: add the magnitude, or set use_dora false"
        )
    if has_mag and not cfg.use_dora:
        raise FormatError(
            f"{cfg.where}: the file holds a DoRA magnitude {roles['magnitude'][0]!r}, but 'use_dora' is not true; peft would ignore it "
            "and merge plain LoRA. Fix: set \"use_dora\": true (or drop the magnitude)"
        )
