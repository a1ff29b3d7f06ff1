"""The report: rows written as they are measured to `<out>/gpu_proof-<gpu>.json`, and its markdown, planned beside
measured."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

from ..core.presets import PRESETS
from ..plan.model import (
    T4_USABLE_GIB,
)
from .world import FIRST, PHASES

# ---------------------------------------------------------------- the report

def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Report:
    """`<out>/gpu_proof-<gpu>.json` and `.md`, rewritten (whole, atomically) after every row; rows of an earlier run
    of the same file are kept unless measured again (`--only`)."""

    def __init__(self, path: Path, header: dict, keep_rows: bool):
        self.json_path, self.md_path = path.with_suffix(".json"), path.with_suffix(".md")
        old = json.loads(self.json_path.read_text()) if keep_rows and self.json_path.is_file() else {}
        self.header = header
        self.rows = {(r["preset"], r["phase"]): r for r in old.get("rows", [])}
        self.tiny_world = old.get("tiny_world")

    def drop(self, preset: str) -> None:
        self.rows = {k: v for k, v in self.rows.items() if k[0] != preset}

    def add(self, row: dict) -> None:
        row = {**row, "kind": self.header["kind"]}
        self.rows[(row["preset"], row["phase"])] = row
        planned_gib, measured = row.get("planned_gib"), row.get("measured_gib")
        print(f"  {row['preset']:<26} {row['phase']:<10} {row['status']:<12} planned {planned_gib:5.2f} GiB"
              + (f"  measured {measured:5.2f} GiB" if measured is not None else ""))
        self.write()

    def ordered_rows(self) -> list[dict]:
        order = {name: i for i, name in enumerate(preset_order())}
        return sorted(self.rows.values(), key=lambda r: (order.get(r["preset"], 99), PHASES.index(r["phase"])))

    def write(self) -> None:
        data = {**self.header, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": self.ordered_rows(),
                "tiny_world": self.tiny_world}
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        for path, text in ((self.json_path, json.dumps(data, indent=1, default=str)),
                           (self.md_path, report_markdown(data))):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(path)


def preset_order() -> list[str]:
    """Every t4 preset, FIRST first."""
    return [FIRST, *(n for n in PRESETS if n != FIRST)]


def _num(value, fmt: str = ".2f") -> str:
    return "" if value is None else format(value, fmt)


def report_markdown(data: dict) -> str:
    smoke = data["kind"] == "cpu smoke"
    where = data.get("device", "?")
    lines = [f"# The T4 plan measured: {'CPU smoke' if smoke else where}", ""]
    if smoke:
        lines += ["**CPU smoke**: the real configs with every width ÷ 8, small resolutions and batches, on a CPU in "
                  "the T4-dtype mode; memory is the process's peak resident set. It proves the instrument runs, not "
                  "the plan: compare the planned column with a GPU run's.", "",
                  f"Shrunk: {data.get('settings', {}).get('shrunk', '')}.", ""]
    else:
        s = data.get("settings", {})
        lines += [f"Full-size architectures with random weights on **{where}**, the allocator capped at "
                  f"{_num(s.get('cap_gib'))} GiB (a T4's {T4_USABLE_GIB} less this card's CUDA context of "
                  f"{_num(s.get('context_gib'))} GiB), {s.get('attention')}, TF32 off, cudnn.benchmark off.", "",
                  "Memory below is nearly independent of the card under these settings: it is what the plan's "
                  "error band (helpers.plan.calibration) is calibrated from. **Time is this card's, not a T4's**: "
                  "it is listed apart and calibrates nothing.", ""]
    how = ("measured = the process's peak resident set during the phase (libraries included); context = the "
           "resident set when the phase began; peak allocated = their difference" if smoke else
           "measured = peak reserved + memory outside the allocator (CUDA context, handles, kernels) at the phase's "
           "end; context = that memory outside the allocator; held at start = what earlier phases left allocated")
    lines += [f"Started {data.get('started')}, updated {data.get('updated')}; {data.get('versions', {})}.", "",
              "## Memory per phase (GiB)", "",
              f"{how}; planned = helpers.plan's phase before the error band (helpers.proof.planned says which "
              "number of the plan each phase is).", "",
              "| preset | phase | status | planned | measured | peak allocated | peak reserved | context | "
              "held at start | measured / planned | what ran |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        ratio = (f"{r['measured_gib'] / r['planned_gib']:.2f}" if r.get("measured_gib") and r.get("planned_gib")
                 else "")
        what = r.get("what", "") + (f"; checkpoint {r['measured_mb']:.1f} MB, planned {r['planned_mb']:.1f} MB"
                                    if r.get("measured_mb") is not None else "")
        lines.append(f"| {r['preset']} | {r['phase']} | {r['status']} | {_num(r.get('planned_gib'))} | "
                     f"{_num(r.get('measured_gib'))} | {_num(r.get('allocated_gib'))} | "
                     f"{_num(r.get('reserved_gib'))} | {_num(r.get('context_gib'))} | "
                     f"{_num(r.get('held_before_gib'))} | {ratio} | {what} |")
    lines += ["", f"## Time ({'this CPU' if smoke else where}, not a T4)", "",
              "| preset | phase | unit | measured s/unit | planned T4 s/unit | phase seconds |", "|---|---|---|---|---|---|"]
    for r in data["rows"]:
        if r.get("unit") and r.get("status") == "measured":
            lines.append(f"| {r['preset']} | {r['phase']} | {r['unit']} | {_num(r.get('measured_per_unit'), '.3f')} "
                         f"| {_num(r.get('planned_per_unit'), '.3f')} | {_num(r.get('seconds'), '.1f')} |")
    tiny = data.get("tiny_world")
    if tiny:
        lines += ["", "## The tiny world end to end", "", *(f"- {k}: {v}" for k, v in tiny.items())]
    return "\n".join(lines) + "\n"



def report_path(out: Path, smoke: bool, gpu: str | None) -> Path:
    return Path(out) / ("gpu_proof-cpu-smoke" if smoke else f"gpu_proof-{slug(gpu)}")
