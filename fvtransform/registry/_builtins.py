"""Built-in registry entries (lazy: nothing is imported until resolved)."""

from __future__ import annotations

from fvtransform.registry._registry import Registry

__all__ = ["BUILTIN_ENTRIES", "install_builtins"]

BUILTIN_ENTRIES: dict[str, str] = {
    # The reference architecture shipped with fvtransform.
    "fvt-video-dit": "fvtransform.models:VideoDiT",
    "VideoDiT": "fvtransform.models:VideoDiT",
    # Video diffusion transformers and VAEs from diffusers.
    "WanTransformer3DModel": "diffusers:WanTransformer3DModel",
    "AutoencoderKLWan": "diffusers:AutoencoderKLWan",
    "HunyuanVideoTransformer3DModel": "diffusers:HunyuanVideoTransformer3DModel",
    "AutoencoderKLHunyuanVideo": "diffusers:AutoencoderKLHunyuanVideo",
    "LTXVideoTransformer3DModel": "diffusers:LTXVideoTransformer3DModel",
    "AutoencoderKLLTXVideo": "diffusers:AutoencoderKLLTXVideo",
    "CogVideoXTransformer3DModel": "diffusers:CogVideoXTransformer3DModel",
    "AutoencoderKLCogVideoX": "diffusers:AutoencoderKLCogVideoX",
    # Text and image encoders from transformers.
    "T5EncoderModel": "transformers:T5EncoderModel",
    "UMT5EncoderModel": "transformers:UMT5EncoderModel",
    "CLIPTextModel": "transformers:CLIPTextModel",
    "CLIPTextModelWithProjection": "transformers:CLIPTextModelWithProjection",
    "CLIPVisionModel": "transformers:CLIPVisionModel",
    "CLIPVisionModelWithProjection": "transformers:CLIPVisionModelWithProjection",
}


def install_builtins(registry: Registry) -> None:
    """Add the built-in entries to ``registry`` (names already taken are kept)."""
    for name, target in BUILTIN_ENTRIES.items():
        if name not in registry:
            registry.register(name, target)
