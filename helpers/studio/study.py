"""A blind A/B preference study: images of two variants drawn from the same prompt and seed, shown side by side
with left and right randomised and the names hidden; a person picks left, right or tie. Answers are appended to a
CSV in the run's folder (on Drive in Colab), so a study continues after a disconnect and several raters can take
part one after another. The widgets are in helpers.studio.explorer; everything else is here.

    pairs = pairs_from_scores(board.scores, "SD1.5 base", run)          # reuse notebook 05's images and CLIP scores
    pairs = generate_pairs(engine, "SD1.5 base", run, prompt_set, seeds, out_dir)   # or draw them now
    study = Study(pairs, "SD1.5 base", run, csv_path, seed=0)
    shown = study.next("ada")        # Shown(index, total, pair, left, right): the order is seeded per rater
    study.record("ada", shown, "left")                                   # appended to the CSV at once
    study.results()                  # StudyResults: per prompt set and pooled

Definitions (notebook 05 states them too):
- win rate of a variant = (its wins + ½ × ties) / answers, with a 95 % Wilson score interval on that share;
- sign test: two-sided exact binomial test of A's wins against 50 % over the answers that are not ties;
- agreement with CLIP = share of non-tie answers whose picked image has the higher CLIP score (pairs whose two
  scores are equal are left out), with its Wilson interval.
The order of pairs and the side of each variant come from random.Random seeded with (study seed, rater), so the
same rater gets the same order back after a restart and different raters get different orders.
"""
from __future__ import annotations

import hashlib
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.compare import evaluate_variants
from ..generate.sampling import folder_name
from .answers import ANSWER_COLUMNS, CHOICES, append_answer, read_answers
from .catalog import shared_size
from .study_results import StudyResults, study_results



@dataclass(frozen=True)
class Pair:
    prompt_set: str
    prompt: str
    seed: int
    images: dict  # variant → image path
    clip: dict  # variant → CLIP score of that image (NaN: withheld by SD1.5's safety checker, a black square)

    @property
    def withheld(self) -> bool:
        """A side is a black square from SD1.5's safety checker: nothing for a person to compare."""
        return any(score != score for score in self.clip.values())

    @property
    def key(self) -> str:
        return f"{self.prompt_set}|{self.prompt}|{self.seed}"


@dataclass(frozen=True)
class Shown:
    index: int  # 1-based position in this rater's order
    total: int
    pair: Pair
    left: str  # the variant shown on the left
    right: str


def pairs_from_scores(scores, a: str, b: str, clip_model: str | None = None) -> list[Pair]:
    """Pairs of variants `a` and `b` on the same (prompt set, prompt, seed) from a scores frame (helpers.evaluation
    RESULT_COLUMNS, e.g. notebook 05's scores.csv), with the CLIP scores of `clip_model` (default: the first)."""
    import pandas as pd
    frame = pd.read_csv(scores) if isinstance(scores, (str, Path)) else scores
    if a == b:
        raise ValueError("pick two different variants to compare")
    present = set(frame["variant"])
    for v in (a, b):
        if v not in present:
            raise ValueError(f"no images of {v!r} in these scores; variants: {sorted(present)}")
    clip_model = clip_model or frame["clip_model"].iloc[0]
    frame = frame[frame["clip_model"] == clip_model]
    key = ["prompt_set", "prompt", "seed"]
    merged = frame[frame["variant"] == a].merge(frame[frame["variant"] == b], on=key, suffixes=("_a", "_b"))
    if merged.empty:
        raise ValueError(f"{a!r} and {b!r} share no (prompt, seed): were they drawn in the same evaluation?")
    return [Pair(r["prompt_set"], r["prompt"], int(r["seed"]), {a: r["image_path_a"], b: r["image_path_b"]},
                 {a: float(r["score_a"]), b: float(r["score_b"])}) for r in merged.to_dict("records")]


def generate_pairs(engine, a: str, b: str, prompt_set, seeds, out_dir: str | Path, steps: int | None = None,
                   size: int | None = None) -> list[Pair]:
    """Draw `a` and `b` on every prompt of `prompt_set` with every seed (one pipeline: both must be of one family)
    through helpers.evaluation.evaluate_variants, CLIP-score them, and pair them. `size`: None = the runs' training
    size (helpers.studio.catalog.shared_size), so a base is compared with a run where the run was trained."""
    first, second = engine.catalog.get(a), engine.catalog.get(b)
    if first.base_key != second.base_key:
        raise ValueError(f"{a} ({first.family}) and {b} ({second.family}) draw with different base models; "
                         "compare two variants of one family")
    base = first if not first.is_run else second
    steps = steps or base.preset.sample_steps
    result = evaluate_variants(engine.pipeline(a), [engine.variant(a), engine.variant(b)], prompt_set, seeds,
                               out_dir, scorer=engine.scorer, steps=steps, size=size or shared_size([first, second])[0])
    return pairs_from_scores(result.scores, a, b)


def _rng(seed: int, rater: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}|{rater}".encode()).hexdigest()  # stable across runs (hash() is salted)
    return random.Random(int(digest[:16], 16))


class Study:
    def __init__(self, pairs: list[Pair], a: str, b: str, csv_path: str | Path, seed: int = 0):
        if a == b:
            raise ValueError("pick two different variants to compare")
        keys = [p.key for p in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("every (prompt set, prompt, seed) may appear once in a study")
        shown = [p for p in pairs if not p.withheld]
        self.left_out = len(pairs) - len(shown)  # pairs with a side SD1.5's safety checker withheld
        if not shown:
            raise ValueError("a study needs at least one pair of images" + (
                f" ({self.left_out} left out: the SD1.5 safety checker withheld one side)" if self.left_out else ""))
        self.pairs, self.a, self.b, self.seed = shown, a, b, seed
        self.csv_path = Path(csv_path)
        self.name = f"{a} vs {b}"
        self.notes: list[str] = []  # lines of the answers file left out at the last read, each a sentence
        self._warned: set[str] = set()

    def order(self, rater: str) -> list[tuple[Pair, str]]:
        """Every pair with the variant shown on the left, in this rater's seeded order."""
        rng = _rng(self.seed, self._rater(rater))
        pairs = sorted(self.pairs, key=lambda p: p.key)
        rng.shuffle(pairs)
        return [(p, rng.choice((self.a, self.b))) for p in pairs]

    @staticmethod
    def _rater(rater: str) -> str:
        if not isinstance(rater, str) or not rater.strip():
            raise ValueError("Type your name (or initials) as the rater first.")
        if any(c in rater for c in "\n\r"):
            raise ValueError("a rater name is one line of text")
        return rater.strip()

    def answers(self):
        """This study's answers so far (every rater), as a DataFrame of ANSWER_COLUMNS. A line that is not a whole,
        valid answer (cut short by a disconnect, a bad cell, bytes that are not text) is left out with a sentence
        naming the file and line, in `self.notes` and as a warning (once per line); a file of another layout raises
        AnswersFileError."""
        import pandas as pd
        rows, self.notes = read_answers(self.csv_path, self.name, (self.a, self.b))
        for note in self.notes:
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(note, stacklevel=2)
        frame = pd.DataFrame(rows, columns=list(ANSWER_COLUMNS))
        return frame.astype({"seed": int, "clip_left": float, "clip_right": float})

    def answered(self, rater: str) -> set[str]:
        frame = self.answers()
        return set(frame.loc[frame["rater"] == self._rater(rater), "pair"])

    def next(self, rater: str) -> Shown | None:
        """The next pair this rater has not answered (None when all are done)."""
        done = self.answered(rater)
        order = self.order(rater)
        for index, (pair, left) in enumerate(order, 1):
            if pair.key not in done:
                right = self.b if left == self.a else self.a
                return Shown(index, len(order), pair, left, right)
        return None

    def progress(self, rater: str) -> str:
        return f"{len(self.answered(rater))} of {len(self.pairs)} answered by {self._rater(rater)}"

    def record(self, rater: str, shown: Shown, choice: str) -> dict:
        """Append one answer (flushed and fsynced: a disconnect loses at most the answer being written)."""
        rater = self._rater(rater)
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
        pair = shown.pair
        winner = "tie" if choice == "tie" else shown.left if choice == "left" else shown.right
        row = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S"), study=self.name, rater=rater, pair=pair.key,
                   prompt_set=pair.prompt_set, prompt=pair.prompt, seed=pair.seed, left=shown.left,
                   right=shown.right, choice=choice, winner=winner, clip_left=pair.clip[shown.left],
                   clip_right=pair.clip[shown.right])
        append_answer(self.csv_path, row)
        return row

    def results(self) -> "StudyResults":
        return study_results(self.answers(), self.a, self.b)


def scripted_choice(rng: random.Random, shown: Shown, a: str, p_a: float = 0.5, p_tie: float = 0.1) -> str:
    """A DEMO answer, not a person's: a tie with p_tie, else A wins with p_a; drawn from `rng`, never from the CLIP
    scores (answers derived from CLIP would make the agreement 100 % by construction)."""
    u = rng.random()
    if u < p_tie:
        return "tie"
    winner_is_a = u < p_tie + p_a * (1 - p_tie)
    return "left" if (shown.left == a) == winner_is_a else "right"


def scripted_answers(study: Study, rater: str, count: int, seed: int = 0, p_a: float = 0.5,
                     p_tie: float = 0.1) -> list[dict]:
    """Up to `count` scripted answers (`scripted_choice` with random.Random(seed)) recorded for `rater`."""
    rng, rows = random.Random(seed), []
    for _ in range(count):
        shown = study.next(rater)
        if shown is None:
            break
        rows.append(study.record(rater, shown, scripted_choice(rng, shown, study.a, p_a, p_tie)))
    return rows


def study_csv(engine, a: str, b: str) -> Path:
    """Where a study's answers go: the study/ folder of the run among `a`, `b` (the second if both are runs), else
    the storage root's study/ folder."""
    entries = [engine.catalog.get(a), engine.catalog.get(b)]
    run = next((e for e in reversed(entries) if e.is_run), None)
    folder = (run.folder if run is not None else engine.catalog.root) / "study"
    return folder / f"ab_{folder_name(a)}_vs_{folder_name(b)}.csv"
