"""The storage layout, in ONE place: where the storage folder is (Drive on Colab), and every folder the series
keeps in it, named once:

    <storage>/runs/<run name>/      a training run: checkpoints/, samples/, log.jsonl, final/ (helpers.train)
    <storage>/priors/<run name>/    a prior run (notebook 04 part 2): a prior draws no image, so it stays out of runs/
    <storage>/cache/<name>-<key>/   latent, text and CLIP-embedding caches (helpers.data.caches)
    <storage>/results/              notebook 05's tables, charts and sheets
    <storage>/tiny/                 the tiny world's generated pictures (helpers.tiny)

A run is named `<preset>-<method>-<profile>[-<suffix>]`. The storage folder is LAB_STORAGE if set; on Colab, Drive
when mounted, else the VM's disk outside the clone (with a note: it is gone with the VM); elsewhere `<repo>/outputs`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..bootstrap import DRIVE_FOLDER
from .presets import Preset
from .runtime import Environment, detect

REPO_ROOT = Path(__file__).resolve().parents[2]  # helpers/core/paths.py → the repository (a test checks README.md)
TINY_ASSETS = REPO_ROOT / "helpers" / "tiny" / "assets"  # the tiny world's committed models and tokenizer
# On Colab without Drive (the permission refused): the VM's own disk, outside the clone, lost with the VM.
COLAB_LOCAL_STORAGE = Path("/content/lab-outputs")
RUNS, PRIORS, CACHE, RESULTS, TINY = "runs", "priors", "cache", "results", "tiny"


class StorageError(RuntimeError):
    """Where state would be written does not outlive this Colab VM, and the run needs it to."""


_told_where: set[Path] = set()


def storage_root(env: Environment | None = None) -> Path:
    """Where runs, caches and the tiny world's pictures live: LAB_STORAGE if set; on Colab, Drive when mounted, else
    the VM's disk outside the clone (with a note: it is lost with the VM); elsewhere `<repo>/outputs`."""
    env = env or detect()
    if os.environ.get("LAB_STORAGE"):
        root = Path(os.environ["LAB_STORAGE"])
    elif env.drive_mounted:
        root = DRIVE_FOLDER
    elif env.is_colab:
        root = COLAB_LOCAL_STORAGE
        if root not in _told_where:
            _told_where.add(root)
            print(f"note: Google Drive is not mounted, so this VM's disk keeps what the tiny profile writes, in "
                  f"{root}: it is gone when the VM is (run the setup cell again to mount Drive).")
    else:
        root = REPO_ROOT / "outputs"
    root.mkdir(parents=True, exist_ok=True)
    return root


def require_lasting_storage(profile: str, what: str, env: Environment | None = None) -> None:
    """Refuse `what` (training, caching) with the `t4` profile on Colab when its state would die with the VM."""
    env = env or detect()
    if profile == "t4" and env.is_colab and not env.drive_mounted and not os.environ.get("LAB_STORAGE"):
        raise StorageError(f"{what} with the t4 profile needs Google Drive, the only place a checkpoint or cache "
                           f"outlives a disconnect on Colab: run the setup cell at the top again and allow Drive "
                           f"access when Colab asks.")


def sync_drive() -> None:
    """End of a notebook that wrote to Drive: on Colab, wait until Drive holds every file (flush), then unmount.
    Running the setup cell again mounts it again. Elsewhere nothing to do."""
    env = detect()
    if not env.drive_mounted:
        print(f"storage: {storage_root(env)} (no Drive to sync)")
        return
    from google.colab import drive  # type: ignore[import-not-found]  # exists only on Colab
    drive.flush_and_unmount()
    print("Drive has everything this notebook wrote (flushed and unmounted); the setup cell mounts it again.")


def run_dir(name: str, root: Path | None = None) -> Path:
    """The folder of one run: checkpoints/, samples/, log.jsonl and final/ live inside it."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise ValueError(f"run name {name!r} must be a plain folder name")
    path = Path(root or storage_root()) / RUNS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_name(preset: Preset, suffix: str = "") -> str:
    """The folder name of a run: preset, method and profile (`sd15_xattn_cifar10-lora-tiny`), and a suffix for a
    second run of the same preset with other settings (`…-tiny-b`)."""
    return f"{preset.name}-{preset.method}-{preset.profile}" + (f"-{suffix}" if suffix else "")


def run_folder(preset: Preset, root: Path | None = None, suffix: str = "") -> Path:
    """`<storage>/runs/<run_name(preset, suffix)>/`, created if needed."""
    return run_dir(run_name(preset, suffix), root)




def priors_root(root: Path | str | None = None) -> Path:
    """`<storage>/priors/`, where prior runs live (not created)."""
    return Path(root or storage_root()) / PRIORS


def prior_folder(preset: Preset, root: Path | str | None = None, suffix: str = "") -> Path:
    """`<storage>/priors/<run_name(preset, suffix)>/`, created if needed."""
    path = priors_root(root) / run_name(preset, suffix)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_root(root: Path | str | None = None) -> Path:
    """`<storage>/cache/`, where the latent, text and CLIP-embedding caches live (not created)."""
    return Path(root or storage_root()) / CACHE


def results_folder(name: str, root: Path | str | None = None) -> Path:
    """`<storage>/results/<name>/`, created if needed."""
    path = Path(root or storage_root()) / RESULTS / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def tiny_root() -> Path:
    """The tiny world's generated pictures: `<storage>/tiny/` (LAB_TINY_DIR overrides), shared by every run. On Colab
    that is Drive, so a fresh VM finds the pictures an earlier notebook drew and writes nothing in its clone."""
    root = Path(os.environ.get("LAB_TINY_DIR") or storage_root() / TINY)
    root.mkdir(parents=True, exist_ok=True)
    return root
