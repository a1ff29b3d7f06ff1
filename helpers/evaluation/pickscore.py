"""PickScore: a human-preference score for a prompt and an image (Kirstain et al. 2023, CLIP-H fine-tuned on the
Pick-a-Pic pairs people chose between), the second column of notebook 05's table next to the CLIP score.

score = logit_scale.exp() × cos(image features, text features), as the model card computes it (≈ 100 × cos; the
scale is the model's learned temperature). Like the CLIP score it is only comparable within one model, so every
score travels with the scorer's `name`. The t4 profile loads `yuvalkirstain/PickScore_v1` with the processor of
`laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (ids in helpers.core.presets); the tiny profile runs the same code on the tiny
CLIP pair (transformers layout), a stand-in that shares the tiny CLIP score's weights, so in the tiny profile this
column shows only that the path works, not a second opinion.

Other preference models were tried and left out: ImageReward 1.5 imports helpers that transformers 5 removed from
`transformers.modeling_utils` (it fails to import), and HPSv2 1.2 pins protobuf < 4 and reloads its checkpoint on
every call.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.precision import Precision, precision_for
from ..core.presets import PICKSCORE, PICKSCORE_PROCESSOR
from ..core.runtime import device as default_device
from ..models import from_pretrained
from ..tiny.world import resolve
from .clip_score import to_pil

MODELS = {"t4": (PICKSCORE, PICKSCORE_PROCESSOR), "tiny": ("tiny/clip", "tiny/clip")}  # profile → (model, processor)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns an output object from get_*_features (projected features in pooler_output); 4.x a
    tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class PickScorer:
    """A PickScore model loaded once (eval mode, no grad; fp16 on a GPU by helpers.core.precision) that scores
    image–prompt pairs in batches, with the same `score` and `name` as helpers.evaluation.clip_score.ClipScorer."""

    def __init__(self, model: str = PICKSCORE, processor: str = PICKSCORE_PROCESSOR,
                 device: torch.device | str | None = None, precision: Precision | None = None):
        from transformers import AutoProcessor, CLIPModel
        self.device = torch.device(device or (precision.device if precision is not None else default_device()))
        self.precision = precision if precision is not None else precision_for("fp16", self.device)
        self.processor = AutoProcessor.from_pretrained(resolve(processor))
        self.model = from_pretrained(CLIPModel, resolve(model), None, self.precision.weight_dtype).to(self.device)
        self.model.eval().requires_grad_(False)
        self.name = "PickScore v1" if model == PICKSCORE else f"PickScore code on {model} (tiny stand-in)"

    @classmethod
    def from_profile(cls, profile: str, device: torch.device | str | None = None,
                     precision: Precision | None = None) -> "PickScorer":
        if profile not in MODELS:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(MODELS)}")
        return cls(*MODELS[profile], device=device, precision=precision)

    def __repr__(self) -> str:
        return f"PickScorer({self.name} on {self.device}, {self.model.dtype})"

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                                return_tensors="pt").to(self.device)
        return _pooled(self.model.get_text_features(**tokens)).float()

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        pixels = self.processor(images=[to_pil(im) for im in images], return_tensors="pt")["pixel_values"]
        return _pooled(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))).float()

    def score(self, images: Sequence, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """logit_scale.exp() · cos(image, prompt) for each aligned pair, as float64 numbers."""
        images, prompts = list(images), [str(p) for p in prompts]
        if not images or len(images) != len(prompts):
            raise ValueError(f"need one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
        unique = sorted(set(prompts))
        text = torch.cat([self.text_features(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])
        text = torch.nn.functional.normalize(text, dim=-1)
        row = {p: k for k, p in enumerate(unique)}
        scale = self.model.logit_scale.exp().float()
        scores = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=self.name, disable=len(starts) < 3):
            feats = torch.nn.functional.normalize(self.image_features(images[start:start + batch_size]), dim=-1)
            idx = torch.tensor([row[p] for p in prompts[start:start + batch_size]], device=feats.device)
            scores.append(scale * (feats * text[idx]).sum(-1))
        return torch.cat(scores).cpu().double().numpy()
