"""Seeded image generation with the stock diffusers pipelines, and variants of one pipeline (base, tuned, …).

Every image gets its own CPU `torch.Generator` seeded with its seed, so a (prompt, seed) pair gives the same
starting noise on any device and in any batch: the baseline and the fine-tuned model are compared on exactly the
same noise, which is what makes the paired tests in `helpers.evaluation.clip_score` meaningful.

Inputs beyond the prompt. A run kind that conditions on more than text gets it in ONE way: a tensor with one row
per image, aligned with the (prompt, seed) pairs. Today that is the CLIP image embedding of an image-conditioned
run (notebook 04's IP-Adapter): `generate(..., image_embeds=(N, D))`. A `Variant` carries where its rows come from,
`image_embeds: (prompts, seeds) -> (N, D)` (an `ImageEmbeds`): fixed images' true embeddings, a slerp strip, zeros for
the caption alone, or a prior that turns each prompt (and seed) into an embedding; so the same variant draws any
prompt set, and `generate` checks the rows against the adapter the pipeline holds, puts the unconditional half of
classifier-free guidance beside them, and never lets two embeddings share a pipeline call (diffusers would fold
them into one image's tokens). Methods say which kind they are: `adapters.Method.needs_image_embeds` (its runs
draw from an embedding) and `makes_image_embeds` (a prior: its runs turn prompts into one, `image_embeds_source`).
"""
from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.precision import autocast_for, precision_for
from ..core.presets import Preset
from ..core.runtime import device as default_device
from ..models import (
    load_components,
    load_safety_checker,
    pipeline_from_components,
    pipeline_scheduler,
    vae_scale_factor,
)
from ..tiny.world import resolve

MANIFEST_FIELDS = ("file", "prompt", "seed", "withheld")
WITHHELD = "withheld"  # PIL Image.info key set on a picture SD1.5's safety checker replaced by a black square
ImageEmbeds = Callable[[list[str], list[int]], torch.Tensor]  # (prompts, seeds) -> one CLIP image embedding per
#                                                               image (N, D), for an image-conditioned run
ONE_AT_A_TIME_PX = 768  # from this size up, one image per pipeline call: 4 × 1024² SDXL images in one fp16 call
#                         peak ≈ 21.7 GB (≈ 15.4 GB with VAE slicing), more than a T4's 14.74 GiB
MAX_IMAGES_PER_CALL = 4  # below it, up to 4 prompts per call (classifier-free guidance doubles the UNet batch)
VAE_TILE_PX = 512  # tiled decode in 512 px tiles (the SD/fp16-fix VAE configs' size; the stock SDXL VAE's says 1024,
#                    which would leave a 1024 px image untiled): helpers.plan.memory models this tile


def load_pipeline(preset: Preset, device: torch.device | str | None = None, progress: bool = False,
                  safety_checker: bool = False):
    """The stock pipeline of `preset.family` for `preset.model` with `preset.vae` swapped in when set, built the way
    training loads (helpers.models.load_components: one module at a time, each on `device` as soon as it is
    loaded, so host RAM holds one component, never the whole pipeline: SDXL is 6.5 GiB in fp16 on a 12.7 GB
    machine), with the model's own inference scheduler; dtypes by helpers.core.precision (fp16 on a T4, the VAE upcast
    where its config says so). `safety_checker`: also SD1.5's safety checker, for paths whose pictures other people
    see (helpers.studio.engine); evaluation paths leave it out, as diffusers' training scripts' validation does.
    `progress`: the pipeline's own bar per call (off: `generate` shows one bar over the images instead)."""
    device = torch.device(device or default_device())
    components = load_components(preset, device)
    model = resolve(preset.model)
    checker = (load_safety_checker(model, precision_for(preset.mixed_precision, device).weight_dtype, device)
               if safety_checker and preset.family == "sd15" else None)
    pipe = pipeline_from_components(components, scheduler=pipeline_scheduler(model), safety_checker=checker)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def images_per_call(height: int, width: int) -> int:
    """How many images one pipeline call may draw at this size (the memory rule of every generation path)."""
    return 1 if max(height, width) >= ONE_AT_A_TIME_PX else MAX_IMAGES_PER_CALL


def set_vae_memory(pipe, height: int, width: int) -> None:
    """VAE slicing always (one image decoded at a time: same pixels, lower peak); tiling from ONE_AT_A_TIME_PX up,
    where a whole-image decode is the largest single allocation of a sampling step."""
    vae = pipe.vae
    vae.enable_slicing()
    if max(height, width) >= ONE_AT_A_TIME_PX:
        vae.enable_tiling()
        vae.tile_sample_min_size = VAE_TILE_PX
        vae.tile_latent_min_size = VAE_TILE_PX // vae_scale_factor(vae.config)
    else:
        vae.disable_tiling()


def prompt_seed_pairs(prompts: list[str], seeds: list[int]) -> tuple[list[str], list[int]]:
    """Every prompt with every seed, as the aligned lists `generate` takes (prompt-major order)."""
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def ip_adapter_width(pipe) -> int | None:
    """The image-embedding width D of the IP-Adapter loaded into `pipe` (None when none is loaded)."""
    unet = pipe.unet
    if (getattr(unet, "encoder_hid_proj", None) is None
            or getattr(unet.config, "encoder_hid_dim_type", None) != "ip_image_proj"):
        return None
    return unet.encoder_hid_proj.image_projection_layers[0].image_embeds.in_features


def _check_image_embeds(pipe, image_embeds, n: int) -> torch.Tensor | None:
    width = ip_adapter_width(pipe)
    if image_embeds is None:
        if width is not None:
            raise ValueError(f"this pipeline has an IP-Adapter loaded (an image-conditioned run): pass image_embeds, "
                             f"one CLIP image embedding ({width} wide) per image; zeros for the caption alone")
        return None
    if width is None:
        raise ValueError("image_embeds were given but this pipeline has no IP-Adapter loaded: they would be ignored "
                         "(switch to an image-conditioned run first)")
    image_embeds = torch.as_tensor(image_embeds).float().cpu()
    if image_embeds.shape != (n, width):
        raise ValueError(f"image_embeds must be ({n}, {width}): one {width}-wide embedding per image, got "
                         f"{tuple(image_embeds.shape)}")
    return image_embeds


def pipeline_calls(n: int, batch_size: int, image_embeds: torch.Tensor | None = None) -> list[list[int]]:
    """Image indices of each pipeline call `generate` makes for `n` images: runs of `batch_size`; with image
    embeddings, only images that share one embedding go into a call (diffusers folds extra embedding rows into
    tokens and would mix them)."""
    if image_embeds is None:
        return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    groups: dict[bytes, list[int]] = {}
    for i in range(n):
        groups.setdefault(image_embeds[i].numpy().tobytes(), []).append(i)
    return [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float = 7.5,
             height: int | None = None, width: int | None = None, out_dir: str | Path | None = None,
             prefix: str = "", batch_size: int = MAX_IMAGES_PER_CALL, negative_prompt: str | None = None,
             step_callback: Callable | None = None, image: Image.Image | None = None, strength: float = 0.8,
             image_embeds: torch.Tensor | None = None, progress=True) -> list[Image.Image]:
    """One image per aligned (prompt, seed) pair. With `out_dir`, saves `{prefix}{i:03d}_seed{seed}.png` and
    `{prefix}manifest.csv` (file, prompt, seed, withheld) there. A picture SD1.5's safety checker blacked out comes
    back marked (`withheld(image)`): a mark, never a picture to score.

    At most `images_per_call(height, width)` images per pipeline call, VAE slicing/tiling as `set_vae_memory`
    says, and fp16 autocast when the UNet holds fp16 weights (trained fp32 layers inside an fp16 UNet).
    `negative_prompt`: one negative prompt for every image (None or "" = none).
    `step_callback`: the pipeline's `callback_on_step_end(pipe, step, timestep, kwargs) -> kwargs` (progress, or
    stopping a call between denoising steps with `pipe._interrupt = True`; a stopped call is the last one, so fewer
    images than pairs come back). `image`: img2img from this picture,
    resized to width × height (`pipe` is then an img2img pipeline, e.g. `AutoPipelineForImage2Image.from_pipe`),
    re-noised by `strength` (1 = all of it).

    `image_embeds` (N, D): one CLIP image embedding per image, for a pipeline with an IP-Adapter loaded (an
    image-conditioned run, notebook 04), and only there: the one per-image input beyond the prompt (module
    docstring). Passed as `ip_adapter_image_embeds`, with a zero embedding as the unconditional half of
    classifier-free guidance (as the adapter was trained: a dropped image is a zero embedding). Images that share
    an embedding share calls (`pipeline_calls`); an image is the same whatever it shares a call with.

    `progress`: True = one bar over the images when there is more than one call; False = none; a tqdm bar = advance
    that one (one bar for a whole comparison, `generate_variants`)."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds); "
                         "use prompt_seed_pairs(prompts, seeds) for every combination")
    if batch_size < 1 or steps < 1:
        raise ValueError("batch_size and steps must be >= 1")
    image_embeds = _check_image_embeds(pipe, image_embeds, len(prompts))
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the pipeline's own default size
    height, width = height or default, width or default
    batch_size = min(batch_size, images_per_call(height, width))
    set_vae_memory(pipe, height, width)
    init = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS) if image is not None else None
    images: list[Image.Image | None] = [None] * len(prompts)
    calls = pipeline_calls(len(prompts), batch_size, image_embeds)
    own = progress is True and len(calls) > 1
    bar = (tqdm(total=len(prompts), desc="drawing", unit="image") if own
           else None if isinstance(progress, bool) or progress is None else progress)
    with autocast_for(pipe.unet):
        for chunk in calls:
            generators = [torch.Generator(device="cpu").manual_seed(seeds[i]) for i in chunk]
            chunk_prompts = [prompts[i] for i in chunk]
            extra = {}
            if image_embeds is not None:
                rows = image_embeds[chunk][:, None, :]  # (images, 1 image each, D)
                if guidance > 1.0:  # diffusers' classifier-free guidance test; it splits [negative, positive]
                    rows = torch.cat([torch.zeros_like(rows), rows])
                extra["ip_adapter_image_embeds"] = [rows.to(pipe.device)]
            if negative_prompt:
                extra["negative_prompt"] = [negative_prompt] * len(chunk)
            if step_callback is not None:
                extra["callback_on_step_end"] = step_callback
            if image is not None:  # img2img: the picture sets the size; the pipelines take no height/width
                extra.update(image=[init] * len(chunk), strength=strength)
            else:
                extra.update(height=height, width=width)
            out = pipe(prompt=chunk_prompts, generator=generators, num_inference_steps=steps,
                       guidance_scale=guidance, **extra)
            flagged = getattr(out, "nsfw_content_detected", None) or [False] * len(chunk)  # SD1.5's checker only
            for i, drawn, black in zip(chunk, out.images, flagged):
                if black:  # a black square, not a picture: marked so nothing scores or shows it as one
                    drawn.info[WITHHELD] = True
                images[i] = drawn
            if bar is not None:
                bar.update(len(chunk))
            if getattr(pipe, "_interrupt", False):  # stopped by step_callback: draw no further calls
                break
    if own:
        bar.close()
    images = [drawn for drawn in images if drawn is not None]  # the calls drawn (all of them unless stopped)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{prefix}manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_FIELDS)
            for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
                name = f"{prefix}{i:03d}_seed{seed}.png"
                image.save(out_dir / name)
                writer.writerow((name, prompt, seed, int(withheld(image))))
    return images


def withheld(image: Image.Image) -> bool:
    """Whether SD1.5's safety checker replaced this picture by a black square (`generate` marks it)."""
    return bool(image.info.get(WITHHELD))


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest written by `generate`: {"file": absolute path, "prompt", "seed": int, "withheld": bool}
    (a manifest written before the column existed: nothing withheld)."""
    path = Path(path)
    with open(path, newline="") as f:
        return [{"file": str(path.parent / r["file"]), "prompt": r["prompt"], "seed": int(r["seed"]),
                 "withheld": r.get("withheld") == "1"} for r in csv.DictReader(f)]


# ---------------------------------------------------------------- variants of one pipeline

@dataclass(frozen=True)
class Variant:
    name: str  # column label and folder name, e.g. "base", "crossattn", "lora ×0.5"
    apply: Callable[[object], None]  # puts the ONE shared pipeline into this variant's state (adapter on/off,
    #                                   LoRA scale, attn2 weights swapped): a T4 cannot hold two SDXL pipelines
    image_embeds: ImageEmbeds | None = None  # an image-conditioned run's per-image input (module docstring):
    #   (prompts, seeds) → one CLIP image embedding per image (N, D), e.g. a prior's prediction from the prompt, a
    #   true image's embedding, or zeros for the caption alone. None = a run that draws from the prompt alone.


def folder_name(name: str) -> str:
    """A file-system-safe name for a variant's folder (or a prompt set's grid files): "lora ×0.5" → "lora_0.5"."""
    return re.sub(r"[^\w.-]+", "_", name.strip()).strip("_")


def check_variants(variants: Sequence[Variant]) -> list[Variant]:
    """The variants as a list, or a ValueError naming what is wrong (none, unnamed, duplicate, no `apply`)."""
    variants = list(variants)
    if not variants:
        raise ValueError("no variants to compare; pass e.g. [Variant('base', ...), Variant('tuned', ...)]")
    for v in variants:
        if not isinstance(v, Variant) or not isinstance(v.name, str) or not folder_name(v.name):
            raise ValueError(f"{v!r} is not a Variant with a name of letters or digits")
        if not callable(v.apply):
            raise ValueError(f"variant {v.name!r}: apply must be callable (pipe) -> None")
        if v.image_embeds is not None and not callable(v.image_embeds):
            raise ValueError(f"variant {v.name!r}: image_embeds must be callable (prompts, seeds) -> (N, D) tensor")
    folders = [folder_name(v.name) for v in variants]
    repeated = sorted({v.name for v, f in zip(variants, folders) if folders.count(f) > 1})
    if repeated:
        raise ValueError(f"variant names must differ (also as folder names): {repeated}")
    return variants


def generate_variants(pipe, variants: Sequence[Variant], prompts: list[str], seeds: list[int], out_dir: str | Path,
                      steps: int, guidance: float = 7.5, height: int | None = None,
                      width: int | None = None) -> dict[str, Path]:
    """Each variant in turn: `variant.apply(pipe)`, then `generate` every aligned (prompt, seed) pair into
    `out_dir/<variant folder>/` with its manifest.csv. One pipeline for all, so a pair starts from the same noise in
    every variant. A variant with `image_embeds` gets one embedding per image from it. Returns {variant name: its
    manifest path}; the pipeline is left in the last variant's state. One progress bar for all of it."""
    manifests = {}
    variants = check_variants(variants)
    bar = tqdm(total=len(variants) * len(prompts), desc=f"drawing {len(variants)} variants", unit="image")
    for variant in variants:
        variant.apply(pipe)
        folder = Path(out_dir) / folder_name(variant.name)
        embeds = variant.image_embeds(list(prompts), list(seeds)) if variant.image_embeds is not None else None
        generate(pipe, prompts, seeds, steps, guidance, height, width, out_dir=folder, image_embeds=embeds,
                 progress=bar)
        manifests[variant.name] = folder / "manifest.csv"
    bar.close()
    return manifests
