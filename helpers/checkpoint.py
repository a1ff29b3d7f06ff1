"""Atomic checkpoints of everything a run needs to continue exactly, and resume from the newest good one.

A checkpoint is a folder `checkpoints/step-NNNNNN/`:
  trainable.safetensors  trainable weights only (LoRA or attn2: MBs, not the 5 GB UNet)
  optimizer.pt           optimizer state (AdamW moments or 8-bit Adam states)
  state.pt               LR scheduler, GradScaler, RNG states (python, numpy, torch CPU + CUDA), data position, step
  meta.json              step, preset, library versions
  manifest.json          sha256 and size of every file above; written last
It is written into a hidden temp folder, every file fsync'ed, then renamed into place, so a kill or a full Drive
never leaves a half-written `step-*` folder: the previous checkpoint stays the newest good one. Only after the
rename are old checkpoints pruned to the newest `keep`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .runtime import versions

PREFIX = "step-"
FILES = ("trainable.safetensors", "optimizer.pt", "state.pt", "meta.json")


class CheckpointError(RuntimeError):
    """A checkpoint folder is incomplete or does not match its manifest."""


# ---------------------------------------------------------------- small file helpers

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some FUSE mounts (Drive) refuse fsync on directories; the rename still orders writes
        pass
    finally:
        os.close(fd)


def write_file(path: Path, write) -> None:
    """Write one file with `write(path)` and force it to disk."""
    write(path)
    _fsync(path)


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

def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (temp folders start with '.' and are never listed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    scaler, position: dict, preset, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep`. Returns the checkpoint folder.

    Trainable tensors are copied to CPU one by one, so saving never allocates a second copy of the model on the GPU.
    Non-finite weights are refused: a NaN checkpoint would poison every resume.
    """
    bad = [n for n, t in trainable.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"refusing to save step {step}: non-finite values in {bad[:3]}")
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weights = {n: t.detach().to("cpu", copy=True).contiguous() for n, t in trainable.items()}
        write_file(tmp / "trainable.safetensors", lambda p: save_file(weights, str(p)))
        write_file(tmp / "optimizer.pt", lambda p: torch.save(optimizer.state_dict(), p))
        state = {"step": step, "position": dict(position), "rng": rng_states(),
                 "lr_scheduler": lr_scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None}
        write_file(tmp / "state.pt", lambda p: torch.save(state, p))
        meta = {"step": step, "position": dict(position), "preset": asdict(preset), "versions": versions(),
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_file(tmp / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
        manifest = {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in FILES}
        write_file(tmp / "manifest.json", lambda p: p.write_text(json.dumps(manifest, indent=2)))
        _fsync(tmp)
        if final.exists():  # a re-save of the same step (after resuming before it): replace as a whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------- load

def verify(ckpt: Path) -> None:
    """Raise CheckpointError unless every file is present and matches the manifest."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt.name}: no manifest.json (the write did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{ckpt.name}: manifest.json is corrupt ({e})") from e
    for name in FILES:
        path = ckpt / name
        if name not in manifest or not path.is_file():
            raise CheckpointError(f"{ckpt.name}: {name} is missing")
        if path.stat().st_size != manifest[name]["bytes"] or sha256_file(path) != manifest[name]["sha256"]:
            raise CheckpointError(f"{ckpt.name}: {name} does not match its checksum (truncated or corrupt)")


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
    """Restore weights, optimizer, LR scheduler, scaler and RNG states in place. Returns {step, position}."""
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
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return {"step": state["step"], "position": state["position"]}
