"""A small, self-contained video diffusion transformer (the reference model).

Its parameter names follow diffusers' ``WanTransformer3DModel`` so that LoRA
files and key mappings written for Wan apply to it unchanged:
``patch_embedding``, ``condition_embedder.{time_embedder,time_proj,text_embedder}``,
``blocks.N.{attn1,attn2}.{to_q,to_k,to_v,to_out.0,norm_q,norm_k}``,
``blocks.N.norm2``, ``blocks.N.ffn.net.{0.proj,2}``, ``blocks.N.scale_shift_table``,
``scale_shift_table`` and ``proj_out``.
"""

from __future__ import annotations

import math
from typing import Any, cast

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from fvtransform._dtypes import DTypeLike, as_dtype

__all__ = ["VideoDiT", "VideoDiTConfig", "TINY_CONFIG"]


@attrs.frozen
class VideoDiTConfig:
    """Configuration of :class:`VideoDiT` (defaults: a tiny model that runs in milliseconds)."""

    in_channels: int = 4
    out_channels: int = 4
    patch_size: tuple[int, int, int] = attrs.field(default=(1, 2, 2), converter=tuple)
    num_layers: int = 2
    num_attention_heads: int = 2
    attention_head_dim: int = 8
    ffn_dim: int = 64
    text_dim: int = 16
    freq_dim: int = 16
    eps: float = 1e-6
    rope_max_seq_len: int = 256

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def to_dict(self) -> dict[str, int | float | str | list[int]]:
        """The ``config.json`` of this model (diffusers' shape: ``_class_name`` and the fields)."""
        d: dict[str, int | float | str | list[int]] = {"_class_name": "VideoDiT", **attrs.asdict(self)}
        d["patch_size"] = list(self.patch_size)
        return d


TINY_CONFIG = VideoDiTConfig()
"""A tiny configuration of the reference model, for tests and examples."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position tables over flattened tokens (non-persistent buffers)."""

    freqs_cos: torch.Tensor
    freqs_sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int) -> None:
        super().__init__()
        inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)
        self.register_buffer("freqs_cos", angles.cos().float(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, heads, S, head_dim]
        s = x.shape[-2]
        cos, sin = self.freqs_cos[:s].to(x.dtype), self.freqs_sin[:s].to(x.dtype)
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, eps: float, kv_dim: int | None = None) -> None:
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(kv_dim, dim)
        self.to_v = nn.Linear(kv_dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: Rotary | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self.norm_q(self.to_q(x)), self.norm_k(self.to_k(ctx)), self.to_v(ctx)
        b = x.shape[0]
        q, k, v = (t.view(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).flatten(2))


class _Proj(nn.Module):
    """The projection before the activation (diffusers' ``net.0.proj`` key layout)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[1](cast(_Proj, self.net[0]).proj(x)))


class Block(nn.Module):
    def __init__(self, cfg: VideoDiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=True)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor, rope: Rotary) -> torch.Tensor:
        mods = (self.scale_shift_table + temb).chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn1(h, rope=rope)
        x = x + self.attn2(self.norm2(x), context=text)
        h = self.norm3(x) * (1 + scale2) + shift2
        return x + gate2 * self.ffn(h)


class TimeEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ConditionEmbedder(nn.Module):
    def __init__(self, cfg: VideoDiTConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = TimeEmbedding(cfg.freq_dim, dim)
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = TimeEmbedding(cfg.text_dim, dim)

    def forward(self, timestep: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
        args = timestep.float()[:, None] * freqs[None]
        sinus = torch.cat([args.cos(), args.sin()], dim=-1)
        dtype = self.time_embedder.linear_1.weight.dtype
        temb = self.time_embedder(sinus.to(dtype))
        tproj = self.time_proj(F.silu(temb))
        return temb, tproj, self.text_embedder(text.to(dtype))


class VideoDiT(nn.Module):
    """The reference video diffusion transformer.

    ``forward(hidden_states [B, C, F, H, W], timestep [B], encoder_hidden_states [B, L, text_dim])``
    returns a tensor shaped like ``hidden_states`` (with ``out_channels``).

    >>> import torch
    >>> m = VideoDiT()
    >>> x = torch.randn(1, 4, 2, 4, 4)
    >>> m(x, torch.tensor([10]), torch.randn(1, 3, 16)).shape
    torch.Size([1, 4, 2, 4, 4])
    """

    def __init__(self, config: VideoDiTConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        if config is None:
            config = VideoDiTConfig(**{k: v for k, v in kwargs.items() if not k.startswith("_")})
        elif isinstance(config, dict):
            config = VideoDiTConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_channels, dim, kernel_size=config.patch_size, stride=config.patch_size)
        self.rope = Rotary(config.attention_head_dim, config.rope_max_seq_len)
        self.condition_embedder = ConditionEmbedder(config)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, config.out_channels * math.prod(config.patch_size))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(
        self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        cfg = self.config
        b, _, f, h, w = hidden_states.shape
        pf, ph, pw = cfg.patch_size
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        temb, tproj, text = self.condition_embedder(timestep, encoder_hidden_states)
        tproj = tproj.unflatten(1, (6, -1))
        for block in self.blocks:
            x = block(x, text, tproj, self.rope)
        shift, scale = (self.scale_shift_table + temb[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        x = x.view(b, f // pf, h // ph, w // pw, cfg.out_channels, pf, ph, pw)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.reshape(b, cfg.out_channels, f, h, w)


def init_weights(module: nn.Module, *, seed: int = 0, dtype: DTypeLike = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded weights for a VideoDiT, such as ``fvt.build("fvt-video-dit")`` returns (a plain dict of new tensors, in state order)."""
    from fvtransform.tree._paramtree import state_keys

    dtype = as_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    shapes = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    for key in state_keys(module):
        shape = shapes[key]
        if key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or key.endswith("norm2.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[key] = t.to(dtype)
    return out
