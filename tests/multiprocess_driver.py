"""One tiny LoRA training, run by `accelerate launch` with several processes or by plain python with one, for the
multi-process test.

    python tests/multiprocess_driver.py RUN_DIR STORAGE --batch-size B --max-steps N

Each process writes the (epoch, dataset index) pairs it trained on to RUN_DIR/seen-rank<R>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("storage")
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-steps", type=int, required=True)
    args = ap.parse_args()
    os.environ["LAB_STORAGE"] = args.storage

    import torch
    from accelerate import Accelerator

    from helpers.core import presets
    from helpers.data import dataset as data
    from helpers.models import load_components
    from helpers.train.hooks import CheckpointHook, Hook, LogHook
    from helpers.train.loop import Trainer

    torch.set_num_threads(1)  # one kernel configuration in every process
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", method="lora", lora_rank=4, lora_alpha=8,
                                lora_dropout=0.0, max_train_images=16, batch_size=args.batch_size, grad_accum=2,
                                max_steps=args.max_steps, checkpoint_every=2, sample_every=0, learning_rate=2e-5)
    accelerator = Accelerator(gradient_accumulation_steps=preset.grad_accum)
    with accelerator.main_process_first():  # the main process builds the caches, the others then reuse them
        components = load_components(preset, accelerator.device)
        dataset = data.prepare_dataset(preset, components)

    class Recording(torch.utils.data.Dataset):
        """The real dataset, noting which (epoch, index) this process reads."""

        def __init__(self, base):
            self.base, self.epoch, self.seen = base, 0, []

        def __len__(self):
            return len(self.base)

        def set_epoch(self, epoch):
            self.epoch = epoch
            self.base.set_epoch(epoch)

        def __getitem__(self, i):
            self.seen.append((self.epoch, i))
            return self.base[i]

    recording = Recording(dataset)

    class Seen(Hook):
        def on_end(self, t):
            name = f"seen-rank{t.accelerator.process_index}.json"
            (Path(args.run_dir) / name).write_text(json.dumps(recording.seen))

    trainer = Trainer(preset, components, recording, Path(args.run_dir), hooks=[LogHook(), CheckpointHook(), Seen()],
                      accelerator=accelerator)
    trainer.run()
    accelerator.end_training()


if __name__ == "__main__":
    main()
