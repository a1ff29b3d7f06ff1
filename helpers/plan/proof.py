"""The plan measured: every phase of every `t4` preset run through helpers' own code on FULL-SIZE architectures with
random weights, on a CUDA GPU made to behave like a T4 for memory, with what it held and how long it took written
beside what the plan says (scripts/gpu_proof.py is the command; README, "Measuring on a GPU").

The device (`t4_settings`): the caching allocator capped at a T4's 14.74 GiB less this process's CUDA context (as
`torch.cuda.mem_get_info` measures it before any tensor), scaled-dot-product attention limited to the
memory-efficient and math kernels (a T4 has neither flash nor cuDNN attention), TF32 off, cudnn.benchmark off. Under
these settings what a phase allocates barely depends on the card; how long it takes does, so the report keeps the two
apart, and only memory is fit to calibrate the plan (helpers.plan.calibration's error band, which today rests on
published reports: a committed GPU report is what it is to be recalibrated from).

The models (`random_components`): the real configs of helpers.core.configs built directly on the device in fp16 (the
stock SDXL VAE in fp32 where its config says force_upcast), never a full copy on the host, with the tiny world's
tokenizer (its ids fit the real 49,408-token vocabulary) and the real noise schedules. The CLIP of notebook 04 is
written once to a folder (ClipEncoder loads from a folder), the scorer is open_clip's ViT-L-14 with random weights.

The phases of a preset, each one helpers' own path (`PHASES`):
  loading     the components on the device (for a prior: the image-conditioned SD1.5 it draws through, loaded)
  caching     helpers.data.prepare_dataset (validation, latent and text caches) and, with a CLIP, embedding_set
  training    helpers.train.Trainer for `steps` optimizer steps (the preset's own batch and accumulation)
  checkpoint  Trainer.save_checkpoint, then a new Trainer on the same run resuming from it for one more step
  sampling    helpers.generate.sampling.generate through pipeline_from_components with the training state resident
              (a prior: its predictions through the adapter's pipeline, the scorer loaded beside, as the plan says)
  scoring     helpers.evaluation.ClipScorer in fp16 on a batch of SCORE_BATCH images, the run freed first
A phase that runs out of memory under the cap is written as measured (its peak is the cap) and the preset's later
phases as not reached. Rows are written as they are measured, so a run cut short keeps what it had.

Without CUDA (`smoke=True`) the same functions run on the CPU in the T4-dtype mode (helpers.core.precision) on the
real configs with every width divided by 8 (`proof_configs`), at small resolutions and batches (`proof_preset`); the
memory is then the process's peak resident set (VmHWM), not a GPU's, and the rows say "CPU smoke".
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
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
from ..core.paths import REPO_ROOT
from ..core.precision import T4_DTYPES_ENV, precision_for
from ..core.presets import CIFAR10_CLASSES, CIFAR_PROMPTS, NARUTO_PROMPTS, PRESETS, Preset, get_preset
from ..core.runtime import versions
from ..data.dataset import prepare_dataset
from ..data.embeddings import embedding_set
from ..data.sources import fill_template
from ..evaluation.clip_score import ClipScorer
from ..generate.sampling import generate, prompt_seed_pairs
from ..methods.ip_adapter import EmbeddedDataset
from ..methods.priors import ADAPTER_PRESET
from ..models import Components, load_components, on_device, pipeline_from_components, release_cuda_cache
from ..prior.images import prior_image_embeds
from ..prior.priors import train_prior
from ..tiny import pictures
from ..tiny.world import SD15_SCHEDULER, SDXL_SCHEDULER
from ..tiny.world import tokenizer as tiny_tokenizer
from ..train.hooks import CheckpointHook, ExportHook, Hook
from ..train.loop import Trainer
from ..train.stops import TrainingStopped
from .inference import SCORE_BATCH, scoring_room_gib, scoring_seconds
from .meta import GIB, weights_gib
from .model import (
    CUDA_OVERHEAD_GIB,
    PRIOR_METHODS,
    T4_USABLE_GIB,
    VAE_FORCE_UPCAST,
    prior_training_plan,
    training_plan,
)
from .timing import caching_seconds, generation_seconds, prior_training_seconds, training_estimate

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


# ---------------------------------------------------------------- the device as a T4

def t4_settings(device: torch.device) -> dict:
    """Make this CUDA device hold memory as a T4 would: the allocator capped at T4_USABLE_GIB less the CUDA context
    (measured now, before any tensor), memory-efficient or math attention only, TF32 and cudnn.benchmark off."""
    torch.cuda.init()
    torch.empty(1, device=device)  # the context exists, the allocator holds one small block
    release_cuda_cache()
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    cap = T4_USABLE_GIB * GIB - context
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_math_sdp(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    return {"gpu": torch.cuda.get_device_name(device), "total_gib": total / GIB, "context_gib": context / GIB,
            "cap_gib": cap / GIB, "attention": "memory-efficient or math SDPA (no flash, no cuDNN)",
            "tf32": False, "cudnn_benchmark": False, "cuda": torch.version.cuda}


def _vm_kib(field_name: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field_name}:\s+(\d+)", text).group(1))


class Meter:
    """Peak memory and time of one phase at a time. CUDA: torch's peak allocated and reserved since the phase began
    and the memory outside the allocator (the CUDA context, cuDNN/cuBLAS handles, loaded kernels) at its end;
    measured = reserved + context, what a T4 would need. CPU: the process's peak resident set (VmHWM, reset when a
    phase begins) as measured, the resident set when it began as "context" and the difference as "allocated"."""

    def __init__(self, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        self.t0, self.rss_before, self.held_before = 0.0, 0.0, 0.0

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        release_cuda_cache()
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.held_before = torch.cuda.memory_allocated(self.device) / GIB  # what earlier phases left
        else:
            with contextlib.suppress(OSError):  # Linux ≥ 4.0; elsewhere the peak since the process began
                Path("/proc/self/clear_refs").write_text("5")
            self.rss_before = _vm_kib("VmRSS") * 1024 / GIB
        self.t0 = time.perf_counter()

    def stop(self) -> dict:
        self.sync()
        seconds = time.perf_counter() - self.t0
        if not self.cuda:
            peak = _vm_kib("VmHWM") * 1024 / GIB
            return {"allocated_gib": max(0.0, peak - self.rss_before), "reserved_gib": None, "context_gib": self.rss_before,
                    "measured_gib": peak, "seconds": seconds}
        free, total = torch.cuda.mem_get_info(self.device)
        allocated = torch.cuda.max_memory_allocated(self.device) / GIB
        reserved = torch.cuda.max_memory_reserved(self.device) / GIB
        context = (total - free - torch.cuda.memory_reserved(self.device)) / GIB
        return {"allocated_gib": allocated, "reserved_gib": reserved, "context_gib": context,
                "held_before_gib": self.held_before, "measured_gib": reserved + context, "seconds": seconds}


class StepClock(Hook):
    """Wall time of each optimizer step (the device synchronised), and of the Trainer's setup before the first."""

    def __init__(self, meter: Meter):
        self.meter, self.created, self.started, self.steps = meter, time.perf_counter(), 0.0, []

    def on_start(self, trainer) -> None:
        self.meter.sync()
        self.started = time.perf_counter()

    def on_step(self, trainer) -> None:
        self.meter.sync()
        self.steps.append(time.perf_counter())

    @property
    def setup_seconds(self) -> float:
        return self.started - self.created

    def seconds_per_step(self) -> float | None:
        """The median step after the first (which also warms kernels up); the first when it is the only one."""
        times = [self.started, *self.steps]
        intervals = [b - a for a, b in zip(times, times[1:])]
        return statistics.median(intervals[1:] or intervals) if intervals else None


# ---------------------------------------------------------------- the plan's numbers for each phase

def planned(preset: Preset) -> dict[str, dict]:
    """Per phase of the t4 `preset`: the plan's GiB (helpers.plan.model, before the error band) and seconds per unit
    on a T4 (helpers.plan.timing), with the unit and, for the checkpoint, its MB. Loading is the plan's loaded weights
    without the CLIP of notebook 04, which the caching phase loads (helpers.data.embeddings.embedding_set)."""
    prior = preset.method in PRIOR_METHODS
    plan = (prior_training_plan if prior else training_plan)(preset)
    ph = plan["phases_gib"]
    scoring_gib = weights_gib("clip") + scoring_room_gib("clip") + CUDA_OVERHEAD_GIB  # notebook 05's clip phase
    if prior:
        loading = plan["adapter_loaded_gib"] - plan["parts_gib"]["clip"]
        per_step = prior_training_seconds(preset) / preset.max_steps
        adapter = get_preset(ADAPTER_PRESET, "t4")
        per_image = generation_seconds(adapter.family, adapter.resolution, 1)
        family, resolution = adapter.family, adapter.resolution
    else:
        loading = plan["weights_gib"] - plan["parts_gib"]["clip"] + CUDA_OVERHEAD_GIB
        per_step = training_estimate(preset)["seconds_per_step"]
        family, resolution = preset.family, preset.resolution
    return {"loading": {"gib": loading, "unit": None, "per_unit": None},
            "caching": {"gib": ph["caching"], "unit": "image", "per_unit": caching_seconds(preset, 1)},
            "training": {"gib": ph["training"], "unit": "step", "per_unit": per_step},
            "checkpoint": {"gib": ph["training"], "unit": None, "per_unit": None, "mb": plan["checkpoint_mb"]},
            "sampling": {"gib": ph["sampling"], "unit": "image", "family": family, "resolution": resolution,
                         "seconds_per_denoising_step": generation_seconds(family, resolution, 1)},
            "scoring": {"gib": scoring_gib, "unit": "image", "per_unit": scoring_seconds("clip", 1)}}


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


# ---------------------------------------------------------------- one preset, phase by phase

def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, TrainingStopped)
                                                         and "out of memory" in str(error))


class PresetProof:
    """Measures the phases of one t4 preset in order and hands each row to `write` as soon as it is measured."""

    def __init__(self, name: str, world: World, meter: Meter, write, plan: dict | None = None):
        self.t4 = get_preset(name, "t4")
        self.world, self.meter, self.write = world, meter, write
        self.plan = copy.deepcopy(plan or planned(self.t4))
        self.failed: str | None = None
        self.s: dict = {}  # what the phases hand on: components, dataset, trainer, images, ...

    def measure(self, phase: str, run) -> None:
        """Run `run()` (→ what the row says about units and work) as `phase`, and write its row."""
        plan = self.plan[phase]
        row = {"preset": self.t4.name, "phase": phase, "planned_gib": plan["gib"], "unit": plan.get("unit"),
               "planned_per_unit": plan.get("per_unit")}
        if self.failed is not None:
            self.write({**row, "status": f"not reached ({self.failed})"})
            return
        self.meter.start()
        try:
            info = run() or {}
        except Exception as e:  # noqa: BLE001  every failure is a row: out of memory is a measurement
            memory, oom = self.meter.stop(), is_oom(e)
            status = "out of memory under the cap" if oom else f"error: {type(e).__name__}: {str(e)[:300]}"
            self.failed = f"{phase} {'ran out of memory' if oom else 'failed'}"
            print(f"{self.t4.name} {phase}: {status}")
            e = None
            self.s.clear()
            release_cuda_cache()
            self.write({**row, **memory, "status": status})
            return
        memory = self.meter.stop()
        self.write({**row, **memory, **info, "status": "measured"})

    # ---- pipeline presets: crossattn, lora, ip_adapter
    def run(self) -> None:
        if self.t4.method in PRIOR_METHODS:
            return self.run_prior()
        world, s = self.world, self.s
        p = s["preset"] = proof_preset(self.t4, world)
        self.measure("loading", lambda: self.loading(p))
        self.measure("caching", lambda: self.caching(p))
        self.measure("training", lambda: self.training(p))
        self.measure("checkpoint", lambda: self.checkpoint(p))
        self.measure("sampling", lambda: self.sampling(p))
        self.measure("scoring", lambda: self.scoring())
        s.clear()
        release_cuda_cache()

    def loading(self, p: Preset) -> dict:
        self.s["components"] = random_components(p, self.world.configs, self.world.device)
        c = self.s["components"]
        parts = [c.unet, c.vae, *c.text_encoders]
        return {"what": f"{len(parts)} modules, {sum(m.num_parameters() for m in parts) / 1e9:.2f}B parameters"}

    def caching(self, p: Preset) -> dict:
        c, root = self.s["components"], storage(self.world, p)
        dataset = prepare_dataset(p, c, root=root)
        if p.clip_model:
            es = embedding_set(p, device=self.world.device, records=dataset.records, root=root)
            dataset = EmbeddedDataset(dataset, es)
        self.s["dataset"] = dataset
        n = len(dataset.records) if hasattr(dataset, "records") else len(dataset)
        images = len(getattr(dataset, "dataset", dataset).records)
        return {"count": images, "measured_per_unit": self.meter_seconds() / images,
                "what": f"{images} pictures at {p.resolution} px ({n} train)"}

    def meter_seconds(self) -> float:
        self.meter.sync()
        return time.perf_counter() - self.meter.t0

    def trainer(self, p: Preset, steps: int, hooks: list) -> Trainer:
        preset = replace(p, max_steps=steps)
        return Trainer(preset, self.s["components"], self.s["dataset"], storage(self.world, p) / "run", hooks=hooks)

    def training(self, p: Preset) -> dict:
        clock = StepClock(self.meter)
        trainer = self.s["trainer"] = self.trainer(p, p.max_steps, [clock])
        state = trainer.run()
        return {"count": state.step, "measured_per_unit": clock.seconds_per_step(),
                "what": f"{state.step} steps × {p.images_per_step} images at {p.resolution} px "
                        f"(batch {p.batch_size} × {p.grad_accum}), {type(trainer.optimizer).__name__}, "
                        f"setup {clock.setup_seconds:.1f} s"}

    def checkpoint(self, p: Preset) -> dict:
        trainer = self.s.pop("trainer")
        t0 = time.perf_counter()
        folder = trainer.save_checkpoint()
        saved = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        trainer = None  # its optimizer state goes; the new Trainer loads it back
        release_cuda_cache()
        clock = StepClock(self.meter)
        again = self.s["trainer"] = self.trainer(p, p.max_steps + 1, [clock])
        again.run()
        if again.state.resumed_from != folder.name:
            raise RuntimeError(f"resumed from {again.state.resumed_from}, not {folder.name}")
        return {"measured_mb": mb, "planned_mb": self.plan["checkpoint"]["mb"],
                "what": f"saved {folder.name} in {saved:.1f} s ({mb:.1f} MB); a new Trainer resumed from it in "
                        f"{clock.setup_seconds:.1f} s and trained step {again.state.step}"}

    def sampling(self, p: Preset) -> dict:
        trainer, c = self.s["trainer"], self.s["components"]
        prompts, seeds = prompt_seed_pairs(list(p.sample_prompts), [0])
        c.unet.eval()
        try:
            with on_device([*c.text_encoders, c.vae], self.world.device):  # as helpers.train.hooks.SampleHook
                pipe = pipeline_from_components(c)
                embeds = (trainer.method.sample_image_embeds(trainer, prompts, seeds)
                          if trainer.method.needs_image_embeds else None)
                images, seconds = self.draw(pipe, p, prompts, seeds, embeds)
        finally:
            c.unet.train()
        return self.drawn(p, images, prompts, seconds, p.family)

    def draw(self, pipe, p: Preset, prompts, seeds, embeds) -> tuple[list, float]:
        self.meter.sync()
        t0 = time.perf_counter()
        images = generate(pipe, prompts, seeds, steps=p.sample_steps, height=p.resolution, width=p.resolution,
                          image_embeds=embeds)
        self.meter.sync()
        return images, time.perf_counter() - t0

    def drawn(self, p: Preset, images: list, prompts: list, seconds: float, family: str) -> dict:
        self.s["images"], self.s["prompts"] = images, prompts
        plan = self.plan["sampling"]
        self.plan["sampling"]["per_unit"] = plan["seconds_per_denoising_step"] * p.sample_steps
        return {"count": len(images), "measured_per_unit": seconds / len(images),
                "planned_per_unit": plan["per_unit"],
                "what": f"{len(images)} images of {family} at {p.resolution} px, {p.sample_steps} steps each"}

    def scoring(self) -> dict:
        images, prompts = self.s["images"], self.s["prompts"]
        scorer = self.s.get("scorer")
        for key in [k for k in self.s if k not in ("images", "prompts", "scorer")]:
            del self.s[key]  # the run leaves before the scorer works, as in notebook 05
        release_cuda_cache()
        scorer = scorer or self.world.scorer()
        n = len(images) if self.world.smoke else SCORE_BATCH
        batch = [images[i % len(images)] for i in range(n)]
        texts = [prompts[i % len(prompts)] for i in range(n)]
        self.meter.sync()
        t0 = time.perf_counter()
        scores = scorer.score(batch, texts, batch_size=SCORE_BATCH)
        self.meter.sync()
        seconds = time.perf_counter() - t0
        if not all(math.isfinite(x) for x in scores):
            raise RuntimeError(f"non-finite CLIP scores {scores[:4]}")
        return {"count": n, "measured_per_unit": seconds / n,
                "what": f"{scorer.name}, {scorer.precision.open_clip_precision}, {n} images in one batch"}

    # ---- priors: on top of the image-conditioned SD1.5 they draw through
    def adapter(self) -> None:
        """notebook 04's image-conditioned SD1.5 as its first part leaves it: components with the IP-Adapter and LoRA
        set up, trained one step (optimizer state resident), its CLIP released; text encoders and VAE on the device.
        Not measured: the prior presets' plan starts from it."""
        adapter = proof_preset(get_preset(ADAPTER_PRESET, "t4"), self.world, steps=1)
        c = self.s["components"] = random_components(adapter, self.world.configs, self.world.device)
        root = storage(self.world, adapter) / self.t4.name
        dataset = prepare_dataset(adapter, c, root=root)
        es = embedding_set(adapter, device=self.world.device, records=dataset.records, root=root)
        self.s["dataset"] = EmbeddedDataset(dataset, es)
        trainer = Trainer(adapter, c, self.s["dataset"], root / "run", hooks=[])
        trainer.run()
        es.release()
        for module in (*c.text_encoders, c.vae):
            module.to(self.world.device)
        self.s["adapter_trainer"], self.s["adapter"] = trainer, adapter

    def run_prior(self) -> None:
        world, s = self.world, self.s
        p = s["preset"] = proof_preset(self.t4, world)
        print(f"{self.t4.name}: loading and training one step of {ADAPTER_PRESET}, the SD1.5 the prior draws through")
        self.measure("loading", lambda: self.adapter() or {
            "what": f"{ADAPTER_PRESET} (SD1.5 + IP-Adapter + LoRA after one step, optimizer state; text encoders "
                    f"and VAE on the device)"})
        self.measure("caching", lambda: self.prior_caching(p))
        self.measure("training", lambda: self.prior_training(p))
        self.measure("checkpoint", lambda: self.prior_checkpoint(p))
        self.measure("sampling", lambda: self.prior_sampling(p))
        self.measure("scoring", lambda: self.scoring())
        s.clear()
        release_cuda_cache()

    def prior_caching(self, p: Preset) -> dict:
        es = self.s["embeddings"] = embedding_set(p, device=self.world.device, root=storage(self.world, p))
        return {"count": len(es), "measured_per_unit": self.meter_seconds() / len(es),
                "what": f"CLIP embeddings of {len(es)} pictures ({len(es.train_indices)} train)"}

    def prior_training(self, p: Preset) -> dict:
        clock = StepClock(self.meter)
        prior, trainer = train_prior(p, self.s["embeddings"], storage(self.world, p) / "run",
                                     hooks=[clock, ExportHook()], device=self.world.device)
        self.s["trainer"], self.s["prior"] = trainer, prior
        return {"count": trainer.state.step, "measured_per_unit": clock.seconds_per_step(),
                "what": f"{trainer.state.step} steps × {p.batch_size} pairs, {type(trainer.optimizer).__name__}, "
                        f"export and load_prior included"}

    def prior_checkpoint(self, p: Preset) -> dict:
        trainer = self.s.pop("trainer")
        t0 = time.perf_counter()
        folder = trainer.save_checkpoint()
        saved = time.perf_counter() - t0
        mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
        trainer = None
        self.s.pop("prior")
        release_cuda_cache()
        clock = StepClock(self.meter)
        prior, again = train_prior(replace(p, max_steps=p.max_steps + 1), self.s["embeddings"],
                                   storage(self.world, p) / "run", hooks=[clock, ExportHook()],
                                   device=self.world.device)
        if again.state.resumed_from != folder.name:
            raise RuntimeError(f"resumed from {again.state.resumed_from}, not {folder.name}")
        self.s["trainer"], self.s["prior"] = again, prior
        return {"measured_mb": mb, "planned_mb": self.plan["checkpoint"]["mb"],
                "what": f"saved {folder.name} in {saved:.1f} s ({mb:.1f} MB); train_prior resumed from it in "
                        f"{clock.setup_seconds:.1f} s, trained step {again.state.step}, exported"}

    def prior_sampling(self, p: Preset) -> dict:
        adapter, c = self.s["adapter"], self.s["components"]
        self.s["scorer"] = self.world.scorer()  # notebook 04 compares the pictures with it: the plan has it loaded
        prompts, seeds = prompt_seed_pairs(list(p.sample_prompts), [0])
        embeds = prior_image_embeds(self.s["prior"], self.s["embeddings"])(prompts, seeds)
        c.unet.eval()
        pipe = pipeline_from_components(c)
        images, seconds = self.draw(pipe, replace(adapter, sample_steps=p.sample_steps), prompts, seeds, embeds)
        return self.drawn(replace(adapter, sample_steps=p.sample_steps), images, prompts, seconds, adapter.family)


# ---------------------------------------------------------------- the report

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Report:
    """`<out>/gpu_proof-<gpu>.json` and `.md`, rewritten (whole, atomically) after every row; rows of an earlier run
    of the same file are kept unless measured again (`--only`)."""

    def __init__(self, path: Path, header: dict, keep_rows: bool):
        self.json_path, self.md_path = path.with_suffix(".json"), path.with_suffix(".md")
        old = json.loads(self.json_path.read_text()) if keep_rows and self.json_path.is_file() else {}
        self.header = header
        self.rows = {(r["preset"], r["phase"]): r for r in old.get("rows", [])}
        self.tiny_world = old.get("tiny_world")

    def drop(self, preset: str) -> None:
        self.rows = {k: v for k, v in self.rows.items() if k[0] != preset}

    def add(self, row: dict) -> None:
        row = {**row, "kind": self.header["kind"]}
        self.rows[(row["preset"], row["phase"])] = row
        planned_gib, measured = row.get("planned_gib"), row.get("measured_gib")
        print(f"  {row['preset']:<26} {row['phase']:<10} {row['status']:<12} planned {planned_gib:5.2f} GiB"
              + (f"  measured {measured:5.2f} GiB" if measured is not None else ""))
        self.write()

    def ordered_rows(self) -> list[dict]:
        order = {name: i for i, name in enumerate(preset_order())}
        return sorted(self.rows.values(), key=lambda r: (order.get(r["preset"], 99), PHASES.index(r["phase"])))

    def write(self) -> None:
        data = {**self.header, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": self.ordered_rows(),
                "tiny_world": self.tiny_world}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.json_path, json.dumps(data, indent=1, default=str)),
                           (self.md_path, report_markdown(data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def preset_order() -> list[str]:
    """Every t4 preset, FIRST first."""
    return [FIRST, *(n for n in PRESETS if n != FIRST)]


def _num(value, fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def report_markdown(data: dict) -> str:
    smoke = data["kind"] == "cpu smoke"
    where = data.get("device", "?")
    lines = [f"# The T4 plan measured: {'CPU smoke' if smoke else where}", ""]
    if smoke:
        lines += ["**CPU smoke**: the real configs with every width ÷ 8, small resolutions and batches, on a CPU in "
                  "the T4-dtype mode; memory is the process's peak resident set. It proves the instrument runs, not "
                  "the plan: compare the planned column with a GPU run's.", "",
                  f"Shrunk: {data.get('settings', {}).get('shrunk', '')}.", ""]
    else:
        s = data.get("settings", {})
        lines += [f"Full-size architectures with random weights on **{where}**, the allocator capped at "
                  f"{_num(s.get('cap_gib'))} GiB (a T4's {T4_USABLE_GIB} less this card's CUDA context of "
                  f"{_num(s.get('context_gib'))} GiB), {s.get('attention')}, TF32 off, cudnn.benchmark off.", "",
                  "Memory below is nearly independent of the card under these settings: it is what the plan's "
                  "error band (helpers.plan.calibration) is calibrated from. **Time is this card's, not a T4's**: "
                  "it is listed apart and calibrates nothing.", ""]
    how = ("measured = the process's peak resident set during the phase (libraries included); context = the "
           "resident set when the phase began; peak allocated = their difference" if smoke else
           "measured = peak reserved + memory outside the allocator (CUDA context, handles, kernels) at the phase's "
           "end; context = that memory outside the allocator; held at start = what earlier phases left allocated")
    lines += [f"Started {data.get('started')}, updated {data.get('updated')}; {data.get('versions', {})}.", "",
              "## Memory per phase (GiB)", "",
              f"{how}; planned = helpers.plan's phase before the error band (helpers.plan.proof.planned says which "
              "number of the plan each phase is).", "",
              "| preset | phase | status | planned | measured | peak allocated | peak reserved | context | "
              "held at start | measured / planned | what ran |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ratio = (f"{r['measured_gib'] / r['planned_gib']:.2f}" if r.get("measured_gib") and r.get("planned_gib")
                 else "")
        what = r.get("what", "") + (f"; checkpoint {r['measured_mb']:.1f} MB, planned {r['planned_mb']:.1f} MB"
                                    if r.get("measured_mb") is not None else "")
        lines.append(f"| {r['preset']} | {r['phase']} | {r['status']} | {_num(r.get('planned_gib'))} | "
                     f"{_num(r.get('measured_gib'))} | {_num(r.get('allocated_gib'))} | "
                     f"{_num(r.get('reserved_gib'))} | {_num(r.get('context_gib'))} | "
                     f"{_num(r.get('held_before_gib'))} | {ratio} | {what} |")
    lines += ["", f"## Time ({'this CPU' if smoke else where}, not a T4)", "",
              "| preset | phase | unit | measured s/unit | planned T4 s/unit | phase seconds |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("unit") and r.get("status") == "measured":
            lines.append(f"| {r['preset']} | {r['phase']} | {r['unit']} | {_num(r.get('measured_per_unit'), '.3f')} "
                         f"| {_num(r.get('planned_per_unit'), '.3f')} | {_num(r.get('seconds'), '.1f')} |")
    tiny = data.get("tiny_world")
    if tiny:
        lines += ["", "## The tiny world end to end", "", *(f"- {k}: {v}" for k, v in tiny.items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the whole proof

@contextlib.contextmanager
def t4_dtype_mode(on: bool):
    """LAB_T4_DTYPES=1 and one torch thread for the duration (the CPU smoke), restored after: the smoke's matrices
    are narrow, and a second thread on a shared 2-core machine spins more than it multiplies (4× the CPU time)."""
    before, threads = os.environ.get(T4_DTYPES_ENV), torch.get_num_threads()
    if on:
        os.environ[T4_DTYPES_ENV] = "1"
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if before is None:
            os.environ.pop(T4_DTYPES_ENV, None)
        else:
            os.environ[T4_DTYPES_ENV] = before


def report_path(out: Path, smoke: bool, gpu: str | None) -> Path:
    return Path(out) / ("gpu_proof-cpu-smoke" if smoke else f"gpu_proof-{slug(gpu)}")


def run_proof(out: Path, work: Path, only: list[str] | None = None, smoke: bool | None = None,
              tiny_world: bool | None = None, steps: int | None = None) -> Path:
    """Measure every t4 preset (or `only` these, keeping the report's other rows) and, on CUDA, the tiny world end to
    end; write `<out>/gpu_proof-<gpu>.json` + `.md` row by row. Without CUDA (or `smoke`) the CPU smoke. Returns the
    JSON path."""
    cuda = torch.cuda.is_available()
    smoke = (not cuda) if smoke is None else smoke
    device = torch.device("cuda" if cuda and not smoke else "cpu")
    unknown = sorted(set(only or []) - set(PRESETS))
    if unknown:
        raise KeyError(f"unknown presets {unknown}; choose from {preset_order()}")
    with t4_dtype_mode(smoke):
        settings = t4_settings(device) if device.type == "cuda" else {
            "divisor": SMOKE_DIVISOR, "mode": "T4-dtype mode on a CPU (LAB_T4_DTYPES=1)",
            "shrunk": f"widths ÷ {SMOKE_DIVISOR}; the family's smallest picture (64 px SD1.5, 32 px SDXL); prompts "
                      f"of {SMOKE_TOKENS} tokens; CLIP pictures of {SMOKE_CLIP_IMAGE} px; batch {SMOKE_BATCH} (a "
                      f"prior's {SMOKE_PRIOR_BATCH} pairs), accumulation 1; 1 training step and 1 after the resume, "
                      "1 image of 1 denoising step, 1 image scored"}
        world = World(device, Path(work), smoke, **({"steps": 1, "sample_steps": 1, "prompts": 1} if smoke else {}))
        if steps:
            world.steps = steps
        header = {"kind": "cpu smoke" if smoke else "gpu", "device": settings.get("gpu", "cpu"),
                  "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "versions": {k: v for k, v in versions().items() if k in ("torch", "diffusers", "transformers",
                                                                           "peft", "bitsandbytes", "open_clip_torch")}}
        report = Report(report_path(out, smoke, settings.get("gpu")), header, keep_rows=bool(only))
        names = only or preset_order()
        plans = {name: planned(get_preset(name, "t4")) for name in names}  # the planner first (its meta-device
        gc.collect()  # traces are cached), then everything alive now is frozen out of the collector: each phase
        gc.freeze()  # begins with gc.collect() (release_cuda_cache), which then walks only what the proof made
        try:
            meter = Meter(device)
            for name in names:
                report.drop(name)
                print(f"{name}: measuring {', '.join(PHASES)}")
                PresetProof(name, world, meter, report.add, plans[name]).run()
        finally:
            gc.unfreeze()
        if tiny_world if tiny_world is not None else (device.type == "cuda" and not only):
            report.tiny_world = tiny_world_proof(Path(work) / "tiny_world", device)
            report.write()
        return report.json_path


# ---------------------------------------------------------------- the tiny world end to end (8-bit AdamW on CUDA)

TINY_PRESET = "sdxl_lora_naruto_256"
TINY_FIELDS = dict(optimizer="adamw8bit", mixed_precision="fp16", max_train_images=16, batch_size=4, grad_accum=1,
                   max_steps=6, checkpoint_every=3, keep_checkpoints=2, sample_every=0, sample_steps=4,
                   sample_prompts=NARUTO_PROMPTS[:2], lr_schedule="constant", warmup_steps=0)
KILL_AFTER = 4  # the killed run's last step: it checkpointed at 3, step 4 is lost with it


def tiny_preset(pictures_folder: Path) -> Preset:
    """The tiny preset on generated pictures in a folder (the tiny world's own drawings; no `datasets` needed, which a
    lent GPU machine lacks)."""
    return get_preset(TINY_PRESET, "tiny", data_source="folder", data_ref=str(pictures_folder), **TINY_FIELDS)


class Snapshot(Hook):
    """The trainable weights when training starts (after the method's setup) and when it ends, on the CPU."""

    def on_start(self, trainer) -> None:
        self.start = {k: v.detach().float().cpu().clone() for k, v in trainer.trainable.items()}

    def on_end(self, trainer) -> None:
        self.end = {k: v.detach().float().cpu().clone() for k, v in trainer.trainable.items()}


class KillAfter(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), 9)


def tiny_world_child(run_dir: str, root: str, pictures_folder: str, threads: int) -> None:
    """The killed run (its own process): train the tiny preset with checkpoints and SIGKILL itself after KILL_AFTER."""
    torch.set_num_threads(threads)
    preset = tiny_preset(Path(pictures_folder))
    components = load_components(preset, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = prepare_dataset(preset, components, root=root)
    Trainer(preset, components, dataset, Path(run_dir), hooks=[CheckpointHook(), KillAfter(KILL_AFTER)]).run()


def tiny_world_proof(work: Path, device: torch.device) -> dict:
    """The tiny world end to end in fp16 (8-bit AdamW on CUDA; torch AdamW with a note on a CPU, in the T4-dtype
    mode): train uninterrupted; train in another process, checkpoint at step 3 and SIGKILL it after step 4; resume to
    the end; compare the weights; draw; score with the fp16 open_clip scorer."""
    t0 = time.perf_counter()
    folder = picture_folder("naruto", TINY_FIELDS["max_train_images"], work / "pictures")
    preset, root = tiny_preset(folder), work / "storage"
    components = load_components(preset, device)
    dataset = prepare_dataset(preset, components, root=root)
    reference = Snapshot()
    trainer = Trainer(preset, components, dataset, work / "uninterrupted", hooks=[reference])
    trainer.run()
    optimizer = f"{type(trainer.optimizer).__module__}.{type(trainer.optimizer).__name__}"
    trainer = components = None
    release_cuda_cache()

    run_dir = work / "killed"
    child = ("import sys; sys.path.insert(0, sys.argv[1]); from helpers.plan.proof import tiny_world_child; "
             "tiny_world_child(*sys.argv[2:5], int(sys.argv[5]))")
    done = subprocess.run([sys.executable, "-c", child, str(REPO_ROOT), str(run_dir), str(root), str(folder),
                           str(torch.get_num_threads())], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != -9:
        raise RuntimeError(f"the run to kill ended with {done.returncode}, not SIGKILL:\n{done.stderr[-2000:]}")
    components = load_components(preset, device)
    resumed = Snapshot()
    trainer = Trainer(preset, components, dataset, run_dir, hooks=[CheckpointHook(), resumed])
    trainer.run()
    diff = max(float((resumed.end[k] - reference.end[k]).abs().max()) for k in reference.end)
    moved = max(float((reference.end[k] - reference.start[k]).abs().max()) for k in reference.end)
    equal = all(torch.equal(resumed.end[k], reference.end[k]) for k in reference.end)

    prompts, seeds = prompt_seed_pairs(list(preset.sample_prompts), [0, 1])
    with on_device([*components.text_encoders, components.vae], device):
        components.unet.eval()
        images = generate(pipeline_from_components(components), prompts, seeds, steps=preset.sample_steps,
                          height=preset.resolution, width=preset.resolution)
    scorer = ClipScorer.from_profile("tiny", device=device)
    scores = [float(x) for x in scorer.score(images, prompts)]
    return {"device": str(device), "preset": f"{TINY_PRESET} (tiny) " + json.dumps(
                {k: v for k, v in TINY_FIELDS.items() if k != "sample_prompts"}),
            "optimizer": optimizer, "fp16": trainer.precision.fp16, "unet_dtype": str(components.unet.dtype),
            "grad_scaler": trainer.scaler.is_enabled(),
            "killed": f"SIGKILL after step {KILL_AFTER}", "resumed_from": trainer.state.resumed_from,
            "identical_weights": equal, "max_abs_difference": diff, "weights_moved": moved,
            "tolerance": f"≤ {RESUME_TOLERANCE:.0%} of how far training moved the weights ({RESUME_TOLERANCE * moved:.2e})",
            "resume_passed": equal or diff <= RESUME_TOLERANCE * moved,
            "images": f"{len(images)} at {images[0].size[0]} px", "clip_scores": [round(x, 3) for x in scores],
            "scorer": repr(scorer), "scores_finite": all(math.isfinite(x) for x in scores),
            "seconds": round(time.perf_counter() - t0, 1)}
