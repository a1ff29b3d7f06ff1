"""Loading SD1.5 / SDXL components by Hub id or local folder, and the two encoders every path shares:
images → VAE latent distribution, captions → UNet conditioning. Caching (helpers.data) and training without
caches (helpers.train) call the same functions, so cached and uncached runs condition the UNet identically.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .presets import Preset
from .tiny import resolve


@dataclass
class Components:
    """Everything a preset needs, loaded once. Frozen parts are in `weight_dtype` on `device`."""
    family: str  # "sd15" or "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    tokenizers: list = field(default_factory=list)  # one (SD1.5) or two (SDXL)
    text_encoders: list = field(default_factory=list)
    noise_scheduler: object = None  # DDPMScheduler with the base model's training config
    model_ref: str = ""  # what was loaded (Hub id or folder), for cache keys and manifests
    vae_ref: str = ""


def weight_dtype_for(preset: Preset, device: torch.device) -> torch.dtype:
    """fp16 for frozen weights on CUDA (a T4 has no fast bf16); fp32 on CPU, where fp16 is slow and inexact."""
    return torch.float16 if (device.type == "cuda" and preset.mixed_precision == "fp16") else torch.float32


def load_components(preset: Preset, device: torch.device | str = "cpu", with_text_encoders: bool = True
                    ) -> Components:
    """Load the UNet, VAE, tokenizers, text encoders and training scheduler of `preset.model` (+ `preset.vae`)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(device)
    dtype = weight_dtype_for(preset, device)
    model = resolve(preset.model)
    vae_ref, vae_sub = (resolve(preset.vae), None) if preset.vae else (model, "vae")
    # The stock SDXL VAE overflows to NaN in fp16 (its config says force_upcast); the fp16-fix VAE does not.
    force_upcast = AutoencoderKL.load_config(vae_ref, subfolder=vae_sub).get("force_upcast", False)
    vae_dtype = torch.float32 if (preset.vae_fp32 or force_upcast) else dtype
    vae = AutoencoderKL.from_pretrained(vae_ref, subfolder=vae_sub, dtype=vae_dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", dtype=dtype)
    tokenizers, encoders = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")], []
    if preset.family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
    if with_text_encoders:
        encoders.append(CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=dtype))
        if preset.family == "sdxl":
            encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2",
                                                                        dtype=dtype))
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
        module.eval()
    unet.to(device)
    vae.to(device)
    for enc in encoders:
        enc.to(device)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return Components(preset.family, unet, vae, tokenizers, encoders, scheduler, preset.model,
                      preset.vae or preset.model)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's 77 positions, as the pipelines do."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(family: str, tokenizers: list, text_encoders: list, captions: list[str]
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions → (encoder_hidden_states, pooled) exactly as the diffusers pipelines build them.

    SD1.5: the last hidden state of the CLIP text encoder; no pooled output.
    SDXL: both encoders' penultimate hidden states concatenated on the feature axis (768 + 1280 = 2048), and the
    second encoder's projected pooled output (1280) for the `text_embeds` addition embedding.
    """
    if family == "sd15":
        enc = text_encoders[0]
        ids = tokenize(tokenizers[0], captions).to(enc.device)
        return enc(ids)[0], None
    hidden, pooled = [], None
    for tokenizer, enc in zip(tokenizers, text_encoders):
        out = enc(tokenize(tokenizer, captions).to(enc.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def encode_images(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → the VAE's latent distribution parameters (mean ‖ logvar, 2 × 4 channels).

    Keeping the distribution (not one sample) lets training draw a fresh, seeded sample each time, the same
    whether the parameters came from a cache or from the VAE just now.
    """
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    return vae.encode(pixel_values).latent_dist.parameters


def sample_latents(vae_config, latent_params: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """Draw latents from stored distribution parameters and apply the VAE's scaling (and shift, if any)."""
    mean, logvar = latent_params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device if generator is None else
                        generator.device).to(mean.device)
    latents = mean + std * noise
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def pipeline_from_components(c: Components, unet=None):
    """A stock diffusers pipeline around already-loaded components (no second copy of the weights), for samples
    during training. The scheduler is the base model's own (from its scheduler/ folder)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    if not c.text_encoders:
        raise ValueError("sampling needs the text encoders loaded (load_components(..., with_text_encoders=True))")
    scheduler = DPMSolverMultistepScheduler.from_config(c.noise_scheduler.config)
    unet = unet if unet is not None else c.unet
    if c.family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=c.vae, text_encoder=c.text_encoders[0], text_encoder_2=c.text_encoders[1],
                                         tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1], unet=unet,
                                         scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=c.vae, text_encoder=c.text_encoders[0], tokenizer=c.tokenizers[0],
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
