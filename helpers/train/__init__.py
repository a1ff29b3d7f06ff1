"""The one training loop (loop: `Trainer`), the hooks around it (log, checkpoint, export, samples, loss plots),
checkpoint and exact resume (checkpoint), optimizer and learning-rate schedule (optim), and the stops that explain
themselves (stops: NaN, out of memory, the Stop button, changed settings).
"""
from .checkpoint import checkpoint_dirs, latest_good
from .hooks import CheckpointHook, ExportHook, Hook, LogHook, SampleHook, default_hooks, plot_losses, read_log
from .loop import Trainer, TrainState
from .stops import SettingsChanged, TrainingStopped
