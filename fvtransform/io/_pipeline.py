"""Diffusers pipelines: the one reading of ``model_index.json`` and the one check of a component name.

``fvt.load_model(folder, component=...)``, the hub download of ``components=[...]`` and the CLI's
``inspect`` of a pipeline folder all go through :func:`pipeline_components` and
:func:`require_components`, so a pipeline is read, and refused, the same way everywhere:

- ``model_index.json`` is read with the bounds of :mod:`fvtransform._json` (regular file only, size,
  depth, digits, duplicate keys);
- every component name (a key not starting with ``_``) must be a plain folder name, or the whole
  index is refused as :class:`~fvtransform.errors.UnsafeFileError` before any folder is touched;
- an entry is ``[library, class]``, or ``null`` / ``[null, null]`` for a component the pipeline lacks;
- a component asked for that the index does not name, or names as absent, is a
  :class:`~fvtransform.errors.NotFoundError` listing the components present.

>>> require_components({"transformer": ("diffusers", "M"), "vae": None}, ["vae"], source="p/model_index.json")
Traceback (most recent call last):
...
fvtransform.errors.NotFoundError: p/model_index.json: component 'vae' is absent in this pipeline (its entry is null); components: ['transformer']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import os
from pathlib import Path
import re

from fvtransform._json import read_json_file
from typing import Any

from fvtransform._messages import close_matches
from fvtransform.errors import FormatError, NotFoundError, UnsafeFileError
from fvtransform.io._open import contained

__all__ = ["MODEL_INDEX", "pipeline_components", "read_pipeline_index", "require_components", "check_component_name"]

#: The file that makes a folder a diffusers pipeline.
MODEL_INDEX = "model_index.json"
#: A component name: what diffusers writes (``transformer``, ``text_encoder_2``), a plain folder name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_component_name(name: object, *, source: str) -> str:
    """``name`` if it is a plain folder name (letters, digits, ``._-``, no ``..``); else :class:`UnsafeFileError`.

    >>> check_component_name("../x", source="p/model_index.json")
    Traceback (most recent call last):
    ...
    fvtransform.errors.UnsafeFileError: p/model_index.json names component '../x', which is not a plain folder name (letters, digits, '.', '_', '-'; no '..'); refusing the pipeline
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        shown = repr(name)[:200]
        raise UnsafeFileError(
            f"{source} names component {shown}, which is not a plain folder name (letters, digits, '.', '_', '-'; "
            "no '..'); refusing the pipeline"
        )
    return name


def pipeline_components(
    folder: str | os.PathLike[str], *, source: str | None = None
) -> dict[str, tuple[str, str] | None]:
    """The components of the pipeline in ``folder``: name -> ``(library, class)``, or None when absent.

    ``source`` names ``model_index.json`` in errors (the hub passes ``"org/repo@commit: model_index.json"``).

    Raises:
        NotFoundError: no ``model_index.json``.
        UnsafeFileError: it is not a regular file, or links out of the folder; a component name that is
            not a plain folder name.
        FormatError: not a JSON object, over a bound, an entry that is not ``[library, class]``.
    """
    return read_pipeline_index(folder, source=source)[0]


def read_pipeline_index(
    folder: str | os.PathLike[str], *, source: str | None = None
) -> tuple[dict[str, tuple[str, str] | None], dict[str, Any]]:
    """:func:`pipeline_components` and the index's other fields (``_class_name``, ``boundary_ratio``, ...).

    A field whose value is a list is a component; every other value (a number, a string, a bool, and the
    ``_``-prefixed fields) is the pipeline's own configuration. ``null`` is an absent component.
    """
    folder = folder if isinstance(folder, Path) else Path(folder)
    index = contained(folder, MODEL_INDEX, "pipeline index")
    doc = read_json_file(index, expect=dict)
    where = source if source is not None else str(index)
    out: dict[str, tuple[str, str] | None] = {}
    config: dict[str, Any] = {}
    for name, entry in doc.items():
        if name.startswith("_") or not (entry is None or isinstance(entry, list)):
            config[name] = entry  # the pipeline's own fields: _class_name, _diffusers_version, boundary_ratio
            continue
        check_component_name(name, source=where)
        if entry is None or (isinstance(entry, list) and len(entry) == 2 and entry[0] is None and entry[1] is None):
            out[name] = None
        elif isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry):
            out[name] = (entry[0], entry[1])
        elif isinstance(entry, list):
            raise FormatError(
                f"{where}: key {name!r} must be [library, class] (two strings, or two nulls for an absent "
                f"component); found {entry!r:.80}"
            )
    return out, config


def require_components(
    components: Mapping[str, tuple[str, str] | None], wanted: Sequence[str], *, source: str
) -> None:
    """Refuse, with one wording, a component ``wanted`` that the pipeline does not name or names as absent."""
    present = sorted(k for k, v in components.items() if v is not None)
    for c in wanted:
        if c not in components:
            near = close_matches(c, components) if isinstance(c, str) else []
            hint = f"; did you mean {near}?" if near else ""
            raise NotFoundError(f"{source}: the pipeline has no component {c!r}; components: {present}{hint}")
        if components[c] is None:
            raise NotFoundError(
                f"{source}: component {c!r} is absent in this pipeline (its entry is null); components: {present}"
            )
