"""Measuring pictures: the CLIP score (clip_score) and PickScore, the statistics every table reports (stats:
bootstrap CI, paired difference with a sign test, Wilson), the prompt sets (prompts) and comparisons of variants on
the same prompts and seeds turned into sheets (compare) and tables (tables).
"""
from .clip_score import ClipScorer
from .compare import evaluate_variants, fine_tune_and_evaluate, record_run_summary
from .pickscore import PickScorer
from .prompts import (
    PromptSet,
    cifar_prompts,
    generic_prompts,
    get_prompt_set,
    held_out_subjects,
    naruto_prompts,
    user_prompts,
)
from .stats import bootstrap_ci, paired_difference, sign_test, wilson
from .tables import MIN_PAIRS, ScoreTable
