"""``fvt.lora.split_experts``: one LoRA file for a two-expert pipeline (Wan2.2) -> one adapter per expert.

A Wan2.2 pipeline has two transformers: ``transformer`` (the high-noise expert) and ``transformer_2``
(the low-noise one). diffusers reads a LoRA's keys by component prefix (``load_lora_adapter(prefix=...)``
keeps the keys that start with ``"<prefix>."``) and ``WanPipeline.load_lora_weights(...,
load_into_transformer_2=True)`` loads a file's ``transformer.`` keys into ``transformer_2``; a file that
carries both experts' LoRA therefore holds ``transformer.*`` and ``transformer_2.*`` keys, the component
prefixes diffusers writes. Each expert's keys become that expert's adapter, resolved against its own
base tree (FastVideo applies one adapter to both experts; here each gets its own).

Decisions: an expert is named by its pipeline component (the prefix); a key that starts with no expert's
prefix fits neither and is a :class:`KeyMismatchError` naming it (a file of one model's LoRA, such as
ComfyUI's ``diffusion_model.*``, is loaded per expert with ``fvt.lora.load(..., base=...)``); with
``strict=True`` an expert that gets no key is an error too (the file was meant for another pipeline).
Scales come from the whole file (its header's ``lora_adapter_metadata`` is component-prefixed), so
each expert is read by :func:`fvtransform.lora.load` with ``component=`` its name.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import attrs
import torch

from fvtransform._messages import format_keys
from fvtransform.errors import FormatError, KeyMismatchError, UsageError
from fvtransform.lora._adapter import LoraAdapter
from fvtransform.lora._load import load
from fvtransform.lora._report import ResolutionReport
from fvtransform.lora._source import SourcePart, read_source

__all__ = ["split_experts"]

_FIX = ("Fix: a file of one model's LoRA is loaded per expert, fvt.lora.load(file, base=pipe['transformer_2'].tree); "
        "a file for both experts prefixes each key with its expert's component name ('transformer.', 'transformer_2.')")


def split_experts(
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    bases: Mapping[str, Mapping[str, torch.Tensor] | torch.nn.Module],
    *,
    format: str = "auto",
    strict: bool = True,
    weight_name: str | None = None,
) -> dict[str, LoraAdapter]:
    """Split a LoRA that carries several experts' LoRA into one adapter per expert.

    ``bases`` maps each expert's component name to its base tree (or module):
    ``{"transformer": pipe["transformer"].tree, "transformer_2": pipe["transformer_2"].tree}`` (any component
    names). Each key of the file must start with one expert's name and a dot (the longest such name when
    one name extends another, ``transformer.x`` before ``transformer``; a key goes to one expert only);
    ``format="auto"`` reads it as diffusers' component-prefixed format. Its adapter is resolved against that expert's
    base exactly as :func:`fvtransform.lora.load` resolves (``strict`` has its meaning: every key of the
    expert resolves and every target is in its base; ``strict=False`` skips leftovers into each
    adapter's ``report``).

    >>> import torch, fvtransform as fvt
    >>> base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    >>> file = {"transformer.l.lora_A.weight": torch.zeros(2, 3), "transformer.l.lora_B.weight": torch.zeros(4, 2),
    ...         "transformer_2.l.lora_A.weight": torch.ones(2, 3), "transformer_2.l.lora_B.weight": torch.ones(4, 2)}
    >>> experts = fvt.lora.split_experts(file, {"transformer": base, "transformer_2": base})
    >>> {name: list(adapter) for name, adapter in experts.items()}
    {'transformer': ['l.weight'], 'transformer_2': ['l.weight']}

    Returns:
        expert name -> :class:`~fvtransform.lora.LoraAdapter`, in the order of ``bases``.

    Raises:
        UsageError: ``bases`` empty or not a mapping of names to trees.
        KeyMismatchError: keys that fit no expert (named, with the experts' prefixes); with ``strict``,
            an expert the file has no key for, or an expert's keys that do not resolve to its base.
        FormatError: as :func:`fvtransform.lora.load`.
    """
    if not isinstance(bases, Mapping) or not bases or not all(isinstance(k, str) and k for k in bases):
        raise UsageError(
            "fvt.lora.split_experts: bases must map each expert's component name to its base tree; found "
            f"{type(bases).__name__}. Fix: split_experts(file, {{'transformer': pipe['transformer'].tree, "
            "'transformer_2': pipe['transformer_2'].tree}})"
        )
    tensors, meta, config, label, config_label = read_source(source, weight_name)
    if not tensors:
        raise FormatError(f"{label}: the LoRA file holds no tensors")
    # longest prefix first: a key of expert 'transformer.x' also starts with 'transformer.'; it is x's alone
    prefixes = {f"{name}.": name for name in sorted(bases, key=len, reverse=True)}
    owned: dict[str, list[str]] = {name: [] for name in bases}
    neither: list[str] = []
    for key in tensors:
        name = next((n for p, n in prefixes.items() if key.startswith(p)), None)
        (owned[name] if name is not None else neither).append(key)
    # each key names its component as diffusers' pipeline files do: the format is diffusers' whatever the name
    fmt = "diffusers" if format == "auto" else format
    if neither:
        raise KeyMismatchError(
            f"{label}: {len(neither)} LoRA keys fit none of the experts {list(bases)} (no key prefix "
            f"{sorted(prefixes)}): {format_keys(neither)}. {_FIX}"
        )
    empty = [n for n, keys in owned.items() if not keys]
    if empty and strict:
        raise KeyMismatchError(
            f"{label}: the file carries no LoRA for expert(s) {empty} (no key starts with "
            f"{[f'{n}.' for n in empty]}); it has {sum(map(len, owned.values()))} keys for {[n for n in owned if owned[n]]}. "
            f"Fix: pass only the experts it carries in bases=, or strict=False for an empty adapter. {_FIX}"
        )
    out: dict[str, LoraAdapter] = {}
    for name, base in bases.items():
        if not owned[name]:
            out[name] = LoraAdapter({}, format="memory", metadata={"source": label, "expert": name})
            continue
        part = SourcePart({k: tensors[k] for k in owned[name]}, meta, config, label, config_label)
        adapter = load(part, format=fmt, base=base, strict=False, component=name)
        # set in LoraAdapter.__init__ with object.__setattr__ (not annotated on the class): read them as such
        resolved: ResolutionReport = getattr(adapter, "report")
        mine = set(owned[name])
        leftover = list(resolved.skipped)
        if leftover and strict:
            lines = "\n".join(f"  {k}: {why}" for k, why in sorted(leftover)[:20])
            raise KeyMismatchError(
                f"{label}: expert {name!r}: {len(leftover)} LoRA keys do not resolve to its base:\n{lines}\n"
                "Fix: pass the expert's own base tree in bases= (pipe[name].tree), format=, or strict=False to "
                "load the rest and read adapter.report."
            )
        report = attrs.evolve(resolved, skipped=tuple(leftover))
        metadata: dict[str, Any] = {**getattr(adapter, "metadata"), "expert": name, "keys": len(mine)}
        out[name] = LoraAdapter({k: adapter[k] for k in adapter}, format=resolved.format, metadata=metadata, report=report)
    return out
