"""Benchmark (not a test): data preparation time, cold (caches built) vs warm (caches verified and reused), for the
tiny sd15 and sdxl presets, on a fresh temporary storage root.

    python scripts/bench_data.py [--presets sd15_xattn_cifar10 sdxl_lora_naruto_256] [--profile tiny]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import models
from helpers.core import runtime
from helpers.core.presets import get_preset  # noqa: E402
from helpers.data import dataset as data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["sd15_xattn_cifar10", "sdxl_lora_naruto_256"])
    parser.add_argument("--profile", default="tiny")
    args = parser.parse_args()
    profile = runtime.choose_profile(args.profile)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data-") as root:
        for name in args.presets:
            preset = get_preset(name, profile)
            t = time.perf_counter()
            components = models.load_components(preset, runtime.device())
            load_s = time.perf_counter() - t
            times = []
            for _ in ("cold", "warm"):
                t = time.perf_counter()
                ds = data.prepare_dataset(preset, components, root=root)
                times.append(time.perf_counter() - t)
            rows.append((name, len(ds), load_s, *times, ds.cache_status))
    print(f"\n{'preset':<24} {'images':>6} {'load models':>11} {'cold':>8} {'warm':>8}  speed-up  caches (warm)")
    for name, n, load_s, cold, warm, status in rows:
        print(f"{name:<24} {n:>6} {load_s:>10.2f}s {cold:>7.2f}s {warm:>7.2f}s  {cold / warm:>7.1f}×  {status}")


if __name__ == "__main__":
    main()
