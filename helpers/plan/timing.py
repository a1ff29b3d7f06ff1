"""How long a notebook takes on a free Colab T4: counted FLOPs times one calibrated speed, plus what every fresh VM
spends on installs and downloads. Every time a notebook prints comes from here, with its range.

The UNet's forward FLOPs are counted exactly on the real architecture on the meta device (torch's FlopCounterMode,
no weights). A training image costs `passes` forward-sized passes: the forward, the backward to the activations (the
weight gradients of LoRA / attn2 are a small extra) and, with gradient checkpointing, the forward once more. One
number turns FLOPs into seconds, the published T4 figure for SDXL LoRA at 1024 px (fp16, 8-bit AdamW, gradient
checkpointing, rank 16): the HF SDXL DreamBooth LoRA notebook's 7.96 s per step of 3 images (2.65 s/image). A
second report agrees: in diffusers PR #4470 train_dreambooth_lora_sdxl at batch 1 × accumulation 4, 500 steps,
took ≈ 1 h 30 min on a free T4 at 1024 px (2.7 s/image), while the same thread first saw ≈ 3 h untuned.
Uncertainty (`RANGE`): ×½ to ×2 at the anchor's own setting (SDXL training at 1024 px: one report each, and a 2×
spread between tuned and untuned runs); ×½ to ×3 wherever FLOPs extrapolate from it (smaller images, SD1.5,
inference), because a T4 is memory-bandwidth-bound there and runs below the anchor's FLOP efficiency.

A fresh Colab VM also installs the requirements and downloads every model and data set it uses (only Drive lasts):
file sizes are the real parameter counts (meta device) × the bytes per weight of the files fetched, at
DOWNLOAD_MB_S. Estimates, not measurements.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..core.configs import SD_VAE
from ..core.presets import Preset
from ..methods.priors import condition, make_network
from .meta import (
    SCORERS,
    full_size_clip,
    full_size_scorer,
    full_size_unet,
    full_size_vae,
    parameter_counts,
    safety_checker_parameters,
)

# The calibration point: SDXL LoRA r16 on a free Colab T4, 1024 px, gradient checkpointing, fp16, 8-bit AdamW.
PUBLISHED = dict(family="sdxl", resolution=1024, images_per_step=3, seconds_per_step=7.96, checkpointing=True)
TFLOP = 1e12


@lru_cache(maxsize=None)
def unet_forward_tflop(family: str, resolution: int) -> float:
    """TFLOPs of one UNet forward pass for one image at `resolution` (counted on the meta device)."""
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


@lru_cache(maxsize=None)
def scorer_tflop(model: str) -> float:
    """TFLOPs to score one image with a scorer of SCORERS: the vision tower at its input size (texts are encoded
    once per prompt). Also what a CLIP image embedding costs (notebook 04's cache)."""
    clip = full_size_scorer(model).half()
    size = SCORERS[model][2]["image_size"]
    with torch.device("meta"):
        pixels = torch.randn(1, 3, size, size, dtype=torch.float16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    return counter.get_total_flops() / TFLOP


@lru_cache(maxsize=None)
def vae_encode_tflop(resolution: int) -> float:
    """TFLOPs of one VAE encode of one image at `resolution` (the latent cache; counted on the meta device)."""
    vae = full_size_vae().half()
    with torch.device("meta"):
        x = torch.randn(1, 3, resolution, resolution, dtype=torch.float16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(x)
    return counter.get_total_flops() / TFLOP


def caching_seconds(preset: Preset, images: int) -> float:
    """Building the caches of `images` pictures: a VAE encode each (both orientations with random flips), and with
    a CLIP (notebook 04) its image embedding."""
    work = vae_encode_tflop(preset.resolution) * (2 if preset.random_flip else 1) * preset.cache_latents
    work += scorer_tflop("clip") if preset.clip_model else 0.0  # ViT-L/14's vision tower, the scorer's own
    return images * work * seconds_per_tflop()


@lru_cache(maxsize=None)
def prior_training_seconds(preset: Preset) -> float:
    """Training a prior (notebook 04 part 2): its forward FLOPs at the preset's batch, counted on the meta device,
    × 3 (forward, and a backward twice its size: every weight trains) × max_steps."""
    dim, b, tokens = full_size_clip().config.projection_dim, preset.batch_size, preset.prior_text_tokens
    with torch.device("meta"):
        net = make_network(preset, dim)
        text, states = torch.randn(b, dim), torch.randn(b, tokens, dim)
        masks = torch.ones(b, tokens, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(text) if preset.method == "mlp_prior" else net(text, torch.full((b,), 500, device="meta"),
                                                            **condition(text, states if tokens else None, masks))
    return 3 * counter.get_total_flops() / TFLOP * preset.max_steps * seconds_per_tflop()


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


RANGE = {"anchor": (0.5, 2.0), "extrapolated": (0.5, 3.0), "download": (0.5, 2.0)}  # (low, high) × the estimate


def span(seconds: float, kind: str = "extrapolated") -> str:
    """"≈ 4.5 h (2.3 h–9.1 h)": the estimate and its range (RANGE[kind])."""
    low, high = RANGE[kind]
    return f"≈ {duration(seconds)} ({duration(seconds * low)}–{duration(seconds * high)})"


def training_kind(preset: Preset) -> str:
    """"anchor" where the preset trains at the calibration point's family and size, else "extrapolated"."""
    p = PUBLISHED
    return "anchor" if (preset.family, preset.resolution) == (p["family"], p["resolution"]) else "extrapolated"


# ---------------------------------------------------------------- a fresh VM: installs and downloads

DOWNLOAD_MB_S = 40.0  # one Hub file per connection: ≈ 40 MB/s (huggingface_hub#2658); not measured on Colab
INSTALL_SECONDS = 60.0  # `pip install -r requirements.txt` on a fresh Colab: upgrades diffusers and huggingface_hub,
#                         adds bitsandbytes, open_clip, nbval (≈ 80 MB of wheels) and resolves; assumed, not measured
DATA_MB = {"uoft-cs/cifar10": 144, "lambdalabs/naruto-blip-captions": 701}  # the Hub datasets' parquet files
#   (download_size in cifar10's README; naruto's two parquet files, 344 + 357 MB)


DOWNLOADS = {"sd15": "SD1.5", "sdxl": "SDXL + fp16-fix VAE", "safety_checker": "SD1.5 safety checker",
             "clip": "CLIP ViT-L-14 scorer", "clip_l14": "CLIP ViT-L/14 (the prior's)", "pickscore": "PickScore"}


def model_download_mb(model: str) -> float:
    """MB a fresh VM downloads for `model`: "sd15" / "sdxl" (the pipeline's fp16 variant files; SDXL with the
    fp16-fix VAE, fp32 files), "safety_checker" (SD1.5's, fp16 files), "clip" (open_clip ViT-L-14 openai, fp32),
    "clip_l14" (openai/clip-vit-large-patch14 for transformers, fp32) or "pickscore" (CLIP-H, fp32)."""
    if model in ("sd15", "sdxl"):
        counts = parameter_counts(model)
        vae = 4 if model == "sdxl" else 2  # madebyollin/sdxl-vae-fp16-fix has fp32 files only
        return (2 * (sum(counts.values()) - counts["vae"]) + vae * counts["vae"]) / 1e6
    if model == "safety_checker":
        return 2 * safety_checker_parameters() / 1e6
    scorer = full_size_scorer("clip" if model == "clip_l14" else model)
    return 4 * sum(p.numel() for p in scorer.parameters()) / 1e6  # fp32 files


def setup_seconds(models: list[str], data: list[str] = ()) -> tuple[float, str]:
    """(seconds, what) a fresh VM spends before its first step: INSTALL_SECONDS + every download at
    DOWNLOAD_MB_S."""
    mb = {DOWNLOADS[m]: model_download_mb(m) for m in models} | {d.split("/")[-1]: DATA_MB[d] for d in data}
    what = ", ".join(f"{name} {size / 1000:.1f} GB" for name, size in mb.items())
    return INSTALL_SECONDS + sum(mb.values()) / DOWNLOAD_MB_S, f"installs + downloads ({what})"


DATA_IMAGES = {"uoft-cs/cifar10": 50_000, "lambdalabs/naruto-blip-captions": 1_221}  # training pictures


def run_time_plan(preset: Preset, drawn: int, steps: int, size: int | None = None, models: tuple = ("clip",),
                  extra: tuple = ()) -> str:
    """A training notebook's `time_plan` for the t4 form `preset`: a fresh VM's installs and downloads (its
    pipeline, `models`, its data set), the caches, the training run, `extra` rows (what, seconds, kind), and
    drawing `drawn` images at `size` (default: the preset's resolution) with `steps` denoising steps."""
    size = size or preset.resolution
    pictures = min(preset.max_train_images or 10**9, DATA_IMAGES.get(preset.data_ref, 0))
    setup, what = setup_seconds([preset.family, *models], [preset.data_ref] if preset.data_ref in DATA_MB else [])
    rows = [(what, setup, "download"), (f"caches of {pictures:,} pictures", caching_seconds(preset, pictures),
                                        "extrapolated"),
            (f"training {preset.max_steps} steps × {preset.images_per_step} images at {preset.resolution} px",
             training_estimate(preset)["total_seconds"], training_kind(preset)), *extra,
            (f"drawing {drawn} images at {size} px, {steps} steps", generation_seconds(preset.family, size, steps,
                                                                                        drawn), "extrapolated")]
    return time_plan(rows)


def time_plan(rows: list[tuple[str, float, str]]) -> str:
    """A notebook's time on a T4, row by row: (what, seconds, RANGE kind), then the total with its range."""
    lines = [f"  {what}: {span(seconds, kind)}" for what, seconds, kind in rows]
    total = sum(s for _, s, _ in rows)
    low = sum(s * RANGE[k][0] for _, s, k in rows)
    high = sum(s * RANGE[k][1] for _, s, k in rows)
    return "\n".join(["time on a free Colab T4 (estimates, helpers.plan.timing):", *lines,
                      f"  in all ≈ {duration(total)} ({duration(low)}–{duration(high)}); anchored on 2.65 s per "
                      "1024 px SDXL training image (HF SDXL DreamBooth LoRA notebook; diffusers PR #4470: 2.7 s), "
                      "±2× there, ×½–×3 where extrapolated, downloads at ≈ 40 MB/s ±2×"])
