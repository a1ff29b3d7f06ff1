"""helpers.pickscore on the tiny CLIP pair: the model card's formula, computed by hand with stock transformers."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel

from helpers.core import presets
from helpers.evaluation.pickscore import MODELS, PickScorer
from helpers.tiny.world import resolve


def test_score_is_logit_scale_times_cosine_as_the_model_card_computes_it():
    scorer = PickScorer.from_profile("tiny", device="cpu")
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 40, 40), (30, 160, 60), (20, 40, 200))]
    prompts = ["a red square", "a green frog", "a blue sky"]
    scores = scorer.score(images, prompts)
    model, processor = CLIPModel.from_pretrained(resolve("tiny/clip")), AutoProcessor.from_pretrained(resolve("tiny/clip"))
    with torch.no_grad():
        inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
        out = model(**inputs)  # the full forward: logits_per_image = scale × cos for every image × text
    np.testing.assert_allclose(scores, out.logits_per_image.diag().numpy(), rtol=1e-4, atol=1e-4)
    assert scores.dtype == np.float64 and "tiny stand-in" in scorer.name
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(images, prompts[:2])


def test_the_t4_profile_names_pickscore_and_its_processor():
    assert MODELS["t4"] == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert (presets.PICKSCORE, presets.PICKSCORE_PROCESSOR) == MODELS["t4"]
    with pytest.raises(ValueError, match="unknown profile"):
        PickScorer.from_profile("gpu")
