"""Notebook 05's evaluation across every finished run: each run next to its own base model, on shared prompt sets
with the same seeds, scored by CLIP and by PickScore; one summary table, a bar chart with error bars, CSV + PNG.

    board = evaluate_runs(engine, prompts_per_set=2, seeds=[0, 1], out_dir=root / "results" / "05_evaluation_t4")
    board                      # the summary table (renders in a notebook): a row per run and score
    board.tables["sd15"]       # the full helpers.evaluation.ScoreTable of a family, per prompt set and pooled
    board.chart                # the PNG: paired difference to the base per run, prompt set and score, 95 % CIs

Per family, in turn (a T4 holds one family's pipeline and then one scorer at a time, see helpers.plan.inference): the
family's pipeline draws its base and every finished run (helpers.studio.engine, runs switched in ONE pipeline) on the
family's prompt sets (FAMILY_SETS: the runs' training style, held-out wording or subjects, generic prompts) with the
same seeds, through helpers.evaluation.evaluate_variants; the pipeline is freed. Then the CLIP scorer scores every
image and is freed, then PickScore. Writes to `out_dir`: <family>/… (images, grids, table.csv + table.md: per prompt
set and pooled), scores.csv (every image × score model), summary.csv + summary.md (one row per variant and score),
chart.png, missing.csv (runs not there yet and why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from ..core.presets import get_preset
from ..evaluation import prompts as prompt_sets
from ..evaluation.compare import evaluate_variants
from ..evaluation.tables import (
    IMAGE_COLUMNS,
    MIN_PAIRS,
    ScoreTable,
    reading,
    results_frame,
    score_images,
    score_table,
)
from ..methods.runs import run_preset
from ..models import release_cuda_cache
from ..plan.inference import choose_counts
from .catalog import Entry, shared_size
from .engine import Engine

# training style and held-out prompts per data source and profile; every family also gets the generic set
SOURCE_SETS = {"cifar10": lambda profile: [prompt_sets.cifar_prompts("train"), prompt_sets.cifar_prompts("held-out")],
               "naruto": lambda profile: [prompt_sets.naruto_prompts(profile),
                                          prompt_sets.held_out_subjects("anime style")],
               "folder": lambda profile: [prompt_sets.held_out_subjects()]}
T4_STEPS = {"sd15": 25, "sdxl": 20}  # denoising steps on a T4 (DPM-Solver++ needs ~20-25); tiny: the preset's


def family_sets(runs: list[Entry], prompts_per_set: int) -> list[prompt_sets.PromptSet]:
    """The prompt sets a family is drawn on: each run's data source's sets (once), then generic; each cut to
    `prompts_per_set` prompts (helpers.evaluation.prompts.spread)."""
    chosen: dict[str, prompt_sets.PromptSet] = {}
    for run in runs:
        for s in SOURCE_SETS.get(run.preset.data_source, SOURCE_SETS["folder"])(run.preset.profile):
            chosen.setdefault(s.name, s)
    chosen.setdefault("generic", prompt_sets.generic_prompts())
    return [prompt_sets.spread(s, prompts_per_set) for s in chosen.values()]


TINY_COUNTS = (8, 2)  # prompts per set × seeds in the tiny profile: 16 pairs per set (MIN_PAIRS)


def t4_plan(catalog, budget_seconds: float = 1800, pickscore: bool = True, safety_checker: bool = True):
    """(prompts per set, seeds, phases): the T4 form of every finished run of `catalog` (its preset in the t4
    profile, drawn at its family's shared size: the runs' training size), the largest prompt × seed counts that
    finish in `budget_seconds` on a T4, and the phase plan (helpers.plan.inference), SD1.5 with its safety checker as the
    engine loads it. None without finished runs."""
    runs, sets, sizes, sources = {}, {}, {}, {}
    for family, entries in catalog.by_family().items():
        found = [e for e in entries if e.is_run]
        if found:
            runs[family] = [get_preset(e.preset.name, "t4", method=e.preset.method) for e in found]
            sets[family] = len(family_sets(found, 1))
            sizes[family] = max(p.resolution for p in runs[family])  # helpers.studio.catalog.shared_size's rule
            sources[family] = [get_preset(p.name, "t4", method=p.method)
                               for p in {run_preset(e.source) for e in found if e.source is not None}]
    if not runs:
        return None
    return choose_counts(runs, sets, sizes, {f: T4_STEPS[f] for f in runs}, budget_seconds, pickscore,
                         safety_checker, sources)


@dataclass
class Scoreboard:
    out_dir: Path
    scores: object  # DataFrame: IMAGE_COLUMNS + clip_model + score + family, one row per image and score model
    tables: dict  # family → ScoreTable (both score models, per prompt set and pooled)
    summary: object  # DataFrame, one row per variant and score model (pooled over the family's prompt sets)
    chart: Path | None
    missing: list = field(default_factory=list)  # helpers.studio.catalog.MissingRun
    sizes: dict = field(default_factory=dict)  # family → the size it was drawn at, and why
    labels: dict = field(default_factory=dict)  # variant name → the short label tables and the chart show
    overviews: dict = field(default_factory=dict)  # family → one page of its sheets (first prompts of every set)

    @property
    def withheld(self) -> int:
        """Images SD1.5's safety checker withheld (left out of every mean and pair), over both score models."""
        return int(self.scores["withheld"].sum()) // max(1, self.scores["clip_model"].nunique())

    def _cells(self) -> list[list[str]]:
        head = ["family", "prompt set", "variant", "score", "n", "mean [95% CI]", "Δ vs base [95% CI]", "wins", "p"]
        rows = [head + (["withheld"] if self.withheld else [])]
        for r in self.summary.to_dict("records"):
            delta = "" if r["reference"] is None or r["reference"] != r["reference"] else (
                f"{r['diff']:+.2f} [{r['diff_low']:+.2f}, {r['diff_high']:+.2f}]")
            wins = "" if not delta else f"{int(r['wins'])}/{int(r['pairs'])}"
            rows.append([r["family"], r["prompt_set"], self.labels.get(r["variant"], r["variant"]),
                         short_score_name(r["score_model"]), str(int(r["n"])),
                         f"{r['mean']:.2f} [{r['low']:.2f}, {r['high']:.2f}]", delta, wins,
                         "" if not delta else f"{r['p']:.2g}"] + ([str(int(r["withheld"]))] if self.withheld else []))
        return rows

    def caption(self) -> str:
        models = " and ".join(f"{short_score_name(m)} = {m}" for m in dict.fromkeys(self.summary["score_model"]))
        few = int(self.summary["pairs"].min()) if self.summary["pairs"].notna().any() else 0
        demo = (f" A demonstration, not a measurement: {few} pairs per prompt set (fewer than {MIN_PAIRS}) give CIs "
                "too wide to read." if few < MIN_PAIRS else "")
        return (f"Every run vs its own base on each prompt set (paired on prompt and seed; n pairs; wins of n; p: "
                f"two-sided sign test). {models}.{demo}")

    def readings(self) -> list[str]:
        """One sentence per run, prompt set and score: what its paired CI says (tables.reading)."""
        return [f"{self.labels.get(r['variant'], r['variant'])}, {r['prompt_set']}, {short_score_name(r['score_model'])}"
                f": {reading(dict(mean=r['diff'], low=r['diff_low'], high=r['diff_high'], n=int(r['pairs'])))}"
                for r in self.summary.to_dict("records")
                if r["reference"] is not None and r["reference"] == r["reference"]]

    def notes(self) -> list[str]:
        """What each run's CIs say, the drawing sizes per family, the images the safety checker withheld, the runs
        still missing."""
        notes = self.readings() + [f"{family} drawn at {size}" for family, size in self.sizes.items()]
        if self.withheld:
            notes.append(f"{self.withheld} image(s) withheld by the SD1.5 safety checker (black squares): left out "
                         "of the means and pairs, counted in `withheld`")
        return notes + [f"missing: {m.name}: {m.why}" for m in self.missing]

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
        return "\n".join([self.caption()] + lines + self.notes())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        head, *body = self._cells()
        th = "".join(f"<th>{escape(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
        notes = "".join(f"<li>{escape(n)}</li>" for n in self.notes())
        return (f"<table><caption>{escape(self.caption())}</caption><thead><tr>{th}</tr></thead><tbody>{trs}"
                f"</tbody></table>" + (f"<ul>{notes}</ul>" if notes else ""))


def summary_rows(family: str, table: ScoreTable) -> list[dict]:
    """One row per prompt set, variant and score model (each set apart: in-domain, held-out and generic prompts
    answer different questions): mean with CI and, for runs, the paired difference to the family's base (CI, wins,
    sign-test p)."""
    rows = []
    for r in table.shown_rows():
        if r["paired"]:
            continue
        row = dict(family=family, prompt_set=r["prompt_set"], variant=r["variant"], score_model=r["clip_model"],
                   n=r["n"], pairs=None, mean=r["mean"], low=r["low"], high=r["high"], reference=None, diff=None,
                   diff_low=None, diff_high=None, wins=None, p=None, withheld=r.get("withheld", 0))
        paired = [p for p in table.rows if p["paired"] and p["prompt_set"] == r["prompt_set"]
                  and p["variant"] == r["variant"] and p["clip_model"] == r["clip_model"]]
        if paired:
            p = paired[0]
            row.update(reference=p["reference"], pairs=p["n"], diff=p["mean"], diff_low=p["low"],
                       diff_high=p["high"], wins=p["wins"], p=p["p"])
        rows.append(row)
    return rows


def short_score_name(model: str) -> str:
    """"CLIP" or "PickScore" for a table cell; the full model names go in the caption."""
    return "PickScore" if "pick" in model.lower() else "CLIP"


def plot_differences(tables: dict, path: Path, labels: dict | None = None) -> Path | None:
    """Bars: each run's paired difference to its base on each prompt set of its family, one panel per score model,
    with the 95 % CI as error bars; runs by their short `labels`. Sized for a notebook page (about 900 px wide, text
    at 10–11 pt). None when no run has a paired row."""
    import textwrap

    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    labels = labels or {}
    rows = [r for t in tables.values() for r in t.shown_rows() if r["paired"]]
    if not rows:
        return None
    models = list(dict.fromkeys(r["clip_model"] for r in rows))
    runs = list(dict.fromkeys(r["variant"] for r in rows))
    scopes = {v: list(dict.fromkeys(r["prompt_set"] for r in rows if r["variant"] == v)) for v in runs}
    names = list(dict.fromkeys(s for v in runs for s in scopes[v]))
    colours = {s: plt.cm.tab10(k % 10) for k, s in enumerate(names)}
    bars, x, centres = [], 0.0, []
    for v in runs:
        first = x
        for scope in scopes[v]:
            bars.append((v, scope, x))
            x += 1.0
        centres.append((first + x - 1) / 2)
        x += 0.8  # a gap between runs
    fig, axes = plt.subplots(len(models), 1, figsize=(9, 3.4 * len(models) + 0.6), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        found = {(r["variant"], r["prompt_set"]): r for r in rows if r["clip_model"] == model}
        seen = set()
        for v, scope, pos in bars:
            r = found.get((v, scope))
            if r is None:
                continue
            ax.bar(pos, r["mean"], 0.9, color=colours[scope], label=None if scope in seen else scope,
                   yerr=[[r["mean"] - r["low"]], [r["high"] - r["mean"]]], capsize=3)
            seen.add(scope)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(centres, ["\n".join(textwrap.wrap(labels.get(v, v), 11)) for v in runs], fontsize=9)
        ax.set_ylabel(f"Δ vs base\n{short_score_name(model)}", fontsize=11)
        ax.tick_params(axis="y", labelsize=10)
        if ax is axes[0, 0]:  # one legend, beside the first panel, never on a bar
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    axes[0, 0].set_title("Each run minus its own base, same prompt and seed (95 % bootstrap CI)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_runs(engine: Engine, prompts_per_set: int, seeds, out_dir: str | Path, pickscore=None,
                  steps: dict | None = None) -> Scoreboard:
    """Draw, score and summarise every family that has finished runs (see the module docstring). `pickscore`: a
    function that loads the second scorer (e.g. `lambda: PickScorer.from_profile(profile)`), called only after the
    CLIP scorer is freed, or None.
    `steps`: denoising steps per family (default: T4_STEPS on a T4, each base preset's sample_steps in tiny)."""
    import pandas as pd
    out_dir, catalog = Path(out_dir), engine.catalog
    images, families, sizes, overviews = [], {}, {}, {}
    labels = {e.name: e.label for e in catalog.entries}
    for family, entries in catalog.by_family().items():
        runs = [e for e in entries if e.is_run]
        if not runs:
            continue  # a base alone has nothing to be compared with
        base = next(e for e in entries if not e.is_run)
        n_steps = (steps or {}).get(family) or (T4_STEPS[family] if catalog.profile == "t4"
                                                 else base.preset.sample_steps)
        size, why = shared_size([base, *runs])  # base and runs paired at the runs' training size
        variants = [engine.variant(e.name) for e in [base, *runs]]
        result = evaluate_variants(engine.pipeline(base.name), variants, family_sets(runs, prompts_per_set), seeds,
                                   out_dir / family, scorer=None, steps=n_steps, size=size, labels=labels)
        images.append(result.images.assign(family=family))
        overviews[family] = result.overview(rows=4)
        families[family], sizes[family] = base.name, f"{size} px, {why}"
        engine.unload()  # the next family (or scorer) gets the GPU
    if not images:
        raise ValueError(f"no finished runs to evaluate under {catalog.root / 'runs'}; missing:\n"
                         + catalog.missing_text())
    frame = pd.concat(images, ignore_index=True)
    scored = [score_images(engine.scorer, frame[list(IMAGE_COLUMNS)]).assign(family=frame["family"])]
    engine.release_scorer()
    if pickscore is not None:
        scorer = pickscore()
        scored.append(score_images(scorer, frame[list(IMAGE_COLUMNS)]).assign(family=frame["family"]))
        del scorer
        release_cuda_cache()
    scores = pd.concat(scored, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out_dir / "scores.csv", index=False)
    tables = {f: score_table(results_frame(scores[scores["family"] == f]), baseline=base)
              for f, base in families.items()}
    for family, table in tables.items():  # the full tables: per prompt set and pooled, both score models
        table.frame.to_csv(out_dir / family / "table.csv", index=False)
        (out_dir / family / "table.md").write_text(table.to_markdown() + "\n")
    summary = pd.DataFrame([row for f, t in tables.items() for row in summary_rows(f, t)])
    summary.to_csv(out_dir / "summary.csv", index=False)
    board = Scoreboard(out_dir, scores, tables, summary, plot_differences(tables, out_dir / "chart.png", labels),
                       list(catalog.missing), sizes, labels, overviews)
    (out_dir / "summary.md").write_text("\n".join("| " + " | ".join(r) + " |" for r in board._cells()) + "\n")
    pd.DataFrame([m.__dict__ for m in catalog.missing], columns=["name", "notebook", "why"]).to_csv(
        out_dir / "missing.csv", index=False)
    return board
