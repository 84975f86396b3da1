"""Built-in reference architecture."""

from fvtransform.models._video_dit import TINY_CONFIG, VideoDiT, VideoDiTConfig, init_weights

__all__ = ["TINY_CONFIG", "VideoDiT", "VideoDiTConfig", "init_weights"]
