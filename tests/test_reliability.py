"""A run never silently trains the wrong thing, and a full disk or a second trainer gets a clear answer: changed
settings on resume, the run-folder lock, free space for checkpoints, caches and exports, bad preset values, and
end-of-run order (export before the last sample). Every case is built inside its test."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from helpers.core import files, presets
from helpers.core.lock import LOCK_FILE, RunLock, RunLocked
from helpers.data import dataset as data
from helpers.models import load_components
from helpers.train import checkpoint
from helpers.train.hooks import CheckpointHook, ExportHook, LogHook, SampleHook, default_hooks, read_log
from helpers.train.loop import Trainer
from helpers.train.stops import SettingsChanged, TrainingStopped


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "storage"))
    return tmp_path / "storage"


def small(**kw):
    base = dict(method="lora", lora_rank=4, lora_alpha=4, max_train_images=8, batch_size=2, grad_accum=1,
                max_steps=4, checkpoint_every=2, keep_checkpoints=2, sample_every=0, learning_rate=1e-3)
    return presets.get_preset("sd15_xattn_cifar10", "tiny", **{**base, **kw})


def train(preset, run, hooks=None, **kw):
    c = load_components(preset)
    trainer = Trainer(preset, c, data.prepare_dataset(preset, c), run,
                      hooks=[LogHook(), CheckpointHook()] if hooks is None else hooks, **kw)
    trainer.run()
    return trainer


# ---------------------------------------------------------------- 1. changed settings on resume

def test_resume_with_settings_that_change_learning_stops_with_a_diff(storage, tmp_path):
    run = tmp_path / "run"
    train(small(), run)
    for change, line in [(dict(learning_rate=2e-3), "learning_rate: 0.001 → 0.002"),
                         (dict(batch_size=4), "batch_size: 2 → 4"),
                         (dict(max_train_images=6), "data: '8 pictures and captions"),  # other images
                         (dict(lora_rank=8, lora_alpha=8), "lora_rank: 4 → 8")]:
        with pytest.raises(SettingsChanged) as stopped:
            train(small(max_steps=6, **change), run)
        message = str(stopped.value)
        assert line in message and "new run name" in message and "new_phase=True" in message, message
    assert [p.name for p in checkpoint.checkpoint_dirs(run)] == ["step-000002", "step-000004"]  # nothing written


def test_edited_captions_stop_the_resume_and_a_moved_folder_does_not(storage, tmp_path):
    """Captions are part of what is learned: the same pictures with edited captions are other data. The same
    pictures and captions in another folder (another VM's Drive mount) are the same data."""
    from helpers.data import sources
    from helpers.tiny import world
    originals = sorted((Path(world.resolve("tiny/naruto")) / "train").glob("*.png"))[:8]

    def folder(where: Path, caption: str) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(originals):
            shutil.copy(picture, where / picture.name)
            (where / picture.with_suffix(".txt").name).write_text(f"{caption} {i}")
        return where

    run = tmp_path / "run"
    train(sources.with_source(small(), "folder", str(folder(tmp_path / "a", "a cartoon"))), run)
    moved = sources.with_source(small(max_steps=6), "folder", str(folder(tmp_path / "b", "a cartoon")))
    assert train(moved, run).state.resumed_from == "step-000004"
    edited = sources.with_source(small(max_steps=8), "folder", str(folder(tmp_path / "c", "a sketch")))
    with pytest.raises(SettingsChanged, match="data: '8 pictures and captions, [0-9a-f]+' → '8 pictures"):
        train(edited, run)


def test_resume_with_more_steps_or_other_sampling_continues_with_a_note(storage, tmp_path, capsys):
    run = tmp_path / "run"
    train(small(), run)
    trainer = train(small(max_steps=6, checkpoint_every=3, sample_prompts=("a frog",)), run)
    out = capsys.readouterr().out
    assert "max_steps: 4 → 6" in out and "checkpoint_every: 2 → 3" in out
    assert trainer.state.resumed_from == "step-000004" and trainer.state.step == 6


def test_continuing_at_a_new_learning_rate_is_a_logged_new_phase(storage, tmp_path):
    run = tmp_path / "run"
    first = train(small(lr_schedule="cosine", warmup_steps=1), run)
    moments = {k: v["exp_avg"].clone() for k, v in first.optimizer.state.items()}
    assert moments
    later = train(small(max_steps=8, learning_rate=3e-4, lr_schedule="constant"), run, new_phase=True)
    assert later.state.resumed_from == "step-000004" and later.state.step == 8 and later.phase_start == 4
    assert later.lr_scheduler.get_last_lr() == [3e-4]  # the new LR, not the old schedule's
    phases = [r for r in read_log(run) if r.get("event") == "phase"]
    assert len(phases) == 1 and phases[0]["step"] == 4
    assert any("learning_rate: 0.001 → 0.0003" in c for c in phases[0]["changes"])
    assert [r["step"] for r in read_log(run) if "loss" in r] == list(range(1, 9))
    meta = checkpoint.read_meta(checkpoint.checkpoint_dirs(run)[-1])
    assert meta["preset"]["learning_rate"] == 3e-4 and meta["position"]["phase_start"] == 4
    # the phase's own checkpoints resume normally (no diff), with the phase's schedule
    again = train(small(max_steps=10, learning_rate=3e-4, lr_schedule="constant"), run)
    assert again.phase_start == 4 and again.state.step == 10


# ---------------------------------------------------------------- 2. one trainer per run folder

def write_lock(run: Path, host: str, pid: int, heartbeat: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": "earlier", "heartbeat": heartbeat}))


def test_a_live_trainer_on_the_folder_refuses_a_second_and_a_dead_ones_lock_is_taken_over(storage, tmp_path):
    run = tmp_path / "run"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(run, socket.gethostname(), other.pid, time.time())
        with pytest.raises(RunLocked, match=f"in use by another trainer .*PID {other.pid}"):
            train(small(), run)
        assert checkpoint.checkpoint_dirs(run) == [] and not (run / "log.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    trainer = train(small(), run)  # its process is gone: taken over with a note
    assert trainer.state.step == 4 and not (run / LOCK_FILE).exists()  # released at the end


def test_another_hosts_fresh_lock_is_waited_out_with_a_countdown_then_taken_over(tmp_path, monkeypatch, capsys):
    """A disconnect leaves the dead VM's lock on Drive with a young heartbeat; the user reopens the notebook on a new
    VM at once. The new VM waits until that heartbeat is STALE_AFTER_S old (a countdown), then takes over."""
    from helpers.core import lock as lock_module
    monkeypatch.setattr(lock_module, "STALE_AFTER_S", 3.0)
    run = tmp_path / "run"
    write_lock(run, "colab-vm-gone", 12345, time.time())
    start = time.monotonic()
    lock = RunLock(run)
    assert "no heartbeat from host colab-vm-gone" in lock.acquire()
    assert 2.5 < time.monotonic() - start < 8
    assert "waiting for host colab-vm-gone's lock" in capsys.readouterr().err
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_FILE).exists()


def test_another_hosts_lock_whose_heartbeat_moves_is_a_live_trainer(tmp_path, monkeypatch):
    from helpers.core import lock as lock_module
    monkeypatch.setattr(lock_module, "STALE_AFTER_S", 30.0)
    run = tmp_path / "run"
    host = "colab-vm-" + uuid.uuid4().hex[:6]
    write_lock(run, host, 12345, time.time())
    beat = threading.Timer(1.0, lambda: write_lock(run, host, 12345, time.time()))  # the other VM is alive
    beat.start()
    start = time.monotonic()
    with pytest.raises(RunLocked, match=f"in use by another trainer \\(host {host}"):
        RunLock(run).acquire()
    assert time.monotonic() - start < 10  # stopped at its next heartbeat, not after the full wait
    beat.join()


# ---------------------------------------------------------------- 3. a full disk

@pytest.fixture
def small_disk(tmp_path):
    """A real file system of a few MB (tmpfs), as a nearly full Drive."""
    def make(megabytes: int) -> Path:
        mount = tmp_path / f"disk{len(mounts)}-{megabytes}mb"
        mount.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): needs root")
        mounts.append(mount)
        return mount
    mounts: list[Path] = []
    yield make
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_nearly_full_disk_prunes_old_checkpoints_instead_of_dying(storage, small_disk):
    # keep=3 would need room for 4 checkpoints; this disk holds 3 (each ≈ 1.05 MB with the tiny LoRA r16)
    preset = small(lora_rank=16, lora_alpha=16, max_steps=6, checkpoint_every=1, keep_checkpoints=3)
    run = small_disk(4) / "run"
    trainer = train(preset, run)
    kept = [p.name for p in checkpoint.checkpoint_dirs(run)]
    assert trainer.state.step == 6 and kept[-1] == "step-000006" and 1 <= len(kept) <= 3
    checkpoint.verify(checkpoint.checkpoint_dirs(run)[-1])


def test_a_full_disk_stops_with_the_folder_the_space_needed_and_free(storage, small_disk):
    preset = small(lora_rank=16, lora_alpha=16, max_steps=2, checkpoint_every=1)
    run = small_disk(1) / "run"
    with pytest.raises(TrainingStopped) as stopped:
        train(preset, run)
    message = str(stopped.value)
    assert f"{run / 'checkpoints'}" in message and "needs ≈" in message and "free" in message, message
    with pytest.raises(files.NoSpaceError, match="not enough space for .*needs ≈"):
        files.write_folder(small_disk(1) / "cache" / "latents", lambda tmp: None, expected_bytes=5 * 2**20)


def test_torchs_unexpected_pos_on_a_full_disk_becomes_a_clear_error(small_disk):
    folder = small_disk(1) / "ckpt"
    big = {"w": torch.zeros(2**19)}  # 2 MB: does not fit a 1 MB disk

    def fill(tmp):
        torch.save(big, tmp / "optimizer.pt")
    with pytest.raises(files.NoSpaceError, match="filled up while writing ckpt"):
        files.write_folder(folder, fill)
    assert not folder.exists()


# ---------------------------------------------------------------- 4. bad preset values, end-of-run order

@pytest.mark.parametrize("field, value, says", [
    ("batch_size", 0, "batch_size=0: a whole number ≥ 1"), ("grad_accum", 1.5, "grad_accum=1.5"),
    ("resolution", 60, "resolution 60 is not allowed for sd15: use a multiple of 64"),
    ("checkpoint_every", 0, "checkpoint_every=0"), ("sample_every", -1, "sample_every=-1"),
    ("max_steps", 0, "max_steps=0: a whole number ≥ 1"), ("learning_rate", "1e-4", "learning_rate='1e-4'"),
    ("learning_rate", 0.0, "learning_rate=0.0: a number > 0"), ("warmup_steps", 500, "warmup_steps=500")])
def test_bad_preset_values_are_caught_when_the_preset_is_made(field, value, says):
    with pytest.raises(ValueError) as bad:
        presets.get_preset("sd15_xattn_cifar10", "tiny", **{field: value})
    assert says in str(bad.value)


def test_export_comes_before_the_final_sample_and_sample_every_0_means_none(storage, tmp_path):
    names = [type(h).__name__ for h in default_hooks(small())]
    assert names.index("ExportHook") < names.index("SampleHook")
    run = tmp_path / "run"
    train(small(max_steps=2, sample_every=0, sample_prompts=("a frog",)), run,
          hooks=[LogHook(), CheckpointHook(), ExportHook(), SampleHook(show=False)])
    assert (run / "final" / "run.json").is_file() and not (run / "samples").exists()


def test_a_failing_final_sample_keeps_the_export(storage, tmp_path):
    preset = small(max_steps=3, sample_every=5, sample_prompts=("a frog",), sample_steps=1)  # one sample: at the end
    c = load_components(preset)

    def oom_at_inference(module, args):
        if not module.training:  # sampling runs the UNet in eval mode
            raise torch.OutOfMemoryError("CUDA out of memory")

    c.unet.register_forward_pre_hook(oom_at_inference)
    run = tmp_path / "run"
    hooks = [SampleHook(show=False) if type(h).__name__ == "SampleHook" else h for h in default_hooks(preset)]
    with pytest.raises(TrainingStopped, match="while drawing the sample images of step 3"):
        Trainer(preset, c, data.prepare_dataset(preset, c), run, hooks=hooks).run()
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file() and (run / "final" / "run.json").is_file()
