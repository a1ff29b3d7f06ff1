"""txt2img and img2img with the scratch parts: text → context, noise → (UNet + sampler) × steps → VAE → image.

    prompt, negative ──CLIP──→ context [2b, 77, 768]  (negative first: the "unconditional" half)
    txt2img: latents ~ N(0, 1) [b, 4, H/8, W/8]
    img2img: latents = noise_to(t_start, VAE.encode(image) sampled × 0.18215); only the last steps·strength steps run
    each step: ε_neg, ε_pos = UNet([x, x], t, context);  ε = ε_neg + g·(ε_pos − ε_neg)   (classifier-free guidance)
               x = sampler.step(ε, t, t_prev, x)
    image = VAE.decode(x / 0.18215) → [b, 3, H, W], mapped from [-1, 1] to [0, 1]

Random numbers come from one CPU generator seeded by `seed`, drawn in the same order and shapes as diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline, so the same seed gives the same image on any device.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .clip import CLIPTextEncoder, tokenize
from .ddpm import NoiseSchedule, ScheduleConfig, make_sampler, previous_timesteps
from .unet import UNet
from .vae import VAE, randn

# ---------------------------------------------------------------- helpers

def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    return seed if isinstance(seed, torch.Generator) else torch.Generator("cpu").manual_seed(int(seed))


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[b, 3, H, W] in [0, 1] → PIL images."""
    array = (images.detach().float().cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


def from_pil(images: Image.Image | list[Image.Image], multiple: int = 8) -> torch.Tensor:
    """PIL image(s) → [b, 3, H, W] in [0, 1]; sides are resized down to a multiple of 8 (Lanczos, as diffusers)."""
    images = [images] if isinstance(images, Image.Image) else images
    arrays = []
    for img in images:
        w, h = (s - s % multiple for s in img.size)
        arrays.append(np.asarray(img.convert("RGB").resize((w, h), Image.LANCZOS), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def load_image(path: str | Path, size: int) -> Image.Image:
    """An RGB image resized (Lanczos) to size × size, e.g. as an img2img input."""
    return Image.open(path).convert("RGB").resize((size, size), Image.LANCZOS)


# ---------------------------------------------------------------- pipeline

@dataclass
class StableDiffusion:
    tokenizer: object  # a CLIPTokenizer: prompts → 77 ids
    text_encoder: CLIPTextEncoder
    vae: VAE
    unet: UNet
    schedule: ScheduleConfig = ScheduleConfig()
    default_size: int = 512  # image side when none is given (the UNet's training resolution × 8)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompts → context [b, 77, width] for the UNet's cross-attention."""
        ids = tokenize(self.tokenizer, as_list(prompts)).to(self.device)
        return self.text_encoder(ids)

    def guidance_context(self, prompt, negative_prompt, guidance_scale: float) -> tuple[torch.Tensor, int]:
        prompts = as_list(prompt)
        if guidance_scale <= 1.0:  # no guidance: the negative half is never used
            return self.encode_prompt(prompts), len(prompts)
        negatives = as_list(negative_prompt) if negative_prompt else [""] * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        return torch.cat([self.encode_prompt(negatives), self.encode_prompt(prompts)]), len(prompts)

    @torch.no_grad()
    def denoise(self, latents: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, guidance_scale: float,
                sampler: NoiseSchedule, generator: torch.Generator, progress: bool = True, desc: str = "denoise"
                ) -> torch.Tensor:
        """Run the sampler from `timesteps[0]` down to the clean latent."""
        guided = guidance_scale > 1.0
        for t, t_prev in tqdm(list(zip(timesteps.tolist(), previous_timesteps(timesteps))), desc=desc,
                              disable=not progress):
            eps = self.unet(torch.cat([latents, latents]) if guided else latents, t, context)
            if guided:
                eps_negative, eps_prompt = eps.chunk(2)
                eps = eps_negative + guidance_scale * (eps_prompt - eps_negative)
            latents = sampler.step(eps, t, t_prev, latents, generator=generator)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents → images in [0, 1] (float32, on the CPU)."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor)
        return (images / 2 + 0.5).clamp(0, 1).float().cpu()

    @torch.no_grad()
    def txt2img(self, prompt: str | list[str], negative_prompt: str | list[str] = "", *, steps: int = 50,
                guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                seed: int | torch.Generator = 0, sampler: str = "ddim", eta: float = 0.0,
                latents: torch.Tensor | None = None, progress: bool = True) -> torch.Tensor:
        """Prompt(s) → images [b, 3, H, W] in [0, 1]. `latents` replaces the seeded starting noise."""
        height, width = height or self.default_size, width or self.default_size
        down = self.vae.config.downscale
        if height % down or width % down:
            raise ValueError(f"height and width must be multiples of {down}, got {height}×{width}")
        context, batch = self.guidance_context(prompt, negative_prompt, guidance_scale)
        generator, schedule = make_generator(seed), make_sampler(sampler, self.schedule, eta)
        shape = (batch, self.unet.config.in_channels, height // down, width // down)
        if latents is None:
            latents = randn(shape, generator, self.device, self.dtype)  # σ_max = 1 for DDIM/DDPM: no scaling
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = self.denoise(latents.to(self.device, self.dtype), schedule.timesteps(steps), context,
                               guidance_scale, schedule, generator, progress, desc="txt2img")
        return self.decode(latents)

    @torch.no_grad()
    def img2img(self, prompt: str | list[str], image: Image.Image | list[Image.Image] | torch.Tensor,
                strength: float = 0.8, negative_prompt: str | list[str] = "", *, steps: int = 50,
                guidance_scale: float = 7.5, seed: int | torch.Generator = 0, sampler: str = "ddim",
                eta: float = 0.0, progress: bool = True) -> torch.Tensor:
        """Redraw `image` (PIL, or [b, 3, H, W] in [0, 1]) towards the prompt; strength 0 keeps it, 1 ignores it."""
        pixels = from_pil(image) if not isinstance(image, torch.Tensor) else image
        context, batch = self.guidance_context(prompt, negative_prompt, guidance_scale)
        if pixels.shape[0] != batch:
            raise ValueError(f"{pixels.shape[0]} images for {batch} prompts")
        generator, schedule = make_generator(seed), make_sampler(sampler, self.schedule, eta)
        timesteps = schedule.img2img_timesteps(steps, strength)
        if len(timesteps) == 0:
            raise ValueError(f"strength {strength} with {steps} steps leaves no step to run")
        # encode, sample the latent (first draw from the generator), scale, then noise it to the first timestep
        mean, logvar = self.vae.encode(pixels.to(self.device, self.dtype) * 2 - 1)
        latents = self.vae.sample(mean, logvar, generator) * self.vae.config.scaling_factor
        noise = randn(latents.shape, generator, self.device, self.dtype)
        latents = schedule.add_noise(latents, noise, timesteps[:1].to(self.device))
        latents = self.denoise(latents, timesteps, context, guidance_scale, schedule, generator, progress,
                               desc="img2img")
        return self.decode(latents)
