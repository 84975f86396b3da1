"""LoRA file formats: reading and writing loop over the format table (:mod:`._format_table`).

Reading classifies every key by its role suffix (A, B, alpha, full delta, bias
delta, magnitude, ...), detects the format by scoring every table entry on all
keys, validates the scale's source (adapter_config.json, the diffusers header,
alpha tensors), and (with ``base=``) resolves each target against the base
tree's names and shapes, strictly: a key that resolves to nothing, or two keys
that claim one target, is an error naming them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import json
import math
import os
from pathlib import Path
import re
from typing import Any

import attrs
import torch

from fvtransform._json import loads_json
from fvtransform.errors import FormatError, KeyMismatchError, NotFoundError, ShapeMismatchError, close_matches, format_keys
from fvtransform.io._mappings import WAN_MODULE_RENAMES
from fvtransform.io._open import contained
from fvtransform.lora._adapter import DORA_EPS, GENERATED, Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._dora import canonical_magnitude, dora_scale_layout
from fvtransform.lora._format_table import (
    BY_NAME, CLAIMED_PREFIXES, FORMATS, LYCORIS_SUFFIXES, PARAM_RENAMES, ROLES, TABLE, LoraFormat,
)
from fvtransform.lora._lycoris import is_lycoris, lycoris_targets, lycoris_tensors
from fvtransform.lora._merge import describe
from fvtransform.lora._patterns import compile_patterns, pattern_value
from fvtransform.lora._peft_targets import PeftTargets, check_peft_type, check_targeted, peft_targets
from fvtransform.tree._rename import RenameRules

__all__ = ["load", "save", "FORMATS", "ResolutionReport", "detect_format", "split_role"]

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_META = "lora_adapter_metadata"
FVT_SCALES = "fvt.scales"
#: fvtransform's own DoRA eps per target (a PEFT file cannot hold it: peft reads every DoRA with eps 0).
FVT_DORA_EPS = "fvt.dora_eps"
#: Bounds on untrusted config values (a rank above this is not a LoRA).
MAX_RANK = 1 << 16
#: The largest |alpha / r| a file or config may give: far above any trained LoRA's; larger is a broken or hostile file.
MAX_SCALE = 1e6
MAX_PATTERNS = 4096


def split_role(key: str) -> tuple[str, str] | None:
    """``(module, role)`` for a LoRA file key, or None.

    >>> split_role("base_model.model.blocks.0.attn1.to_q.lora_A.weight")
    ('base_model.model.blocks.0.attn1.to_q', 'A')
    >>> split_role("diffusion_model.blocks.1.cross_attn.v_img.diff_b")
    ('diffusion_model.blocks.1.cross_attn.v_img', 'diff_b')
    >>> split_role("lora_unet_blocks_0_self_attn_q.hada_w1_a")
    ('lora_unet_blocks_0_self_attn_q', 'lycoris')
    """
    for suffix, role in ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    for suffix in LYCORIS_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "lycoris"
    return None


def _strip(fmt: LoraFormat, module: str) -> str | None:
    """The module name without the format's prefix; None when the key does not belong to the format."""
    if not fmt.prefixes:
        return None if module.startswith(CLAIMED_PREFIXES) else module
    for p in fmt.prefixes:
        if module.startswith(p):
            return module if fmt.strip == "component" else module[len(p):]
    return None


def _eligible(fmt: LoraFormat, roles: set[str], meta: Mapping[str, str]) -> bool:
    return (fmt.needs_meta is None or fmt.needs_meta in meta) and (fmt.needs_role is None or fmt.needs_role in roles)


def detect_format(keys: list[str], metadata: Mapping[str, str] | None = None) -> tuple[str, dict[str, float]]:
    """Score every format on all keys (and the file's header); return the best and the scores.

    >>> detect_format(["lora_unet_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_blocks_0_attn1_to_q.alpha"])[0]
    'kohya'
    """
    meta = metadata or {}
    parsed = [split_role(k) for k in keys]
    roles = {p[1] for p in parsed if p is not None}
    scores: dict[str, float] = {}
    for fmt in TABLE:
        if not _eligible(fmt, roles, meta):
            scores[fmt.name] = 0.0
            continue
        hits = sum(1 for p in parsed if p is not None and (p[1] in fmt.reads or p[1] == "lycoris") and _strip(fmt, p[0]) is not None)
        scores[fmt.name] = hits / max(1, len(keys))
    best = max(FORMATS, key=lambda f: (scores[f], -FORMATS.index(f)))
    if scores[best] == 0:
        raise FormatError(
            f"no LoRA format recognises these keys (e.g. {format_keys(keys[:4])}); "
            f"known formats: {list(FORMATS)} with keys ending in lora_A/lora_B/lora_down/lora_up/alpha/diff/diff_b"
        )
    return best, scores


@attrs.frozen
class ResolutionReport:
    """What a non-strict load skipped: file keys and why."""

    skipped: tuple[tuple[str, str], ...] = ()
    format: str = ""
    scores: Mapping[str, float] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return not self.skipped


# ----------------------------------------------------------------------------- reading
def _read_source(source: Any, weight_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any] | None, str, str]:
    """Tensors, safetensors metadata, adapter_config.json (if any), a label for messages, and the config's label."""
    if isinstance(source, Mapping):
        return dict(source), {}, None, "<mapping>", ""
    path = Path(source)
    if not path.exists():
        from fvtransform.hub import maybe_download_lora

        path = maybe_download_lora(str(source), weight_name=weight_name)
    config_path: Path | None = None
    if path.is_dir():
        candidates = [weight_name] if weight_name else [PEFT_WEIGHTS, DIFFUSERS_WEIGHTS]
        found = [path / c for c in candidates if c and (path / c).is_file()]
        if not found:
            singles = sorted(p for p in path.glob("*.safetensors"))
            if len(singles) == 1:
                found = singles
            elif singles:
                raise FormatError(f"{path}: several LoRA files {[p.name for p in singles]}; pass weight_name=")
            else:
                raise NotFoundError(f"{path}: no LoRA weights (*.safetensors) in this folder")
        file = found[0] if weight_name else contained(path, found[0].name, "LoRA file")  # weight_name: the user's choice
    else:
        file = path
    if os.path.lexists(file.parent / PEFT_CONFIG):  # a FIFO or dangling link is refused by the reader, not skipped
        config_path = contained(file.parent, PEFT_CONFIG, "LoRA config", file)
    from fvtransform.io._files import PICKLE_SUFFIXES
    from fvtransform.io._load import Checkpoint
    from fvtransform.io._files import WeightFiles

    if file.suffix in PICKLE_SUFFIXES:
        from fvtransform.errors import UnsafeFileError

        raise UnsafeFileError(f"{file}: pickle-based LoRA files can run code; convert it to safetensors")
    ckpt = Checkpoint(WeightFiles((file,)))
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys()}
    config = None
    if config_path is not None:
        from fvtransform.io._model import read_json

        try:
            config = read_json(config_path)
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{config_path}: not valid JSON ({e})") from None
    return tensors, ckpt.metadata, config, str(file), str(config_path or "")


@attrs.frozen
class _ScaleConfig:
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


def _scale_config(doc: Any, where: str) -> _ScaleConfig:
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
    return _ScaleConfig(
        where, r, alpha, rslora,
        _patterns(doc, "rank_pattern", _rank_value, where),
        _patterns(doc, "alpha_pattern", _alpha_value, where),
        tuple(mts),
        peft_targets(doc, where),
        use_dora,
    )


def _header_config(meta: Mapping[str, str], prefix: str, label: str) -> _ScaleConfig | None:
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


def _config_for(fmt: LoraFormat, config: Any, config_label: str, meta: Mapping[str, str], component: str, label: str) -> _ScaleConfig | None:
    if fmt.scale == "config" and config is not None:
        return _scale_config(config, config_label)
    if fmt.scale == "metadata":
        if config is not None:
            return _scale_config(config, config_label)
        return _header_config(meta, component.rstrip(".") + ".", label)
    if fmt.scale == "metadata-unprefixed":
        return _header_config(meta, "", label)
    return None


def _base_modules(base: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, t in base.items():
        for suffix in (".weight", ".bias"):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], tuple(t.shape))
    return out


def _original_names() -> RenameRules:
    return RenameRules.of([(dst, src) for src, dst in WAN_MODULE_RENAMES])


def _original_params() -> RenameRules:
    return RenameRules.of([(dst, src) for src, dst in PARAM_RENAMES])


def _rename(rules: list[tuple[str, str]] | tuple[tuple[str, str], ...], name: str) -> str:
    return RenameRules.of(list(rules)).plan([name])[name]


def _kohya_table(modules: list[str]) -> dict[str, str]:
    """Underscored name -> module, for the base's names and their original-Wan names."""
    table: dict[str, str] = {}
    clash: dict[str, set[str]] = {}
    orig = _original_names()
    for m in modules:
        for name in {m, orig.plan([m])[m]}:
            u = name.replace(".", "_")
            if u in table and table[u] != m:
                clash.setdefault(u, {table[u]}).add(m)
            table[u] = m
    for u in clash:
        table.pop(u, None)
    return table


def load(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    format: str = "auto",
    base: Any = None,
    strict: bool = True,
    component: str = "transformer",
    weight_name: str | None = None,
) -> Any:
    """Read a LoRA file (or folder, repo id, or mapping) as a :class:`LoraAdapter`.

    ``format="auto"`` scores every format on all keys and picks the best (the
    adapter's ``format`` says which). With ``base=`` (a tree or a module)
    every key is matched to a base key with compatible shapes: anything
    unmatched raises, listing the keys and the closest base names. With
    ``strict=False`` returns ``(adapter, report)`` with what was skipped.

    Conventions: ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA);
    a missing alpha means ``alpha = r``.
    """
    if base is not None and isinstance(base, torch.nn.Module):
        from fvtransform.tree._paramtree import ParamTree

        base = ParamTree.from_module(base)
    tensors, meta, config, label, config_label = _read_source(source, weight_name)
    keys = list(tensors)
    if not keys:
        raise FormatError(f"{label}: the LoRA file holds no tensors")
    if format == "auto":
        try:
            name, scores = detect_format(keys, meta)
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None
    else:
        if format not in BY_NAME:
            raise FormatError(f"unknown LoRA format {format!r}; known: {list(FORMATS)}")
        name, scores = format, {}
    fmt = BY_NAME[name]
    exact_scales = _exact_scales(meta, label)
    exact_eps = _exact_scales(meta, label, FVT_DORA_EPS)
    cfg = _config_for(fmt, config, config_label, meta, component, label)
    if fmt.strip == "underscored" and base is None:
        raise FormatError(
            f"{label}: kohya names replace dots with underscores, which is ambiguous; pass base= (the model's tree) to resolve them"
        )
    skipped: list[tuple[str, str]] = []
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    replaced: dict[str, tuple[str, torch.Tensor]] = {}
    for key in keys:
        parsed = split_role(key)
        if parsed is None or parsed[1] not in fmt.reads | {"lycoris"}:
            full = _replacement(fmt, key, cfg)
            if full is not None:
                replaced[full] = (key, tensors[key])
                continue
            why = "not a LoRA key (expected lora_A/lora_B/lora_down/lora_up/alpha/diff/diff_b)"
            skipped.append((key, why if parsed is None else f"a {parsed[1]!r} key, which format {name!r} does not hold"))
            continue
        module = _strip(fmt, parsed[0])
        if module is None:
            skipped.append((key, f"does not belong to the detected format {name!r}"))
            continue
        if fmt.strip == "component":
            prefix = component.rstrip(".") + "."
            if not module.startswith(prefix):
                skipped.append((key, f"belongs to another component than {component!r}"))
                continue
            module = module[len(prefix):]
        roles = groups.setdefault(module, {})
        role = parsed[1] if parsed[1] != "lycoris" else key[len(parsed[0]) + 1:]  # the LyCORIS tensor name
        if role in roles:
            raise KeyMismatchError(
                f"{label}: keys {roles[role][0]!r} and {key!r} both give the {parsed[1]} of {module!r}; "
                "one target given twice would make one of them silently win. Fix: keep one of them in the file."
            )
        roles[role] = (key, tensors[key])
    base_modules = _base_modules(base) if base is not None else None
    kohya = _kohya_table(list(base_modules)) if (fmt.strip == "underscored" and base_modules is not None) else None
    targets: dict[str, Delta] = {}
    claimed: dict[str, str] = {}
    for module, roles in groups.items():
        try:
            new = _build_targets(fmt, module, roles, cfg, exact_scales, label, base, base_modules, kohya, exact_eps)
        except (ShapeMismatchError, FormatError) as e:
            if strict:
                raise
            skipped += [(k, str(e)) for k, _ in roles.values()]
            continue
        if new is None:
            for key, _ in roles.values():
                skipped.append((key, "no base module matches" + _hint(module, base_modules)))
            continue
        for tkey, delta in new.items():
            first = next(iter(roles.values()))[0]
            if tkey in claimed:
                raise KeyMismatchError(
                    f"{label}: keys {claimed[tkey]!r} and {first!r} both target {tkey!r} (two names for one module); "
                    "one would silently win. Fix: keep one of them in the file."
                )
            claimed[tkey] = first
            if base is not None:
                if tkey not in base:
                    skipped.append((tkey, "the base has no such key" + _hint(tkey, base)))
                    continue
                if not delta.fits(tuple(base[tkey].shape)):
                    msg = f"{describe(delta)} does not fit the base weight {list(base[tkey].shape)}"
                    if strict:
                        raise ShapeMismatchError(f"{label}: target {tkey!r} (from {first!r}): {msg}")
                    skipped.append((tkey, msg))
                    continue
            targets[tkey] = delta
    for tkey, (key, tensor) in replaced.items():
        _add_replacement(targets, claimed, tkey, key, tensor, base, label, skipped)
    if skipped and strict:
        lines = "\n".join(f"  {k}: {why}" for k, why in sorted(skipped)[:20])
        more = f"\n  ... ({len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise KeyMismatchError(
            f"{label}: {len(skipped)} LoRA keys do not resolve (format {name!r}):\n{lines}{more}\n"
            "Fix: pass the right base= or format=, or strict=False to load the rest and get a report."
        )
    adapter = LoraAdapter(targets, format=name, metadata={"source": label})
    if strict:
        return adapter
    return adapter, ResolutionReport(tuple(skipped), name, scores)


def _exact_scales(meta: Mapping[str, str], label: str, field: str = FVT_SCALES) -> dict[str, float]:
    """fvtransform's own exact scales (``fvt.scales`` in the header; or DoRA eps, ``fvt.dora_eps``), checked."""
    if field not in meta:
        return {}
    where = f"{label}: header {field!r}"
    doc = loads_json(meta[field], source=where, expect=dict)
    return {k: _alpha_value(v, f"{where}[{k!r}]") for k, v in doc.items()}


def _eps_value(value: float, where: str) -> float:
    if not 0.0 <= value <= 1e-3:
        raise FormatError(f"{where}: DoRA eps {value!r} is out of range (0 to 1e-3); fvtransform writes 0 or float32 eps. "
                          "Fix: drop the header entry")
    return value


def _hint(name: str, base: Any) -> str:
    if base is None:
        return ""
    hint = close_matches(name, list(base))
    return f" (closest base names: {hint})" if hint else ""


def _resolve_module(fmt: LoraFormat, module: str, base_modules: Mapping[str, Any] | None, kohya: Mapping[str, str] | None) -> str | None:
    """The base module a file module names: kohya's underscored names via the base, others by name and Wan renames."""
    if fmt.strip == "underscored":
        return kohya.get(module) if kohya is not None else None
    candidates = [module]
    mapped = _rename(WAN_MODULE_RENAMES, module)
    if mapped != module:
        candidates = [mapped, module] if fmt.write_names == "original" else [module, mapped]
    if base_modules is None:
        return candidates[0]
    return next((c for c in candidates if c in base_modules), None)


def _resolve_param(module: str, base: Any) -> str | None:
    """A parameter the file names directly (Wan's ``blocks.N.modulation`` -> ``blocks.N.scale_shift_table``)."""
    mapped = _rename(PARAM_RENAMES, module)
    if base is None:
        return mapped if mapped != module else None
    return next((c for c in (mapped, module) if c in base and not c.endswith((".weight", ".bias"))), None)


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


def _lowrank_scale(
    fmt: LoraFormat, module: str, rank: int, roles: Mapping[str, tuple[str, torch.Tensor]], cfg: _ScaleConfig | None, label: str,
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
    fmt: LoraFormat, module: str, rank: int, roles: Mapping[str, tuple[str, torch.Tensor]], cfg: _ScaleConfig | None, label: str,
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


def _check_config_applies(cfg: _ScaleConfig, module: str, roles: Mapping[str, tuple[str, torch.Tensor]]) -> None:
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


def _build_targets(
    fmt: LoraFormat,
    module: str,
    roles: Mapping[str, tuple[str, torch.Tensor]],
    cfg: _ScaleConfig | None,
    exact: Mapping[str, float],
    label: str,
    base: Any,
    base_modules: Mapping[str, Any] | None,
    kohya: Mapping[str, str] | None,
    exact_eps: Mapping[str, float] | None = None,
) -> dict[str, Delta] | None:
    """The targets one file module gives, or None when it resolves to nothing in the base."""
    name = _resolve_module(fmt, module, base_modules, kohya)
    if is_lycoris(roles):  # LyCORIS LoHa / LoKr: read by lora/_lycoris.py
        return None if name is None else lycoris_targets(name, roles, label, exact)
    param = None
    if "diff_param" in roles or (name is None and set(roles) == {"diff"}) or (base is None and "diff" in roles and _resolve_param(module, None)):
        # ``<module>.diff_m`` is the delta of ``<module>.modulation`` (lightx2v's extractor, ComfyUI-WanVideoWrapper)
        owner = module + ".modulation" if "diff_param" in roles else module
        param = _resolve_param(owner, base) if fmt.strip != "underscored" else None
        if param is None:
            return None
    elif name is None:
        return None
    out: dict[str, Delta] = {}
    has_a, has_b = "A" in roles, "B" in roles
    if has_a != has_b:
        present = "A" if has_a else "B"
        key = roles[present][0]
        raise FormatError(f"{label}: {key!r} has no matching {'B' if has_a else 'A'} factor; the file is incomplete")
    if has_a:
        A, B = roles["A"][1], roles["B"][1]
        where = f"{label}: {roles['A'][0]!r}"
        if A.dim() < 2 or B.dim() < 2 or A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"{where}: rank mismatch between A {list(A.shape)} and B {list(B.shape)} (A's dim 0 must equal B's dim 1)"
            )
        rank = int(A.shape[0])
        if rank == 0:
            raise ShapeMismatchError(f"{where}: rank 0 (A {list(A.shape)}); a LoRA needs rank 1 or more. Fix: drop this module")
        if cfg is not None:
            _check_config_applies(cfg, module, roles)
        scale, alpha = _lowrank_scale(fmt, module, rank, roles, cfg, label, name + ".weight" in exact)
        if name + ".weight" in exact:
            scale = float(exact[name + ".weight"])
        mag = (canonical_magnitude(roles["magnitude"][1], int(B.shape[0]), int(A.shape[1]), f"{label}: {roles['magnitude'][0]!r}")
               if "magnitude" in roles else None)
        eps = DORA_EPS if mag is not None and roles["magnitude"][0].endswith(".dora_scale") else 0.0  # LyCORIS/ComfyUI
        if mag is not None and exact_eps and name + ".weight" in exact_eps:
            eps = _eps_value(exact_eps[name + ".weight"], f"{label}: header {FVT_DORA_EPS!r}[{name + '.weight'!r}]")
        out[name + ".weight"] = LowRank(A, B, scale, alpha, mag, eps)
    else:
        loose = [r for r in ("alpha", "magnitude", "fv_rank", "fv_alpha") if r in roles]
        if loose:
            raise FormatError(f"{label}: {roles[loose[0]][0]!r} has no lora A/B factors to go with")
    for role in ("diff", "diff_param"):
        if role in roles:
            if has_a:
                raise FormatError(f"{label}: {module!r} has both LoRA factors and a full .diff; keep one")
            target = param if param is not None else name + ".weight"
            out[target] = FullDelta(roles[role][1], float(exact.get(target, 1.0)))
    if "diff_b" in roles:
        if name is None:
            return None
        out[name + ".bias"] = FullDelta(roles["diff_b"][1], float(exact.get(name + ".bias", 1.0)))
    for d_key, d in out.items():
        d.validate(f"{label}: {d_key!r}")
    return out


def _replacement(fmt: LoraFormat, key: str, cfg: _ScaleConfig | None) -> str | None:
    """PEFT ``modules_to_save``: the base key a full replacement tensor is for, or None.

    peft's ``save_pretrained`` writes ``base_model.model.<module>.<param>``; in memory the
    key reads ``<module>.modules_to_save.<adapter>.<param>``. A module is saved when its
    name is, or ends with ``.`` + , an entry of the config's ``modules_to_save``.
    """
    if cfg is None or not cfg.modules_to_save or "replace" not in fmt.holds:
        return None
    name = _strip(fmt, key)
    if name is None:
        return None
    name = re.sub(r"\.modules_to_save\.[^.]+(?=\.[^.]+$)", "", name)
    module = name.rpartition(".")[0]
    if any(module == m or module.endswith("." + m) for m in cfg.modules_to_save):
        return name
    return None


def _add_replacement(targets: dict[str, Delta], claimed: dict[str, str], tkey: str, key: str, tensor: torch.Tensor,
                     base: Any, label: str, skipped: list[tuple[str, str]]) -> None:
    from fvtransform.lora._adapter import Replace

    if tkey in claimed:
        raise KeyMismatchError(f"{label}: keys {claimed[tkey]!r} and {key!r} both target {tkey!r}; keep one")
    claimed[tkey] = key
    if base is not None:
        if tkey not in base:
            skipped.append((key, "modules_to_save tensor for a key the base does not have" + _hint(tkey, base)))
            return
        if tuple(base[tkey].shape) != tuple(tensor.shape):
            raise ShapeMismatchError(f"{label}: {key!r} {list(tensor.shape)} does not replace the base's {tkey!r} {list(base[tkey].shape)}")
    delta = Replace(tensor)
    delta.validate(f"{label}: {key!r}")
    targets[tkey] = delta


# ----------------------------------------------------------------------------- writing
def _module_name(target: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if target.endswith(suffix):
            return target[: -len(suffix)], suffix
    return target, ""  # a parameter named directly (Wan's scale_shift_table)


def _write_name(fmt: LoraFormat, module: str, param: bool) -> str:
    if fmt.write_names == "as-is":
        return module
    original = _original_params() if param else _original_names()
    name = original.plan([module])[module]
    return name.replace(".", "_") if fmt.write_names == "underscored" else name


def _encode(adapter: LoraAdapter, fmt: LoraFormat, component: str) -> dict[str, torch.Tensor]:
    from fvtransform.lora._adapter import Replace

    roles = fmt.write_roles
    prefix = fmt.write_prefix.format(component=component.rstrip("."))
    out: dict[str, torch.Tensor] = {}
    for target, d in adapter.items():
        module, suffix = _module_name(target)
        name = prefix + _write_name(fmt, module, param=not suffix)
        if isinstance(d, GENERATED):
            if "lycoris" not in fmt.holds:
                raise FormatError(f"{target!r} is a LyCORIS {type(d).__name__}, which format {fmt.name!r} cannot hold; save as 'kohya' or 'comfy'")
            out.update({name + k: t for k, t in lycoris_tensors(d).items()})
        elif isinstance(d, LowRank):
            if suffix != ".weight":
                raise FormatError(f"{target!r}: a low-rank delta must target a weight")
            out[name + roles["A"]] = d.A.contiguous()
            out[name + roles["B"]] = d.B.contiguous()
            if d.magnitude is not None:
                if "dora" not in fmt.holds:
                    able = [f.name for f in TABLE if "dora" in f.holds]
                    raise FormatError(f"{target!r}: format {fmt.name!r} cannot hold DoRA magnitudes; use one of {able}")
                if roles["magnitude"].endswith(".dora_scale"):  # LyCORIS's layout, which ComfyUI broadcasts against the weight
                    out[name + roles["magnitude"]] = dora_scale_layout(d.magnitude, d.A.dim()).contiguous()
                elif d.magnitude.dim() != 1:
                    raise FormatError(f"{target!r}: a DoRA magnitude on the input axis (LyCORIS wd_on_output=False) cannot be "
                                      f"written as {fmt.name!r}, which holds per-output magnitudes; save as 'kohya'")
                else:
                    out[name + roles["magnitude"]] = d.magnitude.contiguous()
            if "alpha" in roles:
                out[name + roles["alpha"]] = torch.tensor(d.scale * d.rank, dtype=torch.float32)
        elif isinstance(d, Replace):
            if "replace" not in fmt.holds:
                able = [f.name for f in TABLE if "replace" in f.holds]
                raise FormatError(f"{target!r} is a full replacement (modules_to_save), which format {fmt.name!r} cannot hold; use one of {able}")
            out[prefix + target] = d.T.contiguous()
        else:
            role = {".weight": "diff", ".bias": "diff_b", "": "diff_param"}[suffix]
            if role not in roles or "full" not in fmt.holds:
                able = [f.name for f in TABLE if role in f.write_roles and "full" in f.holds]
                raise FormatError(
                    f"{target!r} is a full delta (.diff / .diff_b), which format {fmt.name!r} cannot hold; save as one of {able}"
                )
            out[name + roles[role]] = d.D.contiguous()
    return out


def _peft_config(adapter: LoraAdapter) -> dict[str, Any]:
    from collections import Counter

    from fvtransform.lora._adapter import Replace

    lows = {k: d for k, d in adapter.items() if isinstance(d, LowRank)}
    if not lows:
        raise FormatError("a PEFT adapter needs at least one low-rank target")
    dora = sorted(k for k, d in lows.items() if d.magnitude is not None)
    if dora and len(dora) != len(lows):
        plain = sorted(set(lows) - set(dora))
        raise FormatError(
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
    saved = sorted({_module_name(k)[0] for k, d in adapter.items() if isinstance(d, Replace)})
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
        FormatError: not an adapter, an unknown format, a NUL in ``path``, a folder where a file goes.
        WriteError: a file fvtransform did not write is in the way (without ``overwrite``), a full disk.
        UnsafeFileError: the destination is a symlink, FIFO, device or socket.
    """
    from fvtransform.io._atomic import atomic_file, check_path, json_bytes, write_files
    from fvtransform.io._save import tree_bytes

    if not isinstance(adapter, LoraAdapter):
        raise FormatError(f"lora.save takes a LoraAdapter; found {type(adapter).__name__}")
    fmt = BY_NAME.get(format)
    if fmt is None or not fmt.write_roles:
        raise FormatError(f"unknown LoRA format {format!r}; write one of {[f.name for f in TABLE if f.write_roles]}")
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
