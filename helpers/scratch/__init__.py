"""Stable Diffusion v1.5 from scratch in plain PyTorch, one file per part, proven equal to diffusers.

    clip.py       CLIP text encoder: prompt ids [b, 77] → context [b, 77, 768]
    vae.py        autoencoder: image [b, 3, 512, 512] ↔ latent [b, 4, 64, 64]
    attention.py  attention, GEGLU feed-forward, transformer block, spatial transformer
    unet.py       the noise-predicting UNet (320/640/1280/1280, cross-attention to the text)
    ddpm.py       noise schedule, DDPM and DDIM samplers with SD1.5's timestep spacing
    pipeline.py   txt2img and img2img with classifier-free guidance
    convert.py    weights from an original single file (and back) by generated key tables, strictly checked
    folders.py    a diffusers folder (configs + weights) into the scratch models
    parity.py     the proof: the same weights in diffusers/transformers, compared part by part

Only parity.py imports diffusers/transformers model classes; the rest uses torch, einops, safetensors and (for the
BPE tokenizer) transformers' CLIPTokenizer.
"""
