"""What a reader is shown: sheets with held-out prompts beside training ones, a load snippet that runs as printed,
tables that say when they are a demonstration, README's times from one measurement, no vague times in the prose."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image
from tiny_runs import train_tiny_run

from helpers.evaluation.compare import EvaluationResult
from helpers.evaluation.tables import MIN_PAIRS, score_table
from helpers.methods.runs import load_snippet

ROOT = Path(__file__).resolve().parents[1]


def _images(tmp_path, sets: dict, variants=("base", "tuned"), seeds=(0, 1)) -> pd.DataFrame:
    rows = []
    for set_name, prompts in sets.items():
        for k, prompt in enumerate(prompts):
            for seed in seeds:
                for v, variant in enumerate(variants):
                    path = tmp_path / f"{set_name}-{k}-{seed}-{variant}.png".replace(" ", "_")
                    Image.new("RGB", (64, 64), (40 * k % 255, 100 * v, 60 * seed)).save(path)
                    rows.append(dict(image_path=str(path), prompt_set=set_name, split=set_name, prompt=prompt,
                                     seed=seed, variant=variant, withheld=False))
    return pd.DataFrame(rows)


def test_the_overview_shows_every_prompt_set_side_by_side(tmp_path):
    sets = {"cifar train": [f"a photo of a {c}" for c in ("cat", "dog", "ship", "frog", "truck", "bird")],
            "cifar held-out": [f"a drawing of a {c}" for c in ("cat", "dog", "ship", "frog", "truck", "bird")]}
    result = EvaluationResult(tmp_path, _images(tmp_path, sets), None, None)
    page = Image.open(result.overview(rows=5))
    parts = sorted((tmp_path / "grids").glob("overview_*_1.png"))
    assert [p.name for p in parts] == ["overview_cifar_held-out_1.png", "overview_cifar_train_1.png"]
    widths = [Image.open(p).width for p in parts]
    assert page.width == sum(widths) + 6 and page.width <= 1000  # two sheets side by side, one page wide
    assert all(Image.open(p).height < 1000 for p in parts)  # five rows at one seed, not 12 tall rows
    assert page.height > 5 * 90  # all five rows of each set on the page


def test_a_table_from_too_few_pairs_says_it_is_a_demonstration():
    def rows(n):
        return [dict(image_path="x", prompt_set="s", split="s", prompt=f"p{k}", seed=0, variant=v, withheld=False,
                     clip_model="clip", score=float(k + (v == "tuned"))) for k in range(n) for v in ("base", "tuned")]
    few, enough = score_table(rows(MIN_PAIRS - 1)), score_table(rows(MIN_PAIRS))
    assert "demonstration, not a measurement: 15 pairs" in few.caption()
    assert "demonstration" not in enough.caption() and enough.fewest_pairs == MIN_PAIRS
    pooled = score_table(rows(MIN_PAIRS) + [dict(r, prompt_set="t") for r in rows(MIN_PAIRS)])
    assert {r[0] for r in pooled._cells()[1:]} == {"s", "t"}  # each prompt set apart; the pooled rows not shown


def test_the_load_snippet_runs_as_printed(tmp_path):
    folder = train_tiny_run(tmp_path, "lora")
    snippet = load_snippet(folder)
    assert "'tiny/" not in snippet and "cuda" not in snippet  # a tiny run: its model's folder (not a ref), the CPU
    done = subprocess.run([sys.executable, "-c", snippet + "\nprint(image.size)"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("(64, 64)")


def test_readme_times_are_one_measurement_and_the_prose_says_no_vague_times():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- tiny-series-times -->")[1].split("<!-- /tiny-series-times -->")[0]
    rows = re.findall(r"\| `(\d\d_\w+)` \| (\d+) min (\d\d) s \|", block)
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert [name for name, _, _ in rows] == notebooks
    total = re.search(r"\*\*the series\*\* \| \*\*(\d+) min (\d\d) s\*\*", block)
    assert sum(int(m) * 60 + int(s) for _, m, s in rows) == int(total[1]) * 60 + int(total[2])
    vague = re.compile(r"in a minute|in a few minutes|in minutes|about two minutes", re.I)
    for path in [ROOT / "README.md", *(ROOT / "notebooks").glob("*.ipynb")]:
        text = path.read_text() if path.suffix == ".md" else " ".join(
            "".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
        assert not vague.search(text), f"{path.name}: {vague.search(text)[0]!r}"


def test_each_paired_row_is_read_out_in_words():
    def rows(shift):
        return [dict(image_path="x", prompt_set="s", split="s", prompt=f"p{k}", seed=0, variant=v, withheld=False,
                     clip_model="clip", score=float(k % 5 + (shift + (k % 3 - 1) * 0.1 if v == "tuned" else 0)))
                for k in range(MIN_PAIRS) for v in ("base", "tuned")]
    assert score_table(rows(+2)).readings()[0].endswith("better, beyond prompt and seed noise")
    assert score_table(rows(-2)).readings()[0].endswith("worse, beyond prompt and seed noise")
    assert score_table(rows(0)).readings()[0].endswith("no change these pairs can tell from noise")
    assert "over 16 pairs" in str(score_table(rows(0)))
