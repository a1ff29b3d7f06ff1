"""CLIP score per image, bootstrap confidence intervals and paired tests (helpers.evaluation puts them together).

CLIP score here = 100 · cos(image features, text features) of one image and its prompt, reported RAW: torchmetrics'
CLIPScore clamps it at 0 (max(100·cos, 0)); we do not, so a mean over images is an unbiased mean of the cosine.
Scores from different CLIP models are not comparable, so every score travels with the model's `name`.

Comparisons are paired: baseline and fine-tuned images are generated from the same prompt AND seed (same starting
noise, see helpers.generate.sampling), so the per-pair difference removes most of the prompt-to-prompt and seed-to-seed
variation and the bootstrap CI of the mean difference says whether fine-tuning changed the score. The p-value is
an exact sign test on wins vs losses (no scipy needed): it asks only whether one variant wins more often than chance.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..core.precision import Precision, precision_for
from ..core.runtime import device as default_device
from ..tiny.world import resolve

# open_clip models per profile: (model, pretrained tag). The tiny one is a random-weight open_clip in local-dir form.
CLIP_MODELS = {"t4": ("ViT-L-14", "openai"), "tiny": ("tiny/open_clip", None)}


# ---------------------------------------------------------------- images in, uint8 RGB out

def to_pil(image) -> Image.Image:
    """A PIL image, a file path, or an HWC (or HW) uint8 array/tensor in 0-255 or float one in [0, 1] → RGB PIL.

    Floats become uint8 by round(x · 255) BEFORE the CLIP preprocessing, so a float image and its uint8 version
    go through identical pixels and get identical scores."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"cannot score a {type(image).__name__}; pass PIL images, paths or HWC arrays")
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array of shape {image.shape} is not HWC; for CHW use .permute(1, 2, 0)")
    if image.ndim not in (2, 3):
        raise ValueError(f"image array must be HW or HWC, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min(initial=0) < 0 or image.max(initial=0) > 1:
            raise ValueError("float images must be in [0, 1] (for [-1, 1] use (x + 1) / 2)")
        image = np.round(image * 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"integer images must be uint8 in 0-255, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image).convert("RGB")


# ---------------------------------------------------------------- the scorer

def pixel_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype pixels must have to enter `model.visual`: that of its input layer.

    Not `next(model.parameters()).dtype`: open_clip's precision="fp16" keeps the positional embeddings and the
    LayerNorms in fp32, so the first parameter is fp32 while the patch embedding (`visual.conv1`) is fp16."""
    visual = model.visual
    first = getattr(visual, "conv1", None)
    if not isinstance(first, (torch.nn.Conv2d, torch.nn.Linear)):
        first = next((m for m in visual.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))), None)
    if first is None:
        raise ValueError(f"cannot tell the input dtype of {type(visual).__name__}: it has no Conv2d or Linear layer")
    return first.weight.dtype


class ClipScorer:
    """An open_clip model loaded once (eval mode, no grad) that scores image–prompt pairs in batches. Its dtype comes
    from helpers.core.precision: fp16 on a T4 (and in the CPU T4-dtype test mode), fp32 otherwise."""

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai",
                 device: torch.device | str | None = None, precision: Precision | None = None):
        import open_clip
        if device is None:
            device = precision.device if precision is not None else default_device()
        self.device = torch.device(device)
        self.precision = precision if precision is not None else precision_for("fp16", self.device)
        local = resolve(model)
        if model.startswith("tiny/") or Path(local).is_dir():
            spec, pretrained = "local-dir:" + local, None  # open_clip's local folder layout; weights are in it
            self.name = "open_clip tiny (pretrained on generated images)" if model == "tiny/open_clip" else f"open_clip {Path(local).name}"
        else:
            spec = model
            self.name = f"open_clip {model} ({pretrained or 'random'})"
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain "ViT-L-14" config uses GELU unless told.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            spec, pretrained=pretrained, device=self.device, force_quick_gelu=pretrained == "openai",
            precision=self.precision.open_clip_precision)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(spec)
        self.dtype = pixel_dtype(self.model)

    @classmethod
    def from_profile(cls, profile: str, device: torch.device | str | None = None,
                     precision: Precision | None = None) -> "ClipScorer":
        if profile not in CLIP_MODELS:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(CLIP_MODELS)}")
        return cls(*CLIP_MODELS[profile], device=device, precision=precision)

    def __repr__(self) -> str:
        return f"ClipScorer({self.name} on {self.device}, {self.precision.open_clip_precision})"

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens).float()

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(to_pil(im)) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels).float()

    def score(self, images: Sequence, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """100 · cos(image, prompt) for each aligned pair (not clamped at 0), as float64 numbers."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)  # a batch N×H×W×C
        images, prompts = list(images), [str(p) for p in prompts]
        if not images or len(images) != len(prompts):
            raise ValueError(f"need one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
        unique = sorted(set(prompts))  # seeds repeat prompts: encode each text once
        text = torch.cat([self.text_features(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])
        text = torch.nn.functional.normalize(text, dim=-1)
        row = {p: k for k, p in enumerate(unique)}
        scores = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"CLIP score ({self.name})", disable=len(starts) < 3):
            feats = torch.nn.functional.normalize(self.image_features(images[start:start + batch_size]), dim=-1)
            idx = torch.tensor([row[p] for p in prompts[start:start + batch_size]], device=feats.device)
            scores.append(100 * (feats * text[idx]).sum(-1))
        return torch.cat(scores).cpu().double().numpy()


