"""``fvt.load_model``: a model folder, pipeline component or repo id -> (module on meta, tree)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
import warnings

import torch
from torch import nn

from fvtransform._json import read_json_file
from fvtransform.errors import FormatError, NotFoundError, ShapeMismatchError, format_keys
from fvtransform.io._check import check
from fvtransform.io._load import load
from fvtransform.io._open import contained
from fvtransform.registry._registry import build
from fvtransform.tree._paramtree import ParamTree

__all__ = ["load_model", "read_json", "pipeline_components"]


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object (config.json, model_index.json) with the bounds of :mod:`fvtransform._json`.

    Errors name the file (and the key): :class:`NotFoundError` when it is missing,
    :class:`~fvtransform.errors.UnsafeFileError` when it is not a regular file (a FIFO never blocks),
    :class:`FormatError` for anything else (size, depth, digits, duplicates, not an object).
    """
    return read_json_file(path, expect=dict)


def pipeline_components(folder: Path) -> dict[str, tuple[str, str] | None]:
    """Components of a diffusers pipeline folder: name -> (library, class), or None when absent."""
    index = read_json(contained(folder, "model_index.json", "pipeline index"))
    out: dict[str, tuple[str, str] | None] = {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if entry is None or (isinstance(entry, list) and len(entry) == 2 and (entry[0] is None or entry[1] is None)):
            out[name] = None
        elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
            out[name] = (entry[0], entry[1])
        elif isinstance(entry, list):
            raise FormatError(
                f"{folder / 'model_index.json'}: key {name!r} must be [library, class] (two strings, or two nulls "
                f"for an absent component); found {entry!r:.80}"
            )
    return out


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
        raise FormatError(f"{folder}: load_model takes a model folder (with config.json) or a pipeline folder")
    if os.path.lexists(folder / "model_index.json"):  # a FIFO or link is refused by the reader, not skipped
        comps = pipeline_components(folder)
        if component is None:
            present = sorted(k for k, v in comps.items() if v is not None)
            raise FormatError(
                f"{folder} is a pipeline; choose a component: component= one of {present}"
            )
        if component not in comps:
            raise NotFoundError(
                f"{folder}: the pipeline has no component {component!r}; components: {sorted(comps)}"
            )
        if comps[component] is None:
            raise NotFoundError(f"{folder}: component {component!r} is absent in this pipeline (its entry is null)")
        folder = contained(folder, component, "pipeline component folder", folder / "model_index.json")
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


def _complete_ties(tree: ParamTree, module: nn.Module) -> ParamTree:
    """Add the keys of weights the module ties to a key the checkpoint holds (saved once)."""
    extra: dict[str, torch.Tensor] = {}
    for group in ParamTree.from_module(module).aliases():
        present = [k for k in group if k in tree]
        if present:
            extra.update({k: tree[present[0]] for k in group if k not in tree})
    return tree.update(extra, allow_new=True) if extra else tree


def load_model(
    path_or_repo_id: str | os.PathLike[str],
    component: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    revision: str | None = None,
) -> tuple[nn.Module, ParamTree]:
    """Build a model from its folder's ``config.json`` (on meta) and load its weights.

    ``path_or_repo_id`` is a model folder, a diffusers pipeline folder (then
    ``component=`` picks ``"transformer"``, ``"vae"``, ...) or a Hub repo id
    (downloaded through :func:`fvtransform.hub.maybe_download_model`). The
    module's parameters stay on the meta device; its non-persistent buffers
    (rotary tables, position ids) are computed for real, so
    ``fvt.call(module, tree, *inputs)`` runs the model. The tree is checked
    against the module: with ``strict=True`` any missing or unexpected key or
    shape mismatch raises; with ``strict=False`` shape mismatches still raise
    and key differences are warned about. The module is in eval mode, as the
    peers' ``from_pretrained`` returns it.

    ``dtype=None`` keeps the checkpoint's dtypes (no copies).
    """
    folder = _resolve_folder(path_or_repo_id, component, revision)
    config_path = contained(folder, "config.json", "model config")
    config = read_json(config_path)
    module = build(config, dtype=dtype, source=config_path)
    tree = _complete_ties(load(folder, dtype=dtype, device=device), module)
    report = check(tree, module, strict=False)
    if report.shape_mismatches or (strict and not report.ok):
        cls = ShapeMismatchError if report.shape_mismatches else None
        from fvtransform.errors import KeyMismatchError

        raise (cls or KeyMismatchError)(
            f"{folder}: the weights do not fit {type(module).__name__} built from config.json:\n{report}\n"
            "Fix: check that config.json belongs to these weights, or pass strict=False to allow key differences."
        )
    if not report.ok:
        warnings.warn(
            f"{folder}: weights and module differ (strict=False): missing {format_keys(report.missing)}, "
            f"unexpected {format_keys(report.unexpected)}",
            stacklevel=2,
        )
    if torch.device(device).type != "cpu":
        for mod in module.modules():
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    mod._buffers[name] = buf.to(device)
    return module.eval(), tree
