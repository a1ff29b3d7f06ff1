"""helpers.evaluate: CLIP score against a hand computation on the tiny open_clip model, input formats, bootstrap
CIs, paired differences and the sign test."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.core.precision import precision_for
from helpers.evaluation import clip_score as evaluate
from helpers.evaluation import stats
from helpers.tiny import world as tiny


@pytest.fixture(scope="module")
def scorer():
    # fp32 explicitly, so LAB_T4_DTYPES=1 in the environment cannot turn the hand-computation checks into fp16 ones
    return evaluate.ClipScorer.from_profile("tiny", device="cpu", precision=precision_for("no", "cpu", t4_dtypes=False))


def _images(n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


PROMPTS = ["a photo of a cat", "a green frog", "a ship on the sea", "a photo of a cat"]


def test_score_equals_hand_computed_cosine(scorer):
    import open_clip
    spec = "local-dir:" + tiny.resolve("tiny/open_clip")  # an independent load of the same model
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    model.eval()
    tokenizer = open_clip.get_tokenizer(spec)
    images = [Image.fromarray(a) for a in _images(4)]
    with torch.no_grad():
        expected = [100 * torch.nn.functional.cosine_similarity(
            model.encode_image(preprocess(img)[None]), model.encode_text(tokenizer([p])))[0].item()
            for img, p in zip(images, PROMPTS)]
    got = scorer.score(images, PROMPTS, batch_size=3)  # batches of 3 + 1, a repeated prompt
    assert scorer.name == "open_clip tiny (pretrained on generated images)"
    assert got.shape == (4,) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert got.min() < 0  # raw 100·cos, not clamped at 0 as torchmetrics does (this random model gives negatives)


def test_fp16_scorer_runs_and_agrees_with_fp32(scorer):
    # open_clip's precision="fp16" keeps positional embeddings and LayerNorms fp32 but makes visual.conv1 fp16: the
    # pixels must take the input layer's dtype, not the first parameter's (which fed fp32 pixels to an fp16 conv).
    t4 = precision_for("fp16", "cpu", t4_dtypes=True)
    fp16 = evaluate.ClipScorer.from_profile("tiny", device="cpu", precision=t4)
    images = _images(4)
    got, reference = fp16.score(images, PROMPTS, batch_size=3), scorer.score(images, PROMPTS, batch_size=3)
    assert fp16.model.visual.conv1.weight.dtype == torch.float16 and fp16.dtype == torch.float16
    assert next(fp16.model.parameters()).dtype == torch.float32  # the trap: the first parameter stays fp32
    assert scorer.dtype == torch.float32
    assert got.dtype == np.float64 and np.isfinite(got).all()
    assert not np.array_equal(got, reference)  # it really ran in fp16
    np.testing.assert_allclose(got, reference, atol=0.5)  # fp16 rounding moves 100·cos by well under half a point


def test_pixel_dtype_falls_back_to_the_first_conv_or_linear_of_the_visual_tower():
    class Tower(torch.nn.Module):  # no conv1 (as in timm towers): the first Conv2d/Linear decides
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(4)
            self.stem = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(4, 4).half())

    model = torch.nn.Module()
    model.visual = Tower()
    assert evaluate.pixel_dtype(model) == torch.float16
    model.visual = torch.nn.Sequential(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError, match="input dtype"):
        evaluate.pixel_dtype(model)


def test_uint8_float_pil_and_path_inputs_score_the_same(scorer, tmp_path):
    arrays = _images(3)
    floats = [a.astype(np.float32) / 255 for a in arrays]
    paths = []
    for k, a in enumerate(arrays):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(a).save(paths[-1])
    prompts = PROMPTS[:3]
    reference = scorer.score(arrays, prompts)
    np.testing.assert_array_equal(scorer.score(floats, prompts), reference)
    np.testing.assert_array_equal(scorer.score(torch.from_numpy(np.stack(floats)), prompts), reference)
    np.testing.assert_array_equal(scorer.score([Image.fromarray(a) for a in arrays], prompts), reference)
    np.testing.assert_array_equal(scorer.score(paths, prompts), reference)


def test_bad_inputs_raise_clear_errors(scorer):
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score(_images(2), PROMPTS[:1])
    with pytest.raises(ValueError, match="one prompt per image"):
        scorer.score([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        scorer.score([np.full((8, 8, 3), -0.5, np.float32)], ["x"])
    with pytest.raises(ValueError, match="permute"):
        scorer.score([torch.zeros(3, 16, 16)], ["x"])
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_ci([])
    with pytest.raises(ValueError, match="align"):
        stats.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="profile"):
        evaluate.ClipScorer.from_profile("colab")


def test_bootstrap_ci_contains_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(1)
    few, many = rng.normal(25, 3, 20), rng.normal(25, 3, 2000)
    widths = []
    for values in (few, many):
        mean, low, high = stats.bootstrap_ci(values)
        assert mean == pytest.approx(values.mean())
        assert low < mean < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 5  # width ∝ 1/√n: √100 = 10× narrower in expectation
    assert widths[1] == pytest.approx(2 * 1.96 * 3 / np.sqrt(2000), rel=0.15)  # the normal-theory width
    assert stats.bootstrap_ci(few) == stats.bootstrap_ci(few)  # seeded


def test_paired_difference_zero_for_identical_and_excludes_zero_for_a_shift(scorer):
    same = scorer.score(_images(6), PROMPTS[:3] * 2)
    d = stats.paired_difference(same, same.copy())
    assert (d["mean_diff"], d["low"], d["high"], d["n"], d["wins"]) == (0.0, 0.0, 0.0, 6, 0)
    rng = np.random.default_rng(2)
    baseline = rng.normal(20, 4, 40)
    shifted = stats.paired_difference(baseline + 2 + rng.normal(0, 1, 40), baseline)
    assert shifted["low"] > 0 and shifted["mean_diff"] == pytest.approx(2, abs=0.5) and shifted["wins"] >= 35
    assert shifted["wins"] + shifted["losses"] == 40 and shifted["p"] < 1e-6
    assert d["losses"] == 0 and d["p"] == 1.0  # all ties: no evidence either way


def test_sign_test_against_binomial_by_hand():
    assert stats.sign_test(9, 1) == pytest.approx(2 * (1 + 10) / 2**10)  # P(X ≤ 1), X ~ Bin(10, ½), two-sided
    assert stats.sign_test(1, 9) == stats.sign_test(9, 1)
    assert stats.sign_test(0, 6) == pytest.approx(2 / 64)
    assert stats.sign_test(5, 5) == 1.0 and stats.sign_test(0, 0) == 1.0  # capped at 1; no pairs, no evidence
    # large n (exact big integers, no overflow) agrees with the normal approximation with continuity correction
    z = (abs(300 - 250) - 0.5) / math.sqrt(500 / 4)
    assert stats.sign_test(300, 200) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        stats.sign_test(-1, 3)
