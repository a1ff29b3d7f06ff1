"""The one training loop of the series, on accelerate. Every notebook trains through `Trainer`; what trains and
its loss belong to the method (helpers.methods.registry), and everything around the loop (logs, checkpoints, samples,
exports) is a hook (helpers.train.hooks). The loop owns accumulation, fp16 autocast + GradScaler (helpers.core.precision),
clipping, the LR schedule, checkpoint/resume and several processes (`accelerate launch`).

Exact resume: data order is a permutation seeded by (seed, epoch); the position (epoch, batch) is checkpointed with
the RNG states, and every per-sample draw is keyed by (seed, epoch, index) (helpers.methods.diffusion), so a resumed run
draws the same batches, noise and timesteps as one never interrupted, and so does a run on more processes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate

from ..core.files import NoSpaceError
from ..core.lock import RunLock
from ..core.paths import require_lasting_storage
from ..core.precision import Precision, forked_rng, precision_for
from ..core.presets import Preset
from ..core.runtime import seed_everything
from ..data.caches import training_data_digest
from ..methods.diffusion import SampleDraws
from ..methods.method import Method
from ..methods.registry import make_method
from ..models import Components, release_cuda_cache
from . import checkpoint as ckpt
from .hooks import default_hooks
from .optim import epoch_batches, make_lr_scheduler, make_optimizer
from .stops import (
    MAX_CONSECUTIVE_SKIPS,
    SettingsChanged,
    TrainingStopped,
    append_log,
    bad_input_message,
    interrupted_message,
    nan_message,
    oom_message,
    settings_changed_message,
    skipped_message,
)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    batch_in_epoch: int = 0  # batches of this epoch already consumed (by this process)
    resumed_from: str | None = None  # checkpoint folder we resumed from
    losses: list[float] = field(default_factory=list)  # one mean loss per optimizer step (this session)
    last_loss: float = float("nan")
    last_lr: float = 0.0
    last_grad_norm: float = float("nan")
    seconds_per_step: float = float("nan")  # wall time per optimizer step in this session (hooks included)
    skipped_steps: int = 0  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients); not counted in `step`


# ---------------------------------------------------------------- pieces

def dataset_identity(dataset) -> str | None:
    """What a dataset trains on (count + a digest of every picture and caption), or None for datasets that cannot
    say. Pictures or captions edited since a checkpoint stop its resume with a diff (helpers.train.checkpoint)."""
    records = getattr(dataset, "records", None)
    if records is None:
        return None
    return f"{len(records)} pictures and captions, {training_data_digest(records)[:16]}"


def bad_inputs(batch: dict) -> dict[str, list[int]]:
    """The batch's float inputs holding NaN/inf, each with the dataset indices of the samples that hold them."""
    found = {}
    for name, values in batch.items():
        if torch.is_tensor(values) and values.is_floating_point() and values.dim() >= 1:
            rows = ~torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
            if rows.any():
                found[name] = [int(batch["index"][i]) if "index" in batch else i for i in rows.nonzero().flatten()]
    return found


def input_caches(dataset) -> dict[str, Path]:
    """Batch input → the cache folder it is read from (helpers.data.dataset: `cache_dirs`)."""
    folders = getattr(dataset, "cache_dirs", {}) or {}
    return {name: folders[cache] for name, cache in (("latent_params", "latents"), ("prompt_embeds", "text"),
                                                     ("pooled_prompt_embeds", "text")) if cache in folders}


# ---------------------------------------------------------------- the loop

class Trainer:
    """Train `components` on `dataset` as `preset` says, into `run_dir`, resuming if it has a checkpoint."""

    def __init__(self, preset: Preset, components: Components, dataset, run_dir: Path,
                 method: Method | None = None, hooks: list | None = None, accelerator=None,
                 precision: Precision | None = None, loss_scale: float = 2.0**16, new_phase: bool = False):
        from accelerate import Accelerator
        self.preset, self.c, self.dataset, self.run_dir = preset, components, dataset, Path(run_dir)
        self.method = method or make_method(preset)
        if hooks is None:
            hooks = default_hooks(preset)
        self.hooks = list(hooks)
        # Mixed precision is ours, not accelerate's: accelerate silently turns fp16 off on a CPU, and the T4-dtype
        # test mode must run the very autocast + GradScaler code a T4 runs (helpers.core.precision).
        self.accelerator = accelerator or Accelerator(mixed_precision="no",
                                                      gradient_accumulation_steps=preset.grad_accum)
        self.precision = precision or precision_for(preset.mixed_precision, self.accelerator.device)
        self.loss_scale = loss_scale  # GradScaler's initial scale (fp16 only)
        self.new_phase = new_phase  # continue a run whose settings changed, as a new phase (see _check_resume)
        self.phase_start = 0  # optimizer step at which the current LR schedule started
        self.phase_changes: dict | None = None  # what changed when this session started a new phase
        self.state = TrainState()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup
    def _check_resume(self, found: Path) -> tuple[dict, bool]:
        """(checkpoint meta, whether this is a new phase). Settings that may change on resume get a note; settings
        that change what is learned stop with a diff unless `new_phase`."""
        meta = ckpt.read_meta(found)
        saved = {**meta["preset"], "data": meta.get("data")}
        wanted = {**asdict(self.preset), "data": self.data_identity if meta.get("data") else None}
        notes, blocking = ckpt.setting_changes(saved, wanted)
        if saved["data"] is not None and saved["data"] == wanted["data"]:  # the same pictures and captions, moved
            notes += [b + " (the same pictures and captions)" for b in blocking if b.startswith("data_ref:")]
            blocking = [b for b in blocking if not b.startswith("data_ref:")]
        for note in notes:
            print(f"note: resuming with a changed setting, {note}")
        if blocking and not self.new_phase:
            raise SettingsChanged(settings_changed_message(self.run_dir, found.name, blocking))
        if blocking:
            print("continuing as a new phase with changed settings:\n  " + "\n  ".join(blocking))
        return meta, blocking

    def _setup(self) -> None:
        acc, c, p = self.accelerator, self.c, self.preset
        self.data_identity = dataset_identity(self.dataset)
        found = ckpt.latest_good(self.run_dir)
        meta, changes = self._check_resume(found) if found is not None else ({}, [])
        new_phase = bool(changes)
        seed_everything(p.seed)  # adapter init (LoRA A), noise and timesteps all start from the preset seed
        self.method.setup(c)
        modules = self.method.modules(c)
        if p.gradient_checkpointing:
            for module in modules.values():
                if hasattr(module, "enable_gradient_checkpointing"):
                    module.enable_gradient_checkpointing()
        self.trainable = self.method.trainable_parameters(c)
        if not self.trainable:
            raise ValueError(f"method {self.method.name!r} left no parameter trainable")
        self.extra_state = self.method.extra_state(c)
        clash = sorted(set(self.extra_state) & set(self.trainable))
        if clash:
            raise ValueError(f"method {self.method.name!r}: extra state names clash with trainable ones: {clash[:3]}")
        self.optimizer = make_optimizer(list(self.trainable.values()), p, acc.device)
        self.phase_start = meta.get("step", 0) if new_phase else meta.get("position", {}).get("phase_start", 0)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, p, self.phase_start)
        self.scaler = self.precision.grad_scaler(self.loss_scale)
        self.models = {name: acc.prepare(module) for name, module in modules.items()}
        self._offload_cached_encoders()
        if found is not None:
            info = ckpt.load_checkpoint(found, {**self.trainable, **self.extra_state}, self.optimizer,
                                        None if new_phase else self.lr_scheduler, self.scaler)
            if new_phase:  # the moments carry over; the learning rate and its schedule are the new preset's
                for group in self.optimizer.param_groups:
                    group["lr"] = group["initial_lr"] = p.learning_rate
                self.lr_scheduler = make_lr_scheduler(self.optimizer, p, self.phase_start)
            position = info["position"]
            self.state.step = info["step"]
            self.state.epoch, self.state.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
            self.state.skipped_steps = position.get("skipped_steps", 0)
            self.state.resumed_from = found.name
            if new_phase:  # new settings may mean new data: start the phase on a fresh epoch
                self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0
                self.phase_changes = {"changes": changes, "resumed_from": found.name}
            print(f"resuming from {found.name}: step {self.state.step}, epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch}")

    def idle_modules(self) -> list[torch.nn.Module]:
        """Modules a training step never runs, as the method declares them (helpers.methods.Method.idle_modules)."""
        return self.method.idle_modules(self.c, self.dataset)

    def _offload_cached_encoders(self) -> None:
        """Idle modules leave the GPU (≈ 1.7 GiB for SDXL) and come back only while sampling (SampleHook,
        helpers.models.on_device). On a CPU there is nowhere else to put them."""
        if self.accelerator.device.type != "cuda":
            return
        for module in self.idle_modules():
            module.to("cpu")
        release_cuda_cache()

    # ---- what notebooks may ask
    @property
    def model(self) -> torch.nn.Module:
        """The trained module (unwrapped): the UNet for crossattn/LoRA, the prior network for a prior."""
        return self.accelerator.unwrap_model(next(iter(self.models.values())))

    @property
    def trainable_parameter_count(self) -> int:
        return sum(p.numel() for p in self.trainable.values())

    @property
    def is_main_process(self) -> bool:
        """Only the main process writes checkpoints, logs, samples and exports; the others wait at a barrier."""
        return self.accelerator.is_main_process

    def _train_mode(self, training: bool) -> None:
        for module in self.models.values():
            module.train(training)

    @property
    def position(self) -> dict:
        return {"epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
                "skipped_steps": self.state.skipped_steps, "phase_start": self.phase_start}

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.state.step, {**self.trainable, **self.extra_state},
                                    self.optimizer, self.lr_scheduler, self.scaler, self.position, self.preset,
                                    keep=self.preset.keep_checkpoints, data_identity=self.data_identity)

    # ---- one micro-batch
    def _loss(self, batch: dict, epoch: int, seed: int | None = None) -> torch.Tensor:
        draws = SampleDraws(self.preset.seed if seed is None else seed, epoch, batch["index"], self.accelerator.device)
        return self.method.loss(self.c, batch, self.models, draws, self.precision.weight_dtype)

    @torch.no_grad()
    def fixed_noise_loss(self, batch: dict, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> float:
        """Loss on one fixed batch with fixed draws (keyed by `seeds`): unlike the training loss it has no sampling
        noise, so before/after values show real progress. Training randomness is untouched."""
        was_training = next(iter(self.models.values())).training
        self._train_mode(False)
        with forked_rng(self.accelerator.device), self.precision.autocast():
            losses = [float(self._loss(batch, epoch=0, seed=seed)) for seed in seeds]
        self._train_mode(was_training)
        return sum(losses) / len(losses)

    def _batches(self):
        """Yield (epoch, batch index, collated batch) from the saved position on; this process's share only."""
        acc, n = self.accelerator, len(self.dataset)
        if n == 0:
            raise ValueError("the dataset is empty: nothing to train on (check the validation report)")
        while True:
            epoch = self.state.epoch
            batches = epoch_batches(n, self.preset.batch_size, self.preset.seed, epoch, acc.num_processes)
            if not batches:
                raise ValueError(f"{n} images make fewer than {acc.num_processes} batches of "
                                 f"{self.preset.batch_size}: lower batch_size or the number of processes")
            mine = batches[acc.process_index::acc.num_processes]
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            for i in range(self.state.batch_in_epoch, len(mine)):
                yield epoch, i, default_collate([self.dataset[j] for j in mine[i]])
            self.state.epoch, self.state.batch_in_epoch = epoch + 1, 0

    # ---- the loop
    def _micro_step(self, batch: dict, epoch: int) -> float:
        """Forward and backward of one micro-batch (loss scaled for fp16, divided for accumulation); returns the
        loss averaged over processes. Its tensors live only in this frame, so an exception raised from here keeps
        no activations alive."""
        with self.precision.autocast():
            loss = self._loss(batch, epoch)
        if not torch.isfinite(loss):
            bad = bad_inputs(batch)
            raise TrainingStopped(bad_input_message(self.state.step, bad, input_caches(self.dataset)) if bad
                                  else nan_message(self.state.step, self.preset))
        self.accelerator.backward(self.scaler.scale(loss))
        return self.accelerator.reduce(loss.detach().float(), "mean").item()

    def _optimizer_step(self) -> bool:
        """Unscale, clip, step. Returns False when the GradScaler skipped the step (inf/NaN fp16 gradients)."""
        params = list(self.trainable.values())
        self.scaler.unscale_(self.optimizer)
        self.state.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.preset.max_grad_norm))
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return not (self.scaler.is_enabled() and self.scaler.get_scale() < scale)

    def run(self) -> TrainState:
        """Train to `preset.max_steps`, holding the run folder's lock (main process) for the whole run."""
        require_lasting_storage(self.preset.profile, "training")
        lock = RunLock(self.run_dir) if self.is_main_process else None
        if lock is not None:
            lock.acquire()
        try:
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def _run(self) -> TrainState:
        acc, p, st = self.accelerator, self.preset, self.state
        self._setup()
        self._train_mode(True)
        for hook in self.hooks:
            hook.on_start(self)
        micro_losses: list[float] = []
        batches = self._batches()
        t0, first_step, skips_in_a_row = time.perf_counter(), st.step, 0
        stopped = None
        try:
            while st.step < p.max_steps:
                epoch, i, batch = next(batches)
                with acc.accumulate(*self.models.values()):
                    micro_losses.append(self._micro_step(batch, epoch))
                st.batch_in_epoch = i + 1
                if not acc.sync_gradients:
                    continue
                if not self._optimizer_step():  # fp16 overflow: no update, so no step, no LR/warmup spent
                    st.skipped_steps += 1
                    skips_in_a_row += 1
                    self._log_event("skipped", reason="inf/NaN fp16 gradients", loss_scale=self.scaler.get_scale(),
                                    skipped_steps=st.skipped_steps)
                    if skips_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                        raise TrainingStopped(skipped_message(p, st.step, self.scaler.get_scale()))
                    micro_losses = []
                    continue
                skips_in_a_row = 0
                self.lr_scheduler.step()
                st.step += 1
                st.last_loss = sum(micro_losses) / len(micro_losses)
                st.last_lr = self.lr_scheduler.get_last_lr()[0]
                st.losses.append(st.last_loss)
                micro_losses = []
                self.method.after_step(self.c)
                for hook in self.hooks:
                    hook.on_step(self)
        except torch.OutOfMemoryError:
            stopped = oom_message(p)
        except (TrainingStopped, ckpt.CheckpointError, NoSpaceError) as e:
            stopped = str(e)
        except KeyboardInterrupt:  # Colab's Stop button: the checkpoints on disk are whole (helpers.core.files)
            stopped = interrupted_message(self.run_dir, st.step, ckpt.latest_good(self.run_dir))
        if stopped is not None:
            # Raised outside the handler, so the new exception chains to nothing: a notebook that keeps it (as
            # sys.last_value) holds no frame with activations or gradients, and a re-run gets its memory back.
            batch = batches = None
            self.optimizer.zero_grad(set_to_none=True)
            release_cuda_cache()
            try:
                self._log_event("stopped", reason=stopped.split(";")[0])
            except NoSpaceError:  # the disk that stopped the run cannot take the stopped event either
                stopped += " (log.jsonl has no stopped event: the disk is full)"
            raise TrainingStopped(stopped)
        if st.step > first_step:
            st.seconds_per_step = (time.perf_counter() - t0) / (st.step - first_step)
        for hook in self.hooks:
            hook.on_end(self)
        return st

    def _log_event(self, event: str, **fields) -> None:
        if not self.is_main_process:
            return
        append_log(self.run_dir, {"event": event, "step": self.state.step, **fields})
