"""Measure what helpers.plan.memory.host_ram_gib assumes: host RAM of loading a full-size UNet with diffusers.

Writes the full SD1.5 UNet (random weights, 3.4 GB fp32 + 1.7 GB fp16 files) to a temp folder, then loads it in a
fresh process with dtype=fp16 from (a) the fp16 variant file and (b) the fp32 file, and reports the process baseline
and the peak RSS split into file-backed pages (the memory-mapped safetensors) and anonymous memory (new copies).
CPU only, ~1 minute, 5 GB of disk.  Usage: .venv/bin/python scripts/memory_host_ram.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict:
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / 2**30
    return fields


def probe(folder: str, variant: str | None) -> dict:
    """In this process: import the libraries, then load the UNet in fp16 and read every weight once (as .to("cuda")
    would), sampling RSS every 5 ms."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    sys.path.insert(0, str(ROOT))
    import helpers.data  # noqa: F401
    import helpers.train  # noqa: F401
    baseline, peak, done = _status(), dict.fromkeys(("VmRSS", "RssAnon", "RssFile"), 0.0), []

    def watch():
        while not done:
            for k, v in _status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)

    threading.Thread(target=watch, daemon=True).start()
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, variant=variant, torch_dtype=torch.float16)
    for p in unet.parameters():  # what a move to the GPU does: read each weight, drop the CPU copy
        p.detach().sum()
        p.data = torch.empty(0, dtype=p.dtype)
    time.sleep(0.05)
    done.append(True)
    return {"baseline_gib": baseline, "peak_gib": peak}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], None if sys.argv[3] == "-" else sys.argv[3])))
        return
    import torch
    sys.path.insert(0, str(ROOT))
    from helpers.plan import meta as memory_meta
    with tempfile.TemporaryDirectory() as tmp:
        unet = memory_meta.full_size_unet("sd15").to_empty(device="cpu")
        for p in unet.parameters():
            torch.nn.init.normal_(p, std=0.02)
        unet.save_pretrained(f"{tmp}/fp32")
        unet.half().save_pretrained(f"{tmp}/fp16", variant="fp16")
        del unet
        for label, folder, variant in (("fp16 variant file", "fp16", "fp16"), ("fp32 file → fp16", "fp32", "-")):
            out = subprocess.run([sys.executable, __file__, "--probe", f"{tmp}/{folder}", variant],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            base, peak = r["baseline_gib"], r["peak_gib"]
            print(f"{label:18s} baseline RSS {base['VmRSS']:.2f} GiB; peak RSS {peak['VmRSS']:.2f} GiB = "
                  f"file pages {peak['RssFile']:.2f} + anonymous {peak['RssAnon']:.2f}")


if __name__ == "__main__":
    main()
