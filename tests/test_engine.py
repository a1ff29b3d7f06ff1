"""helpers.engine on tiny finished runs: what each phase frees (weak references), what the T4 rules keep loaded
(the T4-dtype mode), the size a base model draws at, and images the SD1.5 safety checker withholds."""
from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import pytest
import torch
from tiny_runs import storage_with_run

from helpers.core.precision import T4_DTYPES_ENV
from helpers.studio.catalog import Catalog
from helpers.studio.drawing import Request
from helpers.studio.engine import Engine

LORA = "sd15_xattn_cifar10-lora-tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return storage_with_run(tmp_path_factory, "lora")


def test_unload_frees_the_pipeline_while_variants_are_still_referenced(root):
    engine = Engine(Catalog.scan("tiny", root), scorer=None, device="cpu")
    variants = [engine.variant("SD1.5 base"), engine.variant(LORA, 0.5)]  # what evaluate_runs keeps in a loop
    pipe = weakref.ref(engine.pipeline("SD1.5 base"))
    engine.unload()
    gc.collect()
    assert pipe() is None, "the SD1.5 pipeline outlived engine.unload() through its variants"
    with pytest.raises(RuntimeError, match="freed"):
        variants[1].apply(None)


# ---------------------------------------------------------------- sizes

@pytest.fixture(scope="module")
def big_root(tmp_path_factory):
    """A finished tiny run trained at 128 px: larger than the tiny SD1.5's own 64 px."""
    return storage_with_run(tmp_path_factory, "lora", resolution=128)


def test_a_base_alone_draws_at_its_own_size(big_root):
    engine = Engine(Catalog.scan("tiny", big_root), scorer=None, device="cpu")
    for name in ("SD1.5 base", "SDXL base"):
        pipe = engine.pipeline(name)
        own = pipe.unet.config.sample_size * pipe.vae_scale_factor  # what the stock pipeline draws by default
        drawn = engine.generate(Request("a photo of a cat", (name,), steps=2)).images[0]
        assert engine.catalog.get(name).default_size == own == drawn.size == drawn.image.width
        assert engine.generate(Request("a photo of a cat", (name,), steps=2)).note == ""


def test_a_base_beside_a_run_draws_at_the_runs_training_size_and_says_so(big_root):
    engine = Engine(Catalog.scan("tiny", big_root), scorer=None, device="cpu")
    result = engine.generate(Request("a photo of a cat", ("SD1.5 base", LORA), steps=2))
    assert [(d.size, d.image.size) for d in result.images] == [(128, (128, 128))] * 2
    assert "SD1.5 base drawn at 128 px, the training size of " + LORA in result.note
    assert result.settings()["note"] == result.note
    sized = engine.generate(Request("a photo of a cat", ("SD1.5 base", LORA), steps=2, size=64))
    assert [d.size for d in sized.images] == [64, 64] and sized.note == ""  # an asked size is kept


# ---------------------------------------------------------------- the T4's rules: what stays loaded

@pytest.mark.slow  # both families and the checker loaded
def test_under_the_t4_rules_sd15_with_its_checker_is_freed_before_sdxl_loads(root, monkeypatch):
    from helpers.plan import inference as evalplan
    monkeypatch.setenv(T4_DTYPES_ENV, "1")
    assert not evalplan.explorer_fits(["sd15", "sdxl"])  # 11.2 GiB planned with the safety checker: over 10.95
    engine = Engine(Catalog.scan("tiny", root), scorer=None, device="cpu")
    engine.generate(Request("a photo of a cat", ("SD1.5 base",), steps=2))
    sd15 = weakref.ref(engine.pipeline("SD1.5 base"))
    engine.generate(Request("a photo of a cat", ("SDXL base",), steps=2))
    gc.collect()
    assert engine.loaded() == ["SDXL base"] and sd15() is None


# ---------------------------------------------------------------- pictures the safety checker withholds

def safety_checker_against(image, threshold: float = 0.9995):
    """A real diffusers StableDiffusionSafetyChecker (tiny random CLIP vision tower) whose one concept is `image`'s
    own embedding: it withholds that picture (and any it cannot tell from it), nothing else."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=16)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    with torch.no_grad():
        pixels = processor([image], return_tensors="pt").pixel_values
        embed = checker.visual_projection(checker.vision_model(pixels)[1])[0]
        checker.concept_embeds[0] = embed
        checker.concept_embeds_weights.fill_(2.0)  # cos − 2 < 0: never
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights.fill_(2.0)
    return {"safety_checker": checker, "feature_extractor": processor}


def test_a_withheld_picture_is_marked_never_scored_and_counted_out_of_tables_and_the_study(root, tmp_path):
    from helpers.studio.scoreboard import evaluate_runs, family_sets
    from helpers.studio.study import Study, pairs_from_scores
    engine = Engine(Catalog.scan("tiny", root), device="cpu")
    prompt = family_sets(engine.catalog.runs(), 1)[0].prompts[0]
    target = Request(prompt, (LORA,), seed=0, steps=engine.catalog.get("SD1.5 base").preset.sample_steps)
    picture = engine.generate(target).images[0].image
    engine.pipeline("SD1.5 base").register_modules(**safety_checker_against(picture))
    drawn = engine.generate(replace(target, models=(LORA, "SDXL base")))
    lora, sdxl = drawn.images
    assert lora.withheld and lora.clip_score is None and lora.image.getbbox() is None  # black, marked, unscored
    assert lora.score_text == "withheld by the SD1.5 safety checker" and not sdxl.withheld and sdxl.clip_score
    assert drawn.settings()["images"][0]["withheld"]

    board = evaluate_runs(engine, 1, [0], tmp_path / "results")
    scores = board.scores
    withheld = scores[scores["withheld"]]
    assert len(withheld) >= 1 and withheld["score"].isna().all() and scores[~scores["withheld"]]["score"].notna().all()
    assert ((withheld["variant"] == LORA) & (withheld["prompt"] == prompt) & (withheld["seed"] == 0)).any()
    for (variant, prompt_set, model), part in scores.groupby(["variant", "prompt_set", "clip_model"]):
        s = board.summary
        row = s[(s["variant"] == variant) & (s["prompt_set"] == prompt_set) & (s["score_model"] == model)].iloc[0]
        assert (row["n"], row["withheld"]) == (int((~part["withheld"]).sum()), int(part["withheld"].sum()))
    paired = board.tables["sd15"].row(LORA, paired=True)
    pairs = scores.pivot(index=["prompt_set", "prompt", "seed"], columns="variant", values="withheld")
    assert (paired["n"], paired["withheld"]) == (int((~pairs.any(axis=1)).sum()), int(pairs.any(axis=1).sum()))
    assert "withheld by the SD1.5 safety checker" in str(board)
    study = Study(pairs_from_scores(scores, "SD1.5 base", LORA), "SD1.5 base", LORA, tmp_path / "ab.csv")
    assert study.left_out == int(pairs.any(axis=1).sum()) and all(not p.withheld for p in study.pairs)
