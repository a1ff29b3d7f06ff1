"""The A/B study's answers file (a CSV in the run's study/ folder): appended one answer at a time, flushed and
fsynced, and read back so that no answer is ever lost or ignored without a sentence naming the file and line (a
line cut by a crash, a file of another layout, a bad cell, binary garbage)."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

ANSWER_COLUMNS = ("time", "study", "rater", "pair", "prompt_set", "prompt", "seed", "left", "right", "choice",
                  "winner", "clip_left", "clip_right")
CHOICES = ("left", "right", "tie")


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


def append_answer(path: Path, row: dict) -> None:
    """Append one answer (flushed and fsynced: a disconnect loses at most the answer being written), under the file's
    own header (AnswersFileError for a file of another layout), on a line of its own after a line a crash cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = _file_header(path)
    with open(path, "a", newline="", encoding="utf-8") as f:
        if header is None:
            header = list(ANSWER_COLUMNS)
            csv.writer(f).writerow(header)
        elif not _ends_with_newline(path):
            f.write("\r\n")  # a line cut by a crash stays a line of its own: this answer is never merged into it
        csv.DictWriter(f, header, restval="").writerow(row)
        f.flush()
        os.fsync(f.fileno())
