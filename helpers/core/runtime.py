"""Where we are running (Colab? GPU? how much memory? Drive?) and which profile that allows.

Profiles: `t4` runs real Hub models on a CUDA GPU (what Colab gives you); `tiny` runs tiny pretrained models
and generated data on any CPU, which is how CI proves the wiring. `auto` picks `t4` when a CUDA GPU is present.
"""
from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch

from ..bootstrap import DRIVE_MOUNT, is_colab

PROFILES = ("t4", "tiny")

ATTACH_T4 = ("This Colab runtime has no GPU. Attach a free T4: Runtime > Change runtime type > Hardware accelerator: "
             "T4 GPU > Save, then run the notebook again from the top. (PROFILE='tiny' runs the tiny CPU models.)")


class ProfileError(RuntimeError):
    """The requested profile cannot run on this machine."""


@dataclass(frozen=True)
class Environment:
    is_colab: bool
    cuda_name: str | None  # e.g. "Tesla T4"; None without a CUDA GPU
    vram_gb: float  # total memory of GPU 0 in GiB, 0 without a GPU
    ram_gb: float  # total host RAM in GiB
    drive_mounted: bool

    def summary(self) -> str:
        gpu = f"{self.cuda_name} ({self.vram_gb:.1f} GiB)" if self.cuda_name else "none"
        where = "Colab" if self.is_colab else "local machine"
        drive = "mounted" if self.drive_mounted else "not mounted"
        return f"{where} | GPU: {gpu} | RAM: {self.ram_gb:.1f} GiB | Drive: {drive}"


def _host_ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 0.0


def detect() -> Environment:
    """Read the machine: Colab or not, GPU name and memory, RAM, Drive (mounted only counts on Colab: a
    `/content/drive/MyDrive` folder elsewhere is just a folder)."""
    colab = is_colab()
    cuda_name, vram = None, 0.0
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cuda_name, vram = props.name, props.total_memory / 2**30
    return Environment(colab, cuda_name, vram, _host_ram_gb(), colab and (DRIVE_MOUNT / "MyDrive").is_dir())


def choose_profile(requested: str = "auto", env: Environment | None = None) -> str:
    """Resolve the profile: an explicit notebook parameter wins, then LAB_PROFILE, then the hardware.

    `t4` without a CUDA GPU is refused: real SD models on a CPU would take hours per image.
    """
    env = env or detect()
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        requested = os.environ.get("LAB_PROFILE", "auto").strip().lower() or "auto"
    if requested == "auto":
        if env.cuda_name is None and env.is_colab:
            print(ATTACH_T4)
        return "t4" if env.cuda_name else "tiny"
    if requested not in PROFILES:
        raise ProfileError(f"unknown profile {requested!r}: choose one of {PROFILES} or 'auto'")
    if requested == "t4" and env.cuda_name is None:
        raise ProfileError(ATTACH_T4 if env.is_colab else
                           "profile 't4' loads the real Stable Diffusion weights and needs a CUDA GPU; this machine "
                           "has none. Use PROFILE='tiny' (or 'auto') here, or run on Colab with a T4 attached.")
    return requested


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def versions() -> dict[str, str]:
    """Versions of the libraries a run depends on (recorded in checkpoints and shown by 00_setup)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
                 "open_clip_torch"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
