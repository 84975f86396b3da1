"""``fvt.load_model``: a model folder, pipeline component or repo id -> (module on meta, tree)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fvtransform._args import check_device, check_strict
from fvtransform._json import read_json_file
from fvtransform._dtypes import as_dtype, DTypeLike
from fvtransform._messages import format_keys
from fvtransform.errors import KeyMismatchError, NotFoundError, ShapeMismatchError, UsageError
from fvtransform.io._check import compare
from fvtransform.io._declared import (
    LoadedModel,
    LoadNote,
    LoadReport,
    default_dtype,
    first_match,
    ignore_rules,
    keep_float32_rule,
    legacy_renames,
    library_of,
    non_persistent_buffers,
)
from fvtransform.io._load import load
from fvtransform.io._open import contained
from fvtransform.io._pipeline import (
    MODEL_INDEX,
    pipeline_components,
    require_components,
)
from fvtransform.registry._registry import build, meta_parameters, resolve
from fvtransform.tree._keymap import KeyMap
from fvtransform.tree._ops import map_tensors
from fvtransform.tree._paramtree import ParamTree, state_keys, tensors_equal

__all__ = ["LoadNote", "LoadReport", "LoadedModel", "load_model", "read_json"]

log = logging.getLogger("fvtransform.io")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object (config.json, model_index.json) with the bounds of :mod:`fvtransform._json`.

    Errors name the file (and the key): :class:`NotFoundError` when it is missing,
    :class:`~fvtransform.errors.UnsafeFileError` when it is not a regular file (a FIFO never blocks),
    :class:`FormatError` for anything else (size, depth, digits, duplicates, not an object).
    """
    return read_json_file(path, expect=dict)


def _resolve_folder(path_or_repo_id: str | os.PathLike[str], component: str | None, revision: str | None) -> Path:
    path = Path(path_or_repo_id)
    if path.exists():
        folder = path
    else:
        from fvtransform.hub import maybe_download_model

        folder = maybe_download_model(
            str(path_or_repo_id), revision=revision, components=[component] if component else None
        )
    if not folder.is_dir():
        raise UsageError(f"{folder}: load_model takes a model folder (with config.json) or a pipeline folder")
    if os.path.lexists(folder / MODEL_INDEX):  # a FIFO or link is refused by the reader, not skipped
        comps = pipeline_components(folder)
        if component is None:
            present = sorted(k for k, v in comps.items() if v is not None)
            raise UsageError(
                f"{folder} is a pipeline; choose a component: component= one of {present}"
            )
        require_components(comps, [component], source=str(folder / MODEL_INDEX))
        folder = contained(folder, component, "pipeline component folder", folder / MODEL_INDEX)
        if not folder.is_dir():
            raise NotFoundError(f"{folder}: the component's folder is missing")
    elif component is not None:
        sub = contained(folder, component, "component folder")
        if not os.path.lexists(sub / "config.json"):
            raise NotFoundError(f"{folder}: no pipeline (model_index.json) and no {component}/config.json")
        folder = sub
    if not os.path.lexists(folder / "config.json"):
        raise NotFoundError(f"{folder}: no config.json; load_model needs the model's config to build it")
    return folder


def _build(config: dict[str, Any], dtype: torch.dtype | None, lib: str | None, device: str = "meta", *,
           source: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build as the class's library does: diffusers builds in float32 (buffers stay so), transformers under ``dtype``."""
    if dtype is None or lib == "diffusers":
        return build(config, device=device, source=source)
    if lib == "transformers":
        with default_dtype(dtype) as ok:
            if ok:
                return build(config, device=device, source=source)
    return build(config, device=device, dtype=dtype, source=source)


def _build_with_buffers(config: dict[str, Any], dtype: torch.dtype | None, lib: str | None, *,
                        source: str | os.PathLike[str] | None = None) -> nn.Module:
    """The module with parameters on meta and every buffer, persistent ones too, as constructed (no weight memory)."""
    with meta_parameters():
        return _build(config, dtype, lib, device="cpu", source=source)


def _untie(module: nn.Module, key: str) -> None:
    """Give the module's tensor at ``key`` its own (meta) parameter, and drop the tie transformers records for it."""
    path, _, name = key.rpartition(".")
    owner = module.get_submodule(path)
    old = owner._parameters.get(name)
    if old is None:
        raise KeyMismatchError(f"{type(module).__name__}: tied {key!r} is not a parameter; it cannot be untied")
    owner._parameters[name] = nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=old.requires_grad)
    declared = getattr(module, "all_tied_weights_keys", None)
    if isinstance(declared, dict):
        for target in [t for t, s in declared.items() if key in (t, s)]:
            declared.pop(target)


def _reconcile_ties(
    data: dict[str, torch.Tensor], module: nn.Module, lib: str | None, folder: Path, notes: list[LoadNote]
) -> None:
    """One tensor for every name of each tied group that the checkpoint holds under one name or more."""
    cls = type(module).__name__
    declared = getattr(module, "all_tied_weights_keys", None) or {}
    for group in ParamTree.from_module(module).aliases():
        present = [k for k in group if k in data]
        if not present:
            continue
        src = present[0]
        differing = [k for k in present[1:] if not tensors_equal(data[k], data[src])]
        for k in differing:
            if lib != "transformers" or not any(k in pair or src in pair for pair in declared.items()):
                raise KeyMismatchError(
                    f"{folder}: {cls} ties {list(group)} (one weight), but the checkpoint holds different values for "
                    f"{src!r} and {k!r}. Fix: check that config.json belongs to these weights (does it tie them?), "
                    "or save the tied weight once."
                )
            _untie(module, k)
            notes.append(LoadNote(k, "untied", f"{cls} ties it to {src!r}, but the checkpoint holds different values "
                                               "(transformers then unties them too)"))
            warnings.warn(f"{folder}: {k!r} and {src!r} are tied by {cls} but differ in the checkpoint; "
                          "loaded separately, as transformers does", stacklevel=3)
        for k in group:
            if k in differing or data.get(k) is data[src]:
                continue
            why = "saved again with equal values" if k in data else "not in the checkpoint"
            notes.append(LoadNote(k, "tied", f"{why}; {cls} ties it to {src!r}"))
            data[k] = data[src]


def _reconcile(
    raw: ParamTree, module: nn.Module, lib: str | None, folder: Path, notes: list[LoadNote],
    fill: Callable[[], nn.Module], strict: bool,
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, less the keys the class ignores, with tied and allowed-missing keys completed."""
    expected = state_keys(module)
    unexpected_rules, missing_rules = ignore_rules(module)
    computed = non_persistent_buffers(module)
    rename = legacy_renames(module)
    data: dict[str, torch.Tensor] = {}
    for k, t in raw.items():
        hit = rename(k) if k not in expected else None
        if hit is not None and hit[0] in expected and hit[0] not in raw:
            notes.append(LoadNote(k, "renamed", f"an old name of {hit[0]!r} ({hit[1]})"))
            k = hit[0]
        data[k] = t
    for k in [k for k in data if k not in expected]:
        why = first_match(k, unexpected_rules) or computed.get(k)
        if why is not None:
            del data[k]
            notes.append(LoadNote(k, "ignored", why))
    _reconcile_ties(data, module, lib, folder, notes)
    allowed = {k: why for k in expected if k not in data and (why := first_match(k, missing_rules)) is not None}
    params = [k for k in allowed if expected[k][0] == "parameter"]
    if params and strict:
        raise KeyMismatchError(
            f"{folder}: the checkpoint lacks {format_keys(params)}, which {type(module).__name__} allows "
            f"({allowed[params[0]]}); its library would initialise these parameters at random, and fvtransform "
            "loads only values it can reproduce. Fix: add them to the checkpoint, or pass strict=False and add "
            "them to the tree (fvt.update(tree, {...}, allow_new=True))."
        )
    buffers = [k for k in allowed if expected[k][0] == "buffer"]
    if buffers:
        initial = dict(fill().named_buffers(remove_duplicate=False))
        for k in buffers:
            data[k] = initial[k]
            notes.append(LoadNote(k, "filled", f"{allowed[k]}; the module's initial value, as its library does"))
    return data


def _place(
    data: dict[str, torch.Tensor], module: nn.Module, lib: str | None, dtype: torch.dtype | None,
    device: torch.device, keep_fp32: bool, notes: list[LoadNote],
) -> ParamTree:
    """Cast (floating tensors only) and move each tensor once; keys the class keeps in float32 stay so."""
    rule = keep_float32_rule(module, dtype) if dtype is not None and keep_fp32 else None
    built = ParamTree.from_module(module) if lib == "transformers" else None

    def target(key: str, t: torch.Tensor) -> torch.dtype:
        if dtype is None or not t.dtype.is_floating_point:
            return t.dtype
        if rule is not None and rule[0](key):
            if dtype != torch.float32:
                notes.append(LoadNote(key, "float32", rule[1]))
            return torch.float32
        ref = built.get(key) if built is not None else None
        if ref is not None and ref.dtype.is_floating_point and ref.dtype != dtype:
            return ref.dtype  # transformers keeps a parameter the class creates in another dtype
        return dtype

    return map_tensors(ParamTree._wrap(data), lambda k, t: t.to(device=device, dtype=target(k, t)), with_keys=True)


def _retype_meta(module: nn.Module, tree: ParamTree) -> None:
    """Give the module's meta parameters and buffers the dtypes of the tree (ties stay tied)."""
    memo: dict[int, torch.Tensor] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for slots in (mod._parameters, mod._buffers):
            for name, old in list(slots.items()):
                value = tree.get(prefix + name)
                if old is None or value is None or old.device.type != "meta" or value.dtype == old.dtype:
                    continue
                if id(old) not in memo:
                    new = torch.empty_like(old, dtype=value.dtype)
                    memo[id(old)] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
                slots[name] = memo[id(old)]


def load_model(
    path_or_repo_id: str | os.PathLike[str],
    component: str | None = None,
    *,
    dtype: DTypeLike | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    revision: str | None = None,
    keep_fp32: bool = True,
    config: str | os.PathLike[str] | Mapping[str, object] | None = None,
    layout: str | None = None,
) -> LoadedModel:
    """Build a model from its folder's ``config.json`` (on meta) and load its weights.

    ``path_or_repo_id`` is a model folder, a diffusers pipeline folder (then
    ``component=`` picks ``"transformer"``, ``"vae"``, ...) or a Hub repo id
    (downloaded through :func:`fvtransform.hub.maybe_download_model`). The
    module's parameters stay on the meta device; its non-persistent buffers
    (rotary tables, position ids) are computed for real, so
    ``fvt.call(module, tree, *inputs)`` runs the model. The module is in eval
    mode, as the peers' ``from_pretrained`` returns it.

    The checkpoint is matched to the module as the class's own library
    (transformers, diffusers) matches it, and every such decision is recorded
    in the :class:`~fvtransform.io.LoadReport` that the result carries as
    ``.report`` (the result unpacks as ``module, tree``): keys the class
    declares ignorable (``_keys_to_ignore_on_load_unexpected``, transformers'
    old ``position_ids`` / ``rotary_emb.inv_freq``) or that name a
    non-persistent buffer are ignored; transformers' old names
    (``LayerNorm.gamma``) are renamed; tied weights saved once are tied (saved
    twice with different values: untied for transformers, as it does; an
    error otherwise); buffers the class allows to be missing get the module's
    initial value.
    Everything else is strict: with ``strict=True`` any other missing or
    unexpected key raises; with ``strict=False`` they are allowed and
    listed in the report. Shape mismatches always raise.

    ``dtype=None`` keeps the checkpoint's dtypes (no copies). With a ``dtype`` (or its name, ``"bfloat16"``),
    floating tensors are cast to it except the modules the class keeps in
    float32 (``_keep_in_fp32_modules``, applied as diffusers or transformers
    apply it); ``keep_fp32=False`` casts those too.

    *A single file.* ``path_or_repo_id`` may also be one ``.safetensors``
    file in a layout the registry knows (:data:`fvtransform.registry.LAYOUTS`:
    the original Wan release / ComfyUI layout, the original HunyuanVideo
    layout, or diffusers'). ``config=`` gives the diffusers config: a model or
    pipeline folder, a Hub repo id (its ``transformer``), or a dict; without
    it the file's own ``"config"`` metadata is used. The layout is detected
    from the keys (``layout=`` names it instead); the tree comes back in the
    diffusers layout, mapped through the layout's invertible
    :class:`~fvtransform.KeyMap` (``result.report`` notes it), lazily: a fused
    original key is split as views of the mapped file.
    ``fvtransform.io.original_key_map(path, config)`` gives that map; its
    ``.inverse()`` writes a tree back in the original layout.
    """
    dtype = None if dtype is None else as_dtype(dtype)
    strict = check_strict(strict, "fvt.load_model")
    device = check_device(device, "fvt.load_model")
    if config is not None or layout is not None or _is_single_file(path_or_repo_id):
        from fvtransform.io._original import load_single_file

        if component is not None:
            raise UsageError(
                f"{path_or_repo_id}: component= picks a pipeline's component; a single file is one model. "
                "Call fvt.load_model(file, config=...) without component="
            )
        return load_single_file(path_or_repo_id, config, layout=layout, dtype=dtype, device=device, strict=strict,
                                revision=revision, keep_fp32=keep_fp32)
    folder = _resolve_folder(path_or_repo_id, component, revision)
    config_path = contained(folder, "config.json", "model config")
    return load_built(read_json(config_path), config_path, load(folder), folder, dtype=dtype, device=device,
                      strict=strict, keep_fp32=keep_fp32)


def _is_single_file(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(".safetensors") and os.path.lexists(path)


def load_built(
    config: dict[str, Any], config_path: Path | str, raw: ParamTree, folder: Path, *, dtype: torch.dtype | None,
    device: torch.device | str, strict: bool, keep_fp32: bool, notes: list[LoadNote] | None = None,
    layout: str | None = None, key_map: KeyMap | None = None,
) -> LoadedModel:
    """Build the config's class on meta and load ``raw`` (a lazy tree in its layout) into it, as :func:`load_model`."""
    ctor = resolve(config, source=str(config_path))
    lib = library_of(ctor)
    module = _build(config, dtype, lib, source=config_path)
    notes = [] if notes is None else notes
    data = _reconcile(raw, module, lib, folder, notes, lambda: _build_with_buffers(config, dtype, lib, source=config_path), strict)
    tree = _place(data, module, lib, dtype, torch.device(device), keep_fp32, notes)
    if dtype is not None:
        _retype_meta(module, tree)
    report = compare(tree, module)
    if report.shape_mismatches or (strict and not report.ok):
        cls = ShapeMismatchError if report.shape_mismatches else KeyMismatchError
        raise cls(
            f"{folder}: the weights do not fit {type(module).__name__} built from {config_path}:\n{report}\n"
            "Fix: check that config.json belongs to these weights, or pass strict=False to allow key differences."
        )
    # strict=False: the key differences are listed in the report (never merely warned about: strictness)
    load_report = LoadReport(str(folder), type(module).__name__, tuple(notes), report.missing, report.unexpected,
                             layout, key_map)
    if not load_report.exact:
        log.info("%s", load_report)
    if torch.device(device).type != "cpu":
        for mod in module.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    mod._buffers[name] = buf.to(device)
    return LoadedModel(module.eval(), tree, load_report)
