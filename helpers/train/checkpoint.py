"""Atomic checkpoints of everything a run needs to continue exactly, and resume from the newest good one.

A checkpoint is a folder `checkpoints/step-NNNNNN/`:
  trainable.safetensors  trainable weights only (LoRA or attn2: MBs, not the 5 GB UNet), plus the method's extra
                         state (a prior's EMA weights and update count)
  optimizer.pt           optimizer state (AdamW moments or 8-bit Adam states)
  state.pt               LR scheduler, GradScaler, RNG states (python, numpy, torch CPU + CUDA), data position, step
  meta.json              step, preset, library versions
  manifest.json          sha256 and size of every file above; written last
It is written with `helpers.core.files.write_folder` (hidden temp folder, every file fsync'ed, manifest last, rename),
so a kill or a full Drive never leaves a half-written `step-*` folder: the previous checkpoint stays the newest
good one. Only after the rename are old checkpoints pruned, to the newest `keep` that verify: pruning never removes
a verified checkpoint to keep one that does not verify. Anything else in checkpoints/ (a file manager's
"step-000004 (copy)", a note) is not a checkpoint: never resumed from, never pruned, noted once.
"""
from __future__ import annotations

import json
import random
import re
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..core import files

# `write_file` is looked up in this module at call time: tests/train_driver.py replaces it to die mid-checkpoint.
from ..core.files import write_file
from ..core.runtime import versions

PREFIX = "step-"
STEP_FOLDER = re.compile(r"^step-(\d+)$")  # `step-000050`; hidden temp folders and anything else are not checkpoints
FILES = ("trainable.safetensors", "optimizer.pt", "state.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or does not match its manifest."""


# ---------------------------------------------------------------- RNG state

def rng_states() -> dict:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- save

_NOTED: set[str] = set()  # folders already said not to be checkpoints (said once per process, not at every save)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Checkpoint folders (`step-NNNNNN`), oldest first. Temp folders start with '.' and are never listed; anything
    else is not a checkpoint and is left alone, with a note naming it."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_FOLDER.match(path.name)
        if match and path.is_dir():
            found.append((int(match[1]), path.name, path))
        elif not path.name.startswith(".") and str(path) not in _NOTED:
            _NOTED.add(str(path))
            warnings.warn(f"{path} is not a checkpoint (checkpoints are folders named {PREFIX}NNNNNN): left alone, "
                          "never resumed from or pruned", stacklevel=2)
    return [path for _, _, path in sorted(found)]


def step_of(ckpt: Path) -> int:
    return int(STEP_FOLDER.match(Path(ckpt).name)[1])


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    scaler, position: dict, preset, keep: int = 2, data_identity: str | None = None) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep`. Returns the checkpoint folder.

    Trainable tensors are copied to CPU one by one, so saving never allocates a second copy of the model on the GPU.
    Non-finite weights are refused: a NaN checkpoint would poison every resume.
    """
    bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to save step {step}: non-finite values in {bad[:3]}")
    weights = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in trainable.items()}
    state = {"step": step, "position": dict(position), "rng": rng_states(), "lr_scheduler": lr_scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None}
    meta = {"step": step, "position": dict(position), "preset": asdict(preset), "data": data_identity,
            "versions": versions(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}

    def fill(tmp: Path) -> None:
        write_file(tmp / "trainable.safetensors", lambda p: save_file(weights, str(p)))
        write_file(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
        write_file(tmp / "state.pt", lambda p: torch.save(state, p))
        write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))

    def make_room() -> bool:
        """On a full disk, drop the oldest checkpoint while at least one verified checkpoint remains (keep=K
        otherwise needs room for K + 1, and every resume would die at the same step)."""
        existing = checkpoint_dirs(run_dir)
        if len(existing) < 2 or latest_good(run_dir) in (None, existing[0]):
            return False
        print(f"low on space: removing the oldest checkpoint {existing[0].name} before writing step {step}")
        files.discard(existing[0])
        return True

    # a re-save of the same step (after resuming before it) replaces the folder as a whole
    final = files.write_folder(Path(run_dir) / "checkpoints" / f"{PREFIX}{step:06d}", fill,
                               expected_bytes=expected_checkpoint_bytes(run_dir, weights), make_room=make_room)
    _remember_good(final)
    prune(run_dir, final, keep)
    return final


def prune(run_dir: Path, newest: Path, keep: int) -> list[Path]:
    """Keep `newest` (just written) and the next newest checkpoints that verify, `keep` in all; discard the older
    ones. A checkpoint that does not verify is never kept in place of one that does: one older than `newest` goes,
    one newer stays as it is (a resume skips it with a warning; training to its step replaces it). Discarded
    folders are emptied first: on Drive a deleted file would sit in the trash, counted, for 30 days."""
    kept, discarded = [newest], []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        if ckpt != newest and len(kept) < max(1, keep) and is_good(ckpt):
            kept.append(ckpt)
    for ckpt in checkpoint_dirs(run_dir):
        if ckpt not in kept and step_of(ckpt) < step_of(newest):
            files.discard(ckpt)
            discarded.append(ckpt)
    return discarded


def expected_checkpoint_bytes(run_dir: Path, weights: dict[str, torch.Tensor]) -> int:
    """The size of the newest checkpoint, or before the first one: weights + two fp32 optimizer moments."""
    newest = next((c for c in reversed(checkpoint_dirs(run_dir)) if is_good(c)), None)
    if newest is not None:
        return sum(p.stat().st_size for p in newest.iterdir() if p.is_file())
    return 3 * sum(t.numel() * 4 for t in weights.values()) + 2**16


# ---------------------------------------------------------------- load

# Preset fields that may change when a run resumes (with a note): how long it trains, when it checkpoints and samples.
# Every other field changes what is learned (data, batch, accumulation, learning rate and schedule, LoRA shape,
# resolution, method, model), so a change stops the resume with a diff.
RESUMABLE_FIELDS = frozenset({"max_steps", "sample_prompts", "sample_every", "sample_steps", "checkpoint_every",
                              "keep_checkpoints", "vram_plan_gib"})


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's meta.json (step, position, preset, data), or a CheckpointError naming the checkpoint."""
    path = Path(ckpt) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e}): the checkpoint {Path(ckpt).name} "
                              "is not usable") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("preset"), dict) or not _is_step(meta.get("step")):
        raise CheckpointError(f"{path} is not a checkpoint's meta.json (no step and preset): the checkpoint "
                              f"{Path(ckpt).name} is not usable")
    return meta


def _is_step(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def setting_changes(saved: dict, wanted: dict) -> tuple[list[str], list[str]]:
    """(notes, blocking): "field: saved → wanted" for every setting that differs, split into those a resume may
    take and those that change what is learned. `saved`/`wanted` hold preset fields (and "data", the dataset's
    identity), compared as JSON so tuples and lists are equal."""
    def norm(value):
        return json.loads(json.dumps(value, default=str))
    notes, blocking = [], []
    for key in sorted(set(saved) | set(wanted)):
        before, after = norm(saved.get(key)), norm(wanted.get(key))
        if before != after:
            (notes if key in RESUMABLE_FIELDS else blocking).append(f"{key}: {before!r} → {after!r}")
    return notes, blocking

def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file is present and matches the manifest and meta.json reads."""
    try:
        files.verify(ckpt, FILES)
    except files.FolderError as e:
        raise CheckpointError(f"{Path(ckpt).parent}/{e}") from e
    read_meta(ckpt)
    _remember_good(ckpt)


# Checkpoints this process wrote or verified, by the size and time of every file: pruning asks at every save which
# checkpoints verify, and hashing them all again each time would read every kept checkpoint back from Drive.
_GOOD: dict[str, tuple] = {}


def _signature(ckpt: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(ckpt).iterdir()))


def _remember_good(ckpt: Path) -> None:
    _GOOD[str(ckpt)] = _signature(ckpt)


def is_good(ckpt: Path) -> bool:
    """Whether `ckpt` verifies (remembered while none of its files changes)."""
    try:
        if _GOOD.get(str(ckpt)) == _signature(ckpt):
            return True
        verify(ckpt)
        return True
    except (OSError, CheckpointError):
        return False


def latest_good(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; newer broken ones are reported with a warning and skipped."""
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}; falling back to the previous one", stacklevel=2)
    return None


def load_checkpoint(ckpt: Path, trainable: dict[str, torch.nn.Parameter], optimizer, lr_scheduler,
                    scaler) -> dict:
    """Restore weights, optimizer, LR scheduler (None: keep the new one), scaler and RNG states in place. Returns
    {step, position}."""
    verify(ckpt)
    weights = load_file(str(ckpt / "trainable.safetensors"))
    missing, unexpected = sorted(set(trainable) - set(weights)), sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt.name} does not fit this model/method: missing {missing[:3]} "
                              f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return {"step": state["step"], "position": state["position"]}
