"""Shipped key mappings: original Wan checkpoints <-> diffusers, and a fused-qkv layout.

Each mapping is a :class:`KeyMap` value; invert it with ``.inverse()``.
The reference model uses diffusers' Wan names, so the Wan mappings apply to
it unchanged.

The Wan maps account for every key (``keep_rest=False``), strictly, on both
Wan T2V and I2V trees: the rules for the layers only I2V has (the image
cross-attention and the image embedder) are ``optional=True``.
"""

from __future__ import annotations

from fvtransform.tree._keymap import Fuse, KeyMap, Rename

__all__ = ["WAN_ORIGINAL_TO_DIFFUSERS", "WAN_DIFFUSERS_TO_ORIGINAL", "REFERENCE_QKV_FUSE", "WAN_MODULE_RENAMES"]

#: Module-path renames (original Wan -> diffusers), without the parameter suffix.
#: LoRA conversion reuses these, so they are kept as plain pairs.
WAN_MODULE_RENAMES: tuple[tuple[str, str], ...] = (
    ("blocks.{i}.self_attn.q", "blocks.{i}.attn1.to_q"),
    ("blocks.{i}.self_attn.k", "blocks.{i}.attn1.to_k"),
    ("blocks.{i}.self_attn.v", "blocks.{i}.attn1.to_v"),
    ("blocks.{i}.self_attn.o", "blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.self_attn.norm_q", "blocks.{i}.attn1.norm_q"),
    ("blocks.{i}.self_attn.norm_k", "blocks.{i}.attn1.norm_k"),
    ("blocks.{i}.cross_attn.q", "blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.k", "blocks.{i}.attn2.to_k"),
    ("blocks.{i}.cross_attn.v", "blocks.{i}.attn2.to_v"),
    ("blocks.{i}.cross_attn.o", "blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.cross_attn.norm_q", "blocks.{i}.attn2.norm_q"),
    ("blocks.{i}.cross_attn.norm_k", "blocks.{i}.attn2.norm_k"),
    ("blocks.{i}.cross_attn.k_img", "blocks.{i}.attn2.add_k_proj"),
    ("blocks.{i}.cross_attn.v_img", "blocks.{i}.attn2.add_v_proj"),
    ("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("head.head", "proj_out"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("patch_embedding", "patch_embedding"),
)

#: Modules only the image-to-video variant has: their rules are optional.
_I2V_ONLY = frozenset(
    {"blocks.{i}.cross_attn.k_img", "blocks.{i}.cross_attn.v_img", "blocks.{i}.cross_attn.norm_k_img"}
    | {f"img_emb.proj.{n}" for n in (0, 1, 3, 4)}
)

WAN_ORIGINAL_TO_DIFFUSERS = KeyMap.of(
    [Rename(f"{src}.{{p}}", f"{dst}.{{p}}", optional=src in _I2V_ONLY) for src, dst in WAN_MODULE_RENAMES]
    + [
        ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
        ("head.modulation", "scale_shift_table"),
    ],
    keep_rest=False,
)
WAN_DIFFUSERS_TO_ORIGINAL = WAN_ORIGINAL_TO_DIFFUSERS.inverse()

#: Fuse q, k, v of the self-attention into one ``to_qkv`` (weights and biases),
#: keeping every other key; ``plan.inverse()`` splits exactly.
REFERENCE_QKV_FUSE = KeyMap.of(
    [
        Fuse(
            ["blocks.{i}.attn1.to_q.{p}", "blocks.{i}.attn1.to_k.{p}", "blocks.{i}.attn1.to_v.{p}"],
            "blocks.{i}.attn1.to_qkv.{p}",
            dim=0,
        )
    ]
)
