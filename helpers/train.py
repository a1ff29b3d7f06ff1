"""The one training loop of the series, on accelerate. Every notebook trains through `Trainer`; what trains and
its loss belong to the method (helpers.adapters), and everything around the loop (logs, checkpoints, samples,
exports) is a hook (helpers.hooks). The loop owns accumulation, fp16 autocast + GradScaler (helpers.precision),
clipping, the LR schedule, checkpoint/resume and several processes (`accelerate launch`).

Exact resume: data order is a permutation seeded by (seed, epoch); the position (epoch, batch) is checkpointed with
the RNG states, and every per-sample draw is keyed by (seed, epoch, index) (helpers.diffusion), so a resumed run
draws the same batches, noise and timesteps as one never interrupted, and so does a run on more processes.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import default_collate

from . import checkpoint as ckpt
from .adapters import Method, make_method
from .diffusion import SampleDraws
from .models import Components, release_cuda_cache
from .precision import Precision, forked_rng, precision_for
from .presets import Preset
from .runtime import seed_everything

MAX_CONSECUTIVE_SKIPS = 25  # fp16 overflow skips in a row before we call the gradients broken, not just large


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (NaN loss, out of memory); the message says why and what to change."""


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

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, processes: int = 1) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), so any epoch can be replayed exactly. With
    several processes, process r takes batches r, r + P, …; the count is cut to a multiple of P so every process
    takes part in every optimizer step (a process left without a batch would hang the others)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return batches[:len(batches) // processes * processes]


def make_optimizer(params: list[torch.nn.Parameter], preset: Preset, device: torch.device):
    """8-bit AdamW (bitsandbytes) on CUDA when the preset asks; plain AdamW elsewhere, with a note."""
    kwargs = dict(lr=preset.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if preset.optimizer == "adamw8bit":
        if device.type == "cuda":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(params, **kwargs)
        print("note: 8-bit AdamW needs CUDA (bitsandbytes); using torch AdamW on this device")
    elif preset.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {preset.optimizer!r}: use 'adamw8bit' or 'adamw'")
    return torch.optim.AdamW(params, **kwargs)


def make_lr_scheduler(optimizer, preset: Preset):
    from diffusers.optimization import get_scheduler
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}.get(preset.lr_schedule)
    if name is None:
        raise ValueError(f"unknown lr_schedule {preset.lr_schedule!r}: use 'constant' or 'cosine'")
    return get_scheduler(name, optimizer, num_warmup_steps=preset.warmup_steps, num_training_steps=preset.max_steps)


def nan_message(step: int, preset: Preset) -> str:
    return (f"loss became NaN/inf at optimizer step {step + 1}; training stopped and the last good checkpoint is "
            f"kept (no weights were written after it). Likely causes: the VAE overflowing in fp16 (use the fp16-fix "
            f"VAE or set vae_fp32=True), a learning rate too high (now {preset.learning_rate:g}: try 2-10× lower), or "
            f"a broken image/caption in the data. Fix it and run again: training resumes from the last checkpoint.")


def oom_message(preset: Preset) -> str:
    offload = []
    if not preset.cache_latents:
        offload.append(f"cache_latents={preset.cache_latents} (turn on: the VAE then leaves the GPU)")
    if not preset.cache_text or preset.train_text_encoder:
        offload.append(f"cache_text={preset.cache_text}, train_text_encoder={preset.train_text_encoder} (cached "
                       f"text without a trained text encoder lets the text encoders leave the GPU)")
    return (f"CUDA out of memory in a training step; training stopped and the last checkpoint is kept. Lower memory "
            f"with these preset fields: batch_size={preset.batch_size} (halve it and double grad_accum="
            f"{preset.grad_accum} to keep {preset.images_per_step} images/step), resolution={preset.resolution}"
            + ("" if preset.gradient_checkpointing else ", gradient_checkpointing=False (turn on)")
            + "".join(", " + o for o in offload) + ". Then run again: training resumes from the last checkpoint.")


def sampling_oom_message(preset: Preset, step: int) -> str:
    return (f"CUDA out of memory while drawing the sample images of step {step}, not in training: the checkpoint of "
            f"this step is already safe. Sampling at {preset.resolution} px needs the VAE and text encoders back on "
            f"the GPU next to the training state. Set sample_every=0 (no samples during training; generate after it "
            f"in the evaluation cells) or fewer sample_prompts, then run again: training resumes from the checkpoint.")


def skipped_message(preset: Preset, step: int, scale: float) -> str:
    return (f"the fp16 gradients were inf/NaN in {MAX_CONSECUTIVE_SKIPS} optimizer steps in a row after step {step} "
            f"(loss scale now {scale:g}): not an fp16 overflow but broken gradients. Likely causes: a learning rate "
            f"too high (now {preset.learning_rate:g}), the VAE overflowing in fp16 (use the fp16-fix VAE or "
            f"vae_fp32=True), or broken data. Training stopped; the last good checkpoint is kept.")


# ---------------------------------------------------------------- the loop

class Trainer:
    """Train `components` on `dataset` as `preset` says, into `run_dir`, resuming if it has a checkpoint."""

    def __init__(self, preset: Preset, components: Components, dataset, run_dir: Path,
                 method: Method | None = None, hooks: list | None = None, accelerator=None,
                 precision: Precision | None = None, loss_scale: float = 2.0**16):
        from accelerate import Accelerator
        self.preset, self.c, self.dataset, self.run_dir = preset, components, dataset, Path(run_dir)
        self.method = method or make_method(preset)
        if hooks is None:
            from .hooks import default_hooks
            hooks = default_hooks(preset)
        self.hooks = list(hooks)
        # Mixed precision is ours, not accelerate's: accelerate silently turns fp16 off on a CPU, and the T4-dtype
        # test mode must run the very autocast + GradScaler code a T4 runs (helpers.precision).
        self.accelerator = accelerator or Accelerator(mixed_precision="no",
                                                      gradient_accumulation_steps=preset.grad_accum)
        self.precision = precision or precision_for(preset.mixed_precision, self.accelerator.device)
        self.loss_scale = loss_scale  # GradScaler's initial scale (fp16 only)
        self.state = TrainState()
        self.run_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup
    def _setup(self) -> None:
        acc, c, p = self.accelerator, self.c, self.preset
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
        self.optimizer = make_optimizer(list(self.trainable.values()), p, acc.device)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, p)
        self.scaler = self.precision.grad_scaler(self.loss_scale)
        self.models = {name: acc.prepare(module) for name, module in modules.items()}
        self._offload_cached_encoders()
        found = ckpt.latest_good(self.run_dir)
        if found is not None:
            info = ckpt.load_checkpoint(found, self.trainable, self.optimizer, self.lr_scheduler, self.scaler)
            position = info["position"]
            self.state.step = info["step"]
            self.state.epoch, self.state.batch_in_epoch = position["epoch"], position["batch_in_epoch"]
            self.state.skipped_steps = position.get("skipped_steps", 0)
            self.state.resumed_from = found.name
            print(f"resuming from {found.name}: step {self.state.step}, epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch}")

    def idle_modules(self) -> list[torch.nn.Module]:
        """Modules a training step never runs: the VAE when latents are cached, the text encoders when text is
        cached and they do not train."""
        idle = []
        if getattr(self.dataset, "latents", None) is not None:
            idle.append(self.c.vae)
        if getattr(self.dataset, "text", None) is not None and not self.method.trains_text_encoder:
            idle += self.c.text_encoders
        return idle

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
                "skipped_steps": self.state.skipped_steps}

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.trainable, self.optimizer,
                                    self.lr_scheduler, self.scaler, self.position, self.preset,
                                    keep=self.preset.keep_checkpoints)

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
            raise TrainingStopped(nan_message(self.state.step, self.preset))
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
                for hook in self.hooks:
                    hook.on_step(self)
        except torch.OutOfMemoryError:
            stopped = oom_message(p)
        except TrainingStopped as e:
            stopped = str(e)
        if stopped is not None:
            # Raised outside the handler, so the new exception chains to nothing: a notebook that keeps it (as
            # sys.last_value) holds no frame with activations or gradients, and a re-run gets its memory back.
            batch = batches = None
            self.optimizer.zero_grad(set_to_none=True)
            release_cuda_cache()
            self._log_event("stopped", reason=stopped.split(";")[0])
            raise TrainingStopped(stopped)
        if st.step > first_step:
            st.seconds_per_step = (time.perf_counter() - t0) / (st.step - first_step)
        for hook in self.hooks:
            hook.on_end(self)
        return st

    def _log_event(self, event: str, **fields) -> None:
        if not self.is_main_process:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"event": event, "step": self.state.step, **fields}) + "\n")
