"""The tiny world end to end on CUDA in fp16 with 8-bit AdamW: train, checkpoint, kill, resume, sample, score."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..core.paths import REPO_ROOT
from ..core.presets import NARUTO_PROMPTS, Preset, get_preset
from ..data.dataset import prepare_dataset
from ..evaluation.clip_score import ClipScorer
from ..generate.sampling import generate, prompt_seed_pairs
from ..models import load_components, on_device, pipeline_from_components, release_cuda_cache
from ..train.hooks import CheckpointHook, Hook
from ..train.loop import Trainer
from .world import RESUME_TOLERANCE, picture_folder

# ---------------------------------------------------------------- the tiny world end to end (8-bit AdamW on CUDA)

TINY_PRESET = "sdxl_lora_naruto_256"
TINY_FIELDS = dict(optimizer="adamw8bit", mixed_precision="fp16", max_train_images=16, batch_size=4, grad_accum=1,
                   max_steps=6, checkpoint_every=3, keep_checkpoints=2, sample_every=0, sample_steps=4,
                   sample_prompts=NARUTO_PROMPTS[:2], lr_schedule="constant", warmup_steps=0)
KILL_AFTER = 4  # the killed run's last step: it checkpointed at 3, step 4 is lost with it


def tiny_preset(pictures_folder: Path) -> Preset:
    """The tiny preset on generated pictures in a folder (the tiny world's own drawings; no `datasets` needed, which a
    lent GPU machine lacks)."""
    return get_preset(TINY_PRESET, "tiny", data_source="folder", data_ref=str(pictures_folder), **TINY_FIELDS)


class Snapshot(Hook):
    """The trainable weights when training starts (after the method's setup) and when it ends, on the CPU."""

    def on_start(self, trainer) -> None:
        self.start = {k: v.detach().float().cpu().clone() for k, v in trainer.trainable.items()}

    def on_end(self, trainer) -> None:
        self.end = {k: v.detach().float().cpu().clone() for k, v in trainer.trainable.items()}


class KillAfter(Hook):
    def __init__(self, step: int):
        self.step = step

    def on_step(self, trainer) -> None:
        if trainer.state.step == self.step:
            os.kill(os.getpid(), 9)


def tiny_world_child(run_dir: str, root: str, pictures_folder: str, threads: int) -> None:
    """The killed run (its own process): train the tiny preset with checkpoints and SIGKILL itself after KILL_AFTER."""
    torch.set_num_threads(threads)
    preset = tiny_preset(Path(pictures_folder))
    components = load_components(preset, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = prepare_dataset(preset, components, root=root)
    Trainer(preset, components, dataset, Path(run_dir), hooks=[CheckpointHook(), KillAfter(KILL_AFTER)]).run()


def tiny_world_proof(work: Path, device: torch.device) -> dict:
    """The tiny world end to end in fp16 (8-bit AdamW on CUDA; torch AdamW with a note on a CPU, in the T4-dtype
    mode): train uninterrupted; train in another process, checkpoint at step 3 and SIGKILL it after step 4; resume to
    the end; compare the weights; draw; score with the fp16 open_clip scorer."""
    t0 = time.perf_counter()
    folder = picture_folder("naruto", TINY_FIELDS["max_train_images"], work / "pictures")
    preset, root = tiny_preset(folder), work / "storage"
    components = load_components(preset, device)
    dataset = prepare_dataset(preset, components, root=root)
    reference = Snapshot()
    trainer = Trainer(preset, components, dataset, work / "uninterrupted", hooks=[reference])
    trainer.run()
    optimizer = f"{type(trainer.optimizer).__module__}.{type(trainer.optimizer).__name__}"
    trainer = components = None
    release_cuda_cache()

    run_dir = work / "killed"
    child = ("import sys; sys.path.insert(0, sys.argv[1]); from helpers.proof.tiny_world import tiny_world_child; "
             "tiny_world_child(*sys.argv[2:5], int(sys.argv[5]))")
    done = subprocess.run([sys.executable, "-c", child, str(REPO_ROOT), str(run_dir), str(root), str(folder),
                           str(torch.get_num_threads())], capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != -9:
        raise RuntimeError(f"the run to kill ended with {done.returncode}, not SIGKILL:\n{done.stderr[-2000:]}")
    components = load_components(preset, device)
    resumed = Snapshot()
    trainer = Trainer(preset, components, dataset, run_dir, hooks=[CheckpointHook(), resumed])
    trainer.run()
    diff = max(float((resumed.end[k] - reference.end[k]).abs().max()) for k in reference.end)
    moved = max(float((reference.end[k] - reference.start[k]).abs().max()) for k in reference.end)
    equal = all(torch.equal(resumed.end[k], reference.end[k]) for k in reference.end)

    prompts, seeds = prompt_seed_pairs(list(preset.sample_prompts), [0, 1])
    with on_device([*components.text_encoders, components.vae], device):
        components.unet.eval()
        images = generate(pipeline_from_components(components), prompts, seeds, steps=preset.sample_steps,
                          height=preset.resolution, width=preset.resolution)
    scorer = ClipScorer.from_profile("tiny", device=device)
    scores = [float(x) for x in scorer.score(images, prompts)]
    return {"device": str(device), "preset": f"{TINY_PRESET} (tiny) " + json.dumps(
                {k: v for k, v in TINY_FIELDS.items() if k != "sample_prompts"}),
            "optimizer": optimizer, "fp16": trainer.precision.fp16, "unet_dtype": str(components.unet.dtype),
            "grad_scaler": trainer.scaler.is_enabled(),
            "killed": f"SIGKILL after step {KILL_AFTER}", "resumed_from": trainer.state.resumed_from,
            "identical_weights": equal, "max_abs_difference": diff, "weights_moved": moved,
            "tolerance": f"≤ {RESUME_TOLERANCE:.0%} of how far training moved the weights ({RESUME_TOLERANCE * moved:.2e})",
            "resume_passed": equal or diff <= RESUME_TOLERANCE * moved,
            "images": f"{len(images)} at {images[0].size[0]} px", "clip_scores": [round(x, 3) for x in scores],
            "scorer": repr(scorer), "scores_finite": all(math.isfinite(x) for x in scores),
            "seconds": round(time.perf_counter() - t0, 1)}
