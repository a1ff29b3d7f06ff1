"""Run the whole notebook series headlessly, in order, in the profile this machine supports (tiny on a CPU).

    python scripts/run_series.py                 # every notebook
    python scripts/run_series.py 00 02           # only those whose names start with these numbers

Each executed notebook (with its outputs) is written to outputs/notebooks/; the artefacts the notebooks make
(validation reports, preview grids, run folders, samples) land under outputs/ as usual. Stops at the first failing
notebook and says which cell failed.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(selected: list[str]) -> int:
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from helpers.core import runtime

    profile = runtime.choose_profile(os.environ.get("LAB_PROFILE", "auto"))
    os.environ["LAB_PROFILE"] = profile
    if profile == "tiny":  # tiny models and data are built locally: nothing may reach for the Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if selected:
        notebooks = [nb for nb in notebooks if any(nb.name.startswith(s) for s in selected)]
    out_dir = ROOT / "outputs" / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"profile {profile}: running {len(notebooks)} notebooks → {out_dir}")
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
        t0 = time.perf_counter()
        try:
            client.execute()
        except CellExecutionError as e:
            nbformat.write(nb, out_dir / path.name)
            print(f"FAILED {path.name} after {time.perf_counter() - t0:.0f} s (executed copy: {out_dir / path.name})")
            print(str(e)[-3000:])
            return 1
        nbformat.write(nb, out_dir / path.name)
        print(f"ok     {path.name}  {time.perf_counter() - t0:.0f} s")
    print("done: executed notebooks in outputs/notebooks/, run artefacts under outputs/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
