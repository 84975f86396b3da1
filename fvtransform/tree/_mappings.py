"""Shipped key mappings: original Wan checkpoints <-> diffusers, and a fused-qkv layout.

Each mapping is a :class:`KeyMap` value; invert it with ``.inverse()``.
The reference model uses diffusers' Wan names, so the Wan mappings apply to
it unchanged.

The Wan maps account for every key (``keep_rest=False``), strictly, on both
Wan T2V and I2V trees: the rules for the layers only I2V has (the image
cross-attention and the image embedder) are ``optional=True``.
"""

from __future__ import annotations

from fvtransform.tree._keymap import Fuse, KeyMap, Rename, Split

__all__ = ["WAN_ORIGINAL_TO_DIFFUSERS", "WAN_DIFFUSERS_TO_ORIGINAL", "REFERENCE_QKV_FUSE", "WAN_MODULE_RENAMES",
           "HUNYUAN_VIDEO_MODULE_RENAMES", "hunyuan_video_original_to_diffusers"]

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
"""Key map from the original Wan release layout (``blocks.0.self_attn.q.weight``) to diffusers' Wan names; strict on T2V and I2V models."""
WAN_DIFFUSERS_TO_ORIGINAL = WAN_ORIGINAL_TO_DIFFUSERS.inverse()
"""The exact inverse of ``WAN_ORIGINAL_TO_DIFFUSERS``: diffusers' Wan names back to the original layout."""

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
"""Key map fusing the reference model's self-attention q, k, v into one ``to_qkv`` (its plan's inverse splits exactly)."""


#: HunyuanVideo module-path renames (original -> diffusers ``HunyuanVideoTransformer3DModel``), without the
#: parameter suffix: the keys that are only renamed. The fused keys are split by
#: :func:`hunyuan_video_original_to_diffusers`. Learnt from diffusers'
#: ``convert_hunyuan_video_transformer_to_diffusers`` (single_file_utils.py, 0.42).
HUNYUAN_VIDEO_MODULE_RENAMES: tuple[tuple[str, str], ...] = (
    ("img_in.proj", "x_embedder.proj"),
    ("time_in.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("time_in.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("guidance_in.mlp.0", "time_text_embed.guidance_embedder.linear_1"),
    ("guidance_in.mlp.2", "time_text_embed.guidance_embedder.linear_2"),
    ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    ("txt_in.input_embedder", "context_embedder.proj_in"),
    ("txt_in.t_embedder.mlp.0", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    ("txt_in.t_embedder.mlp.2", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    ("txt_in.c_embedder.linear_1", "context_embedder.time_text_embed.text_embedder.linear_1"),
    ("txt_in.c_embedder.linear_2", "context_embedder.time_text_embed.text_embedder.linear_2"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm1", "context_embedder.token_refiner.refiner_blocks.{i}.norm1"),
    ("txt_in.individual_token_refiner.blocks.{i}.norm2", "context_embedder.token_refiner.refiner_blocks.{i}.norm2"),
    ("txt_in.individual_token_refiner.blocks.{i}.self_attn_proj",
     "context_embedder.token_refiner.refiner_blocks.{i}.attn.to_out.0"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc1",
     "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.0.proj"),
    ("txt_in.individual_token_refiner.blocks.{i}.mlp.fc2", "context_embedder.token_refiner.refiner_blocks.{i}.ff.net.2"),
    ("txt_in.individual_token_refiner.blocks.{i}.adaLN_modulation.1",
     "context_embedder.token_refiner.refiner_blocks.{i}.norm_out.linear"),
    ("double_blocks.{i}.img_mod.linear", "transformer_blocks.{i}.norm1.linear"),
    ("double_blocks.{i}.txt_mod.linear", "transformer_blocks.{i}.norm1_context.linear"),
    ("double_blocks.{i}.img_attn_q_norm", "transformer_blocks.{i}.attn.norm_q"),
    ("double_blocks.{i}.img_attn_k_norm", "transformer_blocks.{i}.attn.norm_k"),
    ("double_blocks.{i}.img_attn_proj", "transformer_blocks.{i}.attn.to_out.0"),
    ("double_blocks.{i}.txt_attn_q_norm", "transformer_blocks.{i}.attn.norm_added_q"),
    ("double_blocks.{i}.txt_attn_k_norm", "transformer_blocks.{i}.attn.norm_added_k"),
    ("double_blocks.{i}.txt_attn_proj", "transformer_blocks.{i}.attn.to_add_out"),
    ("double_blocks.{i}.img_mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("double_blocks.{i}.img_mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
    ("double_blocks.{i}.txt_mlp.fc1", "transformer_blocks.{i}.ff_context.net.0.proj"),
    ("double_blocks.{i}.txt_mlp.fc2", "transformer_blocks.{i}.ff_context.net.2"),
    ("single_blocks.{i}.linear2", "single_transformer_blocks.{i}.proj_out"),
    ("single_blocks.{i}.q_norm", "single_transformer_blocks.{i}.attn.norm_q"),
    ("single_blocks.{i}.k_norm", "single_transformer_blocks.{i}.attn.norm_k"),
    ("single_blocks.{i}.modulation.linear", "single_transformer_blocks.{i}.norm.linear"),
    ("final_layer.linear", "proj_out"),
)

#: Modules only guidance-distilled HunyuanVideo has (``guidance_embeds=True``): their rules are optional.
_HUNYUAN_OPTIONAL = frozenset({"guidance_in.mlp.0", "guidance_in.mlp.2"})

#: Names the final modulation's two halves take between the two stages (no real key has them).
_SHIFT, _SCALE = "final_layer.adaLN_modulation.1.shift.{p}", "final_layer.adaLN_modulation.1.scale.{p}"


def hunyuan_video_original_to_diffusers(hidden_size: int, mlp_size: int) -> KeyMap:
    """The original HunyuanVideo transformer layout -> diffusers', for a model of these sizes.

    ``hidden_size`` is ``num_attention_heads * attention_head_dim`` of the
    diffusers config and ``mlp_size`` is ``int(hidden_size * mlp_ratio)``: the
    single-stream ``linear1`` holds q, k, v and the MLP input, pieces of
    ``[hidden, hidden, hidden, mlp]`` rows, so the split needs both sizes
    (diffusers' own converter fixes ``hidden_size = 3072``). ``img_attn_qkv``,
    ``txt_attn_qkv`` and the token refiner's ``self_attn_qkv`` split in thirds.
    The final ``adaLN_modulation`` stores (shift, scale), diffusers' ``norm_out``
    (scale, shift): a second stage splits and fuses the halves in the other
    order. Every key is accounted for (strict); ``.inverse()`` writes the
    original layout back exactly.

    >>> m = hunyuan_video_original_to_diffusers(16, 32)
    >>> m.rules[0]
    split(double_blocks.{i}.img_attn_qkv.{p}) -> transformer_blocks.{i}.attn.to_q.{p}, transformer_blocks.{i}.attn.to_k.{p}, transformer_blocks.{i}.attn.to_v.{p} dim=0 sizes=[16, 16, 16]
    """
    h, thirds = hidden_size, (hidden_size,) * 3
    refiner = "txt_in.individual_token_refiner.blocks.{i}"
    splits = [
        Split("double_blocks.{i}.img_attn_qkv.{p}",
              [f"transformer_blocks.{{i}}.attn.to_{x}.{{p}}" for x in "qkv"], sizes=thirds),
        Split("double_blocks.{i}.txt_attn_qkv.{p}",
              [f"transformer_blocks.{{i}}.attn.add_{x}_proj.{{p}}" for x in "qkv"], sizes=thirds),
        Split(f"{refiner}.self_attn_qkv.{{p}}",
              [f"context_embedder.token_refiner.refiner_blocks.{{i}}.attn.to_{x}.{{p}}" for x in "qkv"], sizes=thirds),
        Split("single_blocks.{i}.linear1.{p}",
              [f"single_transformer_blocks.{{i}}.attn.to_{x}.{{p}}" for x in "qkv"]
              + ["single_transformer_blocks.{i}.proj_mlp.{p}"], sizes=(h, h, h, mlp_size)),
        Split("final_layer.adaLN_modulation.1.{p}", [_SHIFT, _SCALE], sizes=(h, h)),
    ]
    renames = [Rename(f"{src}.{{p}}", f"{dst}.{{p}}", optional=src in _HUNYUAN_OPTIONAL)
               for src, dst in HUNYUAN_VIDEO_MODULE_RENAMES]
    first = KeyMap.of([*splits, *renames], keep_rest=False)
    swap = KeyMap.of([Fuse([_SCALE, _SHIFT], "norm_out.linear.{p}", sizes=(h, h))])
    return first.then(swap)
