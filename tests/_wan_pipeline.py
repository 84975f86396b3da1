"""A tiny Wan pipeline made with diffusers and transformers themselves (``save_pretrained``), for tests and benchmarks.

Every component is built by its own library from a tiny config, with seeded random weights, and the
pipeline folder is written by ``WanPipeline.save_pretrained``: the same files a hub pipeline has
(``model_index.json``, one folder per component, the tokenizer's files, the scheduler's config).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: The transformer of a Wan2.1/2.2 pipeline, tiny (``num_layers`` is the ``--blocks`` of the benchmark).
TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    image_dim=None, rope_max_seq_len=32,
)
#: Wan2.1-T2V-1.3B's transformer (diffusers' config of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
TRANSFORMER_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, image_dim=None, rope_max_seq_len=1024,
)
VAE = dict(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
TEXT_ENCODER = dict(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16, pad_token_id=0,
                    eos_token_id=1, decoder_start_token_id=0)


def tokenizer() -> Any:
    """A word-level fast tokenizer (no download): words of the test prompts, ``<pad>`` = 0, ``</s>`` = 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "moon", "dog", "blurry", "low", "quality"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_pipeline(folder: Path, *, two_experts: bool = False, transformer: dict[str, Any] | None = None,
                  text_encoder: dict[str, Any] | None = None, seed: int = 0, dtype: torch.dtype | None = None) -> Any:
    """Write a Wan pipeline to ``folder`` with ``save_pretrained`` and return it (a Wan2.2-style one with
    ``transformer_2`` and ``boundary_ratio`` when ``two_experts``)."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    tcfg = transformer or TRANSFORMER
    ecfg = dict(TEXT_ENCODER, d_model=tcfg["text_dim"]) if text_encoder is None else text_encoder
    parts: dict[str, Any] = dict(
        tokenizer=tokenizer(),
        text_encoder=transformers.UMT5EncoderModel(transformers.UMT5Config(**ecfg)).eval(),
        vae=diffusers.AutoencoderKLWan(**VAE).eval(),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=diffusers.WanTransformer3DModel(**tcfg).eval(),
    )
    if two_experts:
        parts["transformer_2"] = diffusers.WanTransformer3DModel(**tcfg).eval()
        parts["boundary_ratio"] = 0.5
    if dtype is not None:
        for k in ("text_encoder", "transformer", "transformer_2"):
            if k in parts:
                parts[k] = parts[k].to(dtype)
    pipe = diffusers.WanPipeline(**parts)
    pipe.save_pretrained(folder)
    return pipe
