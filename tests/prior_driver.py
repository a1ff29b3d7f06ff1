"""Trains the tiny diffusion prior in its own process, for the kill-and-resume test.

    python tests/prior_driver.py RUN_DIR STORAGE [--kill-after-step N]

--kill-after-step N  SIGKILL this process right after optimizer step N (between steps); nothing in helpers knows.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# EMA, text dropout, 2-step accumulation and a cosine schedule with warmup: every piece of state a resume must restore
OVERRIDES = dict(max_steps=12, checkpoint_every=4, keep_checkpoints=2, batch_size=16, grad_accum=2,
                 warmup_steps=2, ema_decay=0.9, cond_drop_prob=0.3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("storage")
    ap.add_argument("--kill-after-step", type=int)
    args = ap.parse_args()
    os.environ["LAB_STORAGE"] = args.storage

    import torch

    from helpers.core.presets import get_preset
    from helpers.data.embeddings import embedding_set
    from helpers.prior.priors import train_prior
    from helpers.train.hooks import CheckpointHook, ExportHook, Hook, LogHook

    torch.set_num_threads(1)  # identical kernels in every process, so runs are bitwise comparable
    preset = get_preset("prior_diffusion_cifar10", "tiny", **OVERRIDES)

    class KillAfterStep(Hook):
        def on_step(self, t):
            if t.state.step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    hooks = [LogHook(), CheckpointHook(), ExportHook(), KillAfterStep()]
    train_prior(preset, embedding_set(preset, device="cpu"), Path(args.run_dir), hooks=hooks, device="cpu")


if __name__ == "__main__":
    main()
