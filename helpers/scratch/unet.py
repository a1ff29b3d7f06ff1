"""The SD1.5 UNet, written out: it predicts the noise in a latent, given the timestep and the text.

    latents [b, 4, 64, 64] ─conv_in→ [b, 320, 64, 64]
    down:  320 @ 64² (attn) → 640 @ 32² (attn) → 1280 @ 16² (attn) → 1280 @ 8² (no attn)   each level: 2 ResBlocks
    mid:   1280 @ 8²: ResBlock → SpatialTransformer → ResBlock
    up:    mirror of down with 3 ResBlocks per level, each fed the matching down activation (skip connection)
    out:   GroupNorm → SiLU → conv → noise prediction [b, 4, 64, 64]

The timestep becomes a 320-d sinusoid then a 1280-d vector added inside every ResBlock; the text [b, 77, 768]
enters through cross-attention in every SpatialTransformer. `UNetConfig` makes the same wiring small (the repo's
tiny SD1.5: 3 levels 32/64/64, 1 ResBlock each, attention on the first two).
Parameter names follow the diffusers folder layout, so diffusers weights load as they are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import SpatialTransformer


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted noise channels out
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # width of each resolution level (each halves H and W)
    cross_attention: tuple[bool, ...] = (True, True, True, False)  # SpatialTransformer per down level; up mirrors
    layers_per_block: int = 2  # ResBlocks per down level (up levels get one more, for the downsampler's skip)
    heads: int = 8  # attention heads at every level (head width = channels / 8: 40, 80, 160, 160)
    context_dim: int = 768  # width of the text encoder's hidden states
    transformer_depth: int = 1  # TransformerBlocks per SpatialTransformer
    groups: int = 32  # GroupNorm groups
    eps: float = 1e-5  # GroupNorm eps in ResBlocks and the output norm

    def __post_init__(self):
        if len(self.cross_attention) != len(self.channels):
            raise ValueError(f"cross_attention has {len(self.cross_attention)} entries for {len(self.channels)} levels")
        bad = [c for c in self.channels if c % self.groups or c % self.heads]
        if bad:
            raise ValueError(f"channels {bad} must be divisible by groups={self.groups} and heads={self.heads}")

    @property
    def time_dim(self) -> int:
        return self.channels[0] * 4  # 1280 for SD1.5


# ---------------------------------------------------------------- timestep embedding

def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[b] timesteps → [b, dim] sinusoids, cos half first (diffusers' flip_sin_to_cos=True, freq_shift=0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps[:, None].float() * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepMLP(nn.Module):
    def __init__(self, dim: int, time_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# ---------------------------------------------------------------- resnet blocks and resampling (shared with the VAE)

class ResBlock(nn.Module):
    """norm → SiLU → conv, add the timestep, norm → SiLU → conv, plus the input (1×1 conv if the width changes).
    With `time_dim=None` it is the VAE's block, which has no timestep."""

    def __init__(self, in_ch: int, out_ch: int, time_dim: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_ch) if time_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, time: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(time))[:, :, None, None]  # one shift per channel
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """3×3 conv with stride 2. The UNet pads 1 on every side; the VAE pads only right and bottom (`asymmetric`),
    as the original LDM autoencoder did, so its weights expect that."""

    def __init__(self, channels: int, asymmetric: bool = False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, so odd sizes meet their skip connection again), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="nearest") if size else F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


# ---------------------------------------------------------------- UNet levels

def spatial_transformer(channels: int, cfg: UNetConfig) -> SpatialTransformer:
    return SpatialTransformer(channels, cfg.heads, cfg.context_dim, cfg.groups, cfg.transformer_depth)


class DownLevel(nn.Module):
    """ResBlocks (each followed by a SpatialTransformer if `attention`), then a stride-2 conv unless last.
    Returns every intermediate activation: the up path consumes them as skip connections."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attention: bool, downsample: bool):
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch, cfg.time_dim, cfg.groups, cfg.eps)
                                      for i in range(n)])
        self.attentions = nn.ModuleList([spatial_transformer(out_ch, cfg) for _ in range(n)] if attention else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if downsample else [])

    def forward(self, x, time, context) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """Like DownLevel, but each ResBlock first concatenates the next skip connection on the channel axis."""

    def __init__(self, in_ch: int, out_ch: int, skip_channels: list[int], cfg: UNetConfig, attention: bool,
                 upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock((in_ch if i == 0 else out_ch) + skip, out_ch, cfg.time_dim, cfg.groups,
                                               cfg.eps) for i, skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList([spatial_transformer(out_ch, cfg) for _ in skip_channels] if attention else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if upsample else [])

    def forward(self, x, skips: list[torch.Tensor], time, context) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), time)
            if self.attentions:
                x = self.attentions[i](x, context)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])  # the size the next skip connection has
        return x


class MidLevel(nn.Module):
    def __init__(self, ch: int, cfg: UNetConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, cfg.time_dim, cfg.groups, cfg.eps) for _ in range(2)])
        self.attentions = nn.ModuleList([spatial_transformer(ch, cfg)])

    def forward(self, x, time, context) -> torch.Tensor:
        x = self.resnets[0](x, time)
        return self.resnets[1](self.attentions[0](x, context), time)


# ---------------------------------------------------------------- UNet

class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        ch, levels = cfg.channels, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], cfg.time_dim)

        # down path; remember the width of every activation kept for a skip connection
        skip_channels, self.down_blocks = [ch[0]], nn.ModuleList()
        for i in range(levels):
            last = i == levels - 1
            self.down_blocks.append(DownLevel(ch[max(i - 1, 0)], ch[i], cfg, cfg.cross_attention[i], not last))
            skip_channels += [ch[i]] * (cfg.layers_per_block + (0 if last else 1))

        self.mid_block = MidLevel(ch[-1], cfg)

        # up path: deepest level first, each takes layers_per_block + 1 skips (popped from the end)
        self.up_blocks, x_ch = nn.ModuleList(), ch[-1]
        for i in reversed(range(levels)):
            skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            self.up_blocks.append(UpLevel(x_ch, ch[i], skips, cfg, cfg.cross_attention[i], upsample=i > 0))
            x_ch = ch[i]

        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[0], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | int, context: torch.Tensor) -> torch.Tensor:
        """latents [b, 4, h, w], timesteps [b] or one int, context [b, 77, 768] → predicted noise [b, 4, h, w]."""
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        time = self.time_embedding(timestep_embedding(timesteps, self.config.channels[0]).to(latents.dtype))

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time, context)
            skips += block_skips
        x = self.mid_block(x, time, context)
        for block in self.up_blocks:
            x = block(x, skips, time, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def level_shapes(unet: UNet, latents: torch.Tensor, timesteps, context: torch.Tensor) -> list[tuple[str, tuple]]:
    """Run the UNet once and return the output shape after conv_in, every level and conv_out, in order: the
    resolution path down and back up, for reading along."""
    shapes, parts = [], [("conv_in", unet.conv_in), *[(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)],
                         ("mid_block", unet.mid_block), *[(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)],
                         ("conv_out", unet.conv_out)]

    def hook(name):
        def record(module, inputs, out):  # a DownLevel returns (x, skips)
            shapes.append((name, tuple((out[0] if isinstance(out, tuple) else out).shape)))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in parts]
    try:
        with torch.no_grad():
            unet(latents, timesteps, context)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
