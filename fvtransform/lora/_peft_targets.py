"""Which modules a PEFT ``adapter_config.json`` applies its LoRA to, as peft 0.21 decides it.

peft (``tuners/tuners_utils.py``: ``check_target_module_exists``) adapts a
module ``key`` (its name in the model) when, in order:

1. ``exclude_modules`` does not exclude it (a string: ``re.fullmatch``; a list:
   ``key`` is an entry or ends with ``"." + entry``);
2. ``target_modules`` names it (a string: ``re.fullmatch``, ``"all-linear"``
   every linear layer; a list: the same rule as ``exclude_modules``);
3. only for a *list* ``target_modules``: with ``layers_to_transform`` (an int or
   a non-empty list) the module's layer index -- the number after the first
   ``<layers_pattern>.`` (any segment when no pattern) -- must be one of them.

A weight in the file for a module peft would not adapt is never loaded by peft,
so fvtransform refuses it (or skips it with ``strict=False``) rather than merge
a delta peft does not apply. String patterns come from an untrusted file: they
go through the bounded matcher of :mod:`fvtransform.lora._patterns`, never ``re``;
``layers_pattern`` must be a plain name (``blocks``, ``layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
import re
from typing import Any

import attrs

from fvtransform.errors import FormatError
from fvtransform.lora._patterns import check_pattern, full_match

__all__ = ["PeftTargets", "peft_targets", "check_targeted", "check_peft_type"]

_ALL_LINEAR = "all-linear"
_MAX_NAMES = 4096
_NAME = re.compile(r"[A-Za-z0-9_]{1,128}")
_MAX_LAYER = 1 << 20


@attrs.frozen
class PeftTargets:
    """A validated module selection: ``targets``/``excludes`` are None (unset), a parsed pattern, or a tuple of names."""

    targets: Any = None
    excludes: Any = None
    layers: tuple[int, ...] | None = None
    layers_patterns: tuple[str, ...] = ()
    target_text: str = ""
    exclude_text: str = ""


def _selection(doc: Mapping[str, Any], key: str, where: str) -> tuple[Any, str]:
    value = doc.get(key)
    if value is None:
        return None, ""
    if isinstance(value, str):
        if key == "target_modules" and value.lower() == _ALL_LINEAR:
            return _ALL_LINEAR, value
        return check_pattern(value, f"{where}: {key!r}"), value
    if not isinstance(value, list) or len(value) > _MAX_NAMES or not all(isinstance(v, str) and v for v in value):
        raise FormatError(f"{where}: {key!r} must be a regex string or a list of module names; found {str(value)[:80]!r}")
    return tuple(value), str(value)[:120]


def _layers(doc: Mapping[str, Any], where: str) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
    raw = doc.get("layers_to_transform")
    if raw is None or raw == []:
        layers = None
    else:
        items = [raw] if isinstance(raw, int) and not isinstance(raw, bool) else raw
        if not isinstance(items, list) or len(items) > _MAX_NAMES or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _MAX_LAYER for i in items):
            raise FormatError(f"{where}: 'layers_to_transform' must be a layer index or a list of them; found {str(raw)[:80]!r}")
        layers = tuple(items)
    pat = doc.get("layers_pattern")
    pats = [] if pat is None else [pat] if isinstance(pat, str) else pat
    if not isinstance(pats, list) or len(pats) > 64 or not all(isinstance(p, str) and (p == "" or _NAME.fullmatch(p)) for p in pats):
        raise FormatError(
            f"{where}: 'layers_pattern' must be a plain module-list name or a list of them (e.g. \"blocks\"); found {str(pat)[:80]!r}. "
            "Fix: write the name of the model's layer list"
        )
    return layers, tuple(p for p in pats if p)


def peft_targets(doc: Mapping[str, Any], where: str) -> PeftTargets:
    """Validate the module-selection fields of a PEFT config (``where`` names the config file)."""
    targets, ttext = _selection(doc, "target_modules", where)
    excludes, etext = _selection(doc, "exclude_modules", where)
    layers, pats = _layers(doc, where)
    return PeftTargets(targets, excludes, layers, pats, ttext, etext)


def check_peft_type(doc: Mapping[str, Any], where: str) -> None:
    """A PEFT config for LoRA weights must say ``peft_type: "LORA"`` (or nothing)."""
    kind = doc.get("peft_type")
    if kind is not None and kind != "LORA":
        raise FormatError(
            f"{where}: 'peft_type' is {str(kind)[:40]!r}, but the file holds LoRA (lora_A/lora_B) weights; peft would build a "
            f"{str(kind)[:40]} adapter and not load them. Fix: set \"peft_type\": \"LORA\" or use the matching weights"
        )


def _names_hit(names: tuple[str, ...], key: str) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def _hit(sel: Any, key: str) -> bool:
    if sel == _ALL_LINEAR:
        return True
    if isinstance(sel, tuple):
        return _names_hit(sel, key)
    return full_match(sel, key)


def _layer_index(key: str, patterns: tuple[str, ...]) -> int | None:
    """peft's layer index: the first all-digit segment that follows ``<pattern>`` and is followed by a dot.

    With no pattern (``.*?\\.[^.]*\\.(\\d+)\\.``) the segment before the index must itself follow a dot.
    """
    parts = key.split(".")
    for j in range(0 if patterns else 1, len(parts) - 2):
        if parts[j + 1].isdecimal() and (not patterns or parts[j] in patterns):
            return int(parts[j + 1])
    return None


def check_targeted(sel: PeftTargets, key: str, where: str, file_key: str) -> None:
    """Raise FormatError when peft would not adapt module ``key`` (so would not load ``file_key``)."""
    fix = "Fix: correct adapter_config.json (or drop the module's weights from the file)"
    if sel.excludes is not None and _hit(sel.excludes, key):
        raise FormatError(f"{where}: 'exclude_modules' ({sel.exclude_text}) excludes {key!r}, whose weights {file_key!r} are in the file; "
                          f"peft would not load them. {fix}")
    if sel.targets is None:
        return
    if not _hit(sel.targets, key):
        raise FormatError(f"{where}: 'target_modules' ({sel.target_text}) does not match {key!r}, whose weights {file_key!r} are in "
                          f"the file; peft would not load them. {fix}")
    if isinstance(sel.targets, tuple) and sel.layers is not None:
        index = _layer_index(key, sel.layers_patterns)
        if index is None or index not in sel.layers:
            raise FormatError(
                f"{where}: 'layers_to_transform' {list(sel.layers)[:20]} (layers_pattern {list(sel.layers_patterns)}) does not "
                f"include {key!r} (layer {index}), whose weights {file_key!r} are in the file; peft would not load them. {fix}"
            )
