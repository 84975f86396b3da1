"""``fvt.lora.load``: read, detect, resolve every key to a target, and account for every key (strict)."""

from __future__ import annotations

from collections.abc import Mapping
import os

import torch

from fvtransform._args import check_strict
from fvtransform.errors import FormatError, KeyMismatchError, ShapeMismatchError, UsageError
from fvtransform.tree._keymap import KeyMap, KeyMapLike
from fvtransform.lora._adapter import Delta, LoraAdapter
from fvtransform.lora._report import ResolutionReport
from fvtransform.lora._format_table import (
    BY_NAME, FORMATS, FVT_DORA_EPS, SCALE_CONVENTIONS,
)
from fvtransform.lora._detect import detect_format, split_role, strip_prefix
from fvtransform.lora._scale_config import config_for, exact_scales
from fvtransform.lora._source import read_source
from fvtransform.lora._targets import add_replacement, build_targets, close_hint, kohya_table, module_shapes, replacement_target
from fvtransform.lora._merge import describe


def load(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    format: str = "auto",
    base: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    strict: bool = True,
    component: str = "transformer",
    weight_name: str | None = None,
    rename: KeyMapLike | None = None,
) -> LoraAdapter:
    """Read a LoRA file (or folder, repo id, or mapping) as a :class:`LoraAdapter`.

    ``format="auto"`` scores every format on all keys and picks the best (the
    adapter's ``format`` says which). With ``base=`` (a tree or a module)
    every key is matched to a base key with compatible shapes.

    ``strict`` has the library's one meaning (both sides account exactly):
    with ``strict=True`` every file key must be claimed by a target and every
    target found in ``base`` (when given), else :class:`KeyMismatchError` lists
    the leftovers with their reasons and the closest base names. With
    ``strict=False`` the leftovers are skipped, and listed with their reasons
    in ``adapter.report`` (a :class:`ResolutionReport`); the return type is
    the same. ``rename`` (a :class:`~fvtransform.KeyMap` of renames, or what
    ``KeyMap.of`` takes, as every ``rename=``) maps the file's module names (the
    format's prefix removed) before they are matched to ``base``; strictly, each
    of its rules must match a module. A folder holding several weights files is read as
    its LoRA file name picks (``pytorch_lora_weights.safetensors``, ``adapter_model.safetensors``, ...), or ``weight_name=``.

    Conventions: ``scale = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA);
    a missing alpha means ``alpha = r``; ``adapter.report.convention`` says
    where this file's scales came from.

    >>> import torch, fvtransform as fvt
    >>> base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> file = {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2),
    ...         "other.lora_A.weight": torch.zeros(2, 3), "other.lora_B.weight": torch.zeros(4, 2)}
    >>> adapter = fvt.lora.load(file, base=base, strict=False)
    >>> list(adapter), [key for key, why in adapter.report.skipped]
    (['l.weight'], ['other.lora_A.weight', 'other.lora_B.weight'])
    """
    strict = check_strict(strict, "fvt.lora.load")
    if base is not None and not isinstance(base, (Mapping, torch.nn.Module)):
        raise UsageError(f"fvt.lora.load: base={base!r} is a {type(base).__name__}; expected the model's tree (a mapping) "
                         f"or module. Fix: base=fvt.load({str(base)!r}) for a checkpoint on disk (lazy: nothing is read)")
    if base is not None and isinstance(base, torch.nn.Module):
        from fvtransform.tree._paramtree import ParamTree

        base = ParamTree.from_module(base)
    tensors, meta, config, label, config_label = read_source(source, weight_name)
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
            raise UsageError(f"unknown LoRA format {format!r}; known: {list(FORMATS)}")
        name, scores = format, {}
    fmt = BY_NAME[name]
    exact = exact_scales(meta, label)
    exact_eps = exact_scales(meta, label, FVT_DORA_EPS)
    cfg = config_for(fmt, config, config_label, meta, component, label)
    if fmt.strip == "underscored" and base is None:
        raise UsageError(
            f"{label}: kohya names replace dots with underscores, which is ambiguous; pass base= (the model's tree) to resolve them"
        )
    skipped: list[tuple[str, str]] = []
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    replaced: dict[str, tuple[str, torch.Tensor]] = {}
    for key in keys:
        parsed = split_role(key)
        if parsed is None or parsed[1] not in fmt.reads | {"lycoris"}:
            full = replacement_target(fmt, key, cfg)
            if full is not None:
                replaced[full] = (key, tensors[key])
                continue
            why = "not a LoRA key (expected lora_A/lora_B/lora_down/lora_up/alpha/diff/diff_b)"
            skipped.append((key, why if parsed is None else f"a {parsed[1]!r} key, which format {name!r} does not hold"))
            continue
        module = strip_prefix(fmt, parsed[0])
        if module is None and fmt.strip == "component" and parsed[0].startswith(component.rstrip(".") + "."):
            module = parsed[0]  # a component the caller names (any pipeline component, not only the common ones)
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
    if rename is not None:
        groups = _renamed(groups, rename, strict, label)
    base_modules = module_shapes(base) if base is not None else None
    if base_modules is not None:
        groups = _under_model_prefix(groups, base_modules)
    kohya = kohya_table(list(base_modules)) if (fmt.strip == "underscored" and base_modules is not None) else None
    targets: dict[str, Delta] = {}
    claimed: dict[str, str] = {}
    for module, roles in groups.items():
        try:
            new = build_targets(fmt, module, roles, cfg, exact, label, base, base_modules, kohya, exact_eps)
        except (ShapeMismatchError, FormatError) as e:
            if strict:
                raise
            skipped += [(k, str(e)) for k, _ in roles.values()]
            continue
        if new is None:
            for key, _ in roles.values():
                skipped.append((key, "no base module matches" + close_hint(module, base_modules)))
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
                    skipped.append((tkey, "the base has no such key" + close_hint(tkey, base)))
                    continue
                if not delta.fits(tuple(base[tkey].shape)):
                    msg = f"{describe(delta)} does not fit the base weight {list(base[tkey].shape)}"
                    if strict:
                        raise ShapeMismatchError(f"{label}: target {tkey!r} (from {first!r}): {msg}")
                    skipped.append((tkey, msg))
                    continue
            targets[tkey] = delta
    for tkey, (key, tensor) in replaced.items():
        add_replacement(targets, claimed, tkey, key, tensor, base, label, skipped)
    if skipped and strict:
        lines = "\n".join(f"  {k}: {why}" for k, why in sorted(skipped)[:20])
        more = f"\n  ... ({len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise KeyMismatchError(
            f"{label}: {len(skipped)} LoRA keys do not resolve (format {name!r}):\n{lines}{more}\n"
            "Fix: pass the right base=, format= or rename=, or strict=False to load the rest and read adapter.report."
        )
    source = "none" if cfg is None and fmt.scale.startswith(("config", "metadata")) else fmt.scale
    convention = SCALE_CONVENTIONS[source] + ("; fvtransform's exact scales (header 'fvt.scales') win" if exact else "")
    report = ResolutionReport(name, scores, {k: claimed[k] for k in targets}, tuple(skipped), convention)
    return LoraAdapter(targets, format=name, metadata={"source": label}, report=report)


def _under_model_prefix(groups: dict[str, dict[str, tuple[str, torch.Tensor]]],
                       base_modules: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """A diffusion model's LoRA against a full checkpoint (``model.diffusion_model.<module>``, as ComfyUI names a
    full checkpoint's keys): a module the base has only under such a prefix resolves there, as ComfyUI applies it."""
    from fvtransform.tree._fp8 import MODEL_PREFIXES

    out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for module, roles in groups.items():
        if module not in base_modules:
            module = next((p + module for p in MODEL_PREFIXES if p + module in base_modules and p + module not in groups),
                          module)
        out[module] = roles
    return out


def _renamed(groups: dict[str, dict[str, tuple[str, torch.Tensor]]], rename: KeyMapLike, strict: bool,
             label: str) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """``groups`` with each module renamed by ``rename`` (renames only: a LoRA module is not fused or split).

    ``strict`` as everywhere: every module claimed by a rule and every rule used (``KeyMap.of`` keeps the rest).
    """
    # names only: a stand-in shape lets a fuse rule reach the check below
    plan = KeyMap.of(rename).plan({m: (1,) for m in groups}, strict=strict)
    out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for step in plan.steps:
        if len(step.sources) != 1 or len(step.targets) != 1:
            raise UsageError(f"{label}: rename= fuses or splits {list(step.sources)} -> {list(step.targets)}; a LoRA's modules "
                              "are only renamed. Fix: use rename rules only")
        out[step.targets[0]] = groups[step.sources[0]]
    return out
