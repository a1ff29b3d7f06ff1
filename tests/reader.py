"""What a reader sees in an executed notebook, as checks: the libraries' expected notices never reach the page
(helpers.core.notices silences them at their source), one progress bar per long step, and no table whose CIs rest
on fewer pairs than helpers.evaluation.MIN_PAIRS. Used on every notebook of the Colab-shaped series
(tests/test_colab.py) and by scripts that read outputs/notebooks/."""
from __future__ import annotations

from helpers.core import notices

EXPECTED_NOTICES = tuple(n.words for n in (*notices.EVERYWHERE, *notices.LORA_WITHOUT_TEXT_ENCODER,
                                           notices.SECOND_ADAPTER))
MAX_BARS_PER_CELL = 8  # notebook 03 trains two runs in one cell: per run validation, two caches, training
DEMO_WORDS = "A demonstration, not a measurement"


def _stderr(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", [])
                   if o.get("output_type") == "stream" and o.get("name") == "stderr")


def _html(cell) -> str:
    return "".join(o.get("data", {}).get("text/html", "") for o in cell.get("outputs", [])
                   if o.get("output_type") in ("display_data", "execute_result"))


def code_cells(nb):
    return [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]


def notices_shown(nb) -> list[tuple[int, str]]:
    """(cell, words) for every expected notice a cell printed."""
    return [(i, words) for i, c in code_cells(nb) for words in EXPECTED_NOTICES if words in _stderr(c)]


def progress_bars(cell) -> int:
    """How many progress bars a cell left on the page: tqdm's widgets (one display each) and its text bars on
    stderr (one line each once closed)."""
    widgets = sum("%|" in o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])
                  if o.get("output_type") == "display_data")
    return widgets + sum("%|" in line for line in _stderr(cell).split("\n"))


def crowded_cells(nb, limit: int = MAX_BARS_PER_CELL) -> list[tuple[int, int]]:
    return [(i, n) for i, c in code_cells(nb) if (n := progress_bars(c)) > limit]


def demo_tables(nb) -> list[int]:
    """Cells showing a score table that says its CIs rest on too few pairs."""
    return [i for i, c in code_cells(nb) if DEMO_WORDS in _html(c) or DEMO_WORDS in "".join(
        o.get("text", "") for o in c.get("outputs", []) if o.get("output_type") == "stream")]


def problems(nb, name: str) -> list[str]:
    found = [f"{name} cell {i}: the expected notice {w!r} reached the page" for i, w in notices_shown(nb)]
    found += [f"{name} cell {i}: {n} progress bars" for i, n in crowded_cells(nb)]
    found += [f"{name} cell {i}: a table from too few pairs" for i in demo_tables(nb)]
    return found
