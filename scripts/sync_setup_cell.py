"""Copy notebook 00's setup cell (the first code cell) into every other notebook, so all of them find or clone the
repository the same way. tests/test_notebooks.py checks that they agree.

    python scripts/sync_setup_cell.py
"""
from __future__ import annotations

import json
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def setup_cell(notebook: dict) -> dict:
    return next(c for c in notebook["cells"] if c["cell_type"] == "code")


def main() -> None:
    source = setup_cell(json.loads((NOTEBOOKS / "00_setup.ipynb").read_text()))["source"]
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        notebook = json.loads(path.read_text())
        cell = setup_cell(notebook)
        if cell["source"] != source:
            cell["source"] = source
            path.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n")
            print(f"updated {path.name}")


if __name__ == "__main__":
    main()
