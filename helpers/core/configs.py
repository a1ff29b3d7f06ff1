"""The real models' configurations, written once: copied from their Hub config.json files (we may not download
them). The memory plan builds the full-size models from them on the meta device, the scratch parity tests build
diffusers' models from them, and the image-size rule of every generation and training path derives from them.
"""
from __future__ import annotations

import math

# Copied from the Hub config.json files (we may not download them): stable-diffusion-v1-5/stable-diffusion-v1-5
# unet/config.json, stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, vae/config.json (identical layout in
# both and in madebyollin/sdxl-vae-fp16-fix, whose sample_size 512 sets diffusers' VAE tile to 512 px),
# text_encoder/config.json (openai/clip-vit-large-patch14's text tower, in both pipelines) and SDXL's
# text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower + projection).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32, norm_eps=1e-5,
                 center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
                 mid_block_scale_factor=1)
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, act_fn="silu",
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5,
                 flip_sin_to_cos=True, freq_shift=0, downsample_padding=1, mid_block_scale_factor=1)
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, act_fn="silu", norm_num_groups=32, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
CLIP_L14_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_BIGG_TEXT = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
CLIP_L14_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu", projection_dim=768)
# laion/CLIP-ViT-H-14-laion2B-s32B-b79K config.json (PickScore_v1 fine-tunes it; open_clip ViT-H-14.json agrees:
# vision width 1280, 32 layers, head width 80, patch 14; text width 1024, 24 layers, 16 heads; embed_dim 1024).
CLIP_H14_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=1024)
CLIP_H14_VISION = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu", projection_dim=1024)
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # as the diffusers LoRA scripts adapt CLIP
UNETS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}


def size_multiple(unet_config, vae_config) -> int:
    """Image sides must be a multiple of the VAE's factor × the UNet's down-sampling (its latents are halved once
    per block after the first): SD1.5 8 × 8 = 64 px, SDXL 8 × 4 = 32 px."""
    def get(config, key):
        return config[key] if isinstance(config, dict) else getattr(config, key)
    vae_factor = 2 ** (len(get(vae_config, "block_out_channels")) - 1)
    return vae_factor * 2 ** (len(get(unet_config, "block_out_channels")) - 1)


def image_size_multiple(family: str) -> int:
    if family not in UNETS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(UNETS)}")
    return size_multiple(UNETS[family], SD_VAE)


def check_image_size(size: int, family: str, what: str = "image size") -> int:
    """The one image-size rule (presets, evaluation, explorer, app): a positive multiple of the family's multiple."""
    multiple = image_size_multiple(family)
    if not isinstance(size, int) or isinstance(size, bool) or size < multiple or size % multiple:
        finite = isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size)
        near = max(multiple, round(size / multiple) * multiple) if finite else multiple
        raise ValueError(f"{what} {size!r} is not allowed for {family}: use a multiple of {multiple} px "
                         f"(e.g. {near})")
    return size
