"""Loading SD1.5 / SDXL components by Hub id or local folder, and the two encoders every path shares:
images → VAE latent distribution, captions → UNet conditioning. Caching (helpers.data) and training without
caches (helpers.train) call the same functions, so cached and uncached runs condition the UNet identically.
"""
from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from .core.precision import Precision, precision_for
from .core.presets import Preset
from .tiny.world import resolve


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
    pristine: dict = field(default_factory=dict)  # original weights a method overwrites in place (CPU copies)


def weight_dtype_for(preset: Preset, device: torch.device) -> torch.dtype:
    """dtype of the frozen weights: the one fp16 rule of `helpers.core.precision` (fp16 on CUDA, fp32 on CPU unless
    the T4-dtype test mode is on)."""
    return precision_for(preset.mixed_precision, device).weight_dtype


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent pixel: 2 per down-sampling level of the VAE (8 for SD1.5/SDXL's four-level VAE)."""
    return 2 ** (len(vae_config.block_out_channels) - 1)


def from_pretrained(cls, ref: str, subfolder: str | None, dtype: torch.dtype, **kwargs):
    """`cls.from_pretrained` in `dtype`; for fp16 the repository's fp16 variant files when it has them (SDXL's UNet
    is 5.1 GB as fp16 files instead of 10.3 GB in fp32, on a machine with 12.7 GB of RAM), else its plain files.
    The repository is asked which files it has first: diffusers logs a red "An error occurred while trying to
    fetch … Defaulting to unsafe serialization" for a missing variant (the fp16-fix VAE), then loads fine."""
    if subfolder:
        kwargs["subfolder"] = subfolder
    with _no_weight_bars(local=Path(ref).is_dir()):
        if dtype == torch.float16 and has_fp16_variant(ref, subfolder) is not False:
            try:
                return cls.from_pretrained(ref, variant="fp16", dtype=dtype, **kwargs)
            except (OSError, ValueError):  # could not ask (offline) and there is none: the plain files
                pass
        return cls.from_pretrained(ref, dtype=dtype, **kwargs)


@contextmanager
def _no_weight_bars(local: bool):
    """transformers draws a "Loading weights" bar per module it loads from a local folder (the tiny world, a moment
    each): off. From the Hub they stay on, with the downloads' bars (transformers switches both together)."""
    from transformers.utils import logging as transformers_logging
    shown = local and transformers_logging.is_progress_bar_enabled()
    if shown:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


def has_fp16_variant(ref: str, subfolder: str | None = None) -> bool | None:
    """Whether the model folder or Hub repository `ref` has fp16 variant weights (`*.fp16.safetensors` / `.bin`)
    in `subfolder`; None when the Hub cannot be asked (offline)."""
    folder = Path(ref) / (subfolder or "")
    if Path(ref).is_dir():
        return any(".fp16." in p.name for p in folder.iterdir()) if folder.is_dir() else False
    try:
        files = _repo_files(ref)
    except Exception:  # offline or unreachable: try the variant and let the load decide
        return None
    prefix = f"{subfolder}/" if subfolder else ""
    return any(f.startswith(prefix) and "/" not in f[len(prefix):] and ".fp16." in f for f in files)


@lru_cache(maxsize=None)
def _repo_files(repo_id: str) -> tuple[str, ...]:
    from huggingface_hub import list_repo_files
    return tuple(list_repo_files(repo_id))


def _frozen_on(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module.to(device)


def load_components(preset: Preset, device: torch.device | str = "cpu", with_text_encoders: bool = True,
                    precision: Precision | None = None) -> Components:
    """Load the UNet, VAE, tokenizers, text encoders and training scheduler of `preset.model` (+ `preset.vae`).

    Each module goes to `device` as soon as it is loaded, so host RAM holds one component at a time (Colab has
    12.7 GB of RAM for a 6.9 GB SDXL pipeline in fp16)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(device)
    precision = precision or precision_for(preset.mixed_precision, device)
    dtype = precision.weight_dtype
    model = resolve(preset.model)
    vae_ref, vae_sub = (resolve(preset.vae), None) if preset.vae else (model, "vae")
    force_upcast = AutoencoderKL.load_config(vae_ref, subfolder=vae_sub).get("force_upcast", False)
    vae_dtype = precision.vae_dtype(force_upcast, preset.vae_fp32)
    unet = _frozen_on(from_pretrained(UNet2DConditionModel, model, "unet", dtype), device)
    vae = _frozen_on(from_pretrained(AutoencoderKL, vae_ref, vae_sub, vae_dtype), device)
    tokenizers, encoders = [CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")], []
    if preset.family == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2"))
    if with_text_encoders:
        encoders.append(_frozen_on(from_pretrained(CLIPTextModel, model, "text_encoder", dtype), device))
        if preset.family == "sdxl":
            encoders.append(_frozen_on(from_pretrained(CLIPTextModelWithProjection, model, "text_encoder_2", dtype),
                                       device))
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    return Components(preset.family, unet, vae, tokenizers, encoders, scheduler, preset.model,
                      preset.vae or preset.model)


@contextmanager
def on_device(modules: list, device: torch.device):
    """Move `modules` to `device` for the duration (e.g. the VAE and text encoders for sampling), then back to
    where each one was; on CUDA the freed blocks are released, so training gets its memory back."""
    homes = [(m, next(m.parameters()).device) for m in modules if m is not None]
    try:
        for module, _ in homes:
            module.to(device)
        yield
    finally:
        for module, home in homes:
            module.to(home)
        release_cuda_cache()


def release_cuda_cache() -> None:
    """Return cached, unused CUDA blocks (after sampling or a stopped run), so the next phase can use them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_stopped_run() -> None:
    """Before a notebook cell loads models again after a stop (NaN, out of memory, the Stop button): drop what the
    last exception keeps alive. Python keeps it as `sys.last_value` / `last_traceback` / `last_exc` (and IPython's
    traceback printer as `.tb`); its frames hold the stopped trainer, its components and their GPU memory (+4.8 GiB
    for SDXL). Set the cell's own names (`trainer = components = None`) before calling this."""
    for name in ("last_type", "last_value", "last_traceback", "last_exc"):
        if hasattr(sys, name):
            setattr(sys, name, None)
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None and getattr(shell, "InteractiveTB", None) is not None:
        shell.InteractiveTB.tb = None
    release_cuda_cache()


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


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL micro-conditioning per sample: (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def pipeline_class(family: str):
    """The stock diffusers pipeline class of a model family: the one place that maps "sd15"/"sdxl" to a class."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    classes = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
    if family not in classes:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(classes)}")
    return classes[family]


def family_of(pipe) -> str:
    """"sdxl" or "sd15" for a loaded pipeline (img2img pipelines built from its components included)."""
    return "sdxl" if "text_encoder_2" in pipe.components else "sd15"


def pipeline_from_components(components: Components, unet=None, scheduler=None, safety_checker: dict | None = None):
    """A stock diffusers pipeline around already-loaded components (no second copy of the weights). `scheduler`:
    default DPM-Solver++ from the base model's training schedule (samples during training); `safety_checker`: SD1.5's
    checker and feature extractor (`load_safety_checker`), None = none."""
    from diffusers import DPMSolverMultistepScheduler
    if not components.text_encoders:
        raise ValueError("sampling needs the text encoders loaded (load_components(..., with_text_encoders=True))")
    scheduler = scheduler or DPMSolverMultistepScheduler.from_config(components.noise_scheduler.config)
    parts = dict(vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
                 unet=unet if unet is not None else components.unet, scheduler=scheduler)
    if components.family == "sdxl":
        parts.update(text_encoder_2=components.text_encoders[1], tokenizer_2=components.tokenizers[1])
    else:
        checker = safety_checker or {}
        parts.update(safety_checker=checker.get("safety_checker"), feature_extractor=checker.get("feature_extractor"),
                     requires_safety_checker=bool(checker))
    pipe = pipeline_class(components.family)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_scheduler(model: str):
    """The inference scheduler the model's own pipeline uses (model_index.json: PNDM for SD1.5, Euler for SDXL)."""
    import diffusers
    _, name = diffusers.DiffusionPipeline.load_config(model)["scheduler"]
    return getattr(diffusers, name).from_pretrained(model, subfolder="scheduler")


def load_safety_checker(model: str, dtype: torch.dtype, device: torch.device | str) -> dict:
    """SD1.5's safety checker (a CLIP ViT-L/14 vision tower, 304M parameters) and its feature extractor on `device`,
    when the model ships one (its model_index.json lists it); {} when it does not (the tiny models)."""
    import diffusers
    from transformers import CLIPImageProcessor
    checker_class, _ = diffusers.DiffusionPipeline.load_config(model).get("safety_checker", [None, None])
    if checker_class is None:
        return {}
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    checker = _frozen_on(from_pretrained(StableDiffusionSafetyChecker, model, "safety_checker", dtype), device)
    return {"safety_checker": checker,
            "feature_extractor": CLIPImageProcessor.from_pretrained(model, subfolder="feature_extractor")}
