"""Benchmark (not a test): training steps/s with cached vs uncached latents on the tiny SDXL-like model.

    python scripts/bench_train.py [--steps 30] [--resolution 128]

Uncached, every micro-batch is decoded from PNG, resized, cropped and encoded by the VAE; cached, it is a lookup.
On a T4 the VAE encode at 1024 px is a large share of a step, which is why the t4 presets cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench(cache_latents: bool, steps: int, resolution: int, root: Path) -> tuple[float, float]:
    import torch

    from helpers.core import presets
    from helpers.data import dataset as data
    from helpers.models import load_components
    from helpers.train.loop import Trainer

    torch.manual_seed(0)
    preset = presets.get_preset("sdxl_lora_naruto_256", "tiny", cache_latents=cache_latents, max_steps=steps,
                                resolution=resolution, sample_every=0, checkpoint_every=10_000)
    components = load_components(preset)
    t0 = time.perf_counter()
    dataset = data.prepare_dataset(preset, components, root=root)
    prep = time.perf_counter() - t0
    state = Trainer(preset, components, dataset, root / f"run-{cache_latents}", hooks=[]).run()
    return prep, 1.0 / state.seconds_per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--resolution", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LAB_STORAGE"] = tmp
        rows = []
        for cache in (False, True):
            prep, rate = bench(cache, args.steps, args.resolution, Path(tmp))
            rows.append((cache, prep, rate))
    print(f"\ntiny SDXL-like LoRA, {args.resolution} px, batch 4 × 2 accumulation, {args.steps} steps, "
          f"{os.cpu_count()} CPU threads")
    print(f"{'latents':10s} {'prepare s':>10s} {'steps/s':>9s}")
    for cache, prep, rate in rows:
        print(f"{'cached' if cache else 'uncached':10s} {prep:10.2f} {rate:9.2f}")
    print(f"speed-up from caching: {rows[1][2] / rows[0][2]:.2f}×")


if __name__ == "__main__":
    main()
