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

import csv
import hashlib
import io
import os
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..evaluation.compare import evaluate_variants
from ..evaluation.stats import sign_test, wilson
from ..generate.sampling import folder_name
from .catalog import shared_size

ANSWER_COLUMNS = ("time", "study", "rater", "pair", "prompt_set", "prompt", "seed", "left", "right", "choice",
                  "winner", "clip_left", "clip_right")
CHOICES = ("left", "right", "tie")


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


class AnswersFileError(ValueError):
    """The answers file is of another layout: its answers cannot be read, nor new ones appended."""


def _decode(raw: bytes) -> str:
    """The file's text; bytes that are not UTF-8 text (and NULs) become U+FFFD, so their line can be named."""
    return raw.decode("utf-8", errors="replace").removeprefix("\ufeff").replace("\x00", "\ufffd")


def _file_header(path: Path) -> list[str] | None:
    """The answers file's column names (None: no file yet, or an empty one); AnswersFileError unless it names
    every column of ANSWER_COLUMNS (other orders and extra columns are read by name)."""
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        first = f.readline()
    if not first.strip():
        if path.stat().st_size > len(first):
            raise AnswersFileError(f"{path}, line 1: the header line is empty; the file is not an answers file of "
                                   "this lab. Move it aside (rename it), then start the study again.")
        return None
    header = [c.strip() for c in next(csv.reader([_decode(first).rstrip("\r\n")]), [])]
    missing = [c for c in ANSWER_COLUMNS if c not in header]
    if missing:
        raise AnswersFileError(
            f"{path}, line 1: the header is not the A/B study's (it lacks {', '.join(missing)}), so none of its "
            f"lines can be read as answers and no answer is appended to it. Move it aside (rename it), then start "
            f"the study again: a new answers file is begun.")
    return header


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _records(lines: list[str], width: int):
    """(line number, cells) of each CSV record after the header; a record may span lines only inside a quoted cell
    (a prompt with a line break), and only while it does not exceed `width` cells: a line cut inside quotes never
    swallows the lines after it."""
    k = 1
    while k < len(lines):
        start, text = k + 1, lines[k]
        k += 1
        if not text.strip():
            continue
        if text.count('"') % 2:  # a quoted cell goes on over the next line(s), or the line was cut inside it
            joined, j = text, k
            while joined.count('"') % 2 and j < len(lines):
                joined, j = joined + "\n" + lines[j], j + 1
            cells = next(csv.reader(io.StringIO(joined, newline="")), [])
            if joined.count('"') % 2 == 0 and len(cells) == width:
                k = j
                yield start, cells
                continue
        yield start, next(csv.reader([text]), [])


def read_answers(path: Path, study: str, variants: tuple[str, str]) -> tuple[list[dict], list[str]]:
    """(the answers of `study` in the file at `path`, one sentence per line left out). Lines of other studies are
    not this study's and are skipped without a word; a line that is not a whole, valid answer is left out with a
    sentence naming the file, the line and what is wrong with it."""
    path = Path(path)
    header = _file_header(path)
    if header is None:
        return [], []
    lines = _decode(path.read_bytes()).split("\n")
    lines = [line.removesuffix("\r") for line in lines]
    rows, notes = [], []

    def leave_out(line: int, why: str) -> None:
        notes.append(f"{path}, line {line}: {why}; this line is left out of the results (the other lines' answers "
                     "are kept).")

    for line, cells in _records(lines, len(header)):
        if "\ufffd" in "".join(cells):
            leave_out(line, "it holds bytes that are not text (binary garbage)")
            continue
        if [c.strip() for c in cells] == header:
            continue  # the header again (two files joined): not an answer
        if len(cells) != len(header):
            leave_out(line, f"it has {len(cells)} cells where the header has {len(header)} (cut short by a "
                            "disconnect while it was written, or edited by hand)" if len(cells) < len(header) else
                      f"it has {len(cells)} cells where the header has {len(header)} (two lines merged into one)")
            continue
        row = dict(zip(header, cells))
        if row["study"] != study:
            continue
        try:
            rows.append(_answer(row, variants))
        except ValueError as e:
            leave_out(line, str(e))
    return rows, notes


def _answer(row: dict, variants: tuple[str, str]) -> dict:
    """One answer of ANSWER_COLUMNS with its cells checked and typed; ValueError says which cell is wrong."""
    out = {c: row[c] for c in ANSWER_COLUMNS}
    if not out["rater"].strip():
        raise ValueError("its rater cell is empty")
    if out["choice"] not in CHOICES:
        raise ValueError(f"its choice {out['choice']!r} is not one of {', '.join(CHOICES)}")
    if {out["left"], out["right"]} != set(variants):
        raise ValueError(f"its left and right cells ({out['left']!r}, {out['right']!r}) are not this study's two "
                         "variants")
    expected = "tie" if out["choice"] == "tie" else out[out["choice"]]
    if out["winner"] != expected:
        raise ValueError(f"its winner {out['winner']!r} does not follow from its choice {out['choice']!r} "
                         f"(that is {expected!r})")
    try:
        out["seed"] = int(out["seed"])
    except ValueError:
        raise ValueError(f"its seed {out['seed']!r} is not a whole number") from None
    for side in ("clip_left", "clip_right"):
        try:
            out[side] = float(out[side])
        except ValueError:
            raise ValueError(f"its {side} {out[side]!r} is not a number") from None
    return out


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
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        header = _file_header(self.csv_path)  # raises AnswersFileError for a file of another layout
        with open(self.csv_path, "a", newline="", encoding="utf-8") as f:
            if header is None:
                header = list(ANSWER_COLUMNS)
                csv.writer(f).writerow(header)
            elif not _ends_with_newline(self.csv_path):
                f.write("\r\n")  # a line cut by a crash stays a line of its own: this answer is never merged into it
            csv.DictWriter(f, header, restval="").writerow(row)
            f.flush()
            os.fsync(f.fileno())
        return row

    def results(self) -> "StudyResults":
        return study_results(self.answers(), self.a, self.b)


@dataclass
class StudyResults:
    a: str
    b: str
    rows: list[dict]  # one per prompt set, then "all" (pooled) when there are several

    @property
    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def _cells(self) -> list[list[str]]:
        head = ["prompt set", "answers", f"{self.a} wins", f"{self.b} wins", "ties", f"{self.a} win rate [95% CI]",
                f"{self.b} win rate [95% CI]", "sign test p", "agrees with CLIP [95% CI]"]
        cells = [head]
        for r in self.rows:
            def rate(v):
                return "–" if r["n"] == 0 else f"{r[f'rate_{v}']:.2f} [{r[f'low_{v}']:.2f}, {r[f'high_{v}']:.2f}]"
            agree = ("–" if not r["agree_n"] else f"{r['agreement']:.2f} [{r['agree_low']:.2f}, "
                     f"{r['agree_high']:.2f}] of {r['agree_n']}")
            cells.append([r["prompt_set"], str(r["n"]), str(r["wins_a"]), str(r["wins_b"]), str(r["ties"]),
                          rate("a"), rate("b"), f"{r['p']:.2g}", agree])
        return cells

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from html import escape
        head, *body = self._cells()
        th = "".join(f"<th>{escape(c)}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in body)
        return f"<table class='study-results'><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _summary(scope: str, part, a: str, b: str) -> dict:
    wins_a, wins_b = int((part["winner"] == a).sum()), int((part["winner"] == b).sum())
    ties, n = int((part["winner"] == "tie").sum()), len(part)
    rate_a, low_a, high_a = wilson(wins_a + ties / 2, n)
    rate_b, low_b, high_b = wilson(wins_b + ties / 2, n)
    agree = agree_n = 0
    for r in part.to_dict("records"):
        if r["choice"] == "tie":
            continue
        picked, other = ((r["clip_left"], r["clip_right"]) if r["choice"] == "left"
                         else (r["clip_right"], r["clip_left"]))
        if picked != other:
            agree_n += 1
            agree += int(picked > other)
    share, agree_low, agree_high = wilson(agree, agree_n)
    return dict(prompt_set=scope, n=n, wins_a=wins_a, wins_b=wins_b, ties=ties, rate_a=rate_a, low_a=low_a,
                high_a=high_a, rate_b=rate_b, low_b=low_b, high_b=high_b, p=sign_test(wins_a, wins_b),
                agreement=share, agree_n=agree_n, agree_low=agree_low, agree_high=agree_high)


def study_results(answers, a: str, b: str) -> StudyResults:
    """Win rates, sign tests and agreement with CLIP per prompt set and pooled ("all"), by the definitions above."""
    sets = list(dict.fromkeys(answers["prompt_set"]))
    rows = [_summary(s, answers[answers["prompt_set"] == s], a, b) for s in sets]
    if len(sets) != 1:
        rows.append(_summary("all", answers, a, b))
    return StudyResults(a, b, rows)


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
