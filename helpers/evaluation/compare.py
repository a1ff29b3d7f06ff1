"""Comparing variants of one pipeline end to end: prompt sets × seeds → images per variant → grids → CLIP
scores → a table with CIs and paired differences, everything written to one folder.

    result = evaluate_variants(pipe, [base, tuned], [cifar_prompts("train"), cifar_prompts("held-out")],
                               seeds=[0, 1], out_dir=run / "eval", scorer=scorer, steps=25, size=256)

writes, under `out_dir`:
  <variant>/NNN_seedS.png, <variant>/manifest.csv   the images (helpers.generate.sampling.generate)
  images.csv                                        every image: IMAGE_COLUMNS
  grids/<prompt set>_K.png                          sheets, rows = prompt × seed, columns = variants
  clip_scores.csv                                   every image and its CLIP score: RESULT_COLUMNS
  clip_summary.csv, clip_summary.md                 the ScoreTable
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from PIL import Image

from ..core import paths
from ..data import dataset as data
from ..generate import sampling
from ..generate.grids import GAP, LABEL_WIDTH, MAX_SIDE, PAGE_PX, comparison_sheets
from ..generate.sampling import Variant, check_variants, folder_name, generate_variants, read_manifest
from ..methods import runs
from ..models import load_components
from ..train.loop import Trainer
from .clip_score import ClipScorer
from .prompts import PromptSet
from .tables import IMAGE_COLUMNS, ScoreTable, comparisons, results_frame, score_images, score_table

OVERVIEW_TILE = 96  # the smallest tile an overview places side by side with another prompt set's sheet


# ---------------------------------------------------------------- the entry point

@dataclass
class EvaluationResult:
    out_dir: Path
    images: object  # DataFrame, one row per generated image (IMAGE_COLUMNS); also images.csv
    scores: object | None  # DataFrame with RESULT_COLUMNS (clip_scores.csv), None without a scorer
    table: ScoreTable | None  # None without a scorer
    grids: dict[str, list[Path]] = field(default_factory=dict)  # prompt set name → its sheets
    labels: dict[str, str] = field(default_factory=dict)  # variant name → its short column header

    @property
    def sheets(self) -> list[Path]:
        return [path for paths in self.grids.values() for path in paths]

    def overview(self, rows: int = 5, seed: int | None = None) -> Path:
        """One page (PAGE_PX wide at most, to be shown at its own size): the first `rows` prompts of EVERY prompt set
        (training beside held-out beside generic) at one seed (default: the first), each set a sheet of its
        variants, side by side where their tiles stay readable (else below each other), in `grids/overview.png`.
        The full sheets (every prompt and seed) stay in `sheets`."""
        seed = int(self.images["seed"].min()) if seed is None else seed
        variants = list(dict.fromkeys(self.images["variant"]))
        set_names = list(dict.fromkeys(self.images["prompt_set"]))
        per_row = next(k for k in range(len(set_names), 0, -1)
                       if (_part_px(k) - LABEL_WIDTH - GAP) / len(variants) - GAP >= OVERVIEW_TILE or k == 1)
        parts = []
        for set_name in set_names:
            part = self.images[(self.images["prompt_set"] == set_name) & (self.images["seed"] == seed)]
            by_prompt = part.pivot(index="prompt", columns="variant", values="image_path")
            prompts = list(dict.fromkeys(part["prompt"]))[:rows]
            parts += comparison_sheets([list(by_prompt.loc[p, variants]) for p in prompts], prompts,
                                       [self.labels.get(v, v) for v in variants],
                                       self.out_dir / "grids" / f"overview_{folder_name(set_name)}",
                                       title=f"{set_name} · seed {seed}", max_side=_part_px(per_row),
                                       max_height=MAX_SIDE)[:1]
        sheets = [Image.open(path) for path in parts]
        lines = [sheets[k:k + per_row] for k in range(0, len(sheets), per_row)]
        page = Image.new("RGB", (max(sum(s.width for s in line) + GAP * (len(line) - 1) for line in lines),
                                 sum(max(s.height for s in line) for line in lines) + GAP * (len(lines) - 1)), "white")
        y = 0
        for line in lines:
            x = 0
            for sheet in line:
                page.paste(sheet, (x, y))
                x += sheet.width + GAP
            y += max(s.height for s in line) + GAP
        path = self.out_dir / "grids" / "overview.png"
        page.save(path)
        return path

    def _repr_html_(self) -> str:
        table = self.table._repr_html_() if self.table is not None else "<p>not scored (no scorer)</p>"
        files = "".join(f"<li>{escape(str(p))}</li>" for p in self.sheets)
        return f"{table}<p>{len(self.images)} images in {escape(str(self.out_dir))}; grids:</p><ul>{files}</ul>"


def _part_px(per_row: int) -> int:
    """The width of one of `per_row` sheets side by side on a PAGE_PX page."""
    return (PAGE_PX - GAP * (per_row - 1)) // per_row


def _check_inputs(prompt_sets, seeds) -> tuple[list[PromptSet], list[int]]:
    prompt_sets = [prompt_sets] if isinstance(prompt_sets, PromptSet) else list(prompt_sets)
    if not prompt_sets or not all(isinstance(s, PromptSet) for s in prompt_sets):
        raise ValueError("pass one or more PromptSets (helpers.evaluation.prompts), e.g. [cifar_prompts('train')]")
    names = [folder_name(s.name) for s in prompt_sets]
    if len(set(names)) != len(names):
        raise ValueError(f"prompt set names must differ: {[s.name for s in prompt_sets]}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"need one or more distinct seeds, got {seeds}")
    return prompt_sets, seeds


def _grid(images, prompt_set: PromptSet, variants: list[str], n_seeds: int, folder: Path,
          labels: dict | None = None) -> list[Path]:
    """The sheets of one prompt set: a row per (prompt, seed) in plan order, a column per variant (headed by its
    short label where `labels` has one)."""
    part = images[images["prompt_set"] == prompt_set.name]
    by_pair = part.pivot(index=["prompt", "seed"], columns="variant", values="image_path")
    order = list(dict.fromkeys(zip(part["prompt"], part["seed"])))
    name = prompt_set.name if prompt_set.split in prompt_set.name else f"{prompt_set.name} ({prompt_set.split})"
    return comparison_sheets([list(by_pair.loc[pair, variants]) for pair in order],
                             [f"{prompt}\nseed {seed}" for prompt, seed in order],
                             [(labels or {}).get(v, v) for v in variants],
                             folder / folder_name(prompt_set.name),
                             title=f"{name}: {len(prompt_set)} prompts × {n_seeds} seeds")


def evaluate_variants(pipe, variants: Sequence[Variant], prompt_sets: PromptSet | Sequence[PromptSet],
                      seeds: Sequence[int], out_dir: str | Path, scorer: ClipScorer | None, steps: int,
                      size: int | None = None, guidance: float = 7.5, baseline: str | None = None,
                      pairs: str = "baseline", level: float = 0.95, labels: dict | None = None) -> EvaluationResult:
    """Every variant draws every prompt of every set with every seed on the ONE pipeline `pipe` (each variant's
    `apply` first), then grids, and with a `scorer` CLIP scores and the ScoreTable against `baseline` (default: the
    first variant). Inputs are checked before any image is drawn. `size`: square side, None = the pipeline's.
    The pipeline is left in the last variant's state. `labels`: variant name → a short column header for the sheets
    (tables and CSVs keep the names)."""
    variants = check_variants(variants)
    prompt_sets, seeds = _check_inputs(prompt_sets, seeds)
    names = [v.name for v in variants]
    comparisons(names, baseline, pairs)  # an unknown baseline fails now, not after an hour of sampling
    out_dir = Path(out_dir)
    plan = [dict(prompt_set=s.name, split=s.split, prompt=p, seed=seed)
            for s in prompt_sets for p in s.prompts for seed in seeds]
    manifests = generate_variants(pipe, variants, [r["prompt"] for r in plan], [r["seed"] for r in plan], out_dir,
                                  steps, guidance, size, size)
    rows = []
    for name, manifest in manifests.items():
        listed = read_manifest(manifest)
        assert [(m["prompt"], m["seed"]) for m in listed] == [(r["prompt"], r["seed"]) for r in plan], manifest
        rows += [dict(r, image_path=m["file"], variant=name, withheld=m["withheld"]) for r, m in zip(plan, listed)]
    images = results_frame(rows, out_dir / "images.csv", IMAGE_COLUMNS)
    grids = {s.name: _grid(images, s, names, len(seeds), out_dir / "grids", labels) for s in prompt_sets}
    scores = table = None
    if scorer is not None:
        scores = score_images(scorer, images, csv_path=out_dir / "clip_scores.csv")
        table = score_table(scores, baseline, pairs, level)
        table.frame.to_csv(out_dir / "clip_summary.csv", index=False)
        (out_dir / "clip_summary.md").write_text(table.to_markdown() + "\n")
    return EvaluationResult(out_dir, images, scores, table, grids, dict(labels or {}))


def record_run_summary(csv_path: str | Path, row: dict, key: str = "method"):
    """Add (or replace, by `key`) one run's summary row in a CSV shared by runs, e.g. crossattn vs LoRA on the same
    data, and return the whole table as a DataFrame."""
    import pandas as pd
    path = Path(csv_path)
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not frame.empty and key in frame.columns:
        frame = frame[frame[key] != row[key]]
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame


def fine_tune_and_evaluate(preset, prompt_sets: PromptSet | Sequence[PromptSet], root: Path,
                           seeds: Sequence[int] = (0, 1), steps: int = 20, scorer: ClipScorer | None = None,
                           guidance: float = 7.5) -> EvaluationResult:
    """Train `preset` in `root`/runs/ (resuming a finished run there), then draw base vs tuned on ONE pipeline
    and score them: what the tiny-world learning checks and scripts/measure_tiny_finetune.py measure."""
    components = load_components(preset)
    dataset = data.prepare_dataset(preset, components)
    run = paths.run_folder(preset, Path(root))
    Trainer(preset, components, dataset, run).run()
    del components, dataset
    pipe = sampling.load_pipeline(preset, "cpu", progress=False)
    loaded = runs.RunSet(pipe)
    tuned = loaded.add(run)
    variants = [loaded.variant(None), loaded.variant(tuned, label="tuned")]
    return evaluate_variants(pipe, variants, prompt_sets, seeds=list(seeds), out_dir=run / "eval", scorer=scorer,
                             steps=steps, size=preset.resolution, guidance=guidance)
