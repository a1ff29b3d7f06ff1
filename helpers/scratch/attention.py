"""Attention for Stable Diffusion v1.5, written out: multi-head attention, the GEGLU feed-forward, the transformer
block (self-attention → cross-attention to the text → feed-forward) and the spatial transformer that wraps blocks so
they run on a feature map.

Shapes for SD1.5 at 512 px (latent 64 × 64), first level (320 channels, 8 heads of 40):
    feature map [b, 320, 64, 64] → tokens [b, 4096, 320] → attention per head [b, 8, 4096, 40]
    text context [b, 77, 768]: cross-attention keys/values come from it, so every pixel can look at every word.

Parameter names follow the diffusers folder layout (`to_q`, `to_out.0`, `ff.net.0.proj`, ...), so a diffusers
state dict loads with no renaming; helpers/scratch/convert.py maps them to the original single-file names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

# ---------------------------------------------------------------- helpers

def exists(value) -> bool:
    return value is not None


def default(value, fallback):
    return value if exists(value) else fallback


# ---------------------------------------------------------------- attention

class Attention(nn.Module):
    """Multi-head attention: self-attention when `context` is None, else cross-attention to `context`.

    softmax(q kᵀ / √d) v per head. F.scaled_dot_product_attention computes exactly this (and saves memory on a GPU:
    at 64 × 64 latents the 4096 × 4096 attention matrix per head never has to exist all at once).
    """

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qkv_bias: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        context_dim = default(context_dim, dim)
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        # a list with one Linear (diffusers also keeps a Dropout at index 1), so the weight is named `to_out.0.weight`
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = default(context, x)  # [b, n, dim] attends to [b, m, context_dim]
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/√d is the default
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


# ---------------------------------------------------------------- feed-forward

class GEGLU(nn.Module):
    """One projection to twice the width, split in two: value × GELU(gate) (Shazeer 2020, "GLU variants")."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is a Dropout(0) in diffusers; kept so the output layer is `net.2` as in every SD checkpoint
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---------------------------------------------------------------- transformer block

class TransformerBlock(nn.Module):
    """Pre-norm block with three residual branches: look at the image, look at the text, think (feed-forward)."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)  # self-attention over pixels
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim=context_dim)  # cross-attention to the prompt
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Runs transformer blocks on a feature map: GroupNorm, 1×1 conv in, flatten pixels to tokens, blocks, back to a
    map, 1×1 conv out, plus the input (a residual, so a fresh block starts close to the identity)."""

    def __init__(self, channels: int, heads: int, context_dim: int, groups: int = 32, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)  # 1e-6 here, unlike the ResBlocks' 1e-5
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, heads, context_dim)
                                                 for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return x + self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=height, w=width))
