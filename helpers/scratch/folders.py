"""Diffusers folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/ with config.json files) into the scratch
models: their configs become an SDConfig (fields that older configs omit take the library defaults; unsupported
options are refused), their weights load with no renaming (the scratch modules use diffusers' parameter names).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.paths import TINY_ASSETS
from ..core.presets import SD15 as SD15_REPO  # model ids live in core/presets.py
from .clip import CLIPTextConfig
from .convert import SDConfig, build, strip_text_model
from .ddpm import ScheduleConfig
from .pipeline import StableDiffusion
from .unet import UNetConfig
from .vae import VAEConfig

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
    folder = TINY_ASSETS / "tiny_world" / "sd15"  # the committed tiny model (helpers.tiny; not imported: diffusers)
    return load_diffusers_folder(folder), folder


# What each profile's model can draw: the real SD1.5 knows any English; the tiny one only the words of its generated
# world (CIFAR-10 classes, coloured shapes, scenes), and a prompt outside its tokenizer's vocabulary draws a blank.
PROMPTS = {"t4": ("a watercolor painting of a lighthouse on a cliff at sunset",
                  "a watercolor portrait of a ninja with orange hair"),
           "tiny": ("a photo of a ship", "a photo of a frog")}


def default_prompts(profile: str, prompt: str = "", img2img_prompt: str = "") -> tuple[str, str]:
    """(txt2img prompt, img2img prompt): the ones given, and for an empty one a prompt `profile`'s model knows."""
    known = PROMPTS["t4" if profile == "t4" else "tiny"]
    return prompt or known[0], img2img_prompt or known[1]
