"""The ground floor: where we run and what that allows (runtime), where everything is stored and how runs are named
(paths: the storage layout in one place), the presets (the one table of settings; every model and dataset id lives
there) and the full-size configs, the fp16 rule (precision), folders written whole or not at all (files) and the
one-trainer-per-run lock (lock), and the libraries' notices that are expected here, silenced at their source
(notices). Imports nothing else of helpers but helpers.bootstrap.
"""
from . import notices
from .files import FolderError, NoSpaceError, discard, verify, write_folder
from .lock import RunLock, RunLocked
from .paths import (
    REPO_ROOT,
    StorageError,
    cache_root,
    prior_folder,
    priors_root,
    require_lasting_storage,
    results_folder,
    run_dir,
    run_folder,
    run_name,
    storage_root,
    sync_drive,
    tiny_root,
)
from .precision import T4_DTYPES_ENV, Precision, precision_for
from .presets import CIFAR10_CLASSES, PRESETS, Preset, get_preset, require_runtime, runtime_verdict
from .runtime import PROFILES, Environment, ProfileError, choose_profile, detect, device, seed_everything, versions

notices.install()  # the libraries' notices that are expected everywhere here (helpers.core.notices)
