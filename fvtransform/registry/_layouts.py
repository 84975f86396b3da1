"""Checkpoint layouts the registry knows: which model class each is for, how to spot it, how to convert it.

A single-file checkpoint (the Wan-AI release, the files ComfyUI users load)
may name its tensors in its model's *original* layout rather than in the
diffusers layout the registry's classes use. :data:`LAYOUTS` is the data table
of the layouts fvtransform can load: for each, the diffusers class it fills,
the key signatures that identify it, and the :class:`~fvtransform.KeyMap` (made
from the diffusers config, for sizes) that turns it into the diffusers layout.
A diffusers layout's map is ``None`` (keys already match).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import attrs

from fvtransform._messages import close_matches
from fvtransform.errors import FormatError, RegistryError, UsageError
from fvtransform.tree._keymap import KeyMap
from fvtransform.tree._mappings import (
    WAN_ORIGINAL_TO_DIFFUSERS,
    hunyuan_video_original_to_diffusers,
)

__all__ = ["LAYOUTS", "Layout", "layout", "layout_names"]


def _positive_int(config: Mapping[str, object], key: str, source: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"{source}: {key!r} must be a positive integer to size the fused keys; found {value!r}")
    return value


def _hunyuan_video(config: Mapping[str, object], source: str) -> KeyMap:
    hidden = _positive_int(config, "num_attention_heads", source) * _positive_int(config, "attention_head_dim", source)
    ratio = config.get("mlp_ratio", 4.0)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1024:
        raise FormatError(f"{source}: 'mlp_ratio' must be a positive number; found {ratio!r}")
    return hunyuan_video_original_to_diffusers(hidden, int(hidden * ratio))


@attrs.frozen
class Layout:
    """One checkpoint layout: ``name``, the diffusers ``class_name`` it fills, and how to find and convert it.

    ``signatures`` are regular expressions; a checkpoint is in this layout when
    each one matches one of its keys at least. ``markers`` match keys that only
    this layout names (a checkpoint whose keys hit two layouts' markers is mixed).
    ``key_map(config, source)`` is the map to the diffusers layout, or None.
    """

    name: str
    class_name: str
    signatures: tuple[str, ...]
    markers: tuple[str, ...]
    key_map: Callable[[Mapping[str, object], str], KeyMap] | None = None
    description: str = ""

    def matches(self, keys: list[str]) -> bool:
        return all(any(re.fullmatch(s, k) for k in keys) for s in self.signatures)

    def marked(self, keys: list[str]) -> list[str]:
        """The keys that only this layout names."""
        rx = re.compile("|".join(f"(?:{m})" for m in self.markers))
        return [k for k in keys if rx.fullmatch(k)]


#: The layouts fvtransform can load, by name.
LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "wan-original", "WanTransformer3DModel",
            signatures=(r"head\.modulation", r"blocks\.\d+\.self_attn\.q\.weight"),
            markers=(r"head\.(modulation|head\..*)", r"blocks\.\d+\.(self_attn|cross_attn|ffn\.\d|norm3|modulation).*",
                     r"(text_embedding|time_embedding|time_projection|img_emb)\..*"),
            key_map=lambda config, source: WAN_ORIGINAL_TO_DIFFUSERS,
            description="the Wan-AI release / ComfyUI layout (blocks.0.self_attn.q.weight, head.head.weight)",
        ),
        Layout(
            "wan-diffusers", "WanTransformer3DModel",
            signatures=(r"scale_shift_table", r"blocks\.\d+\.attn1\.to_q\.weight"),
            markers=(r"blocks\.\d+\.(attn1|attn2|ffn\.net|scale_shift_table)\..*", r"blocks\.\d+\.scale_shift_table",
                     r"condition_embedder\..*"),
            description="diffusers' WanTransformer3DModel (blocks.0.attn1.to_q.weight, proj_out.weight)",
        ),
        Layout(
            "hunyuan-video-original", "HunyuanVideoTransformer3DModel",
            signatures=(r"double_blocks\.\d+\.img_attn_qkv\.weight", r"single_blocks\.\d+\.linear1\.weight"),
            markers=(r"(double_blocks|single_blocks|txt_in|img_in|time_in|vector_in|guidance_in|final_layer)\..*",),
            key_map=_hunyuan_video,
            description="the Tencent HunyuanVideo release layout (double_blocks.0.img_attn_qkv.weight)",
        ),
        Layout(
            "hunyuan-video-diffusers", "HunyuanVideoTransformer3DModel",
            signatures=(r"transformer_blocks\.\d+\.attn\.add_q_proj\.weight",
                        r"single_transformer_blocks\.\d+\.proj_mlp\.weight"),
            markers=(r"(transformer_blocks|single_transformer_blocks|context_embedder|x_embedder|norm_out)\..*",),
            description="diffusers' HunyuanVideoTransformer3DModel (transformer_blocks.0.attn.to_q.weight)",
        ),
    )
}
"""The checkpoint layouts ``fvt.load_model`` can load from a single file, by name (``layout=``)."""


def layout_names() -> list[str]:
    """The names of the layouts fvtransform can load, sorted."""
    return sorted(LAYOUTS)


def layout(name: str) -> Layout:
    """The :class:`Layout` called ``name``; an unknown name raises, listing the close names.

    >>> layout("wan-original").class_name
    'WanTransformer3DModel'
    >>> layout("wan-orignal")
    Traceback (most recent call last):
    ...
    fvtransform.errors.RegistryError: unknown checkpoint layout 'wan-orignal'; close names: ['wan-original', 'hunyuan-video-original']. fvtransform converts these layouts: ['hunyuan-video-diffusers', 'hunyuan-video-original', 'wan-diffusers', 'wan-original'].
    """
    if not isinstance(name, str):
        raise UsageError(f"a checkpoint layout is named by a string; found {type(name).__name__} {name!r:.40}. "
                         f"Fix: layout= one of {layout_names()}, or leave it out to detect the layout from the keys")
    found = LAYOUTS.get(name)
    if found is None:
        hint = close_matches(name, LAYOUTS)
        raise RegistryError(
            f"unknown checkpoint layout {name!r}" + (f"; close names: {hint}" if hint else "")
            + f". fvtransform converts these layouts: {layout_names()}."
        )
    return found
