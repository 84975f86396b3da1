"""Downloads of models and LoRAs (huggingface_hub), verified against the hub's hashes."""

from fvtransform.hub._download import maybe_download_lora, maybe_download_model
from fvtransform.hub._verify import resolved_commit

__all__ = ["maybe_download_lora", "maybe_download_model", "resolved_commit"]
