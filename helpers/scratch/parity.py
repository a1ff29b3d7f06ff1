"""The proof, not the model: every scratch part next to its diffusers / transformers reference on the same weights.

This is the one file under helpers/scratch that imports diffusers and transformers model classes (the test suite
checks that no other file does, and that the scratch modules import without them). Tests and notebook 06 use it to
build references with the same configs and to compute the parity table.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .clip import CLIPTextConfig, tokenize
from .ddpm import NoiseSchedule
from .pipeline import StableDiffusion, to_pil
from .unet import UNetConfig
from .vae import VAEConfig

# ---------------------------------------------------------------- references with the same configs

def reference_unet(cfg: UNetConfig):
    from diffusers import UNet2DConditionModel
    levels = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=8, in_channels=cfg.in_channels, out_channels=cfg.out_channels, block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.heads,
        norm_num_groups=cfg.groups, norm_eps=cfg.eps, transformer_layers_per_block=cfg.transformer_depth,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attention),
        up_block_types=tuple("CrossAttnUpBlock2D" if cfg.cross_attention[levels - 1 - i] else "UpBlock2D"
                             for i in range(levels)))


def reference_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL
    levels = len(cfg.channels)
    return AutoencoderKL(in_channels=cfg.image_channels, out_channels=cfg.image_channels,
                         latent_channels=cfg.latent_channels, block_out_channels=cfg.channels,
                         down_block_types=("DownEncoderBlock2D",) * levels,
                         up_block_types=("UpDecoderBlock2D",) * levels,
                         layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.groups,
                         scaling_factor=cfg.scaling_factor)


def reference_text_encoder(cfg: CLIPTextConfig):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel
    return CLIPTextModel(HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_width,
                                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                  max_position_embeddings=cfg.max_tokens, layer_norm_eps=cfg.eps,
                                  hidden_act="quick_gelu"))


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Jitter every 1-d parameter (norm scales/shifts, biases). Default init leaves all norms at 1/0, under which a
    swapped or missing norm weight would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        if param.ndim == 1:
            param.add_(scale * torch.randn(param.shape, generator=generator).to(param))
    return module


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return (a.float() - b.float()).abs().max().item()


def load_reference(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   variant: str | None = None):
    """StableDiffusionPipeline from the same folder with its scheduler swapped for DDIM (same config). Without a
    `variant`, the fp16 files are used when the folder has them (as fetch_diffusers_folder downloads)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    if variant is None and any((Path(folder) / "unet").glob("*.fp16.safetensors")):
        variant = "fp16"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, variant=variant,
                                                   safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------- the parity table

@torch.no_grad()
def parity_table(sd: StableDiffusion, reference, prompt: str = "a red circle on a blue sky", steps: int = 4,
                 size: int | None = None, seed: int = 0) -> list[tuple[str, str, float]]:
    """(component, shape, max |scratch − reference|) for each part and both pipelines, on random inputs."""
    from diffusers import DDPMScheduler, StableDiffusionImg2ImgPipeline
    size, device, dtype = size or sd.default_size, sd.device, sd.dtype
    down, gen = sd.vae.config.downscale, torch.Generator().manual_seed(seed)
    rows = []

    def row(name, ours, theirs):
        rows.append((name, "×".join(map(str, ours.shape)), max_abs_diff(ours, theirs)))

    ids = tokenize(sd.tokenizer, [prompt, ""]).to(device)
    row("text encoder", sd.text_encoder(ids), reference.text_encoder(ids)[0])
    image = (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(device, dtype)
    mean, logvar = sd.vae.encode(image)
    posterior = reference.vae.encode(image).latent_dist
    row("VAE encode (mean)", mean, posterior.mean)
    row("VAE encode (log-variance)", logvar, posterior.logvar)
    latents = torch.randn(2, 4, size // down, size // down, generator=gen).to(device, dtype)
    row("VAE decode", sd.vae.decode(latents), reference.vae.decode(latents).sample)
    context = sd.text_encoder(ids)
    row("UNet (t = 500)", sd.unet(latents, 500, context), reference.unet(latents, 500, context).sample)

    ours, ddpm = NoiseSchedule(sd.schedule), DDPMScheduler.from_config(reference.scheduler.config)
    reference.scheduler.set_timesteps(50)
    row("scheduler ᾱ (DDPM)", ours.alphas_cumprod, ddpm.alphas_cumprod)
    row("DDIM timesteps (50 steps)", ours.timesteps(50), reference.scheduler.timesteps)

    pt = dict(num_inference_steps=steps, output_type="pt", height=size, width=size)
    theirs = reference(prompt, negative_prompt="blurry", generator=torch.Generator().manual_seed(seed), **pt).images
    row(f"txt2img (DDIM {steps} steps, CFG 7.5)",
        sd.txt2img(prompt, "blurry", steps=steps, height=size, width=size, seed=seed, progress=False), theirs)
    init = to_pil(theirs.float())[0]
    img2img = StableDiffusionImg2ImgPipeline(**reference.components, requires_safety_checker=False)
    img2img.set_progress_bar_config(disable=True)
    pt.pop("height"), pt.pop("width")
    theirs = img2img(prompt, init, strength=0.6, generator=torch.Generator().manual_seed(seed), **pt).images
    row("img2img (DDIM, strength 0.6)", sd.img2img(prompt, init, 0.6, steps=steps, seed=seed, progress=False),
        theirs)
    return rows


def markdown_table(rows: list[tuple[str, str, float]]) -> str:
    lines = ["| component | output shape | max abs difference |", "|---|---|---|"]
    return "\n".join(lines + [f"| {name} | {shape} | {diff:.2e} |" for name, shape, diff in rows])

