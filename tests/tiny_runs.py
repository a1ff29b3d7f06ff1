"""Finished tiny runs for tests that need something to load (catalog, explorer, browser test)."""
from __future__ import annotations

from pathlib import Path

import pytest


def train_tiny_run(root: Path, method: str = "lora", steps: int = 2, **overrides) -> Path:
    """A finished tiny SD1.5 run (notebook 02's preset, with `overrides`) in `root/runs`: `steps` optimizer steps on
    eight images."""
    from helpers.core import paths, presets
    from helpers.data import dataset as data
    from helpers.models import load_components
    from helpers.train.hooks import ExportHook
    from helpers.train.loop import Trainer
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", method=method, max_steps=steps, sample_every=0,
                                max_train_images=8, **overrides)
    components = load_components(preset)
    folder = paths.run_folder(preset, root)
    Trainer(preset, components, data.prepare_dataset(preset, components), folder, hooks=[ExportHook()]).run()
    return folder


def train_tiny_ip_adapter_run(root: Path, steps: int = 2, images: int = 40) -> Path:
    """A finished tiny image-conditioned run (notebook 04's preset) in `root/runs`: `steps` optimizer steps on the
    training side of `images` images, their CLIP embeddings cached under `root`."""
    from helpers.core import paths, presets
    from helpers.data import dataset as data
    from helpers.data.embeddings import embedding_set
    from helpers.methods.ip_adapter import EmbeddedDataset
    from helpers.models import load_components
    from helpers.train.hooks import ExportHook
    from helpers.train.loop import Trainer
    preset = presets.get_preset("prior_sd15", "tiny", max_steps=steps, sample_every=0, max_train_images=images)
    components = load_components(preset)
    dataset = data.prepare_dataset(preset, components, root=root)
    embeddings = embedding_set(preset, records=dataset.records, root=root)
    folder = paths.run_folder(preset, root)
    Trainer(preset, components, EmbeddedDataset(dataset, embeddings), folder, hooks=[ExportHook()]).run()
    return folder


def storage_with_run(tmp_path_factory, method: str = "lora", **overrides) -> Path:
    """A fresh storage folder holding one finished tiny run (`train_tiny_run`), trained with LAB_STORAGE on it."""
    root = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        train_tiny_run(root, method, **overrides)
    return root
