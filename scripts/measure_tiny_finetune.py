"""Measure a tiny-world fine-tune the way tests/test_tiny_world.py checks it: train a tiny preset (with overrides)
in a fresh storage folder, draw base vs tuned on the same prompts and seeds, print the paired CLIP table.

    python scripts/measure_tiny_finetune.py sdxl_lora_naruto_256                      # the preset as shipped
    python scripts/measure_tiny_finetune.py sdxl_lora_naruto_256 max_steps=300 lora_rank=16 --seeds 0 1 2 3
    python scripts/measure_tiny_finetune.py sd15_xattn_cifar10 max_steps=600

Prompt sets: SDXL presets the real set's Naruto-style prompts and the tiny profile's (held-out Naruto-like captions),
SD1.5 presets the CIFAR held-out templates. Numbers for README and closing notes come from here, not from timed tests.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.core import presets
from helpers.evaluation import clip_score as evaluate
from helpers.evaluation import compare as evaluation
from helpers.evaluation import prompts


def prompt_sets(family: str) -> list[prompts.PromptSet]:
    if family == "sdxl":
        return [prompts.PromptSet("naruto style (real wording)", prompts.NARUTO_STYLE, "in-domain"),
                prompts.naruto_prompts("tiny")]
    return [prompts.cifar_prompts("held-out")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("preset")
    parser.add_argument("overrides", nargs="*", help="preset fields, e.g. max_steps=300 learning_rate=5e-4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()
    fields = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        try:
            fields[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            fields[key] = value
    preset = presets.get_preset(args.preset, "tiny", sample_every=0, **fields)
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="measure_") as root:
        os.environ["LAB_STORAGE"] = root  # caches and the run stay in the temporary folder
        result = evaluation.fine_tune_and_evaluate(
            preset, prompt_sets(preset.family), Path(root), seeds=args.seeds, guidance=args.guidance,
            scorer=evaluate.ClipScorer.from_profile("tiny", device="cpu"))
    print(f"{preset.name} {fields or '(as shipped)'}, seeds {args.seeds}, guidance {args.guidance}: "
          f"{time.time() - start:.0f} s")
    print(result.table)


if __name__ == "__main__":
    main()
