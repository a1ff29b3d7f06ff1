"""Seeded image generation with the stock diffusers pipelines, and image grids for comparing them.

Every image gets its own CPU `torch.Generator` seeded with its seed, so a (prompt, seed) pair gives the same
starting noise on any device and in any batch: the baseline and the fine-tuned model are compared on exactly the
same noise, which is what makes the paired tests in `helpers.evaluate` meaningful.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .precision import autocast_for
from .presets import Preset
from .runtime import device as default_device
from .tiny import resolve

MANIFEST_FIELDS = ("file", "prompt", "seed")
ONE_AT_A_TIME_PX = 768  # from this size up, one image per pipeline call: 4 × 1024² SDXL images in one fp16 call
#                         peak ≈ 21.7 GB (≈ 15.4 GB with VAE slicing), more than a T4's 14.74 GiB
MAX_IMAGES_PER_CALL = 4  # below it, up to 4 prompts per call (classifier-free guidance doubles the UNet batch)
VAE_TILE_PX = 512  # tiled decode in 512 px tiles (the SD/fp16-fix VAE configs' size; the stock SDXL VAE's says 1024,
#                    which would leave a 1024 px image untiled): helpers.memory models this tile


def load_pipeline(preset: Preset, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                  progress: bool = True):
    """The stock StableDiffusionPipeline (sd15) or StableDiffusionXLPipeline (sdxl) for `preset.model`, with
    `preset.vae` swapped in when set. fp16 on CUDA, fp32 on CPU (fp16 is slow and inexact there). Real SD1.5 keeps
    its default safety checker; the tiny pipelines were saved without one."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    device = torch.device(device or default_device())
    dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
    if preset.family not in ("sd15", "sdxl"):
        raise ValueError(f"unknown model family {preset.family!r}; choose 'sd15' or 'sdxl'")
    cls = StableDiffusionPipeline if preset.family == "sd15" else StableDiffusionXLPipeline
    extra = {"vae": AutoencoderKL.from_pretrained(resolve(preset.vae), dtype=dtype)} if preset.vae else {}
    pipe = cls.from_pretrained(resolve(preset.model), dtype=dtype, **extra)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe.to(device)


def images_per_call(height: int, width: int) -> int:
    """How many images one pipeline call may draw at this size (the memory rule of every generation path)."""
    return 1 if max(height, width) >= ONE_AT_A_TIME_PX else MAX_IMAGES_PER_CALL


def set_vae_memory(pipe, height: int, width: int) -> None:
    """VAE slicing always (one image decoded at a time: same pixels, lower peak); tiling from ONE_AT_A_TIME_PX up,
    where a whole-image decode is the largest single allocation of a sampling step."""
    from .models import vae_scale_factor
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


def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float = 7.5,
             height: int | None = None, width: int | None = None, out_dir: str | Path | None = None,
             prefix: str = "", batch_size: int = MAX_IMAGES_PER_CALL) -> list[Image.Image]:
    """One image per aligned (prompt, seed) pair. With `out_dir`, saves `{prefix}{i:03d}_seed{seed}.png` and
    `{prefix}manifest.csv` (file, prompt, seed) there.

    At most `images_per_call(height, width)` images per pipeline call, VAE slicing/tiling as `set_vae_memory`
    says, and fp16 autocast when the UNet holds fp16 weights (trained fp32 layers inside an fp16 UNet)."""
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"need one seed per prompt (got {len(prompts)} prompts, {len(seeds)} seeds); "
                         "use prompt_seed_pairs(prompts, seeds) for every combination")
    if batch_size < 1 or steps < 1:
        raise ValueError("batch_size and steps must be >= 1")
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the pipeline's own default size
    height, width = height or default, width or default
    batch_size = min(batch_size, images_per_call(height, width))
    set_vae_memory(pipe, height, width)
    images: list[Image.Image] = []
    starts = range(0, len(prompts), batch_size)
    with autocast_for(pipe.unet):
        for start in tqdm(starts, desc="generating", disable=len(starts) < 2):
            chunk = slice(start, start + batch_size)
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[chunk]]
            images += pipe(prompt=prompts[chunk], generator=generators, num_inference_steps=steps,
                           guidance_scale=guidance, height=height, width=width).images
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / f"{prefix}manifest.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MANIFEST_FIELDS)
            for i, (image, prompt, seed) in enumerate(zip(images, prompts, seeds)):
                name = f"{prefix}{i:03d}_seed{seed}.png"
                image.save(out_dir / name)
                writer.writerow((name, prompt, seed))
    return images


def read_manifest(path: str | Path) -> list[dict]:
    """Rows of a manifest written by `generate`: {"file": absolute path, "prompt", "seed": int}."""
    path = Path(path)
    with open(path, newline="") as f:
        return [{"file": str(path.parent / r["file"]), "prompt": r["prompt"], "seed": int(r["seed"])}
                for r in csv.DictReader(f)]


# ---------------------------------------------------------------- grids

def _font(size: int = 12):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong text ends with an ellipsis."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "…"
    return lines


def _text_strip(lines: list[str], width: int, font) -> Image.Image:
    line_height = font.getbbox("Ag")[3] + 3
    strip = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for k, line in enumerate(lines):
        draw.text((width / 2, 2 + k * line_height), line, fill="black", font=font, anchor="ma")
    return strip


def image_grid(images: list[Image.Image], rows: int, cols: int, labels: list[str] | None = None,
               title: str | None = None) -> Image.Image:
    """Tiles `images` row by row (all the size of the first) with an optional label under each and a title."""
    if not images or len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}×{cols} grid")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    w, h = images[0].size
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    strips = [_text_strip(_wrap(measure, label, font, w - 4), w, font) for label in labels] if labels else []
    label_h = max((s.height for s in strips), default=0)
    head = _text_strip(_wrap(measure, title, font, cols * w - 4), cols * w, font) if title else None
    top = head.height if head else 0
    grid = Image.new("RGB", (cols * w, top + rows * (h + label_h)), "white")
    if head:
        grid.paste(head, (0, 0))
    for k, image in enumerate(images):
        x, y = (k % cols) * w, top + (k // cols) * (h + label_h)
        grid.paste(image.convert("RGB").resize((w, h)) if image.size != (w, h) else image.convert("RGB"), (x, y))
        if strips:
            grid.paste(strips[k], (x, y + h))
    return grid


def _stack(images: list[Image.Image], horizontal: bool) -> Image.Image:
    width = sum(i.width for i in images) if horizontal else max(i.width for i in images)
    height = max(i.height for i in images) if horizontal else sum(i.height for i in images)
    out, offset = Image.new("RGB", (width, height), "white"), 0
    for image in images:
        out.paste(image, (offset, 0) if horizontal else (0, offset))
        offset += image.width if horizontal else image.height
    return out


def side_by_side(left_images: list[Image.Image], right_images: list[Image.Image], labels: list[str] | None = None,
                 left_title: str = "baseline", right_title: str = "fine-tuned") -> Image.Image:
    """Two titled columns (e.g. base vs tuned on the same prompt and seed), one row per pair, a label under each."""
    if not left_images or len(left_images) != len(right_images):
        raise ValueError(f"need matching non-empty lists ({len(left_images)} left, {len(right_images)} right)")
    if labels is not None and len(labels) != len(left_images):
        raise ValueError(f"{len(labels)} labels for {len(left_images)} pairs")
    w = left_images[0].width
    font, measure = _font(), ImageDraw.Draw(Image.new("RGB", (1, 1)))
    parts = [_stack([_text_strip(_wrap(measure, t, font, w - 4), w, font) for t in (left_title, right_title)], True)]
    for k, pair in enumerate(zip(left_images, right_images)):
        parts.append(image_grid(list(pair), rows=1, cols=2))
        if labels is not None:
            parts.append(_text_strip(_wrap(measure, labels[k], font, 2 * w - 4), 2 * w, font))
    return _stack(parts, horizontal=False)


# ---------------------------------------------------------------- base vs tuned on the same prompts and seeds

def template_prompts(labels: list[str], templates: dict[str, tuple[str, ...]], seeds: list[int]) -> list[dict]:
    """Evaluation rows {prompt, seed, label, split}: every label × template × seed. `templates` maps a split name
    ("train", "held-out") to caption templates with a `{label}` slot."""
    from .data import fill_template
    return [{"prompt": fill_template(t, label), "seed": s, "label": label, "split": split}
            for split, ts in templates.items() for t in ts for label in labels for s in seeds]


def generate_rows(pipe, rows: list[dict], out_dir: str | Path, steps: int, size: int,
                  guidance: float = 7.5) -> list[Image.Image]:
    """`generate` for evaluation rows."""
    return generate(pipe, [r["prompt"] for r in rows], [r["seed"] for r in rows], steps, guidance,
                    height=size, width=size, out_dir=out_dir)


def comparison_grids(baseline: list[Image.Image], tuned: list[Image.Image], rows: list[dict],
                     out_dir: str | Path, cols: int = 10) -> dict[str, Path]:
    """baseline_grid.png, finetuned_grid.png (labelled tiles) and comparison_grid.png (pairs side by side)."""
    out_dir = Path(out_dir)
    labels = [f"{r['prompt']} ({r['split']}, seed {r['seed']})" for r in rows]
    cols = min(cols, len(rows))
    rows_n = -(-len(rows) // cols)
    paths = {"baseline": out_dir / "baseline_grid.png", "finetuned": out_dir / "finetuned_grid.png",
             "comparison": out_dir / "comparison_grid.png"}
    image_grid(baseline, rows_n, cols, labels, title="baseline").save(paths["baseline"])
    image_grid(tuned, rows_n, cols, labels, title="fine-tuned").save(paths["finetuned"])
    side_by_side(baseline, tuned, labels).save(paths["comparison"])
    return paths
