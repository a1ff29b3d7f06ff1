"""Scores as tables: one row per image and score (results_frame, score_images), and the ScoreTable of a comparison:
per prompt set (and pooled, kept out of sight), each variant's mean with a bootstrap CI, the paired differences with
wins and a sign test, and a sentence per paired row saying what its CI shows (reading)."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path

from .clip_score import ClipScorer
from .stats import bootstrap_ci, paired_difference

IMAGE_COLUMNS = ("image_path", "prompt_set", "split", "prompt", "seed", "variant", "withheld")
#  withheld: SD1.5's safety checker replaced the picture by a black square (helpers.generate.sampling.withheld): it gets no
#  score and is left out of every mean and pair, counted in the table's `withheld` column
RESULT_COLUMNS = IMAGE_COLUMNS + ("clip_model", "score")
POOLED = "all"  # the prompt_set of rows pooled over every prompt set
PAIRS = ("baseline", "all")  # paired rows for every variant vs the baseline, or for every two variants
MIN_PAIRS = 16  # pairs per prompt set below which a paired CI is a demonstration, not a measurement: with 16 pairs a
#                 sign test can call 12 of 16 wins (p ≈ 0.08) apart from chance; with 2 it cannot call anything. A
#                 table with fewer says so in its caption.


# ---------------------------------------------------------------- per-image results

def results_frame(rows: Iterable[dict], csv_path: str | Path | None = None, columns: Sequence[str] = RESULT_COLUMNS):
    """Per-image rows (dicts or a DataFrame) as a pandas DataFrame with `columns` in that order; with `csv_path`,
    also written there."""
    import pandas as pd
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if "withheld" in columns and "withheld" not in frame.columns and not frame.empty:
        frame["withheld"] = False  # drawn without a safety checker (or before the column existed)
    missing = [c for c in columns if c not in frame.columns]
    if frame.empty or missing:
        raise ValueError(f"results need rows with columns {tuple(columns)}; missing {missing or 'all rows'}")
    frame = frame[list(columns)].astype({"seed": int, **({"score": float} if "score" in columns else {}),
                                         **({"withheld": bool} if "withheld" in columns else {})})
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    return frame


def score_images(scorer: ClipScorer, images, batch_size: int = 32, csv_path: str | Path | None = None):
    """CLIP-score every image of an images frame (or images.csv): the frame with `clip_model` and `score` added.
    A withheld image (a black square from SD1.5's safety checker) is not scored: its score is NaN."""
    import numpy as np
    import pandas as pd
    images = results_frame(pd.read_csv(images) if isinstance(images, (str, Path)) else images, columns=IMAGE_COLUMNS)
    scores = np.full(len(images), np.nan)
    shown = ~images["withheld"].to_numpy()
    if shown.any():
        scores[shown] = scorer.score(list(images["image_path"][shown]), list(images["prompt"][shown]), batch_size)
    return results_frame(images.assign(clip_model=scorer.name, score=scores), csv_path)


# ---------------------------------------------------------------- the summary table

def comparisons(variants: Sequence[str], baseline: str | None = None, pairs: str = "baseline") -> list[tuple]:
    """(variant, reference) pairs to compare: every variant vs `baseline` (default: the first), and with
    pairs="all" then every other two variants too (the later one minus the earlier one)."""
    variants = list(variants)
    baseline = variants[0] if baseline is None and variants else baseline
    if baseline not in variants:
        raise ValueError(f"unknown baseline variant {baseline!r}; choose one of {variants}")
    if pairs not in PAIRS:
        raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
    chosen = [(v, baseline) for v in variants if v != baseline]
    if pairs == "all":
        others = [v for v in variants if v != baseline]
        chosen += [(b, a) for i, a in enumerate(others) for b in others[i + 1:]]
    return chosen


def reading(row: dict) -> str:
    """What a paired row's CI says, in words: "+14.89 [+6.52, +24.22] over 40 pairs: better, beyond prompt and seed
    noise" (its CI excludes zero), "worse, …", or "no change these pairs can tell from noise" (it spans zero)."""
    verdict = ("better, beyond prompt and seed noise" if row["low"] > 0 else
               "worse, beyond prompt and seed noise" if row["high"] < 0 else
               "no change these pairs can tell from noise")
    return f"{row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}] over {row['n']} pairs: {verdict}"


class ScoreTable:
    """Per prompt set (and pooled over all sets, "all") and CLIP model: n, mean and CI of every variant, then
    the paired rows (variant − reference on the same prompt and seed: mean difference, CI, wins, sign-test p).
    Prints as text, renders as HTML in a notebook; `frame` has the numbers."""

    def __init__(self, rows: list[dict], level: float, baseline: str):
        self.rows, self.level, self.baseline = rows, level, baseline

    def row(self, variant: str, paired: bool = False, prompt_set: str | None = None,
            reference: str | None = None) -> dict:
        """The row of `variant` (paired=True: its difference to `reference`, default the baseline) for
        `prompt_set` (default: pooled over all sets, or the only set)."""
        sets = {r["prompt_set"] for r in self.rows}
        prompt_set = prompt_set or (POOLED if POOLED in sets else next(iter(sets), None))
        reference = reference or self.baseline
        for r in self.rows:
            if (r["variant"], r["paired"], r["prompt_set"]) == (variant, paired, prompt_set) and (
                    not paired or r["reference"] == reference):
                return r
        raise KeyError(f"no {'paired ' if paired else ''}row for variant {variant!r} in prompt set {prompt_set!r}")

    @property
    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    @property
    def fewest_pairs(self) -> int | None:
        """The smallest n of the paired rows per prompt set (the pooled rows aside); None without paired rows."""
        counts = [r["n"] for r in self.rows if r["paired"] and r["prompt_set"] != POOLED]
        return min(counts) if counts else None

    def caption(self) -> str:
        models = ", ".join(dict.fromkeys(r["clip_model"] for r in self.rows))
        withheld = (" withheld: images SD1.5's safety checker blacked out (left out; a pair with one is left out)."
                    if self.withheld else "")
        few = self.fewest_pairs
        demo = (f" A demonstration, not a measurement: {few} pairs in a prompt set (fewer than {MIN_PAIRS}) give "
                "CIs too wide to read." if few is not None and few < MIN_PAIRS else "")
        return (f"CLIP score ({models}): mean with a bootstrap {self.level:.0%} CI per prompt set; paired rows: "
                f"variant − reference on the same prompt and seed, wins of n, p from a two-sided sign test."
                f"{withheld}{demo}")

    def readings(self) -> list[str]:
        """One sentence per paired row shown: what its CI says (better or worse beyond prompt and seed noise, or no
        change it can tell from noise), so a reader need not work it out from the brackets."""
        lines = []
        for r in self.shown_rows():
            if r["paired"]:
                lines.append(f"{r['variant']} − {r['reference']} on {r['prompt_set']}: {reading(r)}")
        return lines

    def shown_rows(self) -> list[dict]:
        """The rows a reader sees: each prompt set apart (pooling in-domain, held-out and generic prompts would mix
        what a fine-tune should change with what it should leave alone); `frame` and `row` keep the pooled rows."""
        sets = {r["prompt_set"] for r in self.rows}
        return [r for r in self.rows if r["prompt_set"] != POOLED or sets == {POOLED}]

    @property
    def withheld(self) -> int:
        """Rows that left out images SD1.5's safety checker withheld (0: nothing was withheld)."""
        return sum(r.get("withheld", 0) > 0 for r in self.rows)

    def _cells(self) -> list[list[str]]:
        several_models = len({r["clip_model"] for r in self.rows}) > 1
        cells = [["prompt set", "variant", "n", "mean", f"{self.level:.0%} CI", "wins", "p"]
                 + (["withheld"] if self.withheld else []) + (["clip_model"] if several_models else [])]
        for r in self.shown_rows():
            sign = "+" if r["paired"] else ""
            name = f"{r['variant']} − {r['reference']}" if r["paired"] else r["variant"]
            cells.append([r["prompt_set"], name, str(r["n"]), f"{r['mean']:{sign}.2f}",
                          f"[{r['low']:{sign}.2f}, {r['high']:{sign}.2f}]",
                          f"{r['wins']}/{r['n']}" if r["paired"] else "", f"{r['p']:.2g}" if r["paired"] else ""]
                         + ([str(r.get("withheld", 0))] if self.withheld else [])
                         + ([r["clip_model"]] if several_models else []))
        return cells

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        return "\n".join([self.caption()] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                                             for row in cells] + self.readings())

    def to_markdown(self) -> str:
        cells = self._cells()
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
        return "\n".join([self.caption(), ""] + lines)

    def _repr_html_(self) -> str:
        head, *body = self._cells()
        th = "".join(f"<th>{escape(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
        caption = f"<caption>{escape(self.caption())}</caption>"
        readings = "".join(f"<li>{escape(line)}</li>" for line in self.readings())
        return (f"<table>{caption}<thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"
                + (f"<ul>{readings}</ul>" if readings else ""))

    __repr__ = __str__


def score_table(results, baseline: str | None = None, pairs: str = "baseline", level: float = 0.95,
                n_boot: int = 2000, seed: int = 0) -> ScoreTable:
    """Summarise a results frame (or rows): per CLIP model and prompt set (plus "all" when there are several),
    mean and bootstrap CI per variant, then the paired rows `comparisons(variants, baseline, pairs)` asks for."""
    frame = results if hasattr(results, "groupby") else results_frame(results)
    variants = list(dict.fromkeys(frame["variant"]))
    chosen, baseline = comparisons(variants, baseline, pairs), baseline or variants[0]
    sets = list(dict.fromkeys(frame["prompt_set"]))
    rows = []
    for model, by_model in frame.groupby("clip_model", sort=False):
        scopes = [(s, by_model[by_model["prompt_set"] == s]) for s in sets]
        for scope, part in scopes + ([(POOLED, by_model)] if len(sets) > 1 else []):
            for variant, group in part.groupby("variant", sort=False):
                scored = group["score"].dropna()  # NaN: withheld by the safety checker, never a score
                mean, low, high = (bootstrap_ci(scored, n_boot, level, seed) if len(scored)
                                   else (float("nan"),) * 3)
                rows.append(dict(prompt_set=scope, variant=variant, reference=None, n=len(scored), mean=mean, low=low,
                                 high=high, wins=None, p=None, paired=False, clip_model=model,
                                 withheld=len(group) - len(scored)))
            key = ["prompt_set", "prompt", "seed"]
            for variant, reference in chosen:
                pairs_ = part[part["variant"] == variant].merge(part[part["variant"] == reference], on=key,
                                                                suffixes=("", "_ref"))
                if pairs_.duplicated(key).any():
                    raise ValueError(f"{variant!r} vs {reference!r}: a (prompt, seed) pair appears more than once")
                kept = pairs_.dropna(subset=["score", "score_ref"])
                if kept.empty:
                    continue
                d = paired_difference(kept["score"], kept["score_ref"], n_boot, level, seed)
                rows.append(dict(prompt_set=scope, variant=variant, reference=reference, n=d["n"], mean=d["mean_diff"],
                                 low=d["low"], high=d["high"], wins=d["wins"], p=d["p"], paired=True, clip_model=model,
                                 withheld=len(pairs_) - len(kept)))
    return ScoreTable(rows, level, baseline)
