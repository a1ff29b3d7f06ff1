"""The whole proof: every t4 preset (FIRST first) phase by phase on the device held like a T4 (or the CPU smoke),
rows written as they are measured, then the tiny world end to end on CUDA."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from ..core.presets import PRESETS, get_preset
from ..core.runtime import versions
from .device import Meter, t4_dtype_mode, t4_settings
from .phases import PresetProof, planned
from .report import Report, preset_order, report_path
from .tiny_world import tiny_world_proof
from .world import (
    PHASES,
    SMOKE_BATCH,
    SMOKE_CLIP_IMAGE,
    SMOKE_DIVISOR,
    SMOKE_PRIOR_BATCH,
    SMOKE_TOKENS,
    World,
)


def run_proof(out: Path, work: Path, only: list[str] | None = None, smoke: bool | None = None,
              tiny_world: bool | None = None, steps: int | None = None) -> Path:
    """Measure every t4 preset (or `only` these, keeping the report's other rows) and, on CUDA, the tiny world end to
    end; write `<out>/gpu_proof-<gpu>.json` + `.md` row by row. Without CUDA (or `smoke`) the CPU smoke. Returns the
    JSON path."""
    cuda = torch.cuda.is_available()
    smoke = (not cuda) if smoke is None else smoke
    device = torch.device("cuda" if cuda and not smoke else "cpu")
    unknown = sorted(set(only or []) - set(PRESETS))
    if unknown:
        raise KeyError(f"unknown presets {unknown}; choose from {preset_order()}")
    with t4_dtype_mode(smoke):
        settings = t4_settings(device) if device.type == "cuda" else {
            "divisor": SMOKE_DIVISOR, "mode": "T4-dtype mode on a CPU (LAB_T4_DTYPES=1)",
            "shrunk": f"widths ÷ {SMOKE_DIVISOR}; the family's smallest picture (64 px SD1.5, 32 px SDXL); prompts "
                      f"of {SMOKE_TOKENS} tokens; CLIP pictures of {SMOKE_CLIP_IMAGE} px; batch {SMOKE_BATCH} (a "
                      f"prior's {SMOKE_PRIOR_BATCH} pairs), accumulation 1; 1 training step and 1 after the resume, "
                      "1 image of 1 denoising step, 1 image scored"}
        world = World(device, Path(work), smoke, **({"steps": 1, "sample_steps": 1, "prompts": 1} if smoke else {}))
        if steps:
            world.steps = steps
        header = {"kind": "cpu smoke" if smoke else "gpu", "device": settings.get("gpu", "cpu"),
                  "settings": settings, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "versions": {k: v for k, v in versions().items() if k in ("torch", "diffusers", "transformers",
                                                                           "peft", "bitsandbytes", "open_clip_torch")}}
        report = Report(report_path(out, smoke, settings.get("gpu")), header, keep_rows=bool(only))
        names = only or preset_order()
        plans = {name: planned(get_preset(name, "t4")) for name in names}  # the planner first (its meta-device
        gc.collect()  # traces are cached), then everything alive now is frozen out of the collector: each phase
        gc.freeze()  # begins with gc.collect() (release_cuda_cache), which then walks only what the proof made
        try:
            meter = Meter(device)
            for name in names:
                report.drop(name)
                print(f"{name}: measuring {', '.join(PHASES)}")
                PresetProof(name, world, meter, report.add, plans[name]).run()
        finally:
            gc.unfreeze()
        if tiny_world if tiny_world is not None else (device.type == "cuda" and not only):
            report.tiny_world = tiny_world_proof(Path(work) / "tiny_world", device)
            report.write()
        return report.json_path
