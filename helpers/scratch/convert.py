"""Weights in and out of the scratch models, with strict key checks.

Two layouts exist for the same SD1.5 weights:
  * the diffusers folder (what `snapshot_download` / Colab gets): unet/, vae/, text_encoder/ with one safetensors
    each, plus config.json files. The scratch modules use these parameter names, so this loads with no renaming.
  * the original single file (v1-5-pruned-emaonly.safetensors, what A1111/ComfyUI use): one state dict with
        model.diffusion_model.*             the UNet, numbered the CompVis way (input_blocks.4.1.… = level 1, attn 0)
        first_stage_model.*                 the VAE (encoder.down.1.block.0.…, attention as 1×1 convs)
        cond_stage_model.transformer.*      the CLIP text encoder (transformers' names under text_model.)
    plus the LDM training buffers (betas, alphas_cumprod, …), which are ignored.

The mapping is generated from the config (levels, ResBlocks per level, which levels have attention), not written out
for 4 levels × 2 blocks, so the tiny test models convert with the same code as the real one. Every conversion
checks both ways: a missing or unexpected key is an error that lists them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .clip import CLIPTextConfig, CLIPTextEncoder
from .ddpm import ScheduleConfig
from .pipeline import StableDiffusion
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
# LDM training buffers and EMA bookkeeping stored beside the weights in original checkpoints
IGNORED_ORIGINAL = re.compile(r"^(betas|alphas_cumprod(_prev)?|sqrt_(one_minus_|recip_|recipm1_)?alphas_cumprod|"
                              r"log_one_minus_alphas_cumprod|posterior_(variance|log_variance_clipped|mean_coef[12])|"
                              r"logvar|lvlb_weights)$|^model_ema\.|\.position_ids$")

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class SDConfig:
    """The four configs of one model; the defaults are SD1.5 (an original single file carries no config)."""
    text_encoder: CLIPTextConfig = CLIPTextConfig()
    vae: VAEConfig = VAEConfig()
    unet: UNetConfig = UNetConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    default_size: int = 512  # image side the UNet was trained at (sample_size × 8)


class KeyMismatchError(ValueError):
    """A state dict does not have exactly the keys the model needs."""


def check_keys(expected, found, what: str, show: int = 12) -> None:
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        def listing(keys):
            return ", ".join(keys[:show]) + (f", … (+{len(keys) - show})" if len(keys) > show else "")
        raise KeyMismatchError(f"{what}: {len(missing)} missing keys [{listing(missing)}]; "
                               f"{len(unexpected)} unexpected keys [{listing(unexpected)}]")


# ---------------------------------------------------------------- key tables: scratch (= diffusers) → original

def unet_blocks(cfg: UNetConfig) -> list[tuple[str, str, dict]]:
    """(scratch prefix, original prefix, renames inside the block), in the CompVis numbering: input_blocks counts
    conv_in, then every ResBlock(+attention) and every downsampler; output_blocks counts every up ResBlock."""
    blocks = [("conv_in.", "input_blocks.0.0.", {}), ("time_embedding.linear_1.", "time_embed.0.", {}),
              ("time_embedding.linear_2.", "time_embed.2.", {}), ("conv_norm_out.", "out.0.", {}),
              ("conv_out.", "out.2.", {}), ("mid_block.resnets.0.", "middle_block.0.", RESNET),
              ("mid_block.attentions.0.", "middle_block.1.", {}), ("mid_block.resnets.1.", "middle_block.2.", RESNET)]
    levels, n, block = len(cfg.channels), cfg.layers_per_block, 1
    for i in range(levels):
        for j in range(n):
            blocks.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", RESNET))
            blocks.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", {}))
            block += 1
        if i < levels - 1:
            blocks.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", {}))
            block += 1
    block = 0
    for i in range(levels):  # up_blocks[i] is level levels-1-i
        attention = cfg.cross_attention[levels - 1 - i]
        for j in range(n + 1):
            blocks.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", RESNET))
            blocks.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", {}))
            if j == n and i < levels - 1:
                slot = 2 if attention else 1  # the upsampler comes after the ResBlock and the attention, if any
                blocks.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{block}.{slot}.conv.", {}))
            block += 1
    return blocks


def vae_blocks(cfg: VAEConfig) -> list[tuple[str, str, dict]]:
    """The LDM autoencoder numbers decoder levels from the smallest resolution up (up.3 is the first to run)."""
    blocks = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    levels = len(cfg.channels)
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                   (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                   (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET),
                   (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET),
                   (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)]
    for i in range(levels):
        up = levels - 1 - i
        for j in range(cfg.layers_per_block + 1):
            blocks.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
            blocks.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{up}.block.{j}.", VAE_RESNET))
        blocks.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        blocks.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", {}))
    return blocks


def _rename(key: str, blocks: list[tuple[str, str, dict]]) -> str:
    for prefix, original, renames in blocks:
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for old, new in renames.items():
                if rest.startswith(old + "."):
                    rest = new + rest[len(old):]
            return original + rest
    raise KeyError(f"no original name for {key!r}")


def _meta_keys(model_class, cfg) -> list[str]:
    """Parameter names of a model, built on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return list(model_class(cfg).state_dict())


def key_map(cfg: SDConfig) -> dict[str, dict[str, str]]:
    """{component: {scratch/diffusers name: original single-file name}} for every parameter."""
    return {"unet": {k: UNET_PREFIX + _rename(k, unet_blocks(cfg.unet)) for k in _meta_keys(UNet, cfg.unet)},
            "vae": {k: VAE_PREFIX + _rename(k, vae_blocks(cfg.vae)) for k in _meta_keys(VAE, cfg.vae)},
            "text_encoder": {k: CLIP_PREFIX + k for k in _meta_keys(CLIPTextEncoder, cfg.text_encoder)}}


def _is_vae_attention_weight(key: str) -> bool:
    return ".mid_block.attentions." in key and key.endswith(".weight") and ".group_norm." not in key


def strip_text_model(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers < 5 saved CLIPTextModel weights under `text_model.` (the Hub SD1.5 file does); ≥ 5 does not.
    Both become the scratch names; the non-weight `position_ids` buffer some files carry is dropped."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


# ---------------------------------------------------------------- conversions

def diffusers_to_original(unet: dict, vae: dict, text_encoder: dict, cfg: SDConfig) -> dict[str, torch.Tensor]:
    """diffusers-folder (= scratch) state dicts → one original single-file state dict."""
    names, parts = key_map(cfg), {"unet": unet, "vae": vae, "text_encoder": strip_text_model(text_encoder)}
    out = {}
    for part, state in parts.items():
        check_keys(names[part], state, f"{part} (diffusers layout)")
        for key, tensor in state.items():
            if part == "vae" and _is_vae_attention_weight(key):
                tensor = tensor[:, :, None, None]  # the LDM autoencoder's attention projections are 1×1 convs
            out[names[part][key]] = tensor
    return out


def original_to_scratch(checkpoint: dict[str, torch.Tensor], cfg: SDConfig) -> dict[str, dict[str, torch.Tensor]]:
    """Original single-file state dict → {"unet", "vae", "text_encoder": scratch state dict}."""
    names = key_map(cfg)
    expected = {original for table in names.values() for original in table.values()}
    check_keys(expected, [k for k in checkpoint if not IGNORED_ORIGINAL.search(k)], "original checkpoint")
    out = {}
    for part, table in names.items():
        out[part] = {key: checkpoint[original] for key, original in table.items()}
        if part == "vae":
            out[part] = {k: (v.flatten(1) if _is_vae_attention_weight(k) else v) for k, v in out[part].items()}
    return out


MODEL_CLASSES = {"text_encoder": CLIPTextEncoder, "vae": VAE, "unet": UNet}


def load_model(part: str, part_cfg, state: dict[str, torch.Tensor], device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> nn.Module:
    """One scratch model ("text_encoder", "vae" or "unet") from a scratch-named state dict: built on the meta
    device and handed the tensors themselves (`assign=True`), so loading never holds two copies of the weights."""
    with torch.device("meta"):
        model: nn.Module = MODEL_CLASSES[part](part_cfg)
    check_keys(model.state_dict(), state, part)
    model.load_state_dict(state, strict=True, assign=True)  # also checks every shape
    return model.to(device, dtype).eval().requires_grad_(False)


def build(cfg: SDConfig, states: dict[str, dict[str, torch.Tensor]], tokenizer, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """StableDiffusion from the three scratch-named state dicts."""
    models = {part: load_model(part, getattr(cfg, part), states[part], device, dtype) for part in MODEL_CLASSES}
    return StableDiffusion(tokenizer, models["text_encoder"], models["vae"], models["unet"], cfg.schedule,
                           cfg.default_size)


# ---------------------------------------------------------------- single files

def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a .ckpt pickle (loaded with weights_only, unwrapped from its "state_dict")."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state)


def config_of(sd: StableDiffusion) -> SDConfig:
    return SDConfig(sd.text_encoder.config, sd.vae.config, sd.unet.config, sd.schedule, sd.default_size)


def save_single_file(sd: StableDiffusion, path: str | Path) -> Path:
    """Write a StableDiffusion's weights as one original-layout safetensors file (what A1111/ComfyUI load)."""
    cfg = config_of(sd)
    state = diffusers_to_original(sd.unet.state_dict(), sd.vae.state_dict(), sd.text_encoder.state_dict(), cfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)


def load_single_file(path: str | Path, tokenizer, cfg: SDConfig = SDConfig(), device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> StableDiffusion:
    """An original single-file checkpoint → StableDiffusion. `cfg` must describe the model (default: SD1.5);
    the tokenizer is not in the file (pass a CLIPTokenizer, e.g. from a diffusers folder's tokenizer/)."""
    return build(cfg, original_to_scratch(read_checkpoint(path), cfg), tokenizer, device, dtype)
