"""Which LoRA format a file is: every key split into (module, role), every format scored on all keys."""

from __future__ import annotations

from collections.abc import Mapping


from fvtransform.errors import FormatError
from fvtransform._messages import format_keys
from fvtransform.lora._format_table import (
    CLAIMED_PREFIXES, FORMATS, LYCORIS_SUFFIXES,
    ROLES, TABLE, LoraFormat,
)


def split_role(key: str) -> tuple[str, str] | None:
    """``(module, role)`` for a LoRA file key, or None.

    >>> split_role("base_model.model.blocks.0.attn1.to_q.lora_A.weight")
    ('base_model.model.blocks.0.attn1.to_q', 'A')
    >>> split_role("diffusion_model.blocks.1.cross_attn.v_img.diff_b")
    ('diffusion_model.blocks.1.cross_attn.v_img', 'diff_b')
    >>> split_role("lora_unet_blocks_0_self_attn_q.hada_w1_a")
    ('lora_unet_blocks_0_self_attn_q', 'lycoris')
    """
    for suffix, role in ROLES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    for suffix in LYCORIS_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], "lycoris"
    return None


def strip_prefix(fmt: LoraFormat, module: str) -> str | None:
    """The module name without the format's prefix; None when the key does not belong to the format."""
    if not fmt.prefixes:
        return None if module.startswith(CLAIMED_PREFIXES) else module
    for p in fmt.prefixes:
        if module.startswith(p):
            return module if fmt.strip == "component" else module[len(p):]
    return None


def _eligible(fmt: LoraFormat, roles: set[str], meta: Mapping[str, str]) -> bool:
    return (fmt.needs_meta is None or fmt.needs_meta in meta) and (fmt.needs_role is None or fmt.needs_role in roles)


def detect_format(keys: list[str], metadata: Mapping[str, str] | None = None) -> tuple[str, dict[str, float]]:
    """Score every format on all keys (and the file's header); return the best and the scores.

    >>> detect_format(["lora_unet_blocks_0_attn1_to_q.lora_down.weight", "lora_unet_blocks_0_attn1_to_q.alpha"])[0]
    'kohya'
    """
    meta = metadata or {}
    parsed = [split_role(k) for k in keys]
    roles = {p[1] for p in parsed if p is not None}
    scores: dict[str, float] = {}
    for fmt in TABLE:
        if not _eligible(fmt, roles, meta):
            scores[fmt.name] = 0.0
            continue
        hits = sum(1 for p in parsed if p is not None and (p[1] in fmt.reads or p[1] == "lycoris") and strip_prefix(fmt, p[0]) is not None)
        scores[fmt.name] = hits / max(1, len(keys))
    best = max(FORMATS, key=lambda f: (scores[f], -FORMATS.index(f)))
    if scores[best] == 0:
        raise FormatError(
            f"no LoRA format recognises these keys (e.g. {format_keys(keys[:4])}); "
            f"known formats: {list(FORMATS)} with keys ending in lora_A/lora_B/lora_down/lora_up/alpha/diff/diff_b"
        )
    return best, scores
