"""Runs one tiny training in its own process, for the kill-and-resume tests.

    python tests/train_driver.py RUN_DIR STORAGE [--kill-after-step N] [--kill-in-save-of-step N]

--kill-after-step N       SIGKILL this process right after optimizer step N (between steps).
--kill-in-save-of-step N  SIGKILL this process in the middle of writing checkpoint N: after its second file is on disk.
The kills are real SIGKILLs of this process; nothing in helpers knows about them.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The run: tiny SD1.5-like model, LoRA with dropout (so RNG restore matters), random flips, 2-step accumulation,
# and sample images every 3 steps (sampling must not shift the training randomness, before or after a resume).
OVERRIDES = dict(method="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.1, max_train_images=24, batch_size=4,
                 grad_accum=2, max_steps=12, checkpoint_every=4, keep_checkpoints=2, sample_every=3,
                 sample_prompts=("a photo of a cat",), sample_steps=2, learning_rate=1e-3, random_flip=True,
                 lr_schedule="cosine", warmup_steps=2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("storage")
    ap.add_argument("--kill-after-step", type=int)
    ap.add_argument("--kill-in-save-of-step", type=int)
    args = ap.parse_args()
    os.environ["LAB_STORAGE"] = args.storage

    import torch

    from helpers.core import presets
    from helpers.data import dataset as data
    from helpers.models import load_components
    from helpers.train import checkpoint
    from helpers.train.hooks import CheckpointHook, Hook, LogHook, SampleHook
    from helpers.train.loop import Trainer

    torch.set_num_threads(1)  # identical kernels in every process, so runs are bitwise comparable
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", **OVERRIDES)
    components = load_components(preset)
    dataset = data.prepare_dataset(preset, components)

    class KillAfterStep(Hook):
        def on_step(self, t):
            if t.state.step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    if args.kill_in_save_of_step is not None:
        original, written = checkpoint.write_file, []

        def write_then_maybe_die(path, write):
            original(path, write)
            written.append(path)
            in_target = f"step-{args.kill_in_save_of_step:06d}" in path.parent.name
            if in_target and sum(p.parent == path.parent for p in written) >= 2:
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.write_file = write_then_maybe_die

    hooks = [LogHook(), CheckpointHook(), SampleHook(show=False), KillAfterStep()]
    Trainer(preset, components, dataset, Path(args.run_dir), hooks=hooks).run()


if __name__ == "__main__":
    main()
