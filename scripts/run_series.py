"""Run the whole notebook series headlessly, in order, in the profile this machine supports (tiny on a CPU).

    python scripts/run_series.py                 # every notebook
    python scripts/run_series.py 00 02           # only those whose names start with these numbers
    python scripts/run_series.py --readme        # README's table of the tiny series' times, from timings.json

Each executed notebook (with its outputs) is written to outputs/notebooks/, and the seconds each took to
outputs/notebooks/timings.json (README's table of the tiny series comes from this file). While a notebook runs, a
line says which cell it is in and for how long (every 30 s during a long cell). The artefacts the notebooks make
(validation reports, preview grids, run folders, samples) land under outputs/ as usual. Stops at the first failing
notebook and says which cell failed.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HEARTBEAT_S = 30
README_START, README_END = "<!-- tiny-series-times -->", "<!-- /tiny-series-times -->"


def first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return (lines[0][:70] + ("…" if len(lines[0]) > 70 else "")) if lines else ""


def run_notebook(path: Path, out: Path) -> float:
    """Execute one notebook cell by cell in a fresh kernel, saying where it is; returns its seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    code = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    start, now = time.perf_counter(), {"cell": None, "since": 0.0}
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            if now["cell"] is not None:
                print(f"    … cell {now['cell']} still running, {time.perf_counter() - now['since']:.0f} s",
                      flush=True)

    threading.Thread(target=heartbeat, daemon=True).start()
    try:
        with client.setup_kernel():
            for n, index in enumerate(code, 1):
                now.update(cell=index, since=time.perf_counter())
                client.execute_cell(nb.cells[index], index)
                print(f"  cell {index:2d} ({n}/{len(code)}) {time.perf_counter() - now['since']:6.1f} s  "
                      f"{first_line(nb.cells[index].source)}", flush=True)
    finally:
        done.set()
        nbformat.write(nb, out / path.name)
    return time.perf_counter() - start


def times_table(timings: dict) -> str:
    """README's table: every notebook's seconds from one measurement (timings.json), and the total."""
    cpus = {t["cpus"] for t in timings.values()}
    dates = sorted({t["date"] for t in timings.values()})
    lines = ["| notebook | time |", "|---|---|"]
    lines += [f"| `{name}` | {t['seconds'] // 60} min {t['seconds'] % 60:02d} s |" for name, t in sorted(timings.items())]
    total = sum(t["seconds"] for t in timings.values())
    lines.append(f"| **the series** | **{total // 60} min {total % 60:02d} s** |")
    return "\n".join(lines) + (f"\n\nMeasured by `scripts/run_series.py` (profile tiny, {'/'.join(map(str, cpus))} CPU "
                               f"cores, {' to '.join(dates[::max(1, len(dates) - 1)])}) on an empty storage folder: the "
                               "first run of each notebook, which draws the data, builds the caches and trains every "
                               "run. Running a notebook again reuses all of that.")


def update_readme(timings_file: Path) -> int:
    timings = json.loads(timings_file.read_text())
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if sorted(timings) != notebooks:
        print(f"{timings_file} lacks {sorted(set(notebooks) - set(timings))}: run the whole series first")
        return 1
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + times_table(timings) + "\n" + text[end:])
    print(f"README.md: the tiny series' times from {timings_file}")
    return 0


def main(selected: list[str]) -> int:
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
    timings_file = out_dir / "timings.json"
    if selected == ["--readme"]:
        return update_readme(timings_file)
    timings = json.loads(timings_file.read_text()) if timings_file.is_file() else {}
    print(f"profile {profile}: running {len(notebooks)} notebooks → {out_dir}", flush=True)
    for path in notebooks:
        print(f"{path.name}", flush=True)
        t0 = time.perf_counter()
        try:
            seconds = run_notebook(path, out_dir)
        except CellExecutionError as e:
            print(f"FAILED {path.name} after {time.perf_counter() - t0:.0f} s (executed copy: {out_dir / path.name})")
            print(str(e)[-3000:])
            return 1
        timings[path.stem] = {"seconds": round(seconds), "profile": profile, "cpus": os.cpu_count(),
                              "date": time.strftime("%Y-%m-%d")}
        timings_file.write_text(json.dumps(timings, indent=1))
        print(f"ok     {path.name}  {seconds:.0f} s", flush=True)
    total = sum(t["seconds"] for t in timings.values())
    print(f"done: executed notebooks in outputs/notebooks/, run artefacts under outputs/; the series so far "
          f"{total} s ({total / 60:.1f} min), per notebook in {timings_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
