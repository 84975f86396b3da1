"""Single-file checkpoints in a model's original layout: detect the layout, map it to diffusers', load lazily.

The layouts are a data table (:data:`fvtransform.registry.LAYOUTS`); this
module reads a file's header (no tensor bytes), finds which layout its keys
are in, checks the config belongs to that layout's model family, and loads the
file through the layout's :class:`~fvtransform.KeyMap`. Renamed keys keep the
file's memory-mapped tensors; a fused original key (HunyuanVideo's
``img_attn_qkv``, ``linear1``) is split into views of its mapped tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from fvtransform._json import loads_json
from fvtransform._messages import format_keys
from fvtransform.errors import (
    FormatError,
    FvTransformError,
    KeyMismatchError,
    NotFoundError,
    UsageError,
)
from fvtransform.io._declared import LoadedModel
from fvtransform.io._header import HEADER_JSON
from fvtransform.io._load import Checkpoint, load, open_checkpoint
from fvtransform.io._model import _resolve_folder, load_built, read_json
from fvtransform.io._open import contained
from fvtransform.io._pipeline import MODEL_INDEX
from fvtransform.registry._layouts import LAYOUTS, Layout, layout_names
from fvtransform.registry._layouts import layout as layout_named
from fvtransform.tree._keymap import KeyMap, Rename

__all__ = ["DetectedLayout", "detect_layout", "load_single_file", "original_key_map"]

#: Prefixes that wrap a whole model in single-file checkpoints (ComfyUI's), stripped before detection.
PREFIXES: tuple[str, ...] = ("model.diffusion_model.",)

#: The file metadata field that may hold the diffusers config (a JSON object) when no config= is given.
CONFIG_METADATA = "config"

#: The files a config repo id needs (no weights are downloaded for them).
_CONFIG_PATTERNS = ["config.json", "model_index.json", "transformer/config.json"]


@attrs.frozen
class DetectedLayout:
    """A file's layout: the :class:`~fvtransform.registry.Layout` and the prefix its keys carry ("" for none)."""

    layout: Layout
    prefix: str = ""

    @property
    def name(self) -> str:
        return self.layout.name


def _samples(keys: list[str], n: int = 4) -> str:
    return format_keys(keys[:n]) + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def _strip_prefix(keys: list[str], source: str) -> tuple[str, list[str]]:
    for prefix in PREFIXES:
        wrapped = [k for k in keys if k.startswith(prefix)]
        if not wrapped:
            continue
        bare = [k for k in keys if not k.startswith(prefix)]
        if bare:
            raise KeyMismatchError(
                f"{source}: mixed layout: {len(wrapped)} keys carry the prefix {prefix!r} ({_samples(wrapped)}) and "
                f"{len(bare)} do not ({_samples(bare)}). Fix: save the model's keys one way "
                f"(fvt.rename(tree, {{'{prefix}{{key*}}': '{{key}}'}}) strips the prefix)."
            )
        return prefix, [k[len(prefix):] for k in keys]
    return "", keys


def _known() -> str:
    return "; ".join(f"{name}: {LAYOUTS[name].description}" for name in layout_names())


def detect_layout(keys: list[str], *, source: str = "checkpoint") -> DetectedLayout:
    """The layout of a checkpoint's keys, from the signature table :data:`~fvtransform.registry.LAYOUTS`.

    Keys that name two layouts (a half-converted file) or no known layout
    raise :class:`~fvtransform.errors.KeyMismatchError` naming sample keys and
    the fix; ``source`` (the file) is named in the message.

    >>> detect_layout(["head.modulation", "blocks.0.self_attn.q.weight"]).name
    'wan-original'
    """
    prefix, bare = _strip_prefix(list(keys), source)
    hits = {name: marked for name, lay in LAYOUTS.items() if (marked := lay.marked(bare))}
    if len(hits) > 1:
        shown = "; ".join(f"{name}: {_samples(marked)}" for name, marked in hits.items())
        raise KeyMismatchError(
            f"{source}: mixed layout: its keys name {len(hits)} layouts ({shown}). A checkpoint must be in one "
            "layout. Fix: convert the whole file one way (fvt.rename with the layout's KeyMap) and save it again."
        )
    matched = [LAYOUTS[name] for name in hits if LAYOUTS[name].matches(bare)]
    if not matched:
        found = f"keys of the {next(iter(hits))} layout, but not its signature keys" if hits else "no known layout"
        raise KeyMismatchError(
            f"{source}: unknown layout ({found}); its keys look like {_samples(bare)}. fvtransform loads single "
            f"files in these layouts: {_known()}. Fix: pass the model's folder (config.json and weights) instead, "
            "or rename the keys to one of these layouts with fvt.rename and save again."
        )
    return DetectedLayout(matched[0], prefix)


def _config_from(config: str | os.PathLike[str] | Mapping[str, object] | None, ckpt: Checkpoint, path: Path,
                 revision: str | None) -> tuple[dict[str, Any], str]:
    """The diffusers config (and where it came from) for a single file."""
    if config is None:
        raw = ckpt.metadata.get(CONFIG_METADATA)
        if raw is None:
            raise NotFoundError(
                f"{path}: no config: the file's metadata has no {CONFIG_METADATA!r} entry. Fix: pass "
                "config= the model's diffusers config (a folder with config.json, a pipeline folder or repo id, or a dict)"
            )
        source = f"{path}: metadata {CONFIG_METADATA!r}"
        return loads_json(raw, source=source, limits=HEADER_JSON, expect=dict), source
    if isinstance(config, Mapping):
        return dict(config), "config="
    if not isinstance(config, (str, os.PathLike)):
        raise UsageError(
            f"config= is a folder, a repo id or a dict; found {type(config).__name__}. "
            "Call fvt.load_model(file, config='path/to/transformer')"
        )
    where = Path(config)
    if where.name == "config.json" and os.path.lexists(where):
        return read_json(where), str(where)
    if not where.exists():
        from fvtransform.hub import maybe_download_model

        where = maybe_download_model(str(config), revision=revision, allow_patterns=list(_CONFIG_PATTERNS))
    component = "transformer" if os.path.lexists(where / MODEL_INDEX) else None
    folder = _resolve_folder(where, component, revision)
    config_path = contained(folder, "config.json", "model config")
    return read_json(config_path), str(config_path)


def _check_family(lay: Layout, config: Mapping[str, object], config_source: str, path: Path) -> None:
    name = config.get("_class_name", config.get("architectures"))
    if name is None:
        raise FormatError(
            f"{path}: the config ({config_source}) names no model class ('_class_name'); the file is in the "
            f"{lay.name} layout. Fix: pass config= the {lay.class_name} config (its config.json)."
        )
    if name != lay.class_name:
        family = [n for n, other in LAYOUTS.items() if other.class_name == name]
        whose = f" (the family of the {', '.join(family)} layouts)" if family else ""
        raise FormatError(
            f"{path}: the file is in the {lay.name} layout, a {lay.class_name}, but the config ({config_source}) "
            f"is for {name!r}{whose}: a config from another family. Fix: pass config= the {lay.class_name} "
            "config these weights were made with."
        )


def original_key_map(
    path: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, object] | None = None,
    *,
    layout: str | None = None,
    revision: str | None = None,
) -> KeyMap | None:
    """The :class:`~fvtransform.KeyMap` from a single file's layout to diffusers' (None when already diffusers').

    Reads only the header (and the config). Its ``.inverse()`` maps a
    diffusers tree back to the file's layout, prefix included.
    """
    file = Path(path)
    ckpt = open_checkpoint(file)
    detected, cfg, source = _detect(file, ckpt, config, layout, revision)
    return _key_map(detected, cfg, source)


def _detect(file: Path, ckpt: Checkpoint, config: Any, layout: str | None,
            revision: str | None) -> tuple[DetectedLayout, dict[str, Any], str]:
    keys = ckpt.keys()
    if layout is not None:
        prefix, _ = _strip_prefix(keys, str(file))
        detected = DetectedLayout(layout_named(layout), prefix)
    else:
        detected = detect_layout(keys, source=str(file))
    cfg, source = _config_from(config, ckpt, file, revision)
    _check_family(detected.layout, cfg, source, file)
    return detected, cfg, source


def _key_map(detected: DetectedLayout, cfg: Mapping[str, object], source: str) -> KeyMap | None:
    inner = None if detected.layout.key_map is None else detected.layout.key_map(cfg, source)
    if not detected.prefix:
        return inner
    strip = KeyMap.of([Rename(f"{detected.prefix}{{key*}}", "{key}")], keep_rest=False)
    return strip if inner is None else strip.then(inner)


def load_single_file(
    path: str | os.PathLike[str],
    config: str | os.PathLike[str] | Mapping[str, object] | None,
    *,
    layout: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    strict: bool = True,
    revision: str | None = None,
    keep_fp32: bool = True,
) -> LoadedModel:
    """``fvt.load_model`` of one ``.safetensors`` file in a layout of :data:`~fvtransform.registry.LAYOUTS`."""
    file = Path(path)
    if not os.path.lexists(file):
        raise NotFoundError(f"{file}: no such file; load_model(file, config=...) takes one .safetensors file")
    if file.is_dir():
        raise UsageError(
            f"{file} is a folder; config=/layout= are for a single .safetensors file. Load a model folder with "
            "fvt.load_model(folder) (its own config.json)"
        )
    ckpt = open_checkpoint(file)
    detected, cfg, source = _detect(file, ckpt, config, layout, revision)
    key_map = _key_map(detected, cfg, source)
    raw = load(file)
    if key_map is not None:
        try:
            raw = key_map(raw, strict=strict)  # strict=False keeps unclaimed keys: the check lists them
        except FvTransformError as e:
            raise type(e)(
                f"{file}: in the {detected.name} layout, its keys do not map onto the config's model ({source}): "
                f"{e} Fix: check that the config belongs to this file (layer count, head count and size, mlp_ratio)."
            ) from None
    return load_built(cfg, source, raw, file, dtype=dtype, device=device, strict=strict, keep_fp32=keep_fp32,
                      layout=detected.name, key_map=key_map)
