"""What order the data comes in and how the weights move: the epoch's batches (replayable per epoch, split across
processes), the optimizer (8-bit AdamW on CUDA) and the learning-rate schedule (per training phase)."""
from __future__ import annotations

import torch

from ..core.presets import Preset


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, processes: int = 1) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), so any epoch can be replayed exactly. With
    several processes, process r takes batches r, r + P, …; the count is cut to a multiple of P so every process
    takes part in every optimizer step (a process left without a batch would hang the others)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:len(batches) // processes * processes]


def make_optimizer(params: list[torch.nn.Parameter], preset: Preset, device: torch.device):
    """8-bit AdamW (bitsandbytes) on CUDA when the preset asks; plain AdamW elsewhere, with a note."""
    kwargs = dict(lr=preset.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if preset.optimizer == "adamw8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, **kwargs)
        print("note: 8-bit AdamW needs CUDA (bitsandbytes); using torch AdamW on this device")
    elif preset.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {preset.optimizer!r}: use 'adamw8bit' or 'adamw'")
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer, preset: Preset, phase_start: int = 0):
    """Warmup + constant or cosine over the steps of this phase (a continued run's new phase starts its own)."""
    from diffusers.optimization import get_scheduler
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}.get(preset.lr_schedule)
    if name is None:
        raise ValueError(f"unknown lr_schedule {preset.lr_schedule!r}: use 'constant' or 'cosine'")
    steps = max(1, preset.max_steps - phase_start)
    return get_scheduler(name, optimizer, num_warmup_steps=min(preset.warmup_steps, steps), num_training_steps=steps)
