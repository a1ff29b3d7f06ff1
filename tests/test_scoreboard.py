"""helpers.scoreboard: every finished run against its own base, both scores, the files, the missing runs."""
import gc

import pandas as pd
import pytest
from tiny_runs import train_tiny_run

from helpers.evaluation import clip_score as evaluate
from helpers.evaluation import stats
from helpers.evaluation.pickscore import PickScorer
from helpers.studio.catalog import Catalog
from helpers.studio.engine import Engine
from helpers.studio.scoreboard import evaluate_runs, family_sets, t4_plan

pytestmark = pytest.mark.slow  # notebook 05's evaluation of every run, end to end

ALIVE_AT_PICKSCORE: list[str] = []  # what was still in memory when the PickScore phase began


def _alive(kinds) -> list:
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, kinds)]


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    from diffusers import DiffusionPipeline
    root = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        for method in ("crossattn", "lora"):
            train_tiny_run(root, method)
    engine = Engine(Catalog.scan("tiny", root), device="cpu")
    before = {id(o) for o in _alive((DiffusionPipeline, evaluate.ClipScorer))}  # other tests' objects

    def pickscore():  # called by evaluate_runs when the plan says only PickScore is loaded
        ALIVE_AT_PICKSCORE.extend(type(o).__name__ for o in _alive((DiffusionPipeline, evaluate.ClipScorer))
                                  if id(o) not in before)
        return PickScorer.from_profile("tiny", "cpu")
    return evaluate_runs(engine, 2, [0, 1], root / "results", pickscore)


def test_each_phase_frees_what_the_plan_says_before_the_next_loads(board):
    # the plan (helpers.evalplan): PickScore alone on the GPU; the pipelines and the CLIP scorer are gone
    assert ALIVE_AT_PICKSCORE == []


def test_the_summary_covers_every_run_with_both_scores_and_lists_the_missing(board):
    s = board.summary
    runs = ["sd15_xattn_cifar10-crossattn-tiny", "sd15_xattn_cifar10-lora-tiny"]
    assert list(dict.fromkeys(s["variant"])) == ["SD1.5 base"] + runs
    assert len(set(s["score_model"])) == 2 and len(s) == 3 * 3 * 2  # variants × prompt sets × score models
    assert list(dict.fromkeys(s["prompt_set"])) == ["cifar train", "cifar held-out", "generic"]  # each set apart
    assert (s[s["variant"].isin(runs)]["reference"] == "SD1.5 base").all()
    assert s["n"].eq(2 * 2).all()  # 2 prompts × 2 seeds per set
    assert "demonstration, not a measurement: 4 pairs" in board.caption()  # fewer than MIN_PAIRS
    assert {m.name for m in board.missing} == {"sdxl_lora_naruto_256-lora-tiny", "sdxl_lora_naruto_1024-lora-tiny",
                                               "prior_sd15-ip_adapter-tiny"}
    text = str(board)
    assert "Δ vs base" in text and "missing: prior_sd15-ip_adapter-tiny" in text
    for name in ("scores.csv", "summary.csv", "summary.md", "chart.png", "missing.csv", "sd15/table.md"):
        assert (board.out_dir / name).is_file(), name


def test_paired_differences_match_a_hand_computation_from_scores_csv(board):
    scores = pd.read_csv(board.out_dir / "scores.csv")
    run = "sd15_xattn_cifar10-lora-tiny"
    for model in set(scores["clip_model"]):
        part = scores[scores["clip_model"] == model]
        key = ["prompt_set", "prompt", "seed"]
        part = part[part["prompt_set"] == "cifar held-out"]
        pairs = part[part["variant"] == run].merge(part[part["variant"] == "SD1.5 base"], on=key)
        diff = pairs["score_x"] - pairs["score_y"]
        s = board.summary
        row = s[(s["variant"] == run) & (s["score_model"] == model) & (s["prompt_set"] == "cifar held-out")].iloc[0]
        assert row["diff"] == pytest.approx(diff.mean()) and row["wins"] == (diff > 0).sum()
        assert row["p"] == pytest.approx(stats.sign_test(int((diff > 0).sum()), int((diff < 0).sum())))
        assert row["diff_low"] <= row["diff"] <= row["diff_high"]


def test_prompt_sets_follow_the_runs_data_and_the_t4_plan_sizes_them(board, tmp_path):
    catalog = Catalog.scan("tiny", board.out_dir.parent)
    sets = family_sets(catalog.runs(), 3)
    assert [s.name for s in sets] == ["cifar train", "cifar held-out", "generic"] and all(len(s) == 3 for s in sets)
    assert len({p.split()[-1] for p in sets[0].prompts}) == 3  # spread over the classes, not one class thrice
    prompts, seeds, phases = t4_plan(catalog)
    assert phases[0].name == "setup" and "SD1.5 2.1 GB" in phases[0].resident and "SDXL" not in phases[0].resident
    assert phases[1].name == "sd15" and f"drawing {3 * 3 * prompts * seeds} images at 256 px" in phases[1].resident
    assert t4_plan(Catalog.scan("tiny", tmp_path)) is None
