"""helpers.checkpoint on its own (no model): pruning to the newest K empties what it deletes, so a pruned checkpoint
costs nothing in Google Drive's trash; pruning keeps verified checkpoints; folders that are not checkpoints are left
alone with a note; a checkpoint whose meta.json does not read is named and skipped."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from helpers.core import files, presets
from helpers.train import checkpoint


def save(run, step, weight, keep=2):
    weight = torch.nn.Parameter(torch.full((256,), float(weight)))
    optimizer = torch.optim.AdamW([weight], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny")
    return checkpoint.save_checkpoint(run, step, {"w": weight}, optimizer, scheduler, None, {"epoch": 0}, preset,
                                      keep=keep)


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


def test_pruning_never_removes_a_verified_checkpoint_to_keep_a_broken_one(tmp_path):
    """Issue 27, item 2: with keep_checkpoints=1, a stray broken step-000009 made every good checkpoint be pruned
    right after it was written, leaving only the broken one."""
    save(tmp_path, 1, 1.0, keep=1)
    stray = tmp_path / "checkpoints" / "step-000009"
    stray.mkdir()
    (stray / "trainable.safetensors").write_bytes(b"half a file")  # no manifest: a copy that never finished
    for step in (2, 3):
        save(tmp_path, step, float(step), keep=1)
        assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == [f"step-{step:06d}", "step-000009"]
    with pytest.warns(UserWarning, match="step-000009: no manifest.json"):
        assert checkpoint.latest_good(tmp_path).name == "step-000003"
    assert (stray / "trainable.safetensors").read_bytes() == b"half a file"  # left as it was
    save(tmp_path, 9, 9.0, keep=1)  # training reaches its step: replaced whole, the older one pruned
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000009"]
    checkpoint.verify(stray)


def test_folders_that_are_not_checkpoints_are_left_alone_with_a_note(tmp_path):
    """Issue 27, item 2: a file manager's "step-000004 (copy)" made every resume fail with `invalid literal for
    int()`."""
    save(tmp_path, 4, 4.0)
    copy = tmp_path / "checkpoints" / "step-000004 (copy)"
    shutil.copytree(tmp_path / "checkpoints" / "step-000004", copy)
    (tmp_path / "checkpoints" / "notes.txt").write_text("lr 1e-4 was too high")
    with pytest.warns(UserWarning, match=r"step-000004 \(copy\) is not a checkpoint .*left alone"):
        assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000004"]
    assert checkpoint.latest_good(tmp_path).name == "step-000004"
    for step in (5, 6, 7):
        save(tmp_path, step, float(step))
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step-000006", "step-000007"]
    assert copy.is_dir() and (tmp_path / "checkpoints" / "notes.txt").is_file()


def test_a_garbage_meta_json_behind_a_valid_manifest_is_named_and_skipped(tmp_path):
    """Issue 27, item 2: a meta.json that is not JSON (its manifest rewritten to match) failed the resume with a bare
    JSONDecodeError naming no checkpoint."""
    save(tmp_path, 1, 1.0)
    newest = save(tmp_path, 2, 2.0)
    (newest / "meta.json").write_text("{garbage")
    manifest = json.loads((newest / files.MANIFEST).read_text())
    manifest["meta.json"] = {"sha256": files.sha256_file(newest / "meta.json"), "bytes": 8}
    (newest / files.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.CheckpointError, match=f"{newest / 'meta.json'} cannot be read .*step-000002"):
        checkpoint.read_meta(newest)
    with pytest.warns(UserWarning, match="step-000002/meta.json cannot be read"):
        assert checkpoint.latest_good(tmp_path).name == "step-000001"
