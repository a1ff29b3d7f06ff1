"""The SD1.5 autoencoder (VAE), written out: images ↔ latents 8× smaller per side.

    encode: image [b, 3, 512, 512] → conv_in 128 → levels 128/256/512/512 (3 stride-2 convs: 512 → 64)
            → mid (ResBlock, one-head attention over all 64×64 positions, ResBlock) → GroupNorm → SiLU → conv
            → 8 channels = mean ‖ log-variance of a diagonal Gaussian → quant_conv (1×1) → [b, 8, 64, 64]
    decode: latent [b, 4, 64, 64] → post_quant_conv (1×1) → conv_in 512 → mid → levels 512/512/256/128 with
            ×2 upsampling (3 ResBlocks each) → GroupNorm → SiLU → conv → image [b, 3, 512, 512]

The diffusion model sees `latent × 0.18215`, which brings SD1.5's latents to roughly unit variance.
Every GroupNorm here uses eps 1e-6 (the UNet uses 1e-5): the original weights were trained with it.
Parameter names follow the diffusers folder layout; see convert.py for the original single-file names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import Attention
from .unet import Downsample, ResBlock, Upsample


@dataclass(frozen=True)
class VAEConfig:
    image_channels: int = 3  # RGB in and out
    latent_channels: int = 4  # channels of the latent the UNet denoises
    channels: tuple[int, ...] = (128, 256, 512, 512)  # width per level; len - 1 halvings (4 levels → 8× smaller)
    layers_per_block: int = 2  # ResBlocks per encoder level (decoder levels get one more)
    groups: int = 32  # GroupNorm groups
    eps: float = 1e-6  # GroupNorm eps everywhere in the VAE
    scaling_factor: float = 0.18215  # latents × this ≈ unit variance for the UNet

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.channels) - 1)


# ---------------------------------------------------------------- blocks

class SpatialSelfAttention(Attention):
    """One head over every pixel of the (smallest) feature map, with its own GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__(channels, heads=1, qkv_bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        tokens = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        out = super().forward(tokens)
        return x + rearrange(out, "b (h w) c -> b c h w", h=height, w=width)


class Level(nn.Module):
    """ResBlocks, then optionally a resampler (stride-2 conv going down, ×2 nearest + conv going up)."""

    def __init__(self, in_ch: int, out_ch: int, n: int, cfg: VAEConfig, down: bool = False, up: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(in_ch if i == 0 else out_ch, out_ch, None, cfg.groups, cfg.eps)
                                      for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch, asymmetric=True)] if down else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if up else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        for resample in [*self.downsamplers, *self.upsamplers]:
            x = resample(x)
        return x


class Mid(nn.Module):
    def __init__(self, ch: int, cfg: VAEConfig):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(ch, ch, None, cfg.groups, cfg.eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, cfg.groups, cfg.eps)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


# ---------------------------------------------------------------- encoder and decoder

class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, last = cfg.channels, len(cfg.channels) - 1
        self.conv_in = nn.Conv2d(cfg.image_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, cfg, down=i < last)
                                          for i in range(len(ch))])
        self.mid_block = Mid(ch[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean ‖ log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch = cfg.channels[::-1]  # widest first
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = Mid(ch[0], cfg)
        self.up_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, cfg,
                                              up=i < len(ch) - 1) for i in range(len(ch))])
        self.conv_norm_out = nn.GroupNorm(cfg.groups, ch[-1], eps=cfg.eps)
        self.conv_out = nn.Conv2d(ch[-1], cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            x = level(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# ---------------------------------------------------------------- autoencoder

class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images in [-1, 1], [b, 3, H, W] → (mean, log-variance), each [b, 4, H/8, W/8], NOT yet scaled."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents [b, 4, h, w] → images [b, 3, 8h, 8w], roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(latents))

    def sample(self, mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Draw z = mean + σ·ε from the encoder's Gaussian (ε drawn like diffusers' randn_tensor: on the
        generator's device, then moved), so a seeded run gives the same latents as diffusers."""
        noise = randn(mean.shape, generator, mean.device, mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise


def randn(shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device (CPU generators give the same numbers on any machine)
    and moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=dtype).to(device)
