"""The memory model of a T4 run: GPU memory of every phase of a preset, host RAM while loading, checkpoint MB.

Everything is computed from the REAL full-size architectures on the meta device (`helpers.plan.meta`: exact
parameter counts, the preset's real adapter, measured activations) and modelled phase by phase exactly as the code
runs on a T4 (GiB = 2**30 bytes; the peak is the largest phase):
  caching   UNet + VAE + text encoders in fp16 (VAE fp32 if vae_fp32 / force_upcast) while the latent cache
            (VAE batches of max(1, 32·256²/px²) images) and the text cache (batches of 32 captions) are built;
            with a CLIP (notebook 04) also its fp16 weights and the image-embedding cache (helpers.data.embeddings:
            batches of IMAGE_BATCH images at the CLIP's size), the largest of these batches setting the peak;
            loading puts the same weights on the GPU one module at a time, so it never exceeds this phase;
  training  cached encoders leave the GPU; UNet frozen fp16 + trainable fp32 + fp32 grads + optimizer state +
            ACTIVATION_SLACK × measured saved activations. autocast's fp16 copies of trainable weights live in the
            forward and are freed as the backward makes the grads (4 B > 2 B), so grads, not copies, set the peak;
  sampling  grads freed, cache emptied, text encoders + VAE back on the GPU; CFG UNet batch = 2 × images per call
            (1 from 768 px up, else up to 4), VAE slicing + tiling: INFERENCE_SLACK × the larger of the UNet pass
            and one image's decode (measured live tensors under no_grad), on top of the training state.
A prior preset (notebook 04, helpers.prior) trains on cached CLIP embeddings while notebook 04's image-conditioned
SD1.5 (the adapter preset, planned as above) may still be loaded: its phases are that plan's (`prior_plan`) plus the
prior's fp32 weights, grads, Adam moments, EMA and measured activations.
This module is the model; helpers.plan.calibration measures its error on published reports and
helpers.plan.memory turns its phases into a verdict (peak + error band + 1 GiB ≤ T4_USABLE_GIB).
"""
from __future__ import annotations

from functools import lru_cache
from html import escape
from math import ceil

import torch

from ..core.presets import CLIP_L14, SD15, SDXL, SDXL_VAE_FIX, Preset, get_preset
from ..data.caches import CACHE_ENCODE_PIXELS
from ..data.embeddings import IMAGE_BATCH
from ..generate.sampling import images_per_call as rule
from ..methods.priors import ADAPTER_PRESET, condition, make_network
from .live import (
    clip_image_encode_bytes,
    prior_predict_bytes,
    text_encode_bytes,
    unet_inference_bytes,
    vae_decode_bytes,
    vae_encode_bytes,
)
from .meta import (
    GIB,
    efficient_attention,
    full_size_clip,
    measure_training,
    parameter_counts,
    storages,
    text_lora_sizes,
    weights_gib,
)

T4_USABLE_GIB = 14.74  # what torch reports as a Colab T4's "total capacity" (16 GB board, ECC and reserve off)
MARGIN_GIB = 1.0  # kept free beyond the error band: allocator fragmentation, a stray tensor
COLAB_RAM_GIB = 12.7  # Colab's RAM gauge (MemTotal ≈ 13.3 M kB)

# ---------------------------------------------------------------- constants and where they come from
ACTIVATION_SLACK = 2.0  # peak / measured saved activations: fp32 norm copies under autocast, backward buffers,
#                         allocator rounding. Fitted on the ShivamShrirao T4 DreamBooth table (calibration_table)
INFERENCE_SLACK = 1.69 # peak / measured live tensors of a no_grad pass: autocast fp32 norm copies, cuDNN
#                        workspaces. Fitted so the two SDXL inference reports err equally (see calibration_table)
CUDA_CONTEXT_GIB = 0.4  # CUDA context + kernels on a T4, outside torch's allocator (absent from max_memory_allocated)
CUDA_OVERHEAD_GIB = CUDA_CONTEXT_GIB + 0.35  # + cuBLAS/cuDNN handles and workspaces inside the allocator
HOST_BASELINE_GIB = 2.0  # host RAM before any weight: 0.76 GiB RSS measured for python + torch + diffusers +
#                          transformers + peft + helpers (scripts/memory_host_ram.py, CPU torch), ≈ 0.75 GiB assumed
#                          for CUDA torch's libraries and context on the host, ≈ 0.5 GiB assumed for Colab's own
#                          processes that its RAM gauge also counts
EIGHT_BIT_MIN_SIZE, EIGHT_BIT_BLOCK = 4096, 256  # bitsandbytes AdamW8bit: smaller tensors keep fp32 state; one fp32
#                                                  absmax per 256-element block and moment (optim/optimizer.py)
SAFETENSORS_TENSOR_BYTES = 140  # header entry per tensor in trainable.safetensors
TORCH_SAVE_ENTRY_BYTES = 800  # optimizer.pt: pickle + zip record per parameter's state (measured on tiny runs)
SMALL_FILES_BYTES = 18_000  # state.pt (RNG states ≈ 12 KB, scheduler, scaler) + meta.json + manifest.json
VAE_FORCE_UPCAST = {SD15: False, SDXL: True, SDXL_VAE_FIX: False}  # force_upcast in each VAE's config.json
HAS_FP16_VARIANT = {SD15: True, SDXL: True, SDXL_VAE_FIX: False, CLIP_L14: False}  # *.fp16.* files in the Hub repo


def gib(n_bytes: float) -> float:
    return n_bytes / GIB


def optimizer_state_bytes(sizes, optimizer: str) -> int:
    """Bytes of optimizer state for trainable tensors of these sizes: torch AdamW keeps two fp32 moments (8 B);
    bitsandbytes AdamW8bit keeps two uint8 moments + an fp32 absmax per block of 256, fp32 below 4096 elements."""
    if optimizer == "adamw":
        return sum(8 * n for n in sizes)
    if optimizer == "adamw8bit":
        return sum(8 * n if n < EIGHT_BIT_MIN_SIZE else 2 * n + 8 * ceil(n / EIGHT_BIT_BLOCK) for n in sizes)
    raise ValueError(f"unknown optimizer {optimizer!r}; known: adamw, adamw8bit")


def checkpoint_mb(sizes, optimizer: str) -> float:
    """MB (10^6 B) of one checkpoint folder: trainable.safetensors (fp32) + optimizer.pt + the small files."""
    sizes = list(sizes)
    n_bytes = (4 * sum(sizes) + SAFETENSORS_TENSOR_BYTES * len(sizes) + optimizer_state_bytes(sizes, optimizer)
               + TORCH_SAVE_ENTRY_BYTES * len(sizes) + SMALL_FILES_BYTES)
    return n_bytes / 1e6


def load_ram_gib(parameters: int, fp16_file: bool) -> float:
    """Peak host RAM (baseline included) while one component is loaded in fp16 and moved to the GPU. A safetensors
    file is memory-mapped: loaded in its own dtype its pages are only read while the module is copied to the GPU;
    an fp32 file loaded with dtype=fp16 is read whole (file pages) AND converted into a new fp16 copy (anonymous
    memory), both at once (modeling_utils → load_model_dict_into_meta: param.to(dtype)). Measured on SD1.5's UNet
    by scripts/memory_host_ram.py: fp16 files +1.6 GiB, fp32 file → fp16 +4.8 GiB (3.2 file + 1.6 copy)."""
    return HOST_BASELINE_GIB + gib(2 * parameters if fp16_file else 4 * parameters + 2 * parameters)


def host_ram_gib(preset: Preset, fp16_variant: bool = True) -> float:
    """Peak host RAM while loading the components of `preset` one at a time (helpers.models.load_components, which
    training and every inference pipeline use): baseline + the largest component (`load_ram_gib`), the CLIP of an
    image-conditioned preset included."""
    counts = parameter_counts(preset.family)
    components = [(preset.model, counts["unet"]), (preset.vae or preset.model, counts["vae"]),
                  *((preset.model, counts[k]) for k in counts if k.startswith("text_encoder"))]
    if preset.clip_model:
        components.append((preset.clip_model, parameter_counts_clip()))
    return max(load_ram_gib(n, fp16_variant and HAS_FP16_VARIANT.get(ref, False)) for ref, n in components)


def images_per_call(resolution: int, prompts: int) -> int:
    """Images per sampling call, by helpers.generate.sampling's own rule (1 from 768 px up, else up to 4) for `prompts`."""
    return max(1, min(prompts, rule(resolution, resolution)))


def activation_gib(preset: Preset, gradient_checkpointing: bool | None = None) -> float:
    """Measured saved activations of one training forward pass of `preset` (GiB, before ACTIVATION_SLACK)."""
    _, plain, checkpointed = measure_training(preset.family, preset.method, preset.lora_rank,
                                              tuple(preset.lora_targets), preset.lora_dropout, preset.resolution,
                                              preset.batch_size, preset.mixed_precision == "fp16", preset.clip_model)
    ckpt = preset.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    return gib(checkpointed if ckpt else plain)


def inference_peak_gib(family: str, resolution: int, images: int, vae_fp32: bool, sliced: bool, tiled: bool) -> float:
    """INFERENCE_SLACK × the larger of one CFG UNet step (batch 2 × images) and the VAE decode (1 image if sliced)."""
    unet = unet_inference_bytes(family, resolution, 2 * images)
    decode = vae_decode_bytes(resolution, 1 if sliced else images, vae_fp32, tiled and resolution >= 768)
    return INFERENCE_SLACK * gib(max(unet, decode))


# ---------------------------------------------------------------- the plan of one preset

def training_plan(preset: Preset, encode_pixels: int = CACHE_ENCODE_PIXELS) -> dict:
    """Every term of the T4 plan of a pipeline preset (its t4 form) before the error band: GiB by part and by phase,
    the peak, host RAM while loading and checkpoint MB. See the module docstring for what each phase holds.
    `encode_pixels` sets the latent-cache batch (images × px² per VAE call) to try another caching rule."""
    fp16 = preset.mixed_precision == "fp16"
    frozen_bytes = 2 if fp16 else 4
    counts = parameter_counts(preset.family)
    sizes, plain, checkpointed = measure_training(preset.family, preset.method, preset.lora_rank,
                                                  tuple(preset.lora_targets), preset.lora_dropout,
                                                  preset.resolution, preset.batch_size, fp16, preset.clip_model)
    sizes = list(sizes)
    in_unet = sum(sizes) if preset.method in ("crossattn", "full") else 0  # LoRA adds parameters, attn2 converts
    if preset.train_text_encoder:
        sizes += text_lora_sizes(preset.family, preset.lora_rank)
    trainable = sum(sizes)
    vae_fp32 = preset.vae_fp32 or VAE_FORCE_UPCAST.get(preset.vae or preset.model, False) or not fp16
    text_count = sum(n for k, n in counts.items() if k.startswith("text_encoder"))
    part = {"unet": gib(frozen_bytes * (counts["unet"] - in_unet)),
            "text_encoders": gib(frozen_bytes * text_count),
            "vae": gib((4 if vae_fp32 else 2) * counts["vae"]),
            "clip": gib(frozen_bytes * parameter_counts_clip()) if preset.clip_model else 0.0}
    trainable_gib, grads_gib = gib(4 * trainable), gib(4 * trainable)
    optimizer_gib = gib(optimizer_state_bytes(sizes, preset.optimizer))
    autocast_gib = gib(2 * trainable) if fp16 else 0.0
    activations = ACTIVATION_SLACK * gib(checkpointed if preset.gradient_checkpointing else plain)
    text_stays = preset.train_text_encoder or not preset.cache_text
    encoders = part["text_encoders"] * text_stays + part["vae"] * (not preset.cache_latents)

    # caching: every module in fp16 (attn2 not yet fp32), encoders busy on batches
    encode = 0.0
    if preset.cache_latents:
        batch = max(1, encode_pixels // preset.resolution**2)
        encode = gib(vae_encode_bytes(preset.resolution, batch, vae_fp32))
    if preset.cache_text and not preset.train_text_encoder:
        encode = max(encode, gib(text_encode_bytes(preset.family, 32)))
    clip_encode = 0.0
    if preset.clip_model:
        clip_encode = gib(clip_image_encode_bytes(IMAGE_BATCH))
        encode = max(encode, clip_encode)
    all_weights = gib(frozen_bytes * counts["unet"]) + part["text_encoders"] + part["vae"] + part["clip"]
    caching = all_weights + INFERENCE_SLACK * encode + CUDA_OVERHEAD_GIB
    resident = part["unet"] + part["clip"] + trainable_gib + optimizer_gib + CUDA_OVERHEAD_GIB
    training = resident + encoders + grads_gib + activations
    per_call = images_per_call(preset.resolution, len(preset.sample_prompts) or 1)
    sample = inference_peak_gib(preset.family, preset.resolution, per_call, vae_fp32, True, True)
    sampling = resident + part["text_encoders"] + part["vae"] + autocast_gib + sample
    phases = {"caching": caching, "training": training, "sampling": sampling}
    peak_phase = max(phases, key=phases.get)
    writes = preset.max_steps // preset.checkpoint_every + (preset.max_steps % preset.checkpoint_every > 0)
    ckpt = checkpoint_mb(sizes, preset.optimizer)
    return {"preset": preset.name, "encode_batch": max(1, encode_pixels // preset.resolution**2), "parts_gib": part,
            "trainable_params": trainable, "trainable_gib": trainable_gib,
            "grads_gib": grads_gib, "optimizer_gib": optimizer_gib, "autocast_copy_gib": autocast_gib,
            "weights_gib": all_weights,  # every module as loading puts it on the GPU (≤ the caching phase)
            "activation_gib": activations, "sampling_activation_gib": sample, "images_per_call": per_call,
            "clip_encode_gib": INFERENCE_SLACK * clip_encode,
            "overhead_gib": CUDA_OVERHEAD_GIB, "phases_gib": phases, "peak_phase": peak_phase,
            "total_gib": phases[peak_phase], "host_ram_gib": host_ram_gib(preset),
            "host_ram_no_variant_gib": host_ram_gib(preset, False),
            "checkpoint_mb": ckpt, "checkpoints_written": writes, "drive_mb": ckpt * min(writes, preset.keep_checkpoints)}


def parameter_counts_clip() -> int:
    return sum(p.numel() for p in full_size_clip().parameters())


# ---------------------------------------------------------------- a prior on top of the adapter's plan

PRIOR_METHODS = ("mlp_prior", "diffusion_prior")


@lru_cache(maxsize=None)
def _prior_measure(preset: Preset) -> tuple[tuple[int, ...], int]:
    """(trainable tensor sizes, saved activation bytes of one fp16 training forward) of the prior of `preset`, built
    by helpers.prior itself on the meta device for the CLIP's embedding width."""
    import torch
    dim = full_size_clip().config.projection_dim
    with torch.device("meta"):
        net = make_network(preset, dim).half().train()
    sizes = tuple(p.numel() for n, p in net.named_parameters() if not n.startswith("clip_"))
    weights, saved = storages(net), {}

    def pack(tensor):
        if tensor.untyped_storage()._cdata not in weights:
            saved[tensor.untyped_storage()._cdata] = tensor.untyped_storage()
        return tensor

    b, tokens, half = preset.batch_size, preset.prior_text_tokens, torch.float16
    with torch.device("meta"):
        x, text = torch.randn(b, dim, dtype=half), torch.randn(b, dim, dtype=half)
        states, masks = torch.randn(b, tokens, dim, dtype=half), torch.ones(b, tokens, dtype=torch.bool)
        with efficient_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if preset.method == "mlp_prior":
                net(text)
            else:
                net(x, torch.full((b,), 500), **condition(text, states if tokens else None, masks))
    return sizes, sum(s.nbytes() for s in saved.values())


def prior_predict_gib(preset: Preset) -> float:
    """INFERENCE_SLACK × the peak live tensors of one prediction call of the prior (PREDICT_BATCH texts ×
    CANDIDATES, fp32), measured on the meta device."""
    return INFERENCE_SLACK * gib(prior_predict_bytes(preset, full_size_clip().config.projection_dim))


def prior_source_gib(preset: Preset) -> float:
    """What a finished prior drawing from prompts holds on the GPU (helpers.prior.images.prompt_source): its CLIP's
    text tower and projection in fp16, the prior's fp32 weights and one prediction batch (`prior_predict_gib`)."""
    clip = full_size_clip()
    text = sum(p.numel() for m in (clip.text_model, clip.text_projection) for p in m.parameters())
    with torch.device("meta"):
        prior = sum(p.numel() for n, p in make_network(preset, clip.config.projection_dim).named_parameters()
                    if not n.startswith("clip_"))
    return gib(2 * text + 4 * prior) + prior_predict_gib(preset)


def prior_training_plan(preset: Preset, encode_pixels: int = CACHE_ENCODE_PIXELS) -> dict:
    """The T4 plan of a prior preset before the error band, in `training_plan`'s terms: the embedding cache is the
    adapter's caching phase; training and generation keep the adapter plan's loaded state (SD1.5 + adapter run + CLIP; its sampling phase
    without the sampling activations) and add the prior's weights, optimizer state and EMA (fp32), plus its grads
    and ACTIVATION_SLACK × measured activations while training, or the adapter's sampling activations while
    generating, with the CLIP scorer notebook 04 compares the pictures with (helpers.evaluation.clip_score, fp16) loaded beside
    them; predicting (the held-out metrics, a prompt's embedding) holds INFERENCE_SLACK × one batch of
    helpers.prior.metrics.PREDICT_BATCH texts (`prior_predict_gib`), the larger of the two working rooms."""
    adapter = training_plan(get_preset(ADAPTER_PRESET, "t4"), encode_pixels)
    sizes, saved = _prior_measure(preset)
    trainable = sum(sizes)
    prior_gib = grads_gib = ema_gib = gib(4 * trainable)
    ema_gib *= preset.ema_decay > 0
    optimizer_gib = gib(optimizer_state_bytes(sizes, preset.optimizer))
    activations = ACTIVATION_SLACK * gib(saved)
    loaded = adapter["phases_gib"]["sampling"] - adapter["sampling_activation_gib"]
    prior_state = prior_gib + optimizer_gib + ema_gib
    predict = prior_predict_gib(preset)
    phases = {"caching": adapter["phases_gib"]["caching"],
              "training": loaded + prior_state + grads_gib + activations,
              "sampling": loaded + prior_state + weights_gib("clip")
                          + max(adapter["sampling_activation_gib"], predict)}
    peak_phase = max(phases, key=phases.get)
    ckpt = checkpoint_mb(sizes, preset.optimizer) + (4 * trainable + SAFETENSORS_TENSOR_BYTES * len(sizes)) / 1e6 * (
        preset.ema_decay > 0)
    writes = ceil(preset.max_steps / preset.checkpoint_every)
    return {**{k: adapter[k] for k in ("parts_gib", "images_per_call", "sampling_activation_gib", "host_ram_gib",
                                       "host_ram_no_variant_gib", "encode_batch")},
            "preset": preset.name, "trainable_params": trainable, "trainable_gib": prior_gib,
            "grads_gib": grads_gib, "optimizer_gib": optimizer_gib, "ema_gib": ema_gib, "autocast_copy_gib": 0.0,
            "activation_gib": activations, "adapter_loaded_gib": loaded, "predict_gib": predict,
            "overhead_gib": CUDA_OVERHEAD_GIB,
            "phases_gib": phases, "peak_phase": peak_phase, "total_gib": phases[peak_phase], "checkpoint_mb": ckpt,
            "checkpoints_written": writes,
            "drive_mb": ckpt * min(writes, preset.keep_checkpoints)}


def text_table(header, rows) -> str:
    """A fixed-width table for a notebook's text output."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class Table(str):
    """A plan table: prints as fixed-width text (a terminal, a log) and shows in a notebook as an HTML table, whose
    cells never break mid-word the way 170 characters of text do in a 1000 px output area."""

    def __new__(cls, header, rows, note: str = ""):
        self = super().__new__(cls, text_table(header, rows) + (f"\n{note}" if note else ""))
        self.header, self.rows, self.note = tuple(header), [tuple(r) for r in rows], note
        return self

    def _repr_html_(self) -> str:
        def style(text) -> str:  # short cells (numbers) stay on one line; long ones wrap between words, never inside
            wrap = "nowrap" if len(str(text)) <= 16 else "normal"
            return f"padding:1px 6px;white-space:{wrap};text-align:left;font-size:12px"

        head = "".join(f"<th style='{style(h)}'>{escape(str(h))}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(f"<td style='{style(c)}'>{escape(str(c))}</td>" for c in row) + "</tr>"
                       for row in self.rows)
        note = f"<p style='font-size:12px'>{escape(self.note)}</p>" if self.note else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"

