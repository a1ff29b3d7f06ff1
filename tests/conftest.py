"""Fixtures every test file shares.

- `storage`: a storage folder of the test's own (LAB_STORAGE): runs, caches and results land there.
- `module_storage`: the same for a whole test module (a module that trains once and checks many things).
- `session_runs`: finished tiny runs kept for the whole test session, so each tiny preset is trained ONCE per session
  and reused by every test that needs it: by name, a run is trained on first use, or adopted from the Colab-shaped
  series (tests/test_colab.py), which trains the notebooks' presets anyway.

The two tiers: `pytest -m "not slow"` (unit tests and short real-path runs, ≤ 2 minutes on 2 cores) is the
developers' check; `slow` marks learning checks, the notebooks on Colab-shaped VMs, the browser, the app, several
processes. README's test command runs both.

Tests run in two pytest-xdist workers (pyproject.toml), one torch thread each: the tiny models are too small for a
second thread to help (0.115 s per step of notebook 03's tiny run with 1 or 2), so two workers do twice the work.
The notebooks' series, the learning checks and the prior tests share one worker (`xdist_group("series")`), in that
order, so the checks reuse the runs the notebooks trained.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from helpers import data, methods, models, prior, train
from helpers.core import paths
from helpers.methods import is_finished


if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker; notebook kernels and drivers inherit it
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture
def storage(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "storage"
    monkeypatch.setenv("LAB_STORAGE", str(root))
    return root


@pytest.fixture(scope="module")
def module_storage(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("module-storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        yield root


class SessionRuns:
    """Finished tiny runs of the test session, in one storage folder (`root`) that every xdist worker shares, by run
    name; a run is trained (or adopted) under a file lock, so two workers never train it twice at once."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def lock(self, name: str) -> FileLock:
        return FileLock(str(self.root / f".{name}.lock"))

    def adopt(self, run_folder: Path, under: str = paths.RUNS) -> None:
        """Keep a finished run trained elsewhere in the session (a notebook's, on the fake Drive)."""
        run_folder = Path(run_folder)
        target = self.root / under / run_folder.name
        with self.lock(run_folder.name):
            if is_finished(run_folder) and not target.exists():
                shutil.copytree(run_folder, target, symlinks=True, ignore=shutil.ignore_patterns("run.lock"))

    def trained(self, preset) -> Path:
        """The finished run of `preset` in this session's storage, trained the first time it is asked for as its
        notebook trains it (default hooks; an image-conditioned preset on its CLIP embedding cache, as notebook 04;
        a prior on that cache, under priors/)."""
        is_prior = preset.method in ("mlp_prior", "diffusion_prior")
        folder = (paths.priors_root(self.root) if is_prior else self.root / paths.RUNS) / paths.run_name(preset)
        with self.lock(folder.name), pytest.MonkeyPatch.context() as mp:
            mp.setenv("LAB_STORAGE", str(self.root))
            if is_finished(folder):
                return folder
            if is_prior:
                embeddings = data.embedding_set(preset, device="cpu")
                prior.train_prior(preset, embeddings, folder, device="cpu")
                return folder
            components = models.load_components(preset)
            dataset = data.prepare_dataset(preset, components)
            if preset.method == "ip_adapter":
                dataset = methods.EmbeddedDataset(dataset, data.embedding_set(preset, records=dataset.records))
            train.Trainer(preset, components, dataset, folder).run()
        return folder


@pytest.fixture(scope="session")
def session_runs(tmp_path_factory, worker_id) -> SessionRuns:
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":  # every worker has a base folder of its own; their parent is the session's
        shared = shared.parent
    return SessionRuns(shared / "session-runs")
