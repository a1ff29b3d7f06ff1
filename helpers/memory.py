"""Predicted GPU memory of a preset on a T4, from the REAL full-size architectures built on the meta device.

`torch.device("meta")` gives tensors with shapes and dtypes but no storage, so the full SD1.5 / SDXL UNets, VAEs
and text encoders are built in a second without weights or a download. On them we count parameters exactly, apply
the preset's real adapter (peft LoRA or the attn2 selection) and run one forward pass that records every tensor
autograd saves for the backward pass: that is the activation memory of training, measured on the architecture.

The estimate (GiB, 2**30 bytes) is a simple sum, documented term by term in `estimate_vram`:
    frozen weights × 2 B (fp16)
  + trainable params × (4 B fp32 weight + 4 B grad + optimizer: 8 B AdamW / 2 B 8-bit AdamW + 2 B fp16 autocast copy)
  + ACTIVATION_SLACK × saved activations (measured)          # the one calibrated constant
  + CUDA_OVERHEAD_GIB                                         # CUDA context, cuBLAS/cuDNN workspaces
It is a rough estimate (± ~1.5 GiB), good for "fits / tight / does not fit" on a 15 GiB T4, not for the last MiB.
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch

from .presets import Preset

GIB = 2**30
T4_USABLE_GIB = 15.0  # a T4's 16 GB shows as 15360 MiB in nvidia-smi; the CUDA context is counted in the estimate

# ---------------------------------------------------------------- the real configs
# Copied from the Hub config.json files (we may not download them): stable-diffusion-v1-5/stable-diffusion-v1-5
# unet/config.json, stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, vae/config.json (identical layout in
# both; SDXL only changes scaling_factor to 0.13025), text_encoder/config.json (openai/clip-vit-large-patch14's text
# tower, in both pipelines) and SDXL's text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower + projection).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
                 center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 mid_block_scale_factor=1)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
                 flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # as the diffusers LoRA scripts adapt CLIP

# ---------------------------------------------------------------- calibrated constants
# Measured saved activations miss what autograd does not save: fp32 copies that autocast makes for group/layer
# norms, the gradient buffers flowing backward, allocator rounding and fragmentation. One factor covers them,
# chosen so the estimate lands on commonly reported totals (fp16, batch 1, gradient checkpointing):
#  - SD1.5 full UNet fine-tune at 512 px with 8-bit Adam: "fits a 16 GB GPU", with xformers "a 12 GB GPU"
#    (diffusers examples/dreambooth/README.md) -> this model says 10.8 GiB (11.2 GiB for the batch of 2 that
#    DreamBooth's prior preservation makes);
#  - SDXL LoRA at 1024 px, text-encoder outputs and latents cached, 8-bit optimizer: "can be done with 8GB GPU
#    memory (10GB recommended)" (kohya-ss/sd-scripts README, SDXL tips); "< 16GB" with 8-bit Adam and fp16
#    (diffusers examples/dreambooth/README_sdxl.md, PR huggingface/diffusers#4470) -> this model says 6.9 GiB
#    (8.8 GiB with both text encoders and the fp32 VAE left on the GPU, as in many 10-12 GB reports).
ACTIVATION_SLACK = 2.0
CUDA_OVERHEAD_GIB = 0.75  # CUDA context (~0.4 GiB on a T4) + cuBLAS/cuDNN workspaces
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2}  # optimizer state per trainable parameter (two moments)


# ---------------------------------------------------------------- full-size models on the meta device

def _check_family(family: str) -> None:
    if family not in ("sd15", "sdxl"):
        raise ValueError(f"unknown model family {family!r}; choose 'sd15' or 'sdxl'")


def full_size_unet(family: str):
    """The real SD1.5 or SDXL-base UNet, weightless (meta device)."""
    from diffusers import UNet2DConditionModel
    _check_family(family)
    with torch.device("meta"):
        return UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))


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


def _lora_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


def lora_parameter_count(unet: torch.nn.Module, rank: int, targets) -> int:
    """LoRA parameters peft adds for `LoraConfig(r=rank, target_modules=targets)`: peft is applied to a copy of the
    model (meta or real), so `unet` itself is left untouched. Each adapted Linear(in, out) adds rank × (in + out)."""
    if rank < 1 or not targets:
        raise ValueError(f"LoRA needs rank >= 1 and at least one target module (got {rank}, {targets!r})")
    return _lora_count(_add_lora(copy.deepcopy(unet), rank, targets))


def _make_trainable(unet: torch.nn.Module, method: str, rank: int, targets, dropout: float) -> int:
    """Freeze `unet` and unfreeze (adding LoRA if needed) what `method` trains; returns that parameter count."""
    unet.requires_grad_(False)
    if method == "crossattn":
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.requires_grad_(True)
    elif method in ("lora", "prior"):  # prior: its UNet side is a LoRA (the prior network itself is not counted)
        _add_lora(unet, rank, targets, dropout)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora_" in name)
    elif method == "full":  # not a preset method; checks this model against full fine-tune reports
        unet.requires_grad_(True)
    else:
        raise ValueError(f"unknown training method {method!r}; known: crossattn, lora, prior, full")
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


# ---------------------------------------------------------------- activations, measured on the meta device

class _FusedAttentionCost(torch.autograd.Function):
    """Attention that saves for backward exactly what PyTorch's memory-efficient SDPA kernel (the one a T4 uses)
    saves: q, k, v, output and the log-sum-exp, not the N×N probabilities the math path would keep. Meta only."""

    @staticmethod
    def forward(ctx, q, k, v):
        if q.device.type != "meta":
            raise RuntimeError("_FusedAttentionCost only measures memory on the meta device")
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("memory measurement only")


class _FusedAttentionProcessor:
    """diffusers attention processor for the UNet's transformer blocks (3-D hidden states, no masks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        batch, inner = q.shape[0], q.shape[-1]

        def heads(t):
            return t.view(batch, -1, attn.heads, inner // attn.heads).transpose(1, 2)

        out = _FusedAttentionCost.apply(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(batch, -1, inner)
        return attn.to_out[1](attn.to_out[0](out))


@lru_cache(maxsize=None)
def _measure(family: str, method: str, rank: int, targets: tuple, dropout: float, resolution: int, batch: int,
             fp16: bool) -> tuple[int, int, int]:
    """(trainable params, saved bytes without checkpointing, saved bytes with diffusers gradient checkpointing)."""
    unet = full_size_unet(family)
    trainable = _make_trainable(unet, method, rank, targets, dropout)
    unet = unet.half() if fp16 else unet  # keeps requires_grad: frozen layers save less (no weight grads)
    unet.train()  # dropout masks (LoRA dropout) are saved too
    unet.set_attn_processor(_FusedAttentionProcessor())
    weights = {id(p.untyped_storage()) for p in unet.parameters()}  # saved weights are not activations

    # Saved tensors are keyed by storage (views share one), split by checkpoint unit. Diffusers calls the
    # checkpoint function on every unit it checkpoints (each resnet and transformer block); ours runs it normally
    # and notes which unit is active, so one pass yields both the plain and the checkpointed footprint.
    outside, inputs, units, current = {}, {}, [], [None]

    def keep(store, tensor):
        storage = tensor.untyped_storage()
        if id(storage) not in weights:
            store[id(storage)] = storage  # holding it keeps id() unique

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
    dtype = torch.float16 if fp16 else torch.float32
    with torch.device("meta"):
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, dtype=dtype)
        context = torch.randn(batch, 77, unet.config.cross_attention_dim, dtype=dtype)
        extra = {}
        if family == "sdxl":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280, dtype=dtype),
                                          "time_ids": torch.randn(batch, 6, dtype=dtype)}
        timesteps = torch.full((batch,), 500)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        unet(latents, timesteps, context, **extra)

    def nbytes(*stores):
        merged = {k: v for store in stores for k, v in store.items()}
        return sum(s.nbytes() for s in merged.values())

    plain = nbytes(outside, *units)
    # checkpointed: what runs outside the units + the units' inputs + one unit recomputed during backward
    checkpointed = nbytes(outside, inputs) + max((nbytes(u) for u in units), default=0)
    return trainable, plain, checkpointed


def activation_gib(preset: Preset, gradient_checkpointing: bool | None = None) -> float:
    """Measured saved activations of one training forward pass of `preset` (GiB, before ACTIVATION_SLACK)."""
    _, plain, checkpointed = _measure(preset.family, preset.method, preset.lora_rank, tuple(preset.lora_targets),
                                      preset.lora_dropout, preset.resolution, preset.batch_size,
                                      preset.mixed_precision == "fp16")
    ckpt = preset.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    return (checkpointed if ckpt else plain) / GIB


# ---------------------------------------------------------------- the estimate

def estimate_vram(preset: Preset) -> dict:
    """Predicted peak GPU memory (GiB) of training `preset` (its t4 form) on a T4, term by term, with a verdict.

    Terms: frozen weights in fp16 (2 B; the UNet minus what trains, + text encoders unless their outputs are cached
    or they train, + the VAE unless latents are cached (fp32 if vae_fp32), + the CLIP model of a prior); trainable
    params × (4 B fp32 weight + 4 B grad + optimizer state + 2 B fp16 copy autocast keeps for the backward);
    ACTIVATION_SLACK × measured saved activations; CUDA_OVERHEAD_GIB. The one-off caching pass (VAE/text encoders
    on small batches) and the prior network itself are not included."""
    if preset.profile != "t4":
        raise ValueError(f"memory estimates describe the real models; pass the t4 form of {preset.name!r} "
                         f"(get_preset({preset.name!r}, 't4')), not its {preset.profile!r} form")
    if preset.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"unknown optimizer {preset.optimizer!r}; known: {sorted(OPTIMIZER_BYTES)}")
    fp16 = preset.mixed_precision == "fp16"
    weight_bytes = 2 if fp16 else 4
    per_trainable = 4 + 4 + OPTIMIZER_BYTES[preset.optimizer] + (2 if fp16 else 0)
    counts = parameter_counts(preset.family)
    trainable, _, _ = _measure(preset.family, preset.method, preset.lora_rank, tuple(preset.lora_targets),
                               preset.lora_dropout, preset.resolution, preset.batch_size, fp16)
    frozen = counts["unet"] - (0 if preset.method in ("lora", "prior") else trainable)
    if preset.train_text_encoder or not preset.cache_text:
        encoders = full_size_text_encoders(preset.family)
        frozen += sum(_count(e) for e in encoders)
        if preset.train_text_encoder:
            trainable += sum(_lora_count(_add_lora(e, preset.lora_rank, TEXT_LORA_TARGETS)) for e in encoders)
    frozen_gib = frozen * weight_bytes / GIB
    if not preset.cache_latents:
        frozen_gib += counts["vae"] * (4 if preset.vae_fp32 else weight_bytes) / GIB
    if preset.clip_model:
        frozen_gib += _count(full_size_clip()) * weight_bytes / GIB
    activations = ACTIVATION_SLACK * activation_gib(preset)
    total = frozen_gib + trainable * per_trainable / GIB + activations + CUDA_OVERHEAD_GIB
    margin = T4_USABLE_GIB - total
    verdict = ("fits" if margin >= 1.5 else "tight (may run out on fragmentation)" if margin >= 0 else
               "does not fit")
    return {"preset": preset.name, "frozen_gib": frozen_gib, "trainable_params": trainable,
            "trainable_gib": trainable * per_trainable / GIB, "activation_gib": activations,
            "overhead_gib": CUDA_OVERHEAD_GIB, "total_gib": total, "usable_gib": T4_USABLE_GIB, "verdict": verdict}


def memory_plan_table(presets) -> str:
    """A fixed-width table (for notebook 00) of the estimate of each t4 preset next to its own claim."""
    header = ("preset", "model", "method", "px×batch", "ckpt", "trainable", "frozen", "train", "activ",
              "total GiB", "preset says", "verdict")
    rows = []
    for p in presets:
        e = estimate_vram(p)
        rows.append((p.name, p.family, p.method, f"{p.resolution}×{p.batch_size}",
                     "yes" if p.gradient_checkpointing else "no", f"{e['trainable_params'] / 1e6:.1f}M",
                     f"{e['frozen_gib']:.1f}", f"{e['trainable_gib']:.2f}", f"{e['activation_gib']:.1f}",
                     f"{e['total_gib']:.1f}", f"{p.min_vram_gb:.0f}", e["verdict"]))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"GiB on a T4 with {T4_USABLE_GIB:.0f} GiB usable; rough estimates (± ~1.5 GiB): helpers/memory.py")
    return "\n".join(lines)


__all__ = ["full_size_unet", "full_size_text_encoders", "full_size_vae", "full_size_clip", "parameter_counts",
           "crossattn_parameter_count", "lora_parameter_count", "activation_gib", "estimate_vram",
           "memory_plan_table", "T4_USABLE_GIB"]
