"""What a proof runs on: the real configs (narrowed by a divisor for the CPU smoke), random full-size models
built on the device, the CLIP and scorer folders, generated pictures, and the proof's form of a preset."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..core.configs import (
    CLIP_L14_TEXT,
    CLIP_L14_VISION,
    OPENCLIP_BIGG_TEXT,
    SD_VAE,
    UNETS,
    image_size_multiple,
)
from ..core.precision import precision_for
from ..core.presets import CIFAR10_CLASSES, CIFAR_PROMPTS, Preset
from ..data.sources import fill_template
from ..evaluation.clip_score import ClipScorer
from ..models import Components, release_cuda_cache
from ..plan.model import (
    PRIOR_METHODS,
    VAE_FORCE_UPCAST,
)
from ..tiny import pictures
from ..tiny.world import SD15_SCHEDULER, SDXL_SCHEDULER
from ..tiny.world import tokenizer as tiny_tokenizer

PHASES = ("loading", "caching", "training", "checkpoint", "sampling", "scoring")
FIRST = "sdxl_lora_naruto_1024"  # measured first: the preset closest to a T4's limit
SMOKE_DIVISOR = 8  # the CPU smoke: every width of the real configs ÷ 8
# ... at the family's smallest picture (64 px SD1.5, 32 px SDXL), prompts of 8 tokens (not 77), CLIP pictures of 56 px
# (4 × 4 patches, not 16 × 16): a CPU multiplies fp16 matrices ~20× slower than fp32 ones, and the T4-dtype mode must
# keep fp16, so the smoke keeps the depth and the code path and drops the rows of the matrices
SMOKE_TOKENS, SMOKE_CLIP_IMAGE = 8, 56
TOKENS, CLIP_IMAGE = 77, 224  # CLIP's context and ViT-L/14's picture size, as the real models have them
SMOKE_BATCH, SMOKE_PRIOR_BATCH = 1, 8  # the CPU smoke's batch (a prior's: pairs of embeddings, cheap)
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}  # vae/config.json scaling_factor of SD1.5's VAE and SDXL's (and the fix)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
OPEN_CLIP_L14 = dict(embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=768, heads=12, layers=12))  # open_clip's
#                                                                                       model_configs/ViT-L-14.json
RESUME_TOLERANCE = 0.01  # tiny world on CUDA: a resumed run may differ from an uninterrupted one by ≤ 1 % of how far
#   training moved the weights (non-deterministic CUDA kernels: memory-efficient attention's backward accumulates with
#   atomics, and 8-bit AdamW can round a moment to the next code when its input moves in the last bit); a CPU resumes
#   bit for bit


# ---------------------------------------------------------------- the real configs, narrowed for the smoke

def narrow_unet(config: dict, d: int) -> dict:
    """A UNet config with every width ÷ d: channels, context width, the SDXL time/pooled embeddings; the GroupNorm
    groups ÷ d too, so each group keeps the real number of channels; heads and depth as they are."""
    c = dict(config)
    c["block_out_channels"] = tuple(w // d for w in c["block_out_channels"])
    c["cross_attention_dim"] //= d
    c["norm_num_groups"] //= d
    if "addition_time_embed_dim" in c:
        c["addition_time_embed_dim"] //= d
        c["projection_class_embeddings_input_dim"] //= d
    return c


def narrow_vae(config: dict, d: int) -> dict:
    return {**config, "block_out_channels": tuple(w // d for w in config["block_out_channels"]),
            "norm_num_groups": config["norm_num_groups"] // d}


def narrow_tower(config: dict, d: int) -> dict:
    """A CLIP text or vision tower with hidden, MLP and projection widths ÷ d (heads kept: head width ÷ d)."""
    keys = ("hidden_size", "intermediate_size", "projection_dim")
    return {**config, **{k: config[k] // d for k in keys if k in config}}


def proof_configs(divisor: int = 1, tokens: int = TOKENS, clip_image: int = CLIP_IMAGE) -> dict:
    """The configs the proof builds: helpers.core.configs as they are (divisor 1, 77 tokens, 224 px CLIP) or every
    width ÷ divisor, prompts padded to `tokens` and the CLIPs' pictures `clip_image` px (the CPU smoke: fp16 matmuls
    are slow on a CPU, and their cost is in the 77 tokens and 257 patches more than in the widths)."""
    if divisor < 1 or 32 % divisor:
        raise ValueError(f"divisor {divisor} must divide 32 (the GroupNorm groups)")
    if not 2 < tokens <= TOKENS or clip_image % CLIP_L14_VISION["patch_size"]:
        raise ValueError(f"tokens {tokens} must be in 3..{TOKENS}, clip_image {clip_image} a multiple of 14")
    d = divisor
    open_clip = {**OPEN_CLIP_L14, "embed_dim": OPEN_CLIP_L14["embed_dim"] // d,
                 "vision_cfg": {**OPEN_CLIP_L14["vision_cfg"], "width": 1024 // d, "head_width": 64 // d,
                                "image_size": clip_image},
                 "text_cfg": {**OPEN_CLIP_L14["text_cfg"], "width": 768 // d, "context_length": tokens}}
    return {"unet": {family: narrow_unet(c, d) for family, c in UNETS.items()}, "vae": narrow_vae(SD_VAE, d),
            "text": narrow_tower(CLIP_L14_TEXT, d), "text_2": narrow_tower(OPENCLIP_BIGG_TEXT, d),
            "vision": {**narrow_tower(CLIP_L14_VISION, d), "image_size": clip_image}, "open_clip": open_clip,
            "divisor": d, "tokens": tokens}


def proof_tokenizer(configs: dict):
    """The tiny world's tokenizer (its ids fit the real 49,408-token vocabulary), padding to the configs' tokens."""
    tok = tiny_tokenizer()
    tok.model_max_length = configs.get("tokens", TOKENS)
    return tok


# ---------------------------------------------------------------- random full-size models, built on the device

def build(factory, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`factory()` with its weights created on `device` in `dtype` (torch's default initialisation): a 2.6B UNet
    never passes through host memory."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            module = factory()
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """As helpers.models loads every component: no grad, eval mode."""
    return module.requires_grad_(False).eval()


def text_config(config: dict):
    """A transformers CLIPTextConfig of `config` with the tiny world's special-token ids."""
    from transformers import CLIPTextConfig
    tok = tiny_tokenizer()
    return CLIPTextConfig(**config, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)


def random_components(preset: Preset, configs: dict, device: torch.device) -> Components:
    """What helpers.models.load_components returns for `preset`, with random weights from `configs`, each module
    built on `device` in the dtype the precision rule gives it (helpers.core.precision), one after another."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    precision = precision_for(preset.mixed_precision, device)
    dtype, family = precision.weight_dtype, preset.family
    vae_ref = preset.vae or preset.model
    upcast = VAE_FORCE_UPCAST.get(vae_ref, False)
    unet = frozen(build(lambda: UNet2DConditionModel(**configs["unet"][family]), device, dtype))
    vae_config = {**configs["vae"], "force_upcast": upcast, "scaling_factor": VAE_SCALING[family]}
    vae = frozen(build(lambda: AutoencoderKL(**vae_config), device, precision.vae_dtype(upcast, preset.vae_fp32)))
    encoders = [frozen(build(lambda: CLIPTextModel(text_config(configs["text"])), device, dtype))]
    tokenizers = [proof_tokenizer(configs)]
    if family == "sdxl":
        encoders.append(frozen(build(lambda: CLIPTextModelWithProjection(text_config(configs["text_2"])), device,
                                     dtype)))
        tokenizers.append(proof_tokenizer(configs))
    schedule = SD15_SCHEDULER if family == "sd15" else SDXL_SCHEDULER
    scheduler = DDPMScheduler.from_config({k: v for k, v in schedule.items() if k != "skip_prk_steps"})
    return Components(family, unet, vae, tokenizers, encoders, scheduler, f"random:{preset.model}",
                      f"random:{vae_ref}")


def clip_folder(configs: dict, device: torch.device, folder: Path) -> Path:
    """openai/clip-vit-large-patch14's architecture (widths ÷ the divisor) with random fp16 weights, written once as a
    folder helpers.data.embeddings.ClipEncoder loads (weights, the tiny world's tokenizer, a 224 px processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(text_config=text_config(configs["text"]).to_dict(), vision_config=configs["vision"],
                        projection_dim=configs["vision"]["projection_dim"])
    model = build(lambda: CLIPModel(config), device, torch.float16)
    model.save_pretrained(folder)
    del model
    release_cuda_cache()
    proof_tokenizer(configs).save_pretrained(folder)
    size = configs["vision"]["image_size"]
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD)).save_pretrained(folder)
    (folder / ".complete").write_text("")
    return folder


def scorer_spec(configs: dict, folder: Path) -> str:
    """The open_clip model name ClipScorer builds with random weights: "ViT-L-14", or its narrowed config
    registered under a name of its own."""
    if configs["divisor"] == 1:
        return "ViT-L-14"
    import open_clip
    name = f"ViT-L-14-div{configs['divisor']}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(configs["open_clip"]))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


def picture_folder(kind: str, count: int, folder: Path) -> Path:
    """`count` distinct generated pictures with same-name .txt captions (helpers.data.folders reads them): the tiny
    world's Naruto-like characters (128 px) or CIFAR-like objects (32 px); the training transform resizes them."""
    if (folder / ".complete").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{kind}/{count}")
    for i in range(count):
        if kind == "naruto":
            image, caption = pictures.draw_naruto(rng, 128)
        else:
            label = CIFAR10_CLASSES[i % len(CIFAR10_CLASSES)]
            image, caption = pictures.draw_cifar(label, rng, 32), fill_template("a photo of a {label}", label)
        image.save(folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(caption)
    (folder / ".complete").write_text("")
    return folder



# ---------------------------------------------------------------- the world a proof runs in

@dataclass
class World:
    """Where and how a proof runs: the device, the configs (divisor 1 on a GPU, 8 in the CPU smoke), a scratch
    folder (caches, runs, pictures, the random CLIP) and how much of each phase to run."""
    device: torch.device
    work: Path
    smoke: bool
    steps: int = 3  # optimizer steps timed in the training phase (then one more after the resume)
    sample_steps: int = 10  # denoising steps per drawn image
    prompts: int = 4  # images drawn (one per sample prompt, seed 0)
    configs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.configs = self.configs or (proof_configs(SMOKE_DIVISOR, SMOKE_TOKENS, SMOKE_CLIP_IMAGE) if self.smoke
                                        else proof_configs())

    @property
    def clip(self) -> str:
        return str(clip_folder(self.configs, self.device, self.work / "clip"))

    def scorer(self) -> ClipScorer:
        return ClipScorer(scorer_spec(self.configs, self.work / "open_clip"), pretrained=None, device=self.device)


def smoke_resolution(preset: Preset) -> int:
    """The CPU smoke's size: the family's smallest (its image-size multiple: 64 px SD1.5, 32 px SDXL)."""
    return image_size_multiple(preset.family)


def proof_preset(t4: Preset, world: World, steps: int | None = None) -> Preset:
    """The t4 preset as the proof trains it: generated pictures in a folder (no Hub data), `steps` optimizer steps
    with a checkpoint at the last, no samples while training; the random CLIP folder; on a GPU the preset's own
    resolution, batch and accumulation. The CPU smoke shrinks resolution (`smoke_resolution`), batch (≤ 2; a prior's
    8), accumulation (1) and a prior's width (÷ 8)."""
    steps = steps or world.steps
    fields = dict(max_steps=steps, checkpoint_every=steps, keep_checkpoints=2, sample_every=0,
                  sample_steps=world.sample_steps, warmup_steps=min(t4.warmup_steps, steps), max_train_images=None)
    prompts = t4.sample_prompts or CIFAR_PROMPTS
    fields["sample_prompts"] = tuple(prompts[:world.prompts])
    if t4.clip_model:
        fields["clip_model"] = world.clip
    if world.smoke:
        prior = t4.method in PRIOR_METHODS
        fields.update(resolution=smoke_resolution(t4), grad_accum=1, prior_width=t4.prior_width // SMOKE_DIVISOR,
                      batch_size=min(t4.batch_size, SMOKE_PRIOR_BATCH if prior else SMOKE_BATCH),
                      prior_sample_steps=min(t4.prior_sample_steps, world.sample_steps),
                      prior_text_tokens=min(t4.prior_text_tokens, world.configs["tokens"]))
    batch = fields.get("batch_size", t4.batch_size)
    held_out = t4.clip_model is not None  # the embedding set holds 10 % out (at least one picture)
    count = math.ceil(batch / 0.9) + 1 if held_out else batch
    kind = "naruto" if t4.data_source == "naruto" else "cifar"
    folder = picture_folder(kind, count, world.work / "pictures" / f"{kind}-{count}")
    return replace(t4, data_source="folder", data_ref=str(folder), **fields)


def storage(world: World, preset: Preset) -> Path:
    """A fresh storage root per preset: its caches are built, never reused from another preset."""
    return world.work / "storage" / preset.name
