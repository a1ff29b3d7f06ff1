"""The REAL full-size SD1.5 / SDXL architectures on the meta device, and what they hold in memory.

`torch.device("meta")` gives tensors with shapes and dtypes but no storage, so the full UNets, VAEs and text encoders
are built in a second without weights or a download. On them we count parameters exactly, apply the preset's real
adapter (peft LoRA or the attn2 selection) and run forward passes that record memory:
  - training: every tensor autograd saves for the backward pass (split by gradient-checkpoint unit);
  - inference (sampling, caching): the peak of live tensors while the pass runs under `torch.no_grad()`, tracked by
    a TorchDispatchMode that sees every allocation and, through weak references, every free (helpers.plan.live).
Attention runs as PyTorch's memory-efficient SDPA kernel (what a T4 uses): q, k, v, output and log-sum-exp, never
the N×N probabilities. `helpers.plan.memory` turns these measurements into the T4 plan.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..core.configs import (
    CLIP_H14_TEXT,
    CLIP_H14_VISION,
    CLIP_L14_TEXT,
    CLIP_L14_VISION,
    OPENCLIP_BIGG_TEXT,
    SD_VAE,
    TEXT_LORA_TARGETS,
    UNETS,
)
from ..core.presets import Preset
from ..methods.registry import make_method
from ..models import Components, vae_scale_factor

GIB = 2**30

TOKENS = 77  # CLIP context length: every caption is padded to it


def _check_family(family: str) -> None:
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"unknown model family {family!r}; choose 'sd15' or 'sdxl'")


def full_size_unet(family: str):
    """The real SD1.5 or SDXL-base UNet, weightless (meta device)."""
    from diffusers import UNet2DConditionModel
    _check_family(family)
    with torch.device("meta"):
        return UNet2DConditionModel(**UNETS[family])


def full_size_text_encoders(family: str) -> list:
    """CLIP ViT-L/14 text encoder (both families) and, for SDXL, OpenCLIP bigG text encoder with projection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    _check_family(family)
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)))
    return encoders


def full_size_vae():
    from diffusers import AutoencoderKL
    with torch.device("meta"):
        return AutoencoderKL(**SD_VAE)


def full_size_clip():
    """openai/clip-vit-large-patch14 (vision + text towers), the prior's embedding model."""
    from transformers import CLIPConfig, CLIPModel
    with torch.device("meta"):
        return CLIPModel(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION, projection_dim=768))


SCORERS = {"clip": ("open_clip ViT-L-14 (openai)", CLIP_L14_TEXT, CLIP_L14_VISION, 768),
           "pickscore": ("PickScore v1 (CLIP-H-14)", CLIP_H14_TEXT, CLIP_H14_VISION, 1024)}  # name → (label, towers)


@lru_cache(maxsize=None)
def full_size_scorer(name: str):
    """A scorer of SCORERS ("clip": ViT-L/14, "pickscore": CLIP-H/14) as a transformers CLIPModel, weightless."""
    from transformers import CLIPConfig, CLIPModel
    _, text, vision, dim = SCORERS[name]
    with torch.device("meta"):
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim))


@lru_cache(maxsize=None)
def safety_checker_parameters() -> int:
    """Parameters of SD1.5's safety checker (diffusers' StableDiffusionSafetyChecker: a CLIP ViT-L/14 vision tower,
    its projection and the concept embeddings), built on the meta device."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig
    with torch.device("meta"):
        checker = StableDiffusionSafetyChecker(CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION,
                                                          projection_dim=768))
    return _count(checker)


def latent_factor() -> int:
    """Pixels per latent pixel of the SD VAE, by the one rule of `helpers.models` (no hard-coded 8)."""
    return vae_scale_factor(full_size_vae().config)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=None)
def _parameter_counts(family: str) -> tuple[tuple[str, int], ...]:
    counts = [("unet", _count(full_size_unet(family))), ("vae", _count(full_size_vae()))]
    for i, enc in enumerate(full_size_text_encoders(family)):
        counts.append(("text_encoder" + (f"_{i + 1}" if i else ""), _count(enc)))
    return tuple(counts)


def parameter_counts(family: str) -> dict[str, int]:
    """Exact parameter count of each component of the real pipeline: unet, vae, text_encoder(, text_encoder_2)."""
    return dict(_parameter_counts(family))


# ---------------------------------------------------------------- what trains

def crossattn_parameter_count(unet: torch.nn.Module) -> int:
    """Parameters of every cross-attention module (names ending in "attn2": to_q/k/v/out of text conditioning)."""
    return sum(_count(module) for name, module in unet.named_modules() if name.endswith("attn2"))


def _add_lora(model: torch.nn.Module, rank: int, targets, dropout: float = 0.0) -> torch.nn.Module:
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, target_modules=list(targets))
    return inject_adapter_in_model(config, model)


def lora_tensor_sizes(model: torch.nn.Module) -> list[int]:
    return [p.numel() for name, p in model.named_parameters() if "lora_" in name]


def lora_parameter_count(unet: torch.nn.Module, rank: int, targets) -> int:
    """LoRA parameters peft adds for `LoraConfig(r=rank, target_modules=targets)`: peft is applied to a copy of the
    model (meta or real), so `unet` itself is left untouched. Each adapted Linear(in, out) adds rank × (in + out)."""
    if rank < 1 or not targets:
        raise ValueError(f"LoRA needs rank >= 1 and at least one target module (got {rank}, {targets!r})")
    return sum(lora_tensor_sizes(_add_lora(copy.deepcopy(unet), rank, targets)))


def make_trainable(unet: torch.nn.Module, method: str, rank: int, targets, dropout: float,
                   clip_model: str | None = None) -> list[int]:
    """Apply the method's OWN setup (helpers.methods.registry) to `unet` and return each trainable tensor's size, so the
    plan counts exactly what training trains. "full" (every UNet weight) exists only for the calibration reports.
    `clip_model` sets the image-embedding width of an image-conditioned method (ip_adapter)."""
    if method == "full":
        unet.requires_grad_(True)
        return [p.numel() for p in unet.parameters()]
    preset = Preset("memory-plan", "t4", "sd15", "", "", "", method, resolution=512, batch_size=1, grad_accum=1,
                    max_steps=1, learning_rate=1e-4, lora_rank=rank, lora_alpha=rank, lora_dropout=dropout,
                    lora_targets=tuple(targets), clip_model=clip_model)
    components = Components("sd15", unet, vae=None)
    trainer_method = make_method(preset)
    trainer_method.setup(components)
    return [p.numel() for p in trainer_method.trainable_parameters(components).values()]


@lru_cache(maxsize=None)
def text_lora_sizes(family: str, rank: int) -> tuple[int, ...]:
    """Sizes of the LoRA tensors on the text encoder(s) when `train_text_encoder` is on."""
    return tuple(n for e in full_size_text_encoders(family) for n in lora_tensor_sizes(_add_lora(e, rank,
                                                                                                 TEXT_LORA_TARGETS)))


# ---------------------------------------------------------------- attention as the T4 runs it

class _FusedAttentionCost(torch.autograd.Function):
    """Saves for backward exactly what the memory-efficient SDPA kernel saves: q, k, v, output, log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("memory measurement only")


@contextmanager
def efficient_attention():
    """Route diffusers' `F.scaled_dot_product_attention` (UNet and VAE) to the memory-efficient kernel. Meta only."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if q.device.type != "meta":
            raise RuntimeError("memory measurement runs on the meta device only")
        if attn_mask is not None or is_causal:  # CLIP's causal 77-token attention: tiny either way
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
        if torch.is_grad_enabled():
            return _FusedAttentionCost.apply(q, k, v)
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def storages(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}


# ---------------------------------------------------------------- training: saved activations

def unet_inputs(unet, family: str, resolution: int, batch: int, dtype: torch.dtype):
    size = resolution // latent_factor()
    with torch.device("meta"):
        latents = torch.randn(batch, unet.config.in_channels, size, size, dtype=dtype)
        context = torch.randn(batch, TOKENS, unet.config.cross_attention_dim, dtype=dtype)
        extra = {}
        if family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                          "time_ids": torch.randn(batch, 6, dtype=dtype)}
        timesteps = torch.full((batch,), 500)
        if getattr(unet.config, "encoder_hid_dim_type", None) == "ip_image_proj":  # an IP-Adapter is installed
            width = unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features
            extra["added_cond_kwargs"] = {"image_embeds": [torch.randn(batch, 1, width, dtype=dtype)]}
    return (latents, timesteps, context), extra


@lru_cache(maxsize=None)
def measure_training(family: str, method: str, rank: int, targets: tuple, dropout: float, resolution: int,
                     batch: int, fp16: bool, clip_model: str | None = None) -> tuple[tuple[int, ...], int, int]:
    """(trainable tensor sizes, saved bytes without checkpointing, saved bytes with diffusers' checkpointing)."""
    unet = full_size_unet(family)
    sizes = make_trainable(unet, method, rank, targets, dropout, clip_model)
    unet = unet.half() if fp16 else unet  # keeps requires_grad: frozen layers save less (no weight grads)
    unet.train()  # dropout masks (LoRA dropout) are saved too
    weights = storages(unet)  # saved weights are not activations

    # Saved tensors are keyed by storage (views share one), split by checkpoint unit. Diffusers calls the
    # checkpoint function on every unit it checkpoints (each resnet and transformer block); ours runs it normally
    # and notes which unit is active, so one pass yields both the plain and the checkpointed footprint.
    outside, inputs, units, current = {}, {}, [], [None]

    def keep(store, tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            store[storage._cdata] = storage  # holding it keeps the key unique

    def pack(tensor):
        keep(outside if current[0] is None else current[0], tensor)
        return tensor

    def checkpoint_unit(module, *args):
        for a in args:
            if isinstance(a, torch.Tensor):
                keep(inputs, a)  # a checkpoint keeps its inputs alive to recompute from them
        current[0] = {}
        units.append(current[0])
        try:
            return module(*args)
        finally:
            current[0] = None

    unet.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_unit)
    args, extra = unet_inputs(unet, family, resolution, batch, torch.float16 if fp16 else torch.float32)
    with efficient_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(*args, **extra)

    def nbytes(*stores):
        merged = {k: v for store in stores for k, v in store.items()}
        return sum(s.nbytes() for s in merged.values())

    plain = nbytes(outside, *units)
    # checkpointed: what runs outside the units + the units' inputs + one unit recomputed during backward
    checkpointed = nbytes(outside, inputs) + max((nbytes(u) for u in units), default=0)
    return tuple(sizes), plain, checkpointed


def weights_gib(model: str) -> float:
    """fp16 weights of "sd15" / "sdxl" (whole pipeline), a scorer ("clip", "pickscore") or SD1.5's
    "safety_checker", GiB."""
    if model in SCORERS:
        return 2 * sum(p.numel() for p in full_size_scorer(model).parameters()) / GIB
    if model == "safety_checker":
        return 2 * safety_checker_parameters() / GIB
    return 2 * sum(parameter_counts(model).values()) / GIB
