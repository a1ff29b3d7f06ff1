"""Profile choice, storage and run folders, seeding."""
import random

import numpy as np
import pytest
import torch

from helpers.core import paths, runtime
from helpers.core.runtime import Environment, ProfileError

CPU = Environment(is_colab=False, cuda_name=None, vram_gb=0.0, ram_gb=24.0, drive_mounted=False)
COLAB_CPU = Environment(is_colab=True, cuda_name=None, vram_gb=0.0, ram_gb=12.7, drive_mounted=True)
COLAB_T4 = Environment(is_colab=True, cuda_name="Tesla T4", vram_gb=15.0, ram_gb=12.7, drive_mounted=True)


def test_auto_follows_the_hardware(monkeypatch):
    monkeypatch.delenv("LAB_PROFILE", raising=False)
    assert runtime.choose_profile("auto", CPU) == "tiny"
    assert runtime.choose_profile("auto", COLAB_T4) == "t4"


def test_env_overrides_auto_and_parameter_overrides_env(monkeypatch):
    monkeypatch.setenv("LAB_PROFILE", "tiny")
    assert runtime.choose_profile("auto", COLAB_T4) == "tiny"
    assert runtime.choose_profile("t4", COLAB_T4) == "t4"


def test_real_profile_without_gpu_is_refused_clearly(monkeypatch, capsys):
    monkeypatch.delenv("LAB_PROFILE", raising=False)
    with pytest.raises(ProfileError, match="needs a CUDA GPU"):
        runtime.choose_profile("t4", CPU)
    with pytest.raises(ProfileError, match="Change runtime type"):
        runtime.choose_profile("t4", COLAB_CPU)
    assert runtime.choose_profile("auto", COLAB_CPU) == "tiny"
    assert "T4 GPU" in capsys.readouterr().out  # auto on a GPU-less Colab says how to attach one
    with pytest.raises(ProfileError, match="unknown profile"):
        runtime.choose_profile("a100", CPU)


def test_storage_and_run_dirs(tmp_path, monkeypatch):
    from helpers.core import presets
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path))
    assert paths.storage_root(CPU) == tmp_path
    lora = presets.get_preset("sd15_xattn_cifar10", "t4", method="lora")
    assert paths.run_folder(lora) == tmp_path / "runs" / "sd15_xattn_cifar10-lora-t4"  # one naming rule
    run = paths.run_dir("my-run")
    assert run == tmp_path / "runs" / "my-run" and run.is_dir()
    for bad in ("", "../escape", "a/b", ".hidden"):
        with pytest.raises(ValueError):
            paths.run_dir(bad)
    monkeypatch.delenv("LAB_STORAGE")
    assert paths.storage_root(CPU) == paths.REPO_ROOT / "outputs"


def test_seed_everything_repeats_every_generator():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()
    runtime.seed_everything(7)
    first = draw()
    runtime.seed_everything(7)
    assert draw() == first


def test_environment_summary_and_versions():
    env = runtime.detect()
    assert (env.cuda_name is None) == (not torch.cuda.is_available()) and env.ram_gb > 1
    assert ("GPU: none" in env.summary()) == (env.cuda_name is None)
    if env.cuda_name:
        assert env.vram_gb > 0 and env.cuda_name in env.summary()
    v = runtime.versions()
    assert torch.__version__.startswith(v["torch"]) and v["diffusers"] != "not installed"


def test_drive_counts_as_mounted_only_on_colab(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "DRIVE_MOUNT", tmp_path / "drive")
    (tmp_path / "drive" / "MyDrive").mkdir(parents=True)
    monkeypatch.delenv("COLAB_RELEASE_TAG", raising=False)
    assert not runtime.detect().drive_mounted  # a folder of that name on another machine is just a folder
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-test")
    env = runtime.detect()
    assert env.is_colab and env.drive_mounted


def test_colab_without_drive_keeps_state_off_the_clone_and_refuses_t4_training(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("LAB_STORAGE", raising=False)
    monkeypatch.setattr(paths, "COLAB_LOCAL_STORAGE", tmp_path / "vm-disk")
    colab_no_drive = Environment(is_colab=True, cuda_name="Tesla T4", vram_gb=15.0, ram_gb=12.7, drive_mounted=False)
    root = paths.storage_root(colab_no_drive)
    assert root == tmp_path / "vm-disk" and paths.REPO_ROOT not in root.parents
    assert "Google Drive is not mounted" in capsys.readouterr().out
    with pytest.raises(paths.StorageError, match="needs Google Drive.*setup cell"):
        paths.require_lasting_storage("t4", "training", colab_no_drive)
    paths.require_lasting_storage("tiny", "training", colab_no_drive)  # the tiny profile may, with the note above
    paths.require_lasting_storage("t4", "training", COLAB_T4)
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "chosen"))  # a folder the user chose: their call
    paths.require_lasting_storage("t4", "training", colab_no_drive)
