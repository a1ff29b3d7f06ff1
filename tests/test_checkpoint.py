"""helpers.checkpoint on its own (no model): pruning to the newest K empties what it deletes, so a pruned checkpoint
costs nothing in Google Drive's trash."""
from __future__ import annotations

import os

import torch

from helpers.core import presets
from helpers.train import checkpoint


def save(run, step, weight):
    weight = torch.nn.Parameter(torch.full((256,), float(weight)))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny")
    return checkpoint.save_checkpoint(run, step, {"w": weight}, optimizer, scheduler, None, {"epoch": 0}, preset,
                                      keep=2)


def test_a_pruned_checkpoint_is_emptied_before_it_is_deleted(tmp_path):
    first = save(tmp_path, 1, 1.0)
    fd = os.open(first / "trainable.safetensors", os.O_RDONLY)  # as Drive's trash would keep it
    try:
        assert os.fstat(fd).st_size > 0
        save(tmp_path, 2, 2.0)
        save(tmp_path, 3, 3.0)  # keep=2: step 1 goes
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000003"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    checkpoint.verify(tmp_path / "checkpoints" / "step-000003")
