"""LoRA file formats: PEFT, diffusers, kohya / musubi, ComfyUI / original names.

Reading classifies every key (A, B, alpha, full delta, bias delta, magnitude),
detects the format by scoring all of them, and (with ``base=``) resolves each
target against the base tree's names and shapes, strictly.
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

from fvtransform.errors import FormatError, KeyMismatchError, NotFoundError, ShapeMismatchError, close_matches, format_keys
from fvtransform.io._mappings import WAN_MODULE_RENAMES
from fvtransform.io._open import contained
from fvtransform.lora._adapter import Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.tree._rename import RenameRules

__all__ = ["load", "save", "FORMATS", "ResolutionReport", "detect_format", "split_role"]

FORMATS = ("peft", "diffusers", "kohya", "comfy", "plain")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
DIFFUSERS_META = "lora_adapter_metadata"
FVT_SCALES = "fvt.scales"
_DIFFUSERS_PREFIXES = ("transformer.", "text_encoder.", "text_encoder_2.", "unet.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te1_", "lora_te2_", "lora_te_")

_ROLES = (
    (".lora_A.default.weight", "A"),
    (".lora_B.default.weight", "B"),
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_down.weight", "A"),
    (".lora_up.weight", "B"),
    (".lora_magnitude_vector", "magnitude"),
    (".dora_scale", "magnitude"),
    (".alpha", "alpha"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
)
_ROLE_NAMES = {
    "peft": {"A": ".lora_A.weight", "B": ".lora_B.weight", "magnitude": ".lora_magnitude_vector"},
    "kohya": {"A": ".lora_down.weight", "B": ".lora_up.weight", "alpha": ".alpha", "magnitude": ".dora_scale", "diff": ".diff", "diff_b": ".diff_b"},
    "comfy": {"A": ".lora_A.weight", "B": ".lora_B.weight", "alpha": ".alpha", "diff": ".diff", "diff_b": ".diff_b"},
}


def split_role(key: str) -> tuple[str, str] | None:
    """``(module, role)`` for a LoRA file key, or None.

    >>> split_role("base_model.model.blocks.0.attn1.to_q.lora_A.weight")
    ('base_model.model.blocks.0.attn1.to_q', 'A')
    >>> split_role("diffusion_model.blocks.1.cross_attn.v_img.diff_b")
    ('diffusion_model.blocks.1.cross_attn.v_img', 'diff_b')
    """
    for suffix, role in _ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _module_of(fmt: str, module: str) -> str | None:
    """Strip the format's prefix; None when the key does not belong to the format."""
    if fmt == "peft":
        return module[len("base_model.model."):] if module.startswith("base_model.model.") else None
    if fmt == "diffusers":
        for p in _DIFFUSERS_PREFIXES:
            if module.startswith(p):
                return module
        return None
    if fmt == "kohya":
        return module if module.startswith(_KOHYA_PREFIXES) else None
    if fmt == "comfy":
        return module[len("diffusion_model."):] if module.startswith("diffusion_model.") else None
    if fmt == "plain":
        bad = ("base_model.model.", "diffusion_model.", *_DIFFUSERS_PREFIXES, *_KOHYA_PREFIXES)
        return None if module.startswith(bad) else module
    raise FormatError(f"unknown LoRA format {fmt!r}; known: {list(FORMATS)}")


def detect_format(keys: list[str]) -> tuple[str, dict[str, float]]:
    """Score every format on all keys; return the best and the scores.

    >>> detect_format(["lora_unet_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_blocks_0_attn1_to_q.alpha"])[0]
    'kohya'
    """
    parsed = [split_role(k) for k in keys]
    scores = {}
    for fmt in FORMATS:
        hits = sum(1 for p in parsed if p is not None and _module_of(fmt, p[0]) is not None)
        scores[fmt] = hits / max(1, len(keys))
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
def _read_source(source: Any, weight_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any] | None, str]:
    """Tensors, safetensors metadata, adapter_config.json (if any), and a label for messages."""
    if isinstance(source, Mapping):
        return dict(source), {}, None, "<mapping>"
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

        config = read_json(config_path)
    return tensors, ckpt.metadata, config, str(file)


def _pattern_value(module: str, patterns: Mapping[str, Any], default: Any) -> Any:
    for pat, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pat})", module):
            return value
    return default


def _peft_scale(module: str, rank: int, config: Mapping[str, Any] | None, where: str) -> tuple[float, float]:
    if not config:
        return 1.0, float(rank)
    r = _pattern_value(module, config.get("rank_pattern") or {}, config.get("r", rank))
    alpha = float(_pattern_value(module, config.get("alpha_pattern") or {}, config.get("lora_alpha", r)))
    if int(r) != rank:
        raise ShapeMismatchError(f"{where}: {module!r} has rank {rank} in the file, but its config says r={r}")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale, alpha


def _diffusers_config(meta: Mapping[str, str], component: str) -> dict[str, Any] | None:
    raw = meta.get(DIFFUSERS_META)
    if not raw:
        return None
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError:
        raise FormatError(f"safetensors metadata {DIFFUSERS_META!r} is not JSON") from None
    prefix = component.rstrip(".") + "."
    out = {k[len(prefix):]: v for k, v in packed.items() if k.startswith(prefix)}
    return out or None


def _base_modules(base: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, t in base.items():
        for suffix in (".weight", ".bias"):
            if key.endswith(suffix):
                out.setdefault(key[: -len(suffix)], tuple(t.shape))
    return out


def _original_names() -> RenameRules:
    return RenameRules.of([(dst, src) for src, dst in WAN_MODULE_RENAMES])


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


def _to_diffusers_module(module: str) -> str:
    return RenameRules.of(list(WAN_MODULE_RENAMES)).plan([module])[module]


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
    tensors, meta, config, label = _read_source(source, weight_name)
    keys = list(tensors)
    if not keys:
        raise FormatError(f"{label}: the LoRA file holds no tensors")
    if format == "auto":
        try:
            fmt, scores = detect_format(keys)
        except FormatError as e:
            raise FormatError(f"{label}: {e}") from None
    else:
        if format not in FORMATS:
            raise FormatError(f"unknown LoRA format {format!r}; known: {list(FORMATS)}")
        fmt, scores = format, {}
    exact_scales = json.loads(meta[FVT_SCALES]) if FVT_SCALES in meta else {}
    if fmt == "diffusers":
        config = config or _diffusers_config(meta, component)
    skipped: list[tuple[str, str]] = []
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key in keys:
        parsed = split_role(key)
        if parsed is None:
            skipped.append((key, "not a LoRA key (expected lora_A/lora_B/lora_down/lora_up/alpha/diff/diff_b)"))
            continue
        module = _module_of(fmt, parsed[0])
        if module is None:
            skipped.append((key, f"does not belong to the detected format {fmt!r}"))
            continue
        if fmt == "diffusers":
            prefix = component.rstrip(".") + "."
            if not module.startswith(prefix):
                skipped.append((key, f"belongs to another component than {component!r}"))
                continue
            module = module[len(prefix):]
        groups.setdefault(module, {})[parsed[1]] = (key, tensors[key])
    base_modules = _base_modules(base) if base is not None else None
    kohya = _kohya_table(list(base_modules)) if (fmt == "kohya" and base_modules is not None) else None
    if fmt == "kohya" and base is None:
        raise FormatError(
            f"{label}: kohya names replace dots with underscores, which is ambiguous; pass base= (the model's tree) to resolve them"
        )
    targets: dict[str, Delta] = {}
    for module, roles in groups.items():
        name = _resolve_module(fmt, module, base_modules, kohya)
        if name is None:
            for key, _ in roles.values():
                skipped.append((key, "no base module matches" + _hint(module, base_modules)))
            continue
        try:
            new = _build_targets(name, roles, fmt, config, exact_scales, label)
        except (ShapeMismatchError, FormatError) as e:
            if strict:
                raise
            skipped += [(k, str(e)) for k, _ in roles.values()]
            continue
        for tkey, delta in new.items():
            if base is not None:
                if tkey not in base:
                    skipped.append((tkey, "the base has no such key" + _hint(tkey, base)))
                    continue
                if not delta.fits(tuple(base[tkey].shape)):
                    got = f"A {list(delta.A.shape)}, B {list(delta.B.shape)}" if isinstance(delta, LowRank) else f"delta {list(delta.D.shape)}"
                    msg = f"{got} does not fit the base weight {list(base[tkey].shape)}"
                    if strict:
                        raise ShapeMismatchError(f"{label}: target {tkey!r}: {msg}")
                    skipped.append((tkey, msg))
                    continue
            targets[tkey] = delta
    if skipped and strict:
        lines = "\n".join(f"  {k}: {why}" for k, why in sorted(skipped)[:20])
        more = f"\n  ... ({len(skipped) - 20} more)" if len(skipped) > 20 else ""
        raise KeyMismatchError(
            f"{label}: {len(skipped)} LoRA keys do not resolve (format {fmt!r}):\n{lines}{more}\n"
            "Fix: pass the right base= or format=, or strict=False to load the rest and get a report."
        )
    adapter = LoraAdapter(targets, format=fmt, metadata={"source": label})
    if strict:
        return adapter
    return adapter, ResolutionReport(tuple(skipped), fmt, scores)


def _hint(name: str, base: Any) -> str:
    if base is None:
        return ""
    hint = close_matches(name, list(base))
    return f" (closest base names: {hint})" if hint else ""


def _resolve_module(fmt: str, module: str, base_modules: Mapping[str, Any] | None, kohya: Mapping[str, str] | None) -> str | None:
    if fmt == "kohya":
        for p in _KOHYA_PREFIXES:
            if module.startswith(p):
                return kohya.get(module[len(p):]) if kohya is not None else None
        return None
    candidates = [module]
    mapped = _to_diffusers_module(module)
    if mapped != module:
        candidates = [mapped, module] if fmt == "comfy" else [module, mapped]
    if base_modules is None:
        return candidates[0]
    for c in candidates:
        if c in base_modules:
            return c
    return None


def _build_targets(
    module: str,
    roles: Mapping[str, tuple[str, torch.Tensor]],
    fmt: str,
    config: Mapping[str, Any] | None,
    exact: Mapping[str, float],
    label: str,
) -> dict[str, Delta]:
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
        if "alpha" in roles:
            alpha = float(roles["alpha"][1].float().item())
            scale = alpha / rank
        elif fmt in ("peft", "diffusers", "plain"):
            scale, alpha = _peft_scale(module, rank, config, label)
        else:
            scale, alpha = 1.0, float(rank)
        if module + ".weight" in exact:
            scale = float(exact[module + ".weight"])
        mag = roles["magnitude"][1].reshape(-1) if "magnitude" in roles else None
        out[module + ".weight"] = LowRank(A, B, scale, alpha, mag)
    elif "alpha" in roles or "magnitude" in roles:
        key = roles.get("alpha", roles.get("magnitude"))[0]
        raise FormatError(f"{label}: {key!r} has no lora A/B factors to go with")
    if "diff" in roles:
        if has_a:
            raise FormatError(f"{label}: {module!r} has both LoRA factors and a full .diff; keep one")
        out[module + ".weight"] = FullDelta(roles["diff"][1], float(exact.get(module + ".weight", 1.0)))
    if "diff_b" in roles:
        out[module + ".bias"] = FullDelta(roles["diff_b"][1], float(exact.get(module + ".bias", 1.0)))
    for d_key, d in out.items():
        d.validate(f"{label}: {d_key!r}")
    return out


# ----------------------------------------------------------------------------- writing
def _module_name(target: str) -> tuple[str, str]:
    for suffix in (".weight", ".bias"):
        if target.endswith(suffix):
            return target[: -len(suffix)], suffix
    raise FormatError(f"adapter target {target!r} does not end in .weight or .bias")


def _encode(adapter: LoraAdapter, fmt: str, rename: Callable[[str], str], prefix: str) -> dict[str, torch.Tensor]:
    roles = _ROLE_NAMES["peft" if fmt in ("peft", "diffusers", "plain") else fmt]
    out: dict[str, torch.Tensor] = {}
    for target, d in adapter.items():
        module, suffix = _module_name(target)
        name = prefix + rename(module)
        if isinstance(d, LowRank):
            if suffix != ".weight":
                raise FormatError(f"{target!r}: a low-rank delta must target a weight")
            out[name + roles["A"]] = d.A.contiguous()
            out[name + roles["B"]] = d.B.contiguous()
            if d.magnitude is not None:
                if "magnitude" not in roles:
                    raise FormatError(f"format {fmt!r} cannot hold DoRA magnitudes; use peft or kohya")
                out[name + roles["magnitude"]] = d.magnitude.contiguous()
            if "alpha" in roles:
                out[name + roles["alpha"]] = torch.tensor(d.scale * d.rank, dtype=torch.float32)
        else:
            role = "diff" if suffix == ".weight" else "diff_b"
            if role not in roles:
                raise FormatError(
                    f"{target!r} is a full delta (.diff / .diff_b), which format {fmt!r} cannot hold; save as 'comfy' or 'kohya'"
                )
            out[name + roles[role]] = d.D.contiguous()
    return out


def _peft_config(adapter: LoraAdapter) -> dict[str, Any]:
    from collections import Counter

    lows = {k: d for k, d in adapter.items() if isinstance(d, LowRank)}
    if not lows:
        raise FormatError("a PEFT adapter needs at least one low-rank target")
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
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted({_module_name(k)[0] for k in lows}),
        "use_dora": any(d.magnitude is not None for d in lows.values()),
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "task_type": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }


def save(adapter: LoraAdapter, path: str | os.PathLike[str], *, format: str = "peft", component: str = "transformer") -> Path:
    """Write an adapter in ``format`` (``peft``, ``diffusers``, ``kohya``, ``comfy``), atomically.

    ``peft`` writes a folder (``adapter_model.safetensors`` + ``adapter_config.json``);
    ``diffusers`` writes ``pytorch_lora_weights.safetensors`` (into ``path`` if it
    is a folder or has no suffix) with the adapter config in the header; the
    others write one file. Exact scales are also kept in the header
    (``fvt.scales``), so reading the file back gives the same adapter.
    Returns the path of the weights file.
    """
    from fvtransform.io._save import save as save_tree

    if not isinstance(adapter, LoraAdapter):
        raise FormatError(f"lora.save takes a LoraAdapter; found {type(adapter).__name__}")
    path = Path(path)
    scales = json.dumps({k: d.scale for k, d in adapter.items()})
    meta = {FVT_SCALES: scales}
    if format == "peft":
        folder = path
        tensors = _encode(adapter, "peft", lambda m: m, "base_model.model.")
        config = _peft_config(adapter)
        folder.mkdir(parents=True, exist_ok=True)
        save_tree(tensors, folder / PEFT_WEIGHTS, metadata=meta)
        _write_json_atomic(folder / PEFT_CONFIG, config)
        return folder / PEFT_WEIGHTS
    if format == "diffusers":
        file = path / DIFFUSERS_WEIGHTS if (path.is_dir() or not path.suffix) else path
        tensors = _encode(adapter, "diffusers", lambda m: m, component.rstrip(".") + ".")
        cfg = {f"{component}.{k}": v for k, v in _peft_config(adapter).items()}
        meta[DIFFUSERS_META] = json.dumps(cfg, sort_keys=True)
    elif format == "kohya":
        file = path
        tensors = _encode(adapter, "kohya", lambda m: m.replace(".", "_"), "lora_unet_")
    elif format == "comfy":
        file = path
        orig = _original_names()
        tensors = _encode(adapter, "comfy", lambda m: orig.plan([m])[m], "diffusion_model.")
    else:
        raise FormatError(f"unknown LoRA format {format!r}; write one of peft, diffusers, kohya, comfy")
    save_tree(tensors, file, metadata=meta)
    return file


def _write_json_atomic(path: Path, doc: Mapping[str, Any]) -> None:
    from fvtransform.io._safetensors import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
