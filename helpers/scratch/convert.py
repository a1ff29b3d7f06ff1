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

import json
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
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the Hub copy of runwayml's SD1.5 (diffusers layout)
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


# ---------------------------------------------------------------- diffusers folders

# config fields the scratch models do not implement, with the only value they accept (SD1.5's)
UNSUPPORTED = {
    "unet": {"act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
             "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_padding": 1, "dual_cross_attention": False,
             "encoder_hid_dim": None, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_scale_factor": 1,
             "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False, "resnet_out_scale_factor": 1.0,
             "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
             "time_embedding_type": "positional", "time_embedding_dim": None, "timestep_post_act": None,
             "upcast_attention": False, "use_linear_projection": False, "cross_attention_norm": None,
             "num_class_embeds": None},
    "vae": {"act_fn": "silu", "mid_block_add_attention": True, "use_quant_conv": True, "use_post_quant_conv": True,
            "shift_factor": None, "latents_mean": None, "latents_std": None},
    "text_encoder": {"hidden_act": "quick_gelu"},
    "scheduler": {"beta_schedule": "scaled_linear", "prediction_type": "epsilon", "timestep_spacing": "leading",
                  "trained_betas": None, "rescale_betas_zero_snr": False, "set_alpha_to_one": False,
                  "clip_sample": False, "thresholding": False},
}


def _check_supported(part: str, config: dict) -> None:
    wrong = {k: config[k] for k, ok in UNSUPPORTED[part].items() if k in config and config[k] != ok}
    if wrong:
        raise ValueError(f"{part} config is not SD1.5-like; the scratch models do not implement {wrong} "
                         f"(supported: { {k: UNSUPPORTED[part][k] for k in wrong} })")


# fields older configs may omit, with the value diffusers / transformers assume (SD1.5's vae/config.json, written by
# diffusers 0.6, has no scaling_factor)
OMITTED = {"unet": {"in_channels": 4, "out_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
                    "norm_eps": 1e-5, "transformer_layers_per_block": 1, "num_attention_heads": None},
           "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                   "norm_num_groups": 32, "scaling_factor": 0.18215},
           "text_encoder": {"layer_norm_eps": 1e-5}, "scheduler": {"steps_offset": 0}}


def config_from_diffusers(unet: dict, vae: dict, text_encoder: dict, scheduler: dict) -> SDConfig:
    """The four config.json dicts of a diffusers SD folder → SDConfig, refusing anything not SD1.5-like."""
    given = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
    for part, config in given.items():
        _check_supported(part, config)
    unet, vae, text, sched = ({**OMITTED[part], **config} for part, config in given.items())
    required = {"unet": ("block_out_channels", "down_block_types", "up_block_types", "cross_attention_dim",
                         "attention_head_dim", "sample_size"), "vae": ("block_out_channels",),
                "text_encoder": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                 "intermediate_size", "max_position_embeddings"),
                "scheduler": ("num_train_timesteps", "beta_start", "beta_end")}
    lacking = {part: [k for k in keys if k not in given[part]] for part, keys in required.items()}
    if any(lacking.values()):
        raise ValueError(f"config fields missing: { {p: k for p, k in lacking.items() if k} }")
    down, up = list(unet["down_block_types"]), list(unet["up_block_types"])
    attention = [kind == "CrossAttnDownBlock2D" for kind in down]
    expected_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if any(kind not in ("CrossAttnDownBlock2D", "DownBlock2D") for kind in down) or up != expected_up:
        raise ValueError(f"unsupported UNet blocks {down} / {up}: expected CrossAttnDownBlock2D/DownBlock2D down and "
                         f"their mirror {expected_up} up")
    # diffusers' SD1.5 config calls the number of heads `attention_head_dim` (a historical misnomer)
    heads, depth = unet["num_attention_heads"] or unet["attention_head_dim"], unet["transformer_layers_per_block"]
    if isinstance(heads, (list, tuple)) and len(set(heads)) == 1:
        heads = heads[0]
    if not isinstance(heads, int) or not isinstance(depth, int):
        raise ValueError(f"per-level heads {heads} / transformer depth {depth} are not supported")
    if vae["in_channels"] != vae["out_channels"]:
        raise ValueError("VAE in_channels and out_channels differ")
    return SDConfig(
        text_encoder=CLIPTextConfig(vocab_size=text["vocab_size"], width=text["hidden_size"],
                                    layers=text["num_hidden_layers"], heads=text["num_attention_heads"],
                                    mlp_width=text["intermediate_size"], max_tokens=text["max_position_embeddings"],
                                    eps=text["layer_norm_eps"]),
        vae=VAEConfig(image_channels=vae["in_channels"], latent_channels=vae["latent_channels"],
                      channels=tuple(vae["block_out_channels"]), layers_per_block=vae["layers_per_block"],
                      groups=vae["norm_num_groups"], scaling_factor=vae["scaling_factor"]),
        unet=UNetConfig(in_channels=unet["in_channels"], out_channels=unet["out_channels"],
                        channels=tuple(unet["block_out_channels"]), cross_attention=tuple(attention),
                        layers_per_block=unet["layers_per_block"], heads=heads,
                        context_dim=unet["cross_attention_dim"], transformer_depth=depth,
                        groups=unet["norm_num_groups"], eps=unet["norm_eps"]),
        schedule=ScheduleConfig(num_train_timesteps=sched["num_train_timesteps"], beta_start=sched["beta_start"],
                                beta_end=sched["beta_end"], steps_offset=sched["steps_offset"]),
        default_size=unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1))


def read_weights(folder: str | Path, variant: str | None = None) -> dict[str, torch.Tensor]:
    """Every safetensors shard in one component folder; `<name>.<variant>.safetensors` when present (e.g. the Hub's
    fp16 files, half the download), else the plain files."""
    files = sorted(Path(folder).glob("*.safetensors"))
    plain = [f for f in files if len(f.name.split(".")) == 2]  # not fp16 / non_ema / … variants
    chosen = [f for f in files if variant and f.name.endswith(f".{variant}.safetensors")] or plain
    if not chosen:
        raise FileNotFoundError(f"no weights in {folder} (found {[f.name for f in files]})")
    state = {}
    for file in chosen:
        state.update(load_file(file))
    return state


def read_configs(folder: str | Path) -> dict[str, dict]:
    """The unet/vae/text_encoder config.json and scheduler_config.json of a diffusers folder, as dicts."""
    return {part: json.loads((Path(folder) / part / name).read_text()) for part, name in
            (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
             ("scheduler", "scheduler_config.json"))}


def load_tokenizer(path: str | Path):
    from transformers import CLIPTokenizer  # the one transformers class used here: BPE is not the point of notebook 06
    return CLIPTokenizer.from_pretrained(str(path))


def load_diffusers_folder(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                          variant: str | None = None) -> StableDiffusion:
    """A diffusers SD1.5 folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) →
    StableDiffusion built from the scratch modules."""
    folder = Path(folder)
    cfg = config_from_diffusers(**read_configs(folder))
    states = {part: read_weights(folder / part, variant) for part in ("unet", "vae", "text_encoder")}
    states["text_encoder"] = strip_text_model(states["text_encoder"])
    return build(cfg, states, load_tokenizer(folder / "tokenizer"), device, dtype)


def fetch_diffusers_folder(repo_id: str = SD15_REPO, variant: str = "fp16") -> Path:
    """Download only what load_diffusers_folder reads (configs, tokenizer, one weight file per component: the
    `variant` file where the repo has one, else the full-precision one) and return the local folder."""
    from huggingface_hub import snapshot_download
    parts = ("unet", "vae", "text_encoder")
    small = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"]
    folder = Path(snapshot_download(repo_id, allow_patterns=small + [f"{p}/*.{variant}.safetensors" for p in parts]))
    full = {"unet": "unet/diffusion_pytorch_model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors",
            "text_encoder": "text_encoder/model.safetensors"}
    missing = [full[p] for p in parts if not any((folder / p).glob("*.safetensors"))]
    if missing:
        snapshot_download(repo_id, allow_patterns=missing)
    return folder


def load_for_profile(profile: str, repo_id: str = SD15_REPO) -> tuple[StableDiffusion, Path]:
    """`tiny`: the repo's tiny SD1.5 on the CPU in fp32. `t4`: the real weights from the Hub (fp16 files) on CUDA
    in fp16. Both through load_diffusers_folder; returns the model and the folder it came from."""
    if profile == "t4":
        folder = fetch_diffusers_folder(repo_id)
        return load_diffusers_folder(folder, "cuda", torch.float16, variant="fp16"), folder
    from ..tiny import resolve
    folder = Path(resolve("tiny/sd15"))
    return load_diffusers_folder(folder), folder
