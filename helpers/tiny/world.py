"""The tiny world of the `tiny` profile: small PRETRAINED models committed in the Hub folder layout, and small
generated datasets.

Models (tiny/sd15, tiny/sdxl, tiny/sdxl-vae-fp16-fix, tiny/clip, tiny/open_clip) are committed read-only under
helpers/tiny/assets/tiny_world/ (scripts/build_tiny_world.py pretrains them on a CPU; CI never rebuilds them) and are
loaded by the SAME code as the real ones (`from_pretrained`, open_clip's local-dir). Datasets (tiny/cifar10,
tiny/naruto) are drawn by helpers.tiny.pictures into the storage folder's tiny/ once (on Colab: Drive): small and
deterministic.

The architecture of each tiny model lives here (`make_*`), so the build and the tests agree on one definition.
"""
from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

from ..core import files
from ..core.paths import TINY_ASSETS, tiny_root
from ..core.presets import CIFAR10_CLASSES
from . import pictures as tiny_data

TOKENIZER_DIR = TINY_ASSETS / "tiny_clip_tokenizer"
WORLD_DIR = TINY_ASSETS / "tiny_world"
MODELS = ("sd15", "sdxl", "sdxl-vae-fp16-fix", "clip", "open_clip")
DATA_VERSION = "5"  # bump when a data builder changes so stale folders are redrawn

# The real SD1.5 / SDXL scheduler configs (scheduler/scheduler_config.json on the Hub), so tiny runs exercise the
# same noise schedule, spacing and prediction type as the real models.
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False,
                      prediction_type="epsilon", trained_betas=None)
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, clip_sample=False)

# The tiny CLIP: ViT-L/14's recipe (quick_gelu, 77 causal positions, class-token pooling) at width 64, 3 layers.
CLIP_WIDTH, CLIP_LAYERS, CLIP_HEADS, CLIP_EMBED = 64, 3, 4, 64
CLIP_IMAGE_SIZE, CLIP_PATCH = 32, 4
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI's


def tokenizer():
    from transformers import CLIPTokenizer
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


# ---------------------------------------------------------------- architectures

def text_config():
    from transformers import CLIPTextConfig
    tok = tokenizer()
    return CLIPTextConfig(vocab_size=len(tok), hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH,
                          num_hidden_layers=CLIP_LAYERS, num_attention_heads=CLIP_HEADS, max_position_embeddings=77,
                          hidden_act="quick_gelu", projection_dim=CLIP_EMBED, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def make_clip():
    """Stand-in for openai/clip-vit-large-patch14 (text + vision towers with projections)."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig
    vision = CLIPVisionConfig(hidden_size=CLIP_WIDTH, intermediate_size=4 * CLIP_WIDTH, num_hidden_layers=CLIP_LAYERS,
                              num_attention_heads=CLIP_HEADS, image_size=CLIP_IMAGE_SIZE, patch_size=CLIP_PATCH,
                              projection_dim=CLIP_EMBED, hidden_act="quick_gelu")
    return CLIPModel(CLIPConfig(text_config=text_config().to_dict(), vision_config=vision.to_dict(),
                                projection_dim=CLIP_EMBED))


# GroupNorm groups of the tiny VAE and UNets: 4 channels per group at the widest-resolution level, as the real VAE
# (128 channels / 32 groups) and UNet (320 / 32 = 10). With the default 32 groups a 16- or 32-channel level would be
# normalised per channel, which removes each channel's mean over the picture: flat colours then come back shifted.
VAE_GROUPS, UNET_GROUPS = 4, 8


def make_vae(scaling_factor: float, force_upcast: bool = True):
    from diffusers import AutoencoderKL
    # Four levels, so images shrink 8× into 4-channel latents as in the real VAE; cheap at full resolution (16
    # channels), wider where the picture is small (128 channels at 1/8).
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64, 128),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=VAE_GROUPS, sample_size=64,
                         scaling_factor=scaling_factor, force_upcast=force_upcast)


def make_unet(family: str):
    """SD1.5-like: CrossAttn blocks then a plain block, 8 heads, context = the tiny CLIP's 64-wide states.
    SDXL-like: no attention in the first block, deeper transformers lower down (SDXL: 1/2/10, here 1/1/2), linear
    projections, two text encoders' states concatenated (64 + 64 = 128 context) and the `text_time` addition
    embedding of size 64 pooled + 6 time ids × 8 = 112."""
    from diffusers import UNet2DConditionModel
    if family == "sd15":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=CLIP_WIDTH, attention_head_dim=8, norm_num_groups=UNET_GROUPS)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        cross_attention_dim=2 * CLIP_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=CLIP_EMBED + 6 * 8, norm_num_groups=UNET_GROUPS)


def text_encoders(clip_dir: str | Path, family: str) -> list:
    """The tiny CLIP's text tower as SD's frozen text encoder(s): SD1.5 one CLIPTextModel (as ViT-L/14's), SDXL
    the same tower twice, the second with its projection (pooled `text_embeds`)."""
    from transformers import CLIPModel, CLIPTextModel, CLIPTextModelWithProjection
    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    plain = CLIPTextModel(clip.config.text_config)
    getattr(plain, "text_model", plain).load_state_dict(clip.text_model.state_dict())  # transformers 5: no wrapper
    if family == "sd15":
        return [plain.eval()]
    projected = CLIPTextModelWithProjection(clip.config.text_config)
    getattr(projected, "text_model", projected).load_state_dict(clip.text_model.state_dict())
    projected.text_projection.load_state_dict(clip.text_projection.state_dict())
    return [plain.eval(), projected.eval()]


@torch.no_grad()
def encode_prompts(encoders: list, tok, prompts: list[str], family: str, batch: int = 256):
    """Text states as the stock pipelines compute them: SD1.5 the last layer (after the final LayerNorm); SDXL the
    penultimate layer of both encoders concatenated, plus the second's pooled projection."""
    states, pooled = [], []
    for i in range(0, len(prompts), batch):
        ids = tok(prompts[i:i + batch], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        if family == "sd15":
            states.append(encoders[0](ids).last_hidden_state)
            continue
        first = encoders[0](ids, output_hidden_states=True)
        second = encoders[1](ids, output_hidden_states=True)
        states.append(torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1))
        pooled.append(second.text_embeds)
    return torch.cat(states), (torch.cat(pooled) if pooled else None)


# ---------------------------------------------------------------- generated datasets

def build_cifar10(path: Path, per_class: int = 24) -> None:
    """CIFAR-10 look-alike: 32 px images of the 10 classes in an image folder with metadata.jsonl (file_name,
    label), the on-disk format `helpers.data.sources` reads for a user's folder; captions come from the same templates
    as for the real set."""
    rng = random.Random(tiny_data.CIFAR_FOLDER_SEED)
    (path / "train").mkdir()
    rows = []
    for i in range(per_class):
        for label_id, label in enumerate(CIFAR10_CLASSES):
            name = f"{label}_{i:03d}.png"
            tiny_data.draw_cifar(label, rng).save(path / "train" / name)
            rows.append({"file_name": name, "label": label_id})
    (path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_naruto(path: Path, count: int = tiny_data.NARUTO_FOLDER_COUNT, size: int = 128) -> None:
    """Naruto-BLIP look-alike: one recognisable flat 'anime' style with free-text captions, as an image folder with
    metadata.jsonl (file_name, text)."""
    rng = random.Random(tiny_data.NARUTO_FOLDER_SEED)
    (path / "train").mkdir()
    rows = []
    for i in range(count):
        img, caption = tiny_data.draw_naruto(rng, size)
        name = f"naruto_{i:04d}.png"
        img.save(path / "train" / name)
        rows.append({"file_name": name, "text": caption})
    (path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


DATASETS: dict[str, Callable[[Path], None]] = {"cifar10": build_cifar10, "naruto": build_naruto}


def _build_once(name: str, builder: Callable[[Path], None]) -> Path:
    """Build with `helpers.core.files.write_folder`, so a killed build never leaves a half folder; a folder that exists
    is complete, and its stamp says which DATA_VERSION drew it."""
    final = tiny_root() / name
    stamp = final / ".tiny_build"
    if stamp.is_file() and stamp.read_text() == DATA_VERSION:
        return final

    def fill(tmp: Path) -> None:
        builder(tmp)
        (tmp / ".tiny_build").write_text(DATA_VERSION)

    try:
        return files.write_folder(final, fill)
    except OSError as e:  # two processes drawing it at once (test workers, notebooks): the first one's is the same
        if files.placed_by_another(e, final) and stamp.is_file() and stamp.read_text() == DATA_VERSION:
            return final
        raise


def resolve(ref: str) -> str:
    """`tiny/<name>` → the committed model folder, or the dataset folder (drawn on first use); anything else (a Hub
    id or a path) unchanged."""
    if not ref.startswith("tiny/"):
        return ref
    name = ref.removeprefix("tiny/")
    if name in MODELS:
        folder = WORLD_DIR / name
        if not (folder / ".complete").is_file():
            raise FileNotFoundError(f"the committed tiny model {folder} is missing or partial: check out the "
                                    f"repository again, or rebuild it with scripts/build_tiny_world.py")
        return str(folder)
    if name not in DATASETS:
        raise KeyError(f"no tiny model or dataset called {name!r}; known: {sorted([*MODELS, *DATASETS])}")
    return str(_build_once(name, DATASETS[name]))


def build_all() -> dict[str, str]:
    """Every tiny model and dataset folder (datasets drawn if needed); returns name → folder."""
    return {name: resolve(f"tiny/{name}") for name in (*MODELS, *DATASETS)}
