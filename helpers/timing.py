"""How long a preset trains, and an image takes, on a T4: counted FLOPs times one calibrated speed.

The UNet's forward FLOPs are counted exactly on the real architecture on the meta device (torch's FlopCounterMode,
no weights). A training image costs `passes` forward-sized passes: the forward, the backward to the activations (the
weight gradients of LoRA / attn2 are a small extra) and, with gradient checkpointing, the forward once more. One
number turns FLOPs into seconds: the published T4 figure for SDXL LoRA at 1024 px with the same settings
(fp16, 8-bit AdamW, gradient checkpointing, rank 16): 7.96 s per optimizer step of 3 images. Everything else is
scaled from it, so these are estimates (±30 %: the efficiency of small resolutions and of inference differs).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from .presets import Preset

# The calibration point: SDXL LoRA r16 on a free Colab T4, 1024 px, gradient checkpointing, fp16, 8-bit AdamW.
PUBLISHED = dict(family="sdxl", resolution=1024, images_per_step=3, seconds_per_step=7.96, checkpointing=True)
TFLOP = 1e12


@lru_cache(maxsize=None)
def unet_forward_tflop(family: str, resolution: int) -> float:
    """TFLOPs of one UNet forward pass for one image at `resolution` (counted on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .configs import SD_VAE
    from .memory_meta import full_size_unet
    unet = full_size_unet(family).half()
    latent = resolution // 2 ** (len(SD_VAE["block_out_channels"]) - 1)
    with torch.device("meta"):
        x = torch.randn(1, 4, latent, latent, dtype=torch.float16)
        context = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.float16)
        extra = {}
        if family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280, dtype=torch.float16),
                                          "time_ids": torch.randn(1, 6, dtype=torch.float16)}
        timesteps = torch.full((1,), 500)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, timesteps, context, **extra)
    return counter.get_total_flops() / TFLOP


def passes(checkpointing: bool) -> int:
    """Forward-sized passes per training image: forward + backward to the activations (+ the recomputed forward)."""
    return 3 if checkpointing else 2


def seconds_per_tflop() -> float:
    """The calibrated T4 speed (s per TFLOP of UNet work), from PUBLISHED."""
    p = PUBLISHED
    work = p["images_per_step"] * passes(p["checkpointing"]) * unet_forward_tflop(p["family"], p["resolution"])
    return p["seconds_per_step"] / work


def training_estimate(preset: Preset) -> dict:
    """Seconds per optimizer step and for the whole run of the t4 form of `preset`, with the arithmetic."""
    forward = unet_forward_tflop(preset.family, preset.resolution)
    work = preset.images_per_step * passes(preset.gradient_checkpointing) * forward
    step = work * seconds_per_tflop()
    p = PUBLISHED
    calib = unet_forward_tflop(p["family"], p["resolution"])
    n = passes(preset.gradient_checkpointing)
    arithmetic = (f"UNet forward at {preset.resolution} px = {forward:.2f} TFLOP/image; × {n} passes × "
                  f"{preset.images_per_step} images/step = {work:.1f} TFLOP/step. Calibration: "
                  f"{p['seconds_per_step']} s / ({p['images_per_step']} × {passes(p['checkpointing'])} × "
                  f"{calib:.2f} TFLOP) = {seconds_per_tflop():.3f} s/TFLOP → {step:.1f} s/step × {preset.max_steps} "
                  f"steps = {step * preset.max_steps / 3600:.1f} h")
    return {"seconds_per_step": step, "total_seconds": step * preset.max_steps, "tflop_per_step": work,
            "arithmetic": arithmetic}


def generation_seconds(family: str, size: int, steps: int, images: int = 1, guidance: bool = True) -> float:
    """Estimated T4 time to draw `images` images: steps × (2 with classifier-free guidance) UNet forwards each."""
    per_image = steps * (2 if guidance else 1) * unet_forward_tflop(family, size)
    return images * per_image * seconds_per_tflop()


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["PUBLISHED", "unet_forward_tflop", "passes", "seconds_per_tflop", "training_estimate",
           "generation_seconds", "duration"]
