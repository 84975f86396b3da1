"""What a model class declares about loading, read the way its own library reads it.

transformers and diffusers models carry class attributes that their
``from_pretrained`` honours: keys to ignore when a checkpoint has them
(``_keys_to_ignore_on_load_unexpected``) or lacks them
(``_keys_to_ignore_on_load_missing``), weights the class ties, and modules
kept in float32 whatever ``dtype`` is asked (``_keep_in_fp32_modules``).
:func:`fvtransform.load_model` follows them and records every such decision
in a :class:`LoadReport`; nothing is dropped, filled or kept silently.

The rules (transformers 5.x ``PreTrainedModel._adjust_missing_and_unexpected_keys``,
``_get_dtype_plan``; diffusers ``ModelMixin._load_pretrained_model``,
``load_model_dict_into_meta``):

- transformers: ignore patterns are regular expressions searched in the key;
  a model with a ``*position_ids`` or ``*rotary_emb.inv_freq`` buffer also
  ignores such checkpoint keys (older versions saved them). Float32 is kept
  for ``_keep_in_fp32_modules`` only when ``dtype=torch.float16`` and for
  ``_keep_in_fp32_modules_strict`` when ``dtype`` is float16 or bfloat16;
  those names are patterns (``*`` is any text) searched in the key. Old
  names (``LayerNorm.gamma``/``beta``, ``weight_g``/``weight_v``) are renamed
  as its "legacy" conversion renames them.
- diffusers: unexpected-key patterns are searched in the key; a key is kept
  in float32 when one of ``_keep_in_fp32_modules`` is one of its dotted
  parts, for any ``dtype``. Keys of deprecated attention blocks (``query``,
  ``proj_attn``, ...) are renamed (diffusers does so for single-file
  checkpoints only; here for every checkpoint).
- any module: a checkpoint key naming a non-persistent buffer (which the
  module computes; older versions saved it) is ignored.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import attrs
import torch
from torch import nn

from fvtransform._messages import format_keys
from fvtransform.errors import FormatError, UsageError
from fvtransform.tree import KeyMap, ParamTree

__all__ = [
    "LoadNote",
    "LoadReport",
    "LoadedModel",
    "default_dtype",
    "ignore_rules",
    "keep_float32_rule",
    "legacy_renames",
    "library_of",
]

#: library -> (module prefix, base class name) that marks a model class of that library.
_LIBRARIES: dict[str, tuple[str, str]] = {
    "transformers": ("transformers.", "PreTrainedModel"),
    "diffusers": ("diffusers.", "ModelMixin"),
}

#: transformers ignores these old buffer keys when the model has such a buffer (suffix -> pattern).
_TRANSFORMERS_OLD_BUFFERS: dict[str, str] = {
    "rotary_emb.inv_freq": r"rotary_emb\.inv_freq",
    "position_ids": r"(^|\.)position_ids$",
}

#: transformers' "legacy" key renames (conversion_mapping.py, 5.x), applied to every model: pattern -> replacement.
_TRANSFORMERS_LEGACY_RENAMES: dict[str, str] = {
    "LayerNorm.gamma": "LayerNorm.weight",
    "LayerNorm.beta": "LayerNorm.bias",
    ".weight_g": ".parametrizations.weight.original0",
    ".weight_v": ".parametrizations.weight.original1",
}

#: diffusers' names in attention blocks saved before the Attention rewrite (``_fix_state_dict_keys_on_load``).
_DIFFUSERS_DEPRECATED_ATTENTION: dict[str, str] = {
    "query": "to_q",
    "key": "to_k",
    "value": "to_v",
    "proj_attn": "to_out.0",
}

#: What each action of a :class:`LoadNote` means.
ACTIONS: dict[str, str] = {
    "renamed": "in the checkpoint under an older name (the note's key is the old one)",
    "ignored": "in the checkpoint, not loaded",
    "tied": "not in the checkpoint (or saved twice, equal): the module ties it to another key",
    "untied": "tied by the class, saved twice with different values: loaded separately",
    "filled": "not in the checkpoint, allowed by the class: the module's own initial value",
    "float32": "kept in float32 instead of dtype=",
}

Rule = tuple["re.Pattern[str]", str]


@attrs.frozen
class LoadNote:
    """One decision of :func:`~fvtransform.load_model` about one key: ``action`` (see ``ACTIONS``) and why."""

    key: str
    action: str
    reason: str

    def __str__(self) -> str:
        return f"{self.action} {self.key!r}: {self.reason}"


@attrs.frozen
class LoadReport:
    """Everything :func:`~fvtransform.load_model` did beyond loading each checkpoint key into the same module key.

    ``notes`` lists keys ignored, tied, untied, filled or kept in float32, each
    with its reason; ``missing`` and ``unexpected`` are the key differences
    allowed by ``strict=False`` (empty with ``strict=True``). A single file in
    another layout (``fvt.load_model(file, config=...)``) names it in
    ``layout`` and keeps the :class:`~fvtransform.KeyMap` that mapped it in
    ``key_map``: ``fvt.rename(tree, report.key_map.inverse())`` gives the
    file's layout back.
    """

    folder: str
    model: str
    notes: tuple[LoadNote, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    layout: str | None = None
    key_map: KeyMap | None = None

    def keys(self, action: str) -> tuple[str, ...]:
        """The keys of the notes with ``action`` (one of ``ACTIONS``)."""
        if action not in ACTIONS:
            raise UsageError(f"unknown load action {action!r}; actions: {sorted(ACTIONS)}")
        return tuple(n.key for n in self.notes if n.action == action)

    @property
    def exact(self) -> bool:
        """True when every checkpoint key was loaded into the same module key, and nothing else happened."""
        return not (self.notes or self.missing or self.unexpected or self.key_map is not None)

    def __str__(self) -> str:
        if self.exact:
            return f"{self.folder}: every key loaded as saved into {self.model}"
        lines = [f"{self.folder} -> {self.model}:"]
        if self.key_map is not None:
            lines.append(f"  keys mapped from the {self.layout} layout (report.key_map; its .inverse() maps back)")
        lines += [f"  {n}" for n in self.notes]
        if self.missing:
            lines.append(f"  missing (strict=False) ({len(self.missing)}): {format_keys(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected (strict=False) ({len(self.unexpected)}): {format_keys(self.unexpected)}")
        return "\n".join(lines)


class LoadedModel(tuple[nn.Module, ParamTree]):
    """``(module, tree)`` as :func:`~fvtransform.load_model` returns it, with the :class:`LoadReport` as ``.report``.

    It unpacks as a pair (``module, tree = fvt.load_model(...)``).
    """

    report: LoadReport

    def __new__(cls, module: nn.Module, tree: ParamTree, report: LoadReport) -> LoadedModel:
        self = super().__new__(cls, (module, tree))
        self.report = report
        return self

    def __getnewargs__(self) -> tuple[nn.Module, ParamTree, LoadReport]:
        return (self[0], self[1], self.report)

    @property
    def module(self) -> nn.Module:
        return self[0]

    @property
    def tree(self) -> ParamTree:
        return self[1]


def library_of(module_or_class: Any) -> str | None:
    """``"transformers"``, ``"diffusers"`` or None: the library whose model base class the module (class) derives from."""
    kind = module_or_class if isinstance(module_or_class, type) else type(module_or_class)
    for cls in kind.__mro__:
        for lib, (prefix, base) in _LIBRARIES.items():
            if cls.__name__ == base and cls.__module__.startswith(prefix):
                return lib
    return None


def _patterns(module: nn.Module, attr: str) -> list[str]:
    raw = getattr(module, attr, None)
    if raw is None:
        return []
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in raw):
        raise FormatError(f"{type(module).__name__}.{attr} must be a list of strings; found {raw!r}")
    return sorted(raw)


def _compile(pattern: str, module: nn.Module, attr: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise FormatError(f"{type(module).__name__}.{attr}: {pattern!r} is not a regular expression ({e})") from None


def ignore_rules(module: nn.Module) -> tuple[list[Rule], list[Rule]]:
    """(unexpected, missing) rules: ``(pattern searched in a key, reason)`` the module's class declares."""
    name = type(module).__name__
    out: list[list[Rule]] = []
    for attr in ("_keys_to_ignore_on_load_unexpected", "_keys_to_ignore_on_load_missing"):
        out.append(
            [(_compile(p, module, attr), f"matches {name}.{attr} pattern {p!r}") for p in _patterns(module, attr)]
        )
    if library_of(module) == "transformers":
        buffers = [n for n, _ in module.named_buffers()]
        for suffix, pattern in _TRANSFORMERS_OLD_BUFFERS.items():
            if any(b.endswith(suffix) for b in buffers):
                out[0].append(
                    (re.compile(pattern), f"an old {suffix} buffer key, which transformers ignores (the model computes it)")
                )
    return out[0], out[1]


def legacy_renames(module: nn.Module) -> Callable[[str], tuple[str, str] | None]:
    """``key -> (current name, reason)`` for old checkpoint names the class's library renames, else None.

    transformers renames ``LayerNorm.gamma``/``beta`` and ``weight_g``/``weight_v``
    for every model; diffusers renames the keys of attention blocks built
    ``_from_deprecated_attn_block`` (``query`` -> ``to_q``, ``proj_attn`` ->
    ``to_out.0``, ...).
    """
    lib = library_of(module)
    if lib == "transformers":
        def transformers_rename(key: str) -> tuple[str, str] | None:
            for pattern, replacement in _TRANSFORMERS_LEGACY_RENAMES.items():
                m = re.search(pattern, key)
                if m is not None:
                    return key.replace(m.group(0), replacement, 1), "transformers' legacy rename"
            return None

        return transformers_rename
    if lib == "diffusers":
        old_names: dict[str, str] = {}
        for path, mod in module.named_modules():
            if getattr(mod, "_from_deprecated_attn_block", False) is True:
                prefix = f"{path}." if path else ""
                for old, new in _DIFFUSERS_DEPRECATED_ATTENTION.items():
                    for leaf in ("weight", "bias"):
                        old_names[f"{prefix}{old}.{leaf}"] = f"{prefix}{new}.{leaf}"
        why = "diffusers' rename of a deprecated attention block"
        return lambda key: (old_names[key], why) if key in old_names else None
    return lambda _key: None


def non_persistent_buffers(module: nn.Module) -> dict[str, str]:
    """Non-persistent buffer keys of ``module`` -> reason to ignore them in a checkpoint."""
    out: dict[str, str] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        for name in mod._non_persistent_buffers_set:
            if mod._buffers.get(name) is not None:
                key = f"{path}.{name}" if path else name
                out[key] = (
                    f"a non-persistent buffer of {type(module).__name__} (the module computes it; "
                    "an older version saved it)"
                )
    return out


def first_match(key: str, rules: Iterable[Rule]) -> str | None:
    """The reason of the first rule whose pattern is found in ``key``, or None."""
    return next((why for rx, why in rules if rx.search(key)), None)


def keep_float32_rule(module: nn.Module, dtype: torch.dtype) -> tuple[Callable[[str], bool], str] | None:
    """``(predicate on a key, reason)`` for the keys the class keeps in float32 under ``dtype``, or None."""
    lib = library_of(module)
    name = type(module).__name__
    if lib == "diffusers":
        mods = getattr(type(module), "_keep_in_fp32_modules", None)
        if mods is None:
            return None
        names = [mods] if isinstance(mods, str) else list(mods)
        if not all(isinstance(m, str) for m in names):
            raise FormatError(f"{name}._keep_in_fp32_modules must be a list of strings; found {mods!r}")
        parts = frozenset(names)
        return (lambda key: not parts.isdisjoint(key.split("."))), f"{name}._keep_in_fp32_modules {sorted(parts)} (diffusers)"
    if lib == "transformers":
        globs: list[str] = []
        attrs_used: list[str] = []
        if dtype == torch.float16:
            globs += _patterns(module, "_keep_in_fp32_modules")
            attrs_used.append("_keep_in_fp32_modules")
        if dtype in (torch.float16, torch.bfloat16):
            globs += _patterns(module, "_keep_in_fp32_modules_strict")
            attrs_used.append("_keep_in_fp32_modules_strict")
        if not globs:
            return None
        rx = _compile("|".join(f"({g.replace('*', '.*')})" for g in globs), module, attrs_used[0])
        return (lambda key: rx.search(key) is not None), f"{name}.{'/'.join(attrs_used)} {globs} (transformers, dtype={dtype})"
    return None


#: dtypes torch accepts as its default floating dtype.
_DEFAULTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[bool]:
    """Build under ``torch.set_default_dtype(dtype)`` (as transformers does); yields False when ``dtype`` cannot be a default."""
    if dtype is None or dtype not in _DEFAULTABLE:
        yield False
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield True
    finally:
        torch.set_default_dtype(before)
