"""Inference memory on the meta device: the peak of live tensors while a full-size model runs under
`torch.no_grad()` (sampling, caching), tracked by a TorchDispatchMode that sees every allocation and, through weak
references, every free. `helpers.plan.memory` turns these into the sampling and caching phases of the T4 plan.
"""
from __future__ import annotations

import weakref
from functools import lru_cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..methods.priors import condition, make_network
from ..prior.priors import CANDIDATES, PREDICT_BATCH
from .meta import (
    TOKENS,
    efficient_attention,
    full_size_clip,
    full_size_text_encoders,
    full_size_unet,
    full_size_vae,
    latent_factor,
    storages,
    unet_inputs,
)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of every storage an op creates until its last tensor is freed; `peak` is the high mark.
    Storages of `exclude` (the weights) are not counted."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.now, self.peak = exclude, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.exclude:
            return
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.live[key]


def _peak_live(module: torch.nn.Module, run) -> int:
    tracker = _LiveBytes(storages(module))
    with torch.no_grad(), efficient_attention(), tracker:
        run()
    return tracker.peak


@lru_cache(maxsize=None)
def unet_inference_bytes(family: str, resolution: int, batch: int) -> int:
    """Peak live bytes of one fp16 UNet forward under no_grad (a sampling step: batch = 2 × images for CFG)."""
    unet = full_size_unet(family).half()
    args, extra = unet_inputs(unet, family, resolution, batch, torch.float16)
    return _peak_live(unet, lambda: unet(*args, **extra))


@lru_cache(maxsize=None)
def vae_decode_bytes(resolution: int, images: int, fp32: bool, tiling: bool) -> int:
    """Peak live bytes of `vae.decode` of `images` latents (one call: with slicing diffusers passes 1 at a time);
    with `tiling`, diffusers' own tiled_decode decides whether and how to tile (tiles of config.sample_size px)."""
    vae = full_size_vae()
    vae = vae if fp32 else vae.half()
    if tiling:
        vae.enable_tiling()
    size = resolution // latent_factor()
    z = torch.randn(images, vae.config.latent_channels, size, size, device="meta",
                    dtype=torch.float32 if fp32 else torch.float16)
    return _peak_live(vae, lambda: vae.decode(z))


@lru_cache(maxsize=None)
def vae_encode_bytes(resolution: int, images: int, fp32: bool) -> int:
    """Peak live bytes of `vae.encode` of a batch of images (the latent cache is built in such batches)."""
    vae = full_size_vae()
    vae = vae if fp32 else vae.half()
    x = torch.randn(images, vae.config.in_channels, resolution, resolution, device="meta",
                    dtype=torch.float32 if fp32 else torch.float16)
    return _peak_live(vae, lambda: vae.encode(x))


@lru_cache(maxsize=None)
def text_encode_bytes(family: str, captions: int) -> int:
    """Peak live bytes of encoding `captions` prompts with every text encoder (hidden states kept, as SDXL needs)."""
    peak = 0
    for encoder in full_size_text_encoders(family):
        encoder = encoder.half()
        ids = torch.zeros(captions, TOKENS, dtype=torch.long, device="meta")
        peak = max(peak, _peak_live(encoder, lambda: encoder(ids, output_hidden_states=True)))
    return peak


@lru_cache(maxsize=None)
def clip_image_encode_bytes(images: int) -> int:
    """Peak live bytes of embedding a batch of images with fp16 CLIP ViT-L/14 (the embedding cache, notebook 04)."""
    clip = full_size_clip().half()
    size = clip.config.vision_config.image_size
    x = torch.randn(images, 3, size, size, device="meta", dtype=torch.float16)
    return _peak_live(clip, lambda: clip.visual_projection(clip.vision_model(x).pooler_output))


@lru_cache(maxsize=None)
def prior_predict_bytes(preset, dim: int) -> int:
    """Peak live bytes of one denoising call of `preset`'s prior (built by helpers.prior on the meta device, fp32
    as helpers.prior.metrics.load_prior loads it) on PREDICT_BATCH texts × CANDIDATES: what predicting held-out rows
    or a prompt source's embeddings holds beside the loaded models."""
    rows, tokens = PREDICT_BATCH * CANDIDATES, preset.prior_text_tokens
    with torch.device("meta"):
        net = make_network(preset, dim).eval()
        text = torch.randn(rows, dim)
        states, masks = torch.randn(rows, tokens, dim), torch.ones(rows, tokens, dtype=torch.bool)
    if preset.method == "mlp_prior":
        return _peak_live(net, lambda: net(text))
    return _peak_live(net, lambda: net(text, torch.full((rows,), 500, device="meta"),
                                       **condition(text, states if tokens else None, masks)))
