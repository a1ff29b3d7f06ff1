"""What a training preset is: its fields (`Preset`) and the range of every one (NUMBER_RULES and the rules of
`preset_problems`), checked when a preset is made, never hours into a run. The presets themselves, ONE table of them,
are in helpers.core.presets."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .configs import check_image_size


@dataclass(frozen=True)
class Preset:
    name: str  # key in PRESETS
    profile: str  # "t4" (real models, CUDA) or "tiny" (tiny models, CPU)
    family: str  # "sd15" or "sdxl": which pipeline and which UNet conditioning
    model: str  # Hub id of the base pipeline, or "tiny/<name>" (helpers.tiny builds it)
    data_source: str  # kind of data source: "cifar10", "naruto" or "folder" (helpers.data.sources)
    data_ref: str  # the source's Hub dataset id or local image folder ("tiny/<name>" for generated data)
    method: str  # what trains: "crossattn" (UNet attn2 only), "lora" (peft LoRA), "ip_adapter" (IP-Adapter + LoRA)
    resolution: int  # square training size in pixels; latents are resolution / the VAE's factor (8 for SD)
    batch_size: int  # images per forward pass
    grad_accum: int  # forward passes per optimizer step; images/step = batch_size × grad_accum
    max_steps: int  # optimizer steps
    learning_rate: float  # peak learning rate after warmup
    vae: str | None = None  # separate VAE (SDXL: the fp16-fix VAE); None = the pipeline's own vae/
    vae_fp32: bool = False  # keep the VAE in fp32 (needed for the stock SDXL VAE, which overflows in fp16)
    lr_schedule: str = "constant"  # "constant" or "cosine" (both after linear warmup)
    warmup_steps: int = 0  # linear warmup steps
    lora_rank: int = 16  # LoRA r
    lora_alpha: int = 16  # LoRA alpha; the update is scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # UNet attention projections to adapt
    train_text_encoder: bool = False  # also put LoRA on the text encoder(s) (disables the text-embedding cache)
    optimizer: str = "adamw8bit"  # "adamw8bit" (bitsandbytes, CUDA only; falls back to "adamw" with a note)
    mixed_precision: str = "fp16"  # "fp16" on CUDA (a T4 has no fast bf16); CPU always runs fp32
    gradient_checkpointing: bool = False  # recompute activations in backward: ~30% slower, much less memory
    max_grad_norm: float = 1.0  # gradient-norm clipping
    snr_gamma: float | None = None  # Min-SNR weighting γ (5.0 is the paper's value); None = plain MSE. The
    #                                 diffusion prior weighs its x0 loss by 1 + min(SNR, γ) (helpers.prior)
    noise_offset: float = 0.0  # offset noise strength (0.05 helps very dark/bright images); 0 = off
    cache_latents: bool = True  # encode images once with the VAE and train from cached latents
    cache_text: bool = True  # encode captions once and train from cached text embeddings
    center_crop: bool = True  # center crop (else random crop) after resizing the short side
    random_flip: bool = False  # horizontal flip with p = 0.5
    max_train_images: int | None = None  # use only the first N images of the source (None = all)
    checkpoint_every: int = 50  # optimizer steps between checkpoints in the run folder (Drive on Colab)
    keep_checkpoints: int = 2  # newest checkpoints kept
    sample_every: int = 100  # optimizer steps between sample grids
    sample_prompts: tuple[str, ...] = ()  # fixed prompts for the sample grids
    sample_steps: int = 25  # inference steps per sample image
    seed: int = 42  # one seed for data order, noise and samples
    clip_model: str | None = None  # CLIP vision+text model whose embeddings condition the UNet (ip_adapter, priors)
    prior_width: int = 0  # a prior's width: the MLP's hidden units, the diffusion prior's heads × head size
    prior_layers: int = 0  # transformer blocks of the diffusion prior (the MLP has 3 linear layers, always)
    prior_heads: int = 0  # attention heads of the diffusion prior
    prior_text_tokens: int = 77  # CLIP token states the diffusion prior reads (the first N of 77; 0 = only the
    #                              pooled text embedding). CLIP's text attention is causal, so the first N states
    #                              are exact for a caption of ≤ N tokens (start and end included)
    prior_timesteps: int = 1000  # noise levels of the diffusion prior's cosine schedule
    prior_sample_steps: int = 64  # DDIM steps when the diffusion prior samples
    cond_drop_prob: float = 0.0  # classifier-free dropout: share of samples trained without their text
    ema_decay: float = 0.0  # EMA of the trained weights, sampled and exported (0 = none); warmup as diffusers'
    #                         EMAModel: decay = min(ema_decay, (1 + n) / (10 + n)) after n updates
    vram_plan_gib: float = 0.0  # planned peak VRAM on a T4 + the plan's error band, GiB (an estimate from
    #                            helpers.plan.memory, not a measurement; tests/test_memory.py keeps it up to date)

    def __post_init__(self) -> None:
        problems = preset_problems(self)
        if problems:
            raise ValueError(f"preset {self.name!r} ({self.profile}) has bad values:\n  " + "\n  ".join(problems))

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.grad_accum


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A real, finite number (not a bool, not NaN, not ±inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


SEED_MAX = 2**32 - 1  # numpy's seeds end here


def _whole(low: int, high=None):
    """A whole number from `low` to `high` (a number, a function of the preset, or None for no upper end)."""
    def ok(value, p) -> bool:
        top = high(p) if callable(high) else high
        return _is_int(value) and value >= low and (top is None or value <= top)
    return ok


def _between(low: float, high: float | None, low_open: bool = False, high_open: bool = False):
    """A finite number above `low` (or equal, unless `low_open`) and below `high` (likewise; None: no upper end)."""
    def ok(value, p) -> bool:
        return _is_number(value) and (value > low if low_open else value >= low) and (
            high is None or (value < high if high_open else value <= high))
    return ok


def _or_none(rule):
    return lambda value, p: value is None or rule(value, p)


# Every numeric field and its range, checked when a preset is made (bool fields are switches, text fields ids;
# `resolution` has the family's image-size rule below). tests/test_presets.py fails for a numeric field missing here,
# so no number arrives without a rule.
NUMBER_RULES: dict[str, tuple] = {
    "resolution": (lambda value, p: True, "the family's image-size rule"),
    **{field: (_whole(1), "a whole number ≥ 1") for field in (
        "batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints", "sample_steps", "lora_rank",
        "prior_timesteps")},
    "sample_every": (_whole(0), "a whole number ≥ 0 (0 = no samples)"),
    "warmup_steps": (_whole(0, lambda p: p.max_steps if _is_int(p.max_steps) else 0),
                     "a whole number from 0 to max_steps"),
    "seed": (_whole(0, SEED_MAX), f"a whole number from 0 to {SEED_MAX}"),
    "max_train_images": (_or_none(_whole(1)), "None (all) or a whole number ≥ 1"),
    "learning_rate": (_between(0, 1, True, True), "a number > 0 (and < 1; typical: 1e-5 to 1e-3)"),
    "lora_alpha": (_between(0, None, True), "a number > 0 (the update is scaled by alpha / rank)"),
    "lora_dropout": (_between(0, 1, high_open=True), "from 0 to < 1"),
    "cond_drop_prob": (_between(0, 1, high_open=True), "from 0 to < 1"),
    "ema_decay": (_between(0, 1, high_open=True), "from 0 (no EMA) to < 1"),
    # a negative norm turns every clipped update around (gradient ascent: loss 0.33 → 1.45), NaN makes it NaN
    "max_grad_norm": (_between(0, None, True), "a finite number > 0, the gradient norm clipped to (1.0 is usual)"),
    # Min-SNR γ ≤ 0 weighs every step by ≤ 0: a loss of 0 that learns nothing (γ = 0) or one running to −∞ (γ < 0)
    "snr_gamma": (_or_none(_between(0, None, True)), "None (plain MSE) or a finite number > 0 (5.0 is the paper's)"),
    "noise_offset": (_between(0, 1), "a finite number from 0 (off) to 1 (0.05 to 0.1 is usual)"),
    **{field: (_whole(0), "a whole number ≥ 0") for field in ("prior_width", "prior_layers", "prior_heads")},
    "prior_text_tokens": (_whole(0, 77), "a whole number from 0 to 77 (CLIP gives 77 token states)"),
    "prior_sample_steps": (_whole(1, lambda p: p.prior_timesteps if _is_int(p.prior_timesteps) else None),
                           "a whole number from 1 to prior_timesteps"),
    "vram_plan_gib": (_between(0, None), "a finite number ≥ 0 (0 = no plan)"),
}


def preset_problems(p: Preset) -> list[str]:
    """Every field value a run could not use, each with the field and the allowed range; caught when the preset is
    made, not hours into training. Every numeric field has its range in NUMBER_RULES."""
    problems = [f"{field}={getattr(p, field)!r}: {rule}" for field, (ok, rule) in NUMBER_RULES.items()
                if not ok(getattr(p, field), p)]

    def need(ok: bool, field: str, rule: str) -> None:
        if not ok:
            problems.append(f"{field}={getattr(p, field)!r}: {rule}")

    need(p.family in ("sd15", "sdxl"), "family", "'sd15' or 'sdxl'")
    if p.family in ("sd15", "sdxl"):
        try:
            check_image_size(p.resolution, p.family, "resolution")
        except ValueError as e:
            problems.append(str(e))
    need(p.mixed_precision in ("fp16", "no"), "mixed_precision", "'fp16' or 'no' (a T4 has no fast bf16)")
    if p.method == "diffusion_prior" and _is_int(p.prior_width) and _is_int(p.prior_heads):
        need(p.prior_heads >= 1 and p.prior_width % p.prior_heads == 0, "prior_heads",
             f"≥ 1 and a divisor of prior_width ({p.prior_width})")
    return problems
