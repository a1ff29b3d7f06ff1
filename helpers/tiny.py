"""Tiny random models and generated datasets for the `tiny` profile.

Everything here is written to disk in the same layout as the Hub (model_index.json, unet/, vae/, ...; an image
folder with metadata.jsonl) and then loaded by the SAME code as the real thing (`from_pretrained`,
`helpers.sources`). Nothing is downloaded: the tokenizer files are committed in helpers/assets/.

Presets refer to these by `tiny/<name>`; `resolve("tiny/sd15")` builds the folder once and returns its path.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from . import files
from .runtime import REPO_ROOT

TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tiny_clip_tokenizer"
BUILD_VERSION = "4"  # bump when a builder changes so stale folders are rebuilt
SEED = 0

# The real SD1.5 / SDXL scheduler configs (scheduler/scheduler_config.json on the Hub), so tiny runs exercise the
# same noise schedule, spacing and prediction type as the real models.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                      prediction_type="epsilon", trained_betas=None)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, clip_sample=False)


def tiny_root() -> Path:
    """Tiny models and data live beside the repo's outputs/ (LAB_TINY_DIR overrides), shared by every run."""
    root = Path(os.environ.get("LAB_TINY_DIR", REPO_ROOT / "outputs" / "tiny"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _build_once(name: str, builder: Callable[[Path], None]) -> Path:
    """Build with `helpers.files.write_folder`, so a killed build never leaves a half folder; a folder that exists
    is complete, and its stamp says which BUILD_VERSION made it."""
    final = tiny_root() / name
    stamp = final / ".tiny_build"
    if stamp.is_file() and stamp.read_text() == BUILD_VERSION:
        return final

    def fill(tmp: Path) -> None:
        torch.manual_seed(SEED)
        builder(tmp)
        (tmp / ".tiny_build").write_text(BUILD_VERSION)

    return files.write_folder(final, fill)


# ---------------------------------------------------------------- components

def _tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def _text_config(with_projection_dim: int = 32):
    from transformers import CLIPTextConfig
    tok = _tokenizer()
    # quick_gelu, 77 positions and causal attention as in CLIP ViT-L/14; 2 layers of width 32 instead of 12 × 768.
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=with_projection_dim, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL
    # Four levels, so images shrink 8× into 4-channel latents as in the real VAE.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor,
                         force_upcast=force_upcast)


def build_sd15(path: Path) -> None:
    """SD1.5 in miniature: CrossAttn blocks then a plain block, 8 heads, one CLIP text encoder, PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8)
    pipe = StableDiffusionPipeline(
        vae=_vae(0.18215, force_upcast=True), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
        unet=unet, scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(path)


def build_sdxl(path: Path) -> None:
    """SDXL in miniature: no attention in the first block, deeper transformers lower down (SDXL: 1/2/10, here
    1/1/2), linear projections, two text encoders whose hidden states are concatenated (32 + 32 = 64 context), the
    second with a projection giving pooled `text_embeds`, and the `text_time` addition embedding of size
    32 pooled + 6 time ids × 8 = 80."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025, force_upcast=True), text_encoder=CLIPTextModel(_text_config()), tokenizer=_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(_text_config()), tokenizer_2=_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER), force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(path)
    # The real SDXL repository also ships fp16 copies (`variant="fp16"`), which fp16 loading prefers. Only their
    # weight files are copied: the configs stay those of the fp32 save (transformers reads its dtype from them).
    with tempfile.TemporaryDirectory(dir=path) as tmp:
        pipe.to(torch.float16).save_pretrained(tmp, variant="fp16")
        for weights in Path(tmp).rglob("*.fp16.safetensors"):
            shutil.copy(weights, path / weights.relative_to(tmp))


def build_sdxl_vae_fp16_fix(path: Path) -> None:
    """Stand-in for madebyollin/sdxl-vae-fp16-fix: the tiny SDXL VAE's weights with force_upcast off."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(resolve("tiny/sdxl"), subfolder="vae")
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(path)


def build_clip(path: Path) -> None:
    """Stand-in for openai/clip-vit-large-patch14: text and vision towers with projections, plus processor files."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32, hidden_act="quick_gelu")
    config = CLIPConfig(text_config=_text_config().to_dict(), vision_config=vision.to_dict(), projection_dim=32)
    CLIPModel(config).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def build_open_clip(path: Path) -> None:
    """A tiny open_clip model (ViT, 2 layers, width 32) in open_clip's local-dir layout, for CLIP scores."""
    import open_clip
    from safetensors.torch import save_file
    model_cfg = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                            "preprocess_cfg": preprocess_cfg}, indent=2))
    model = open_clip.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")


# ---------------------------------------------------------------- generated datasets

def _draw_cifar(label: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One synthetic 'photo' of a CIFAR-10 class: each class has its own background, shape, colour and texture,
    jittered in position, size and hue so the model must learn the class, not one picture."""
    def jitter(rgb):
        return tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb)

    backgrounds = {"airplane": (110, 160, 230), "automobile": (120, 120, 120), "bird": (150, 200, 240),
                   "cat": (200, 180, 150), "deer": (60, 140, 60), "dog": (220, 210, 170), "frog": (30, 90, 30),
                   "horse": (150, 190, 90), "ship": (30, 70, 160), "truck": (90, 90, 100)}
    img = Image.new("RGB", (size, size), jitter(backgrounds[label]))
    d = ImageDraw.Draw(img)
    s = rng.uniform(0.8, 1.2)
    cx, cy = size / 2 + rng.uniform(-4, 4), size / 2 + rng.uniform(-4, 4)

    def box(w, h, dx=0.0, dy=0.0):
        return [cx + dx * s - w * s / 2, cy + dy * s - h * s / 2, cx + dx * s + w * s / 2, cy + dy * s + h * s / 2]

    if label == "airplane":  # grey cross-shaped plane on sky
        d.rectangle(box(22, 5), fill=jitter((200, 200, 210)))
        d.rectangle(box(6, 18), fill=jitter((200, 200, 210)))
    elif label == "automobile":  # red body, black wheels on a road
        d.rectangle(box(22, 9), fill=jitter((200, 30, 30)))
        for dx in (-7, 7):
            d.ellipse(box(6, 6, dx, 5), fill=(10, 10, 10))
    elif label == "bird":  # small brown oval with a yellow beak
        d.ellipse(box(12, 8), fill=jitter((120, 70, 30)))
        d.polygon([(cx + 6 * s, cy), (cx + 10 * s, cy + 1), (cx + 6 * s, cy + 2)], fill=(240, 200, 0))
    elif label == "cat":  # orange round head with pointed ears
        d.ellipse(box(16, 14), fill=jitter((230, 140, 40)))
        for dx in (-5, 5):
            d.polygon([(cx + (dx - 3) * s, cy - 4 * s), (cx + dx * s, cy - 12 * s), (cx + (dx + 3) * s, cy - 4 * s)],
                      fill=jitter((230, 140, 40)))
    elif label == "deer":  # brown body with thin legs and antlers on grass
        d.rectangle(box(16, 7), fill=jitter((150, 100, 50)))
        for dx in (-6, 6):
            d.line([cx + dx * s, cy + 3 * s, cx + dx * s, cy + 11 * s], fill=(100, 60, 30), width=2)
        d.line([cx + 8 * s, cy - 3 * s, cx + 12 * s, cy - 11 * s], fill=(90, 60, 30), width=1)
    elif label == "dog":  # black-and-white spotted blob
        d.ellipse(box(18, 12), fill=(240, 240, 240))
        for _ in range(4):
            x, y = cx + rng.uniform(-6, 6) * s, cy + rng.uniform(-4, 4) * s
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(20, 20, 20))
    elif label == "frog":  # bright green flat blob with two eyes
        d.ellipse(box(18, 10), fill=jitter((80, 220, 60)))
        for dx in (-4, 4):
            d.ellipse(box(3, 3, dx, -5), fill=(250, 250, 0))
    elif label == "horse":  # dark brown tall body with a mane stripe
        d.rectangle(box(18, 9), fill=jitter((90, 50, 20)))
        d.rectangle(box(4, 12, 9, -6), fill=jitter((90, 50, 20)))
        d.line([cx + 7 * s, cy - 12 * s, cx + 7 * s, cy - 2 * s], fill=(20, 10, 0), width=2)
    elif label == "ship":  # white hull on stripes of water
        for y in range(0, size, 4):
            d.line([0, y, size, y], fill=jitter((20, 50, 140)), width=1)
        d.polygon([(cx - 12 * s, cy), (cx + 12 * s, cy), (cx + 8 * s, cy + 6 * s), (cx - 8 * s, cy + 6 * s)],
                  fill=jitter((245, 245, 245)))
        d.rectangle(box(6, 6, 0, -3), fill=jitter((200, 50, 50)))
    elif label == "truck":  # big yellow box with a blue cab
        d.rectangle(box(16, 12, -3, 0), fill=jitter((230, 200, 20)))
        d.rectangle(box(7, 9, 9, 1), fill=jitter((40, 60, 200)))
        for dx in (-8, 8):
            d.ellipse(box(5, 5, dx, 7), fill=(10, 10, 10))
    return img


def build_cifar10(path: Path, per_class: int = 24) -> None:
    """CIFAR-10 look-alike: 32 px images of the 10 class names in an image folder with metadata.jsonl
    (file_name, label), the same on-disk format `helpers.sources` reads for a user's folder; captions come from the
    same templates as for the real set."""
    from .sources import CIFAR10_CLASSES  # not at the top: helpers.sources imports this module
    rng = random.Random(SEED)
    (path / "train").mkdir()
    rows = []
    for i in range(per_class):
        for label_id, label in enumerate(CIFAR10_CLASSES):
            name = f"{label}_{i:03d}.png"
            _draw_cifar(label, rng).save(path / "train" / name)
            rows.append({"file_name": name, "label": label_id})
    (path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


NARUTO_HAIR = ("orange", "black", "pink", "white", "red", "blue")
NARUTO_OUTFIT = ("an orange jacket", "a green vest", "a blue shirt", "a black cloak", "a red robe")
NARUTO_BACKGROUND = ("a forest", "a village", "a blue sky", "a stone wall", "a sunset")


def _draw_naruto(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    """A flat cel-shaded 'anime' character: thick black outlines, flat colours, a headband; the caption
    describes what was drawn, in the BLIP style of the real set."""
    colors = {"orange": (250, 140, 20), "black": (25, 25, 25), "pink": (250, 150, 190), "white": (240, 240, 240),
              "red": (210, 30, 30), "blue": (40, 80, 220), "green": (60, 140, 60)}
    hair, outfit, bg = rng.choice(NARUTO_HAIR), rng.choice(NARUTO_OUTFIT), rng.choice(NARUTO_BACKGROUND)
    bg_rgb = {"a forest": (40, 110, 50), "a village": (200, 170, 120), "a blue sky": (120, 180, 250),
              "a stone wall": (140, 140, 140), "a sunset": (250, 120, 80)}[bg]
    img = Image.new("RGB", (size, size), bg_rgb)
    d = ImageDraw.Draw(img)
    for _ in range(3):  # background texture (leaves, bricks, clouds) at random places: no two images alike
        x, y, r = rng.uniform(0, size), rng.uniform(0, size * 0.6), rng.uniform(size / 20, size / 8)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(min(255, c + 30) for c in bg_rgb))
    u = size / 64
    w = max(1, int(2 * u))
    outfit_rgb = colors[outfit.split()[1]]
    d.rectangle([18 * u, 38 * u, 46 * u, 64 * u], fill=outfit_rgb, outline=(0, 0, 0), width=w)  # body
    d.ellipse([20 * u, 12 * u, 44 * u, 40 * u], fill=(250, 215, 170), outline=(0, 0, 0), width=w)  # face
    spikes = [(18 + 4 * k, 18 - (6 if k % 2 else 0)) for k in range(8)]
    d.polygon([(18 * u, 22 * u)] + [(x * u, y * u) for x, y in spikes] + [(46 * u, 22 * u)],
              fill=colors[hair], outline=(0, 0, 0))  # spiky hair
    d.rectangle([20 * u, 20 * u, 44 * u, 24 * u], fill=(60, 60, 200), outline=(0, 0, 0), width=w)  # headband
    for x in (27, 37):  # eyes
        d.ellipse([(x - 2) * u, 27 * u, (x + 2) * u, 31 * u], fill=(20, 20, 80))
    caption = f"a cartoon of a ninja with {hair} hair wearing {outfit} in front of {bg}"
    if rng.random() < 0.3:
        caption = f"an anime character with {hair} hair and {outfit}"
    return img.filter(ImageFilter.SMOOTH), caption


def build_naruto(path: Path, count: int = 120, size: int = 128) -> None:
    """Naruto-BLIP look-alike: one recognisable flat 'anime' style with free-text captions, as an image folder
    with metadata.jsonl (file_name, text)."""
    rng = random.Random(SEED + 1)
    (path / "train").mkdir()
    rows = []
    for i in range(count):
        img, caption = _draw_naruto(rng, size)
        name = f"naruto_{i:04d}.png"
        img.save(path / "train" / name)
        rows.append({"file_name": name, "text": caption})
    (path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


BUILDERS: dict[str, Callable[[Path], None]] = {
    "sd15": build_sd15, "sdxl": build_sdxl, "sdxl-vae-fp16-fix": build_sdxl_vae_fp16_fix, "clip": build_clip,
    "open_clip": build_open_clip, "cifar10": build_cifar10, "naruto": build_naruto,
}


def resolve(ref: str) -> str:
    """`tiny/<name>` → the built folder (built on first use); anything else (a Hub id or a path) unchanged."""
    if not ref.startswith("tiny/"):
        return ref
    name = ref.removeprefix("tiny/")
    if name not in BUILDERS:
        raise KeyError(f"no tiny model or dataset called {name!r}; known: {sorted(BUILDERS)}")
    return str(_build_once(name, BUILDERS[name]))


def build_all() -> dict[str, str]:
    """Build every tiny model and dataset (idempotent); returns name → folder."""
    np.random.seed(SEED)
    return {name: resolve(f"tiny/{name}") for name in BUILDERS}
