"""ONE table of named training presets, each in a `t4` form (real models on a free Colab T4) and a `tiny` form
(tiny models pretrained on generated data, minutes on 2 CPU cores). The arithmetic behind each number is in the
comments next to it; `helpers.plan.memory` checks the T4 memory claims against the real architectures.
"""
from __future__ import annotations

from dataclasses import replace

from .preset_fields import Preset
from .runtime import PROFILES

CIFAR_PROMPTS = ("a photo of a cat", "a photo of a ship", "a photo of an airplane", "a photo of a frog")
NARUTO_PROMPTS = ("a cartoon of a ninja with orange hair", "an anime character with pink hair and a red robe",
                  "a man with glasses in a suit", "a green frog")

# What the tiny SDXL-like LoRAs adapt: attention (as on the T4, diffusers' script) AND the feed-forward, projection
# and ResNet conv layers (LoCon-style). The real SDXL can already draw every part of a Naruto picture, so attention
# is enough to bind its words to them; the tiny base has never drawn outlines, spiky hair or faces, and attention-only
# LoRAs learned the look but not the colours the tiny CLIP judges by (the score fell the longer they trained).
TINY_SDXL_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
                          "conv1", "conv2")

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
SDXL_VAE_FIX = "madebyollin/sdxl-vae-fp16-fix"
CLIP_L14 = "openai/clip-vit-large-patch14"
CIFAR10 = "uoft-cs/cifar10"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NARUTO = "lambdalabs/naruto-blip-captions"
PICKSCORE = "yuvalkirstain/PickScore_v1"  # CLIP-H fine-tuned on Pick-a-Pic preferences (≈ 3.9 GB fp32)
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # the processor PickScore's model card uses

PRESETS: dict[str, dict[str, Preset]] = {
    "sd15_xattn_cifar10": {
        # 32 px CIFAR images upscaled to 256 px: latents 32×32, 4× cheaper than SD1.5's native 512 and the
        # smallest size SD1.5 still draws well at; upscaling further only adds blur.
        # 8 × 2 accumulation = 16 images/step; 400 steps = 6,400 images, so only the first 10,000 of the 50,000
        # are prepared: cached latents 10,000 × 2 flips × 8 × 32 × 32 × 2 B = 330 MB on Drive instead of 1.6 GB.
        # Memory: UNet fp16 860M × 2 B = 1.7 GB, text encoder and VAE cached away; attn2 trains in fp32:
        # 44M × (4 weight + 4 grad + 8 Adam) B = 0.7 GB; activations at 256 px × 8 with SDPA ≈ 4 GB → ≈ 7 GB.
        "t4": Preset("sd15_xattn_cifar10", "t4", "sd15", SD15, "cifar10", CIFAR10, "crossattn",
                     resolution=256, batch_size=8, grad_accum=2, max_steps=400, learning_rate=1e-5,
                     lr_schedule="constant", warmup_steps=20, optimizer="adamw8bit", random_flip=True,
                     max_train_images=10_000, checkpoint_every=50, sample_every=100, sample_prompts=CIFAR_PROMPTS,
                     vram_plan_gib=7.0),
        # 240 generated images at 64 px (latents 8×8); 4 × 1 = 4 images/step; 300 steps = 5 epochs. Measured on the
        # committed tiny world (README, "what is verified where"): lr 1e-3 for 300 steps raises the held-out CLIP
        # score by +16.6 [+10.4, +23.1]; 2e-3 for 150 steps leaves it where it was (≈ −1); 600 steps add little.
        # 20 sampling steps (every tiny preset): the pretrained tiny models draw in 20 what the real ones do; 4 gives
        # smudges.
        "tiny": Preset("sd15_xattn_cifar10", "tiny", "sd15", "tiny/sd15", "cifar10", "tiny/cifar10", "crossattn",
                       resolution=64, batch_size=4, grad_accum=1, max_steps=300, learning_rate=1e-3,
                       optimizer="adamw", mixed_precision="no", random_flip=True,
                       checkpoint_every=100, sample_every=150, sample_prompts=CIFAR_PROMPTS, sample_steps=20),
    },
    "sdxl_lora_naruto_256": {
        # 12 × 8 accumulation = 96 images/step; 200 steps = 19,200 images ≈ 15.7 epochs of 1,221.
        # Memory: UNet fp16 2.6B × 2 B = 5.1 GB; LoRA r16 on to_q/k/v/out ≈ 23M in fp32 with 8-bit Adam
        # ≈ 23M × (4 + 4 + 2) B = 0.23 GB; text encoders (1.6 GB fp16) only while caching; activations at
        # 256 px (32×32 latents) × 12 with checkpointing ≈ 4 GB → ≈ 10 GB.
        "t4": Preset("sdxl_lora_naruto_256", "t4", "sdxl", SDXL, "naruto", NARUTO, "lora",
                     vae=SDXL_VAE_FIX, resolution=256, batch_size=12, grad_accum=8, max_steps=200,
                     learning_rate=1e-4, lora_rank=16, lora_alpha=16, optimizer="adamw8bit",
                     gradient_checkpointing=True, random_flip=True, checkpoint_every=25, sample_every=50,
                     sample_prompts=NARUTO_PROMPTS, vram_plan_gib=11.7),
        # 120 generated images at 64 px; 8 × 1 = 8 images/step; 900 steps = 60 epochs at lr 5e-4, r16 α16 as on the
        # T4, on TINY_SDXL_LORA_TARGETS (≈ 105 s on a CPU). Measured (scripts/measure_tiny_finetune.py, the tiny
        # Naruto-style set × seeds 0-3): tuned − base tiny-CLIP +7.8 [+1.9, +14.0]; 600 steps +5.2 [−1.2, +11.7];
        # 30 steps at 1e-3, r4, attention only (the earlier preset): −0.9 [−6.2, +4.5] (seeds 0-1).
        "tiny": Preset("sdxl_lora_naruto_256", "tiny", "sdxl", "tiny/sdxl", "naruto", "tiny/naruto", "lora",
                       vae="tiny/sdxl-vae-fp16-fix", resolution=64, batch_size=8, grad_accum=1, max_steps=900,
                       learning_rate=5e-4, lora_rank=16, lora_alpha=16, lora_targets=TINY_SDXL_LORA_TARGETS,
                       optimizer="adamw", mixed_precision="no", checkpoint_every=300, sample_every=900,
                       sample_prompts=NARUTO_PROMPTS[:2], sample_steps=20),
    },
    "sdxl_lora_naruto_1024": {
        # 1 × 8 accumulation = 8 images/step; 1,221 images → 152.6 steps/epoch; 5 epochs ≈ 763 → 765 steps.
        # Memory: UNet fp16 5.1 GB + LoRA/Adam 0.23 GB + activations at 1024 px (128×128 latents) × 1 with
        # checkpointing ≈ 5 GB → ≈ 11 GB; without checkpointing it does not fit 15 GB.
        # Time: helpers.plan.timing.training_estimate (notebook 03 prints it with its range) is longer than one free
        # session, so a checkpoint every 30 steps (240 images) bounds what a disconnect loses, and the run resumes.
        "t4": Preset("sdxl_lora_naruto_1024", "t4", "sdxl", SDXL, "naruto", NARUTO,
                     "lora", vae=SDXL_VAE_FIX, resolution=1024, batch_size=1, grad_accum=8, max_steps=765,
                     learning_rate=1e-4, lr_schedule="cosine", warmup_steps=0, lora_rank=16, lora_alpha=16,
                     optimizer="adamw8bit", gradient_checkpointing=True, random_flip=True, checkpoint_every=30,
                     sample_every=150, sample_prompts=NARUTO_PROMPTS, vram_plan_gib=11.7),
        # 128 px on the tiny model (16×16 latents), 1 × 8 = 8 images/step, 12 steps = 0.8 epoch (CI budget).
        "tiny": Preset("sdxl_lora_naruto_1024", "tiny", "sdxl", "tiny/sdxl", "naruto", "tiny/naruto", "lora",
                       vae="tiny/sdxl-vae-fp16-fix", resolution=128, batch_size=1, grad_accum=8, max_steps=12,
                       learning_rate=1e-3, lr_schedule="cosine", lora_rank=16, lora_alpha=16,
                       lora_targets=TINY_SDXL_LORA_TARGETS, optimizer="adamw",
                       mixed_precision="no", gradient_checkpointing=True, checkpoint_every=6, sample_every=12,
                       sample_prompts=NARUTO_PROMPTS[:2], sample_steps=20),
    },
    "prior_sd15": {
        # SD1.5 conditioned on CLIP ViT-L/14 image embeddings (notebook 04, helpers.methods.ip_adapter): an IP-Adapter trained
        # from scratch (768-d → 4 tokens; to_k_ip/to_v_ip in the 16 cross-attentions: 21.5M parameters) with the
        # reference project's LoRA r8 α16 (update scale 2) dropout 0.1 on to_q/to_k/to_v (1.2M); tutorial_train.py's
        # lr 1e-4. 10,000 CIFAR images, 9,000 after the 10 % held-out split; 8 × 2 = 16 images/step at 256 px;
        # 1,500 steps = 24,000 images ≈ 2.7 epochs. Memory (helpers.plan.memory): UNet fp16 1.6 GiB + CLIP fp16 0.8 GiB
        # + 23M trainable fp32 with 8-bit Adam ≈ 0.2 GiB + activations ≈ 3.7 GiB → ≈ 7 GiB while training.
        "t4": Preset("prior_sd15", "t4", "sd15", SD15, "cifar10", CIFAR10, "ip_adapter", clip_model=CLIP_L14,
                     resolution=256, batch_size=8, grad_accum=2, max_steps=1500, learning_rate=1e-4,
                     lora_rank=8, lora_alpha=16, lora_dropout=0.1, lora_targets=("to_q", "to_k", "to_v"),
                     optimizer="adamw8bit", random_flip=False, max_train_images=10_000, checkpoint_every=100,
                     sample_every=500, sample_prompts=CIFAR_PROMPTS, vram_plan_gib=8.9),
        # 240 generated images at 64 px (latents 8×8), 210 train + 30 held out (3 per class); 8 × 1 = 8 images/step;
        # 400 steps ≈ 15 epochs at lr 1e-3. Measured (20 sampling steps, guidance 7.5): held-out pictures drawn back
        # from their embeddings keep their class 83 %, variations stay nearest their source in ~90 % of pairs;
        # 2e-3 swings with the step count (150: 57 %, 200: 60 %, 300: 45 %), so it is not used.
        "tiny": Preset("prior_sd15", "tiny", "sd15", "tiny/sd15", "cifar10", "tiny/cifar10", "ip_adapter",
                       clip_model="tiny/clip", resolution=64, batch_size=8, grad_accum=1, max_steps=400,
                       learning_rate=1e-3, lora_rank=8, lora_alpha=16, lora_dropout=0.1,
                       lora_targets=("to_q", "to_k", "to_v"), optimizer="adamw", mixed_precision="no",
                       checkpoint_every=100, sample_every=200, sample_prompts=CIFAR_PROMPTS[:2], sample_steps=20),
    },
    "prior_mlp_cifar10": {
        # The reference project's MLP prior: CLIP ViT-L/14 text embedding 768 → 1024 → 1024 → 768 (2.6M weights),
        # MSE on the L2-normalised, √768-scaled image embedding. Trains on the CLIP embedding pairs of prior_sd15's
        # data (same data fields and seed, so the same cache): 10,000 images − 10 % held out = 9,000 pairs;
        # 256 × 1 = 256 images/step (their embedding pairs), 1,000 steps = 256,000 pairs ≈ 28 epochs.
        # Memory: 2.6M × 16 B (fp32 weight, grad, 2 Adam moments) = 42 MB beside the adapter's loaded SD1.5 + CLIP;
        # the embedding cache sets the peak.
        "t4": Preset("prior_mlp_cifar10", "t4", "sd15", SD15, "cifar10", CIFAR10, "mlp_prior", clip_model=CLIP_L14,
                     max_train_images=10_000, resolution=256, batch_size=256, grad_accum=1, max_steps=1000,
                     learning_rate=3e-4, optimizer="adamw", prior_width=1024, checkpoint_every=500, sample_every=0,
                     vram_plan_gib=7.1),
        # 240 generated images − 30 held out = 210 pairs of 64-d tiny CLIP embeddings; 32 × 1 = 32 pairs/step,
        # 200 steps ≈ 30 epochs (≈ 1.5 s on a CPU core).
        "tiny": Preset("prior_mlp_cifar10", "tiny", "sd15", "tiny/sd15", "cifar10", "tiny/cifar10", "mlp_prior",
                       clip_model="tiny/clip", resolution=64, batch_size=32, grad_accum=1, max_steps=200,
                       learning_rate=1e-3, optimizer="adamw", mixed_precision="no", prior_width=256,
                       checkpoint_every=100, sample_every=0),
    },
    "prior_diffusion_cifar10": {
        # DALL·E 2's diffusion prior (DALLE2-pytorch's recipe) on diffusers' PriorTransformer: 6 blocks of width
        # 512 (8 heads × 64) over 77 token states + text embedding + timestep + noised embedding + prediction token
        # = 81 tokens; 768-d in and out. Cosine schedule of 1,000 steps, x0 prediction with the loss weighted by
        # 1 + min(SNR, 20) (helpers.prior says why), text dropped for 10 % of the samples, EMA 0.999 (≈ the last
        # 1,000 of 3,000 steps), DDIM with 64 steps to sample.
        # 128 × 1 = 128 images/step (embedding pairs), 3,000 steps = 384,000 pairs ≈ 43 epochs of 9,000; lr 1.1e-4
        # as DALLE2-pytorch.
        # Memory (helpers.plan.memory.prior_plan): 21M weights × 20 B (fp32 weight, grad, 2 Adam moments, EMA) = 0.4 GiB
        # + activations of 128 × 81 tokens × 512 wide × 6 blocks ≈ 2.1 GiB (× 2 slack), beside the adapter's
        # loaded SD1.5 + CLIP (3.5 GiB); batch 256 would need 8.6 GiB of activations. A checkpoint ≈ 21M × 16 B.
        "t4": Preset("prior_diffusion_cifar10", "t4", "sd15", SD15, "cifar10", CIFAR10, "diffusion_prior",
                     clip_model=CLIP_L14, max_train_images=10_000, resolution=256, batch_size=128, grad_accum=1,
                     max_steps=3000,
                     learning_rate=1.1e-4, lr_schedule="cosine", warmup_steps=100, optimizer="adamw",
                     prior_width=512, prior_layers=6, prior_heads=8, prior_text_tokens=77, prior_timesteps=1000,
                     prior_sample_steps=64, cond_drop_prob=0.1, ema_decay=0.999, snr_gamma=20.0,
                     checkpoint_every=500, sample_every=0, vram_plan_gib=10.6),
        # Width 64 (4 heads × 16), 2 blocks, the first 16 token states (the longest tiny CIFAR caption has 15 with
        # start and end); 32 × 1 = 32 pairs/step, 400 steps ≈ 60 epochs of 210 pairs (≈ 9 s on a CPU core); 16 DDIM
        # steps to sample.
        "tiny": Preset("prior_diffusion_cifar10", "tiny", "sd15", "tiny/sd15", "cifar10", "tiny/cifar10",
                       "diffusion_prior", clip_model="tiny/clip", resolution=64, batch_size=32, grad_accum=1,
                       max_steps=400, learning_rate=1e-3, lr_schedule="cosine", warmup_steps=20, optimizer="adamw",
                       mixed_precision="no", prior_width=64, prior_layers=2, prior_heads=4, prior_text_tokens=16,
                       prior_timesteps=1000, prior_sample_steps=16, cond_drop_prob=0.1, ema_decay=0.99,
                       snr_gamma=20.0,
                       checkpoint_every=100, sample_every=0),
    },
}

# Values a preset needs when trained with another method than its own (notebook 02's METHOD switch). A LoRA update
# starts at zero and has rank-limited reach, so it needs ~10× the learning rate of training the full attn2 weights:
# diffusers' train_text_to_image_lora.py uses 1e-4 where full-weight fine-tunes use 1e-5.
METHOD_VALUES: dict[str, dict[str, dict[str, dict]]] = {
    "sd15_xattn_cifar10": {
        "lora": {"t4": dict(learning_rate=1e-4, lora_rank=16, lora_alpha=16),
                 "tiny": dict(learning_rate=5e-3, lora_rank=8, lora_alpha=8)},
    },
}


def get_preset(name: str, profile: str, **overrides) -> Preset:
    """The preset `name` in `profile`, with optional field overrides (e.g. method="lora", max_steps=10).

    A `method` other than the preset's own brings that method's values from METHOD_VALUES (learning rate, rank);
    explicit overrides win over both."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if profile not in PROFILES:
        raise KeyError(f"unknown profile {profile!r}; choose one of {PROFILES}")
    unknown = set(overrides) - set(Preset.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown preset fields {sorted(unknown)}")
    base = PRESETS[name][profile]
    method = overrides.get("method", base.method)
    method_values = METHOD_VALUES.get(name, {}).get(method, {}).get(profile, {}) if method != base.method else {}
    return replace(base, **{**method_values, **overrides})


def runtime_verdict(preset: Preset, vram_gb: float, has_cuda: bool) -> str:
    """One line: can this runtime run the preset?"""
    if preset.profile == "tiny":
        return f"{preset.name} [tiny]: runs on any machine, a CPU included"
    if not has_cuda:
        return f"{preset.name} [t4]: needs a CUDA GPU with ≥ {preset.vram_plan_gib:.0f} GiB; none here"
    ok = vram_gb >= preset.vram_plan_gib + 1.0  # 1 GiB to spare beyond the plan and its band (notebook 00)
    need = f"planned ≈ {preset.vram_plan_gib:.1f} GiB (estimate) of {vram_gb:.1f} GiB"
    return f"{preset.name} [t4]: {'OK' if ok else 'too little GPU memory'} ({need})"


def require_runtime(preset: Preset, vram_gb: float, has_cuda: bool) -> str:
    """The verdict line, or a clear refusal (RuntimeError) when this runtime cannot run the preset."""
    verdict = runtime_verdict(preset, vram_gb, has_cuda)
    if preset.profile == "t4" and "OK" not in verdict:
        raise RuntimeError(f"{verdict}. Attach a T4 (Runtime > Change runtime type > T4 GPU) or run PROFILE='tiny'.")
    return verdict
