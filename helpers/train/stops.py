"""Why a run stops, in words a user can act on: NaN losses, out of memory (training or sampling), fp16 gradients
that stay broken, and a resume whose settings changed. The Trainer raises these; notebooks show the message."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from ..core.files import NoSpaceError
from ..core.presets import Preset

MAX_CONSECUTIVE_SKIPS = 25  # fp16 overflow skips in a row before we call the gradients broken, not just large


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (NaN loss, out of memory); the message says why and what to change."""

class SettingsChanged(ValueError):
    """The run folder's checkpoint was trained with settings that change what is learned."""


def settings_changed_message(run_dir: Path, ckpt_name: str, blocking: list[str]) -> str:
    return (f"{run_dir} was trained with other settings (checkpoint {ckpt_name}):\n  " + "\n  ".join(blocking)
            + "\nThese change what is learned, so resuming would mix two trainings. Either train under a new run "
            "name (paths.run_folder(preset, suffix=\"b\")), or continue this run with the new settings as a new "
            "phase: Trainer(..., new_phase=True) keeps the weights and optimizer moments and restarts the LR "
            "schedule for the remaining steps (a continuation, not an exact resume).")

def nan_message(step: int, preset: Preset) -> str:
    return (f"loss became NaN/inf at optimizer step {step + 1}; training stopped and the last good checkpoint is "
            f"kept (no weights were written after it). Likely causes: the VAE overflowing in fp16 (use the fp16-fix "
            f"VAE or set vae_fp32=True), a learning rate too high (now {preset.learning_rate:g}: try 2-10× lower), or "
            f"a broken image/caption in the data. Fix it and run again: training resumes from the last checkpoint.")


def append_log(run_dir: Path, row: dict) -> None:
    """Append one line to the run's log.jsonl; a full disk is a NoSpaceError naming the folder (the partial line it
    left is cut off again, so the log stays whole lines)."""
    path = Path(run_dir) / "log.jsonl"
    data = (json.dumps(row) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise NoSpaceError(f"the disk holding {Path(run_dir)} is full: log.jsonl could not be appended "
                               f"({row.get('event') or 'step ' + str(row.get('step'))}). Training stopped; the "
                               "checkpoints already written are whole. Free some space there, then run again: "
                               "training resumes from the last checkpoint.") from None
    finally:
        os.close(fd)


def bad_input_message(step: int, inputs: dict[str, list[int]], caches: dict[str, Path]) -> str:
    """The loss is NaN/inf because the batch already was: its inputs (name → sample indices) and the caches they
    came from (name → folder), not the VAE or the learning rate."""
    parts = [f"{name} of sample{'s' * (len(rows) > 1)} {rows[:5]}" + (f" (from the cache {caches[name]})"
                                                                       if name in caches else "")
             for name, rows in inputs.items()]
    folders = sorted({str(caches[name]) for name in inputs if name in caches})
    fix = (f"delete {' and '.join(folders)} and run again: the cache is rebuilt from the pictures, and training "
           "resumes from the last checkpoint" if folders else
           "check the data those samples come from, then run again: training resumes from the last checkpoint")
    return (f"the inputs of optimizer step {step + 1} are NaN/inf before the model sees them: {'; '.join(parts)}. "
            f"Training stopped and the last good checkpoint is kept (no weights were written after it); {fix}.")


def oom_message(preset: Preset) -> str:
    offload = []
    if not preset.cache_latents:
        offload.append(f"cache_latents={preset.cache_latents} (turn on: the VAE then leaves the GPU)")
    if not preset.cache_text or preset.train_text_encoder:
        offload.append(f"cache_text={preset.cache_text}, train_text_encoder={preset.train_text_encoder} (cached "
                       f"text without a trained text encoder lets the text encoders leave the GPU)")
    return (f"CUDA out of memory in a training step; training stopped and the last checkpoint is kept. Lower memory "
            f"with these preset fields: batch_size={preset.batch_size} (halve it and double grad_accum="
            f"{preset.grad_accum} to keep {preset.images_per_step} images/step), resolution={preset.resolution}"
            + ("" if preset.gradient_checkpointing else ", gradient_checkpointing=False (turn on)")
            + "".join(", " + o for o in offload) + ". Then run again: training resumes from the last checkpoint.")


def interrupted_message(run_dir: Path, step: int, checkpoint: Path | None) -> str:
    kept = (f"its last checkpoint, {checkpoint.name}, is whole" if checkpoint is not None else
            "no checkpoint was written yet, so it starts over")
    return (f"stopped by you (the Stop button, or Ctrl+C) at optimizer step {step}; {kept}. Run this cell again to "
            f"continue {Path(run_dir).name} from there.")


def sampling_oom_message(preset: Preset, step: int) -> str:
    return (f"CUDA out of memory while drawing the sample images of step {step}, not in training: the checkpoint of "
            f"this step is already safe. Sampling at {preset.resolution} px needs the VAE and text encoders back on "
            f"the GPU next to the training state. Set sample_every=0 (no samples during training; generate after it "
            f"in the evaluation cells) or fewer sample_prompts, then run again: training resumes from the checkpoint.")


def skipped_message(preset: Preset, step: int, scale: float) -> str:
    return (f"the fp16 gradients were inf/NaN in {MAX_CONSECUTIVE_SKIPS} optimizer steps in a row after step {step} "
            f"(loss scale now {scale:g}): not an fp16 overflow but broken gradients. Likely causes: a learning rate "
            f"too high (now {preset.learning_rate:g}), the VAE overflowing in fp16 (use the fp16-fix VAE or "
            f"vae_fp32=True), or broken data. Training stopped; the last good checkpoint is kept.")
