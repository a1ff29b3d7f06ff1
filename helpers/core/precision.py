"""Which dtype each part of a run uses on which device: the one home of the fp16 rule.

On a T4 (CUDA, `mixed_precision="fp16"`): frozen weights (UNet, VAE, text encoders, CLIP scorer) are fp16, trained
weights stay fp32, forward passes run under `torch.autocast(..., float16)` and the loss goes through a
`torch.amp.GradScaler`. A T4 has no fast bf16, so fp16 + GradScaler is the only mixed precision worth having.

On a CPU everything is fp32 (fp16 is slow there), EXCEPT in the T4-dtype test mode: `LAB_T4_DTYPES=1` (or
`t4_dtypes=True`) applies exactly the T4 rules on the CPU, with a real `torch.autocast("cpu", float16)` and a real
`torch.amp.GradScaler("cpu")`. The Trainer, the samplers and the CLIP scorer take their dtypes only from here, so a
CPU run in this mode goes through the same code, with the same dtypes, as a T4 run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .runtime import device as default_device

T4_DTYPES_ENV = "LAB_T4_DTYPES"


def t4_dtypes_requested() -> bool:
    """True when LAB_T4_DTYPES=1: run the T4's fp16 rules on whatever device this is (a CPU in tests)."""
    return os.environ.get(T4_DTYPES_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Precision:
    device: torch.device  # where the models run
    fp16: bool  # frozen weights fp16, autocast fp16, GradScaler on

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of every frozen weight (and of cached embeddings fed to the UNet)."""
        return torch.float16 if self.fp16 else torch.float32

    def autocast(self):
        """Context for forward passes: fp16 autocast on this device type (a no-op context in fp32)."""
        return torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16)

    def grad_scaler(self, init_scale: float = 2.0**16) -> torch.amp.GradScaler:
        """Loss scaler for fp16 training (disabled, i.e. a pass-through, in fp32)."""
        return torch.amp.GradScaler(self.device.type, init_scale=init_scale, enabled=self.fp16)

    def vae_dtype(self, force_upcast: bool = False, vae_fp32: bool = False) -> torch.dtype:
        """The stock SDXL VAE overflows in fp16 (its config says `force_upcast`); the fp16-fix VAE does not."""
        return torch.float32 if (force_upcast or vae_fp32) else self.weight_dtype

    @property
    def open_clip_precision(self) -> str:
        """open_clip's `precision=` argument for a frozen scorer."""
        return "fp16" if self.fp16 else "fp32"

    def describe(self) -> str:
        if not self.fp16:
            return f"fp32 on {self.device}"
        mode = " (T4-dtype test mode)" if self.device.type != "cuda" else ""
        return f"fp16 frozen weights, fp32 trained weights, fp16 autocast + GradScaler on {self.device}{mode}"


def precision_for(mixed_precision: str = "fp16", device: torch.device | str | None = None,
                  t4_dtypes: bool | None = None) -> Precision:
    """The precision of a run: fp16 rules on CUDA when the preset asks for fp16, or anywhere in T4-dtype mode."""
    device = torch.device(device) if device is not None else default_device()
    if mixed_precision not in ("fp16", "no"):
        raise ValueError(f"mixed_precision {mixed_precision!r} is not supported: use 'fp16' (a T4 has no fast "
                         "bf16) or 'no'")
    forced = t4_dtypes_requested() if t4_dtypes is None else t4_dtypes
    fp16 = forced or (device.type == "cuda" and mixed_precision == "fp16")
    return Precision(device, fp16)


def autocast_for(module: torch.nn.Module):
    """fp16 autocast on the module's device when it holds fp16 weights (fp32 trained layers inside an fp16 UNet
    need it at inference too); a no-op context for an fp32 module."""
    params = list(module.parameters())
    fp16 = any(p.dtype == torch.float16 for p in params)
    device = params[0].device if params else torch.device("cpu")
    return torch.autocast(device.type, dtype=torch.float16, enabled=fp16)


def cuda_fork_devices(device: torch.device) -> list[int]:
    """The CUDA device indices `torch.random.fork_rng(devices=...)` must fork for `device`.

    On a single GPU accelerate's device is `cuda` with no index, and `fork_rng(devices=[None])` fails; the index
    of a bare `cuda` device is the current CUDA device (0 when CUDA is not initialised). CPU → no CUDA devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    if device.index is not None:
        return [device.index]
    return [torch.cuda.current_device() if torch.cuda.is_available() else 0]


def forked_rng(device: torch.device):
    """Fork the CPU RNG and the RNG of `device` (if CUDA): sampling/evaluation inside never shifts training noise."""
    return torch.random.fork_rng(devices=cuda_fork_devices(device))
