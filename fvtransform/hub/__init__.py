"""Downloads of models and LoRAs (huggingface_hub)."""

from fvtransform.hub._download import maybe_download_lora, maybe_download_model

__all__ = ["maybe_download_lora", "maybe_download_model"]
