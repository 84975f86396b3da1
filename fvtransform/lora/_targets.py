"""Resolving one file module to the base's target keys and building its deltas (LoRA, full, LyCORIS, modules_to_save)."""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import torch

from fvtransform.errors import FormatError, KeyMismatchError, ShapeMismatchError
from fvtransform._messages import close_matches
from fvtransform.tree._keymap import KeyMap
from fvtransform.tree._mappings import WAN_MODULE_RENAMES
from fvtransform.lora._adapter import DORA_EPS, Delta, FullDelta, LowRank
from fvtransform.lora._dora import canonical_magnitude
from fvtransform.lora._format_table import (
    FVT_DORA_EPS, PARAM_RENAMES, LoraFormat,
)
from fvtransform.lora._detect import strip_prefix
from fvtransform.lora._scale_config import ScaleConfig, check_config_applies, eps_value, lowrank_scale
from fvtransform.lora._lycoris import is_lycoris, lycoris_targets


def module_shapes(base: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for key, t in base.items():
        for suffix in (".weight", ".bias"):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], tuple(t.shape))
    return out


#: The format facts as KeyMaps (one rename layer): diffusers -> original Wan module names, and the
#: parameters original Wan names differently; unmatched names keep theirs.
DIFFUSERS_NAMES = KeyMap.of(WAN_MODULE_RENAMES)
ORIGINAL_NAMES = DIFFUSERS_NAMES.inverse()
DIFFUSERS_PARAMS = KeyMap.of(PARAM_RENAMES)
ORIGINAL_PARAMS = DIFFUSERS_PARAMS.inverse()


def renamed(keymap: KeyMap, name: str) -> str:
    """``name`` as ``keymap`` (renames only) maps it.

    >>> renamed(ORIGINAL_NAMES, "blocks.3.attn1.to_q"), renamed(DIFFUSERS_NAMES, "blocks.3.self_attn.q")
    ('blocks.3.self_attn.q', 'blocks.3.attn1.to_q')
    """
    return keymap.plan({name: (1,)}, strict=False).steps[0].targets[0]  # one name: the other rules go unused


def kohya_table(modules: list[str]) -> dict[str, str]:
    """Underscored name -> module, for the base's names and their original-Wan names."""
    table: dict[str, str] = {}
    clash: dict[str, set[str]] = {}
    for m in modules:
        for name in {m, renamed(ORIGINAL_NAMES, m)}:
            u = name.replace(".", "_")
            if u in table and table[u] != m:
                clash.setdefault(u, {table[u]}).add(m)
            table[u] = m
    for u in clash:
        table.pop(u, None)
    return table


def close_hint(name: str, base: Any) -> str:
    if base is None:
        return ""
    hint = close_matches(name, list(base))
    return f" (closest base names: {hint})" if hint else ""


def _resolve_module(fmt: LoraFormat, module: str, base_modules: Mapping[str, Any] | None, kohya: Mapping[str, str] | None) -> str | None:
    """The base module a file module names: kohya's underscored names via the base, others by name and Wan renames."""
    if fmt.strip == "underscored":
        return kohya.get(module) if kohya is not None else None
    candidates = [module]
    mapped = renamed(DIFFUSERS_NAMES, module)
    if mapped != module:
        candidates = [mapped, module] if fmt.write_names == "original" else [module, mapped]
    if base_modules is None:
        return candidates[0]
    return next((c for c in candidates if c in base_modules), None)


def _resolve_param(module: str, base: Any) -> str | None:
    """A parameter the file names directly (Wan's ``blocks.N.modulation`` -> ``blocks.N.scale_shift_table``)."""
    mapped = renamed(DIFFUSERS_PARAMS, module)
    if base is None:
        return mapped if mapped != module else None
    return next((c for c in (mapped, module) if c in base and not c.endswith((".weight", ".bias"))), None)


def build_targets(
    fmt: LoraFormat,
    module: str,
    roles: Mapping[str, tuple[str, torch.Tensor]],
    cfg: ScaleConfig | None,
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
    # name is None only where param is set (the .diff_param / lone-.diff path above); LoRA factors there as well
    # are refused by the both-kinds check below, so the module's own name only stands in until then
    weight = (name if name is not None else module) + ".weight"
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
            check_config_applies(cfg, module, roles)
        scale, alpha = lowrank_scale(fmt, module, rank, roles, cfg, label, weight in exact)
        if weight in exact:
            scale = float(exact[weight])
        mag = (canonical_magnitude(roles["magnitude"][1], int(B.shape[0]), int(A.shape[1]), f"{label}: {roles['magnitude'][0]!r}")
               if "magnitude" in roles else None)
        eps = DORA_EPS if mag is not None and roles["magnitude"][0].endswith(".dora_scale") else 0.0  # LyCORIS/ComfyUI
        if mag is not None and exact_eps and weight in exact_eps:
            eps = eps_value(exact_eps[weight], f"{label}: header {FVT_DORA_EPS!r}[{weight!r}]")
        out[weight] = LowRank(A, B, scale, alpha, mag, eps)
    else:
        loose = [r for r in ("alpha", "magnitude", "fv_rank", "fv_alpha") if r in roles]
        if loose:
            raise FormatError(f"{label}: {roles[loose[0]][0]!r} has no lora A/B factors to go with")
    for role in ("diff", "diff_param"):
        if role in roles:
            if has_a:
                raise FormatError(f"{label}: {module!r} has both LoRA factors and a full .diff; keep one")
            target = param if param is not None else weight
            out[target] = FullDelta(roles[role][1], float(exact.get(target, 1.0)))
    if "diff_b" in roles:
        if name is None:
            return None
        out[name + ".bias"] = FullDelta(roles["diff_b"][1], float(exact.get(name + ".bias", 1.0)))
    for d_key, d in out.items():
        d.validate(f"{label}: {d_key!r}")
    return out


def replacement_target(fmt: LoraFormat, key: str, cfg: ScaleConfig | None) -> str | None:
    """PEFT ``modules_to_save``: the base key a full replacement tensor is for, or None.

    peft's ``save_pretrained`` writes ``base_model.model.<module>.<param>``; in memory the
    key reads ``<module>.modules_to_save.<adapter>.<param>``. A module is saved when its
    name is, or ends with ``.`` + , an entry of the config's ``modules_to_save``.
    """
    if cfg is None or not cfg.modules_to_save or "replace" not in fmt.holds:
        return None
    name = strip_prefix(fmt, key)
    if name is None:
        return None
    name = re.sub(r"\.modules_to_save\.[^.]+(?=\.[^.]+$)", "", name)
    module = name.rpartition(".")[0]
    if any(module == m or module.endswith("." + m) for m in cfg.modules_to_save):
        return name
    return None


def add_replacement(targets: dict[str, Delta], claimed: dict[str, str], tkey: str, key: str, tensor: torch.Tensor,
                     base: Any, label: str, skipped: list[tuple[str, str]]) -> None:
    if tkey in claimed:
        raise KeyMismatchError(f"{label}: keys {claimed[tkey]!r} and {key!r} both target {tkey!r}; keep one")
    claimed[tkey] = key
    if base is not None:
        if tkey not in base:
            skipped.append((key, "modules_to_save tensor for a key the base does not have" + close_hint(tkey, base)))
            return
        if tuple(base[tkey].shape) != tuple(tensor.shape):
            raise ShapeMismatchError(f"{label}: {key!r} {list(tensor.shape)} does not replace the base's {tkey!r} {list(base[tkey].shape)}")
    delta = FullDelta(tensor, replaces=True)
    delta.validate(f"{label}: {key!r}")
    targets[tkey] = delta
