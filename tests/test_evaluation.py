"""helpers.evaluation: variants of one tiny SD1.5 pipeline end to end (folders, manifests, CSVs, grids, table), the
summary table against hand computations from the CSV, and the checks that run before any image is drawn."""
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_sampling import attn2_variants  # tests/ is on sys.path under pytest (rootdir without __init__)

from helpers.core.precision import precision_for
from helpers.core.presets import get_preset
from helpers.evaluation import clip_score as evaluate
from helpers.evaluation import compare as evaluation
from helpers.evaluation import tables
from helpers.evaluation import stats
from helpers.evaluation.prompts import PromptSet, user_prompts
from helpers.generate import grids, sampling

SEEDS = [0, 1]


@pytest.fixture(scope="module")
def scorer():
    return evaluate.ClipScorer.from_profile("tiny", device="cpu", precision=precision_for("no", "cpu", t4_dtypes=False))


@pytest.fixture(scope="module")
def sd15():
    return sampling.load_pipeline(get_preset("sd15_xattn_cifar10", "tiny"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def prompt_sets():
    return [user_prompts(["a photo of a cat", "a green frog"], name="set a", split="train"),
            user_prompts(["a red car on a street"], name="set b", split="held-out")]


@pytest.fixture(scope="module")
def result(sd15, scorer, prompt_sets, tmp_path_factory):
    variants, _ = attn2_variants(sd15)
    out = tmp_path_factory.mktemp("eval")
    return evaluation.evaluate_variants(sd15, variants, prompt_sets, SEEDS, out, scorer, steps=2, size=64)


def test_every_variant_has_its_folder_manifest_and_identical_noise(result):
    out = result.out_dir
    names = ["base", "base again", "attn2 ×1.5"]
    pixels = {}
    for name in names:
        rows = sampling.read_manifest(out / sampling.folder_name(name) / "manifest.csv")
        assert len(rows) == 3 * len(SEEDS) and all(Image.open(r["file"]).size == (64, 64) for r in rows)
        pixels[name] = [np.asarray(Image.open(r["file"])).astype(int) for r in rows]
    for a, b, c in zip(*pixels.values()):
        assert np.array_equal(a, b) and np.abs(a - c).mean() > 1.0
    images = pd.read_csv(out / "images.csv")
    assert list(images.columns) == list(tables.IMAGE_COLUMNS) and len(images) == 3 * 3 * len(SEEDS)


def test_csv_has_one_row_per_image_per_variant(result, scorer):
    scores = pd.read_csv(result.out_dir / "clip_scores.csv")
    assert list(scores.columns) == list(tables.RESULT_COLUMNS)
    assert len(scores) == 3 * 3 * len(SEEDS)
    assert not scores.duplicated(["variant", "prompt_set", "prompt", "seed"]).any()
    assert set(scores["clip_model"]) == {scorer.name}
    assert scores.groupby("variant", sort=False).size().to_dict() == {"base": 6, "base again": 6, "attn2 ×1.5": 6}
    assert dict(zip(scores["prompt_set"], scores["split"])) == {"set a": "train", "set b": "held-out"}
    first = scores.iloc[0]  # the stored score is the scorer's score of that file and prompt (up to float32 batching)
    assert first["score"] == pytest.approx(scorer.score([first["image_path"]], [first["prompt"]])[0], abs=1e-3)


def test_paired_rows_match_a_hand_computation_from_the_csv(result):
    scores = pd.read_csv(result.out_dir / "clip_scores.csv")
    by = scores.pivot_table(index=["prompt_set", "prompt", "seed"], columns="variant", values="score")
    diff = by["attn2 ×1.5"] - by["base"]
    table = result.table
    pooled = table.row("attn2 ×1.5", paired=True)
    assert (pooled["prompt_set"], pooled["reference"], pooled["n"]) == ("all", "base", 6)
    assert pooled["mean"] == pytest.approx(diff.mean())
    assert pooled["wins"] == (diff > 0).sum()
    assert pooled["p"] == pytest.approx(stats.sign_test(int((diff > 0).sum()), int((diff < 0).sum())))
    assert pooled["low"] <= pooled["mean"] <= pooled["high"]
    only_a = table.row("attn2 ×1.5", paired=True, prompt_set="set a")
    assert only_a["n"] == 4 and only_a["mean"] == pytest.approx(diff.loc["set a"].mean())
    same = table.row("base again", paired=True)
    assert (same["mean"], same["low"], same["high"], same["wins"], same["p"]) == (0.0, 0.0, 0.0, 0, 1.0)
    assert table.row("base", prompt_set="set b")["mean"] == pytest.approx(by.loc["set b", "base"].mean())
    summary = pd.read_csv(result.out_dir / "clip_summary.csv")
    assert len(summary) == 3 * (3 + 2)  # (set a, set b, all) × (3 variants + 2 paired rows)
    assert (result.out_dir / "clip_summary.md").read_text().startswith("CLIP score")
    assert "<table>" in result._repr_html_() and "attn2 ×1.5 − base" in str(table)


def test_grids_one_sheet_per_set_rows_are_prompt_seed_pairs(result):
    assert list(result.grids) == ["set a", "set b"]
    assert result.sheets == [result.out_dir / "grids" / "set_a_1.png", result.out_dir / "grids" / "set_b_1.png"]
    names = ["base", "base again", "attn2 ×1.5"]
    layout = grids.sheet_layout((64, 64), ["a photo of a cat\nseed 0"], names)  # without the title
    sheet = np.asarray(Image.open(result.sheets[0]))
    title_height = sheet.shape[0] - layout.height(2 * len(SEEDS))
    assert sheet.shape[1] == layout.width and 20 <= title_height <= 60 and max(sheet.shape) <= grids.MAX_SIDE
    images = pd.read_csv(result.out_dir / "images.csv")
    frog_seed1 = images[(images["prompt"] == "a green frog") & (images["seed"] == 1)].set_index("variant")
    x, y = layout.tile_origin(3, 2)  # row 3 = (frog, seed 1), column 2 = the perturbed variant
    y += title_height
    expected = np.asarray(Image.open(frog_seed1.loc["attn2 ×1.5", "image_path"])).repeat(2, 0).repeat(2, 1)
    assert np.array_equal(sheet[y:y + 128, x:x + 128], expected)


def test_table_with_another_baseline_and_all_pairs(result):
    table = tables.score_table(result.scores, baseline="attn2 ×1.5", pairs="all")
    paired = [(r["variant"], r["reference"]) for r in table.rows if r["paired"] and r["prompt_set"] == "all"]
    assert paired == [("base", "attn2 ×1.5"), ("base again", "attn2 ×1.5"), ("base again", "base")]
    flipped = table.row("base", paired=True)
    assert flipped["mean"] == pytest.approx(-result.table.row("attn2 ×1.5", paired=True)["mean"])
    with pytest.raises(KeyError, match="no paired row"):
        table.row("attn2 ×1.5", paired=True)


def test_without_a_scorer_images_and_grids_only(sd15, tmp_path):
    variants, calls = attn2_variants(sd15)
    one = PromptSet("one", ("a blue boat",), "custom")
    r = evaluation.evaluate_variants(sd15, variants[:2], one, [3], tmp_path, None, steps=1, size=64)
    assert r.table is None and r.scores is None and calls == ["base", "base again"]
    assert len(r.images) == 2 and not (tmp_path / "clip_scores.csv").exists() and r.sheets[0].is_file()


def test_bad_input_fails_before_any_image_is_drawn(sd15, prompt_sets, tmp_path):
    variants, calls = attn2_variants(sd15)
    run = dict(seeds=SEEDS, out_dir=tmp_path / "never", scorer=None, steps=1, size=64)
    cases = [
        (dict(variants=[], prompt_sets=prompt_sets), "no variants"),
        (dict(variants=[variants[0], sampling.Variant("base", print)], prompt_sets=prompt_sets), "must differ"),
        (dict(variants=variants, prompt_sets=[]), "PromptSet"),
        (dict(variants=variants, prompt_sets=["a photo of a cat"]), "PromptSet"),
        (dict(variants=variants, prompt_sets=prompt_sets, baseline="tuned"), "unknown baseline"),
        (dict(variants=variants, prompt_sets=prompt_sets, pairs="every"), "pairs"),
        (dict(variants=variants, prompt_sets=prompt_sets * 2), "names must differ"),
        (dict(variants=variants, prompt_sets=prompt_sets, seeds=[1, 1]), "distinct seeds"),
        (dict(variants=variants, prompt_sets=prompt_sets, seeds=[]), "distinct seeds"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluation.evaluate_variants(sd15, **{**run, **kwargs})
    with pytest.raises(ValueError, match="no prompts"):
        PromptSet("empty", ())
    assert calls == [] and not (tmp_path / "never").exists()


def test_score_images_reads_images_csv(scorer, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for k, prompt in enumerate(["a cat", "a dog"]):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{k}.png")
        rows.append(dict(image_path=str(tmp_path / f"{k}.png"), prompt_set="mine", split="custom", prompt=prompt,
                         seed=k, variant="base"))
    tables.results_frame(rows, tmp_path / "images.csv", tables.IMAGE_COLUMNS)
    frame = tables.score_images(scorer, tmp_path / "images.csv")
    assert list(frame.columns) == list(tables.RESULT_COLUMNS)
    np.testing.assert_array_equal(frame["score"], scorer.score([r["image_path"] for r in rows], ["a cat", "a dog"]))
    with pytest.raises(ValueError, match="columns"):
        tables.results_frame([{"prompt": "x"}])


def test_score_table_on_synthetic_scores_and_its_renderings():
    rng = np.random.default_rng(5)
    base = rng.normal(20, 3, 8)
    rows = [dict(image_path=f"{v}/{k}.png", prompt_set="s", split="train", prompt=f"p{k % 4}", seed=k // 4,
                 variant=v, clip_model="m", score=x)
            for v, scores in (("baseline", base), ("finetuned", base + 1.5)) for k, x in enumerate(scores)]
    table = tables.score_table(rows)  # the first variant is the baseline; one prompt set: no pooled rows
    assert {r["prompt_set"] for r in table.rows} == {"s"}
    paired = table.row("finetuned", paired=True)
    assert (paired["mean"], paired["wins"], paired["n"]) == (pytest.approx(1.5), 8, 8)
    assert paired["p"] == pytest.approx(2 / 2**8)
    assert table.row("baseline")["mean"] == pytest.approx(base.mean())
    with pytest.raises(KeyError, match="no row for variant 'nope'"):
        table.row("nope")
    text = str(table)
    assert "95% CI" in text and "finetuned − baseline" in text and "8/8" in text
    assert table.to_markdown().splitlines()[2].startswith("| prompt set | variant")
    with pytest.raises(ValueError, match="unknown baseline"):
        tables.score_table(rows, baseline="base")
