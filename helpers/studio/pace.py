"""How long a drawing takes on THIS machine, known before it starts: what the app's per-request time limit is
checked against (helpers.studio.engine, `Engine.estimate`), so a request that cannot finish in time is refused at once
instead of holding the only drawing slot until a denoising step ends long past the limit.

    pace = Pace.measure(pipe)            # ≈ 2 s for a tiny pipeline on a free 2-core CPU; under 1 s on a GPU
    pace.step_seconds(size, batch)       # one denoising step: a UNet call on `batch` latents (×2 with guidance)
    pace.decode_seconds(size)            # one image's VAE decode

The model, and how each number is measured:
- A UNet call costs `overhead + per_flop · FLOPs`: the overhead (Python, kernel launches, memory traffic) is what a
  call at the smallest size costs beyond its arithmetic, and dominates the tiny models; `per_flop` is the slope between
  two timed calls, at the smallest size (64 px: one untimed call first, then the mean of two) and at the pipeline's
  own size (at least 256 px, once).
- A VAE decode costs `decode_per_flop · FLOPs`, timed once at the larger size (untiled below ONE_AT_A_TIME_PX);
  from ONE_AT_A_TIME_PX up the drawing decodes in overlapping tiles (helpers.generate.sampling.set_vae_memory), counted
  as (1 / 0.75)² the work.
- FLOPs are counted on the loaded pipeline's own architecture (its config built on the meta device, torch's
  FlopCounterMode), as helpers.plan.timing counts the full-size models; attention's growth with size is in them.
- Not counted: the text encoders, the SD1.5 safety checker and the CLIP score (a fraction of one step each), an
  img2img upload's VAE encode (counted as one more decode).
Measured once per base model and kept (`Engine` keys it like its pipelines). What the measured calls leave out (the
scheduler, the pipeline's own work) and a machine busier or quieter than while measuring are what the engine's ratio
of actual to estimated seconds of the last drawing corrects (`Engine.estimate`); a drawing slower still is stopped
between denoising steps before the limit.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..generate.sampling import ONE_AT_A_TIME_PX, autocast_for, set_vae_memory

SMALL_PX = 64  # the smallest size every family allows: a call that is nearly all overhead
LARGE_PX = 256  # at least this large for the slope (a tiny pipeline's own 64 px is all overhead)
TIMESTEP = 500
TILE_OVERLAP = 0.25  # diffusers' tiled VAE decode overlaps its tiles by a quarter: (1 / 0.75)² the work


def _config(module) -> str:
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    if "encoder_hid_dim_type" in config:  # an IP-Adapter's projection (a run's, while it is on): not the UNet's work
        config.update(encoder_hid_dim=None, encoder_hid_dim_type=None)
    return json.dumps(config, sort_keys=True, default=str)


@lru_cache(maxsize=8)
def _meta_model(kind: str, config: str):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):
        return cls.from_config(json.loads(config))


def _unet_inputs(config, latent: int, batch: int, device, dtype) -> tuple:
    """Inputs of one UNet call on `batch` latents of `latent`² (SDXL's added time and text embeddings included)."""
    x = torch.randn(batch, config.in_channels, latent, latent, device=device, dtype=dtype)
    context = torch.randn(batch, 77, config.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if config.addition_embed_type == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, text, device=device, dtype=dtype),
                                      "time_ids": torch.randn(batch, 6, device=device, dtype=dtype)}
    return x, torch.full((batch,), TIMESTEP, device=device), context, extra


@lru_cache(maxsize=256)
def unet_flops(config: str, latent: int) -> float:
    """FLOPs of one UNet forward on one latent of `latent`² (the architecture `config` describes)."""
    unet = _meta_model("unet", config)
    x, timesteps, context, extra = _unet_inputs(unet.config, latent, 1, "meta", torch.float32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, timesteps, context, **extra)
    return float(counter.get_total_flops())


@lru_cache(maxsize=256)
def decode_flops(config: str, latent: int) -> float:
    """FLOPs of one VAE decode of one latent of `latent`²."""
    vae = _meta_model("vae", config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.decode(torch.randn(1, vae.config.latent_channels, latent, latent, device="meta"))
    return float(counter.get_total_flops())


def _tiling(size: int) -> float:
    """Work of a decode at `size` px as the drawing does it, per untiled FLOP."""
    return 1 / (1 - TILE_OVERLAP) ** 2 if size >= ONE_AT_A_TIME_PX else 1.0


def _timed(call, device: torch.device, repeats: int = 1, warm: bool = False) -> float:
    """Mean seconds of `repeats` timed runs of `call()` (after one untimed run if `warm`)."""
    seconds = []
    for k in range(repeats + warm):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if k or not warm:
            seconds.append(time.perf_counter() - start)
    return sum(seconds) / len(seconds)


@dataclass(frozen=True)
class Pace:
    """Seconds per UNet call and per VAE decode of one pipeline on this machine (module docstring)."""
    unet_config: str
    vae_config: str
    scale_factor: int  # px per latent cell
    overhead: float  # s per UNet call beyond its FLOPs
    per_flop: float  # s per UNet FLOP
    decode_per_flop: float  # s per VAE-decode FLOP
    measured: str  # what was timed, for the sentence

    @classmethod
    def measure(cls, pipe) -> "Pace":
        """Time the pipeline's UNet at two sizes and its VAE once (its weights as they are: the base model)."""
        unet, vae, factor = pipe.unet, pipe.vae, pipe.vae_scale_factor
        device, dtype = unet.device, unet.dtype
        own = unet.config.sample_size * factor
        sizes = (SMALL_PX, max(LARGE_PX, own))
        unet_config, vae_config = _config(unet), _config(vae)
        seconds = []
        with torch.no_grad(), autocast_for(unet):
            for size, repeats, warm in ((sizes[0], 2, True), (sizes[1], 1, False)):  # the small call warms up
                inputs = _unet_inputs(unet.config, size // factor, 2, device, dtype)  # 2: guidance's two halves
                seconds.append(_timed(lambda: unet(inputs[0], inputs[1], inputs[2], **inputs[3]), device, repeats,
                                      warm))
            set_vae_memory(pipe, sizes[1], sizes[1])
            latent = torch.randn(1, vae.config.latent_channels, sizes[1] // factor, sizes[1] // factor,
                                 device=device, dtype=vae.dtype)
            decode = _timed(lambda: vae.decode(latent), device)
        flops = [2 * unet_flops(unet_config, size // factor) for size in sizes]
        per_flop = max((seconds[1] - seconds[0]) / (flops[1] - flops[0]), seconds[1] / flops[1] / 4)
        overhead = max(0.0, seconds[0] - per_flop * flops[0])
        return cls(unet_config, vae_config, factor, overhead, per_flop,
                   decode / _tiling(sizes[1]) / decode_flops(vae_config, sizes[1] // factor),
                   f"{seconds[1]:.2g} s a step at {sizes[1]} px")

    def step_seconds(self, size: int, batch: int) -> float:
        """One denoising step at `size` px on `batch` latents (already ×2 where guidance doubles them)."""
        return self.overhead + self.per_flop * batch * unet_flops(self.unet_config, size // self.scale_factor)

    def decode_seconds(self, size: int) -> float:
        """One image's VAE decode at `size` px (tiled from ONE_AT_A_TIME_PX up, as the drawing decodes it)."""
        return _tiling(size) * self.decode_per_flop * decode_flops(self.vae_config, size // self.scale_factor)
