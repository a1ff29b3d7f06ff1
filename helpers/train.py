"""The one training loop of the series, on accelerate. Every notebook trains through `Trainer`; what differs
between methods lives in helpers.adapters, and everything around the loop (checkpoints, samples, logs) is a hook.

The loop follows diffusers' train_text_to_image(_lora)(_sdxl).py: latents from the VAE (or their cache), Gaussian
noise (+ optional offset noise), uniform timesteps, DDPM forward noising, epsilon or v-prediction target from the
scheduler config, MSE with optional Min-SNR-γ weighting.

Exact resume: data order is a permutation seeded by (seed, epoch); the position (epoch, batch) is checkpointed with
the RNG states, so a resumed run draws the same batches, noise and timesteps as one never interrupted.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .adapters import Method, make_method
from .models import Components, encode_images, on_device, release_cuda_cache, sample_latents
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
    batch_in_epoch: int = 0  # batches of this epoch already consumed (this process)
    resumed_from: str | None = None  # checkpoint folder we resumed from
    losses: list[float] = field(default_factory=list)  # one mean loss per optimizer step (this session)
    last_loss: float = float("nan")
    last_lr: float = 0.0
    last_grad_norm: float = float("nan")
    seconds_per_step: float = float("nan")  # wall time per optimizer step in this session (hooks included)
    skipped_steps: int = 0  # optimizer steps the fp16 GradScaler skipped (inf/NaN gradients); not counted in `step`


# ---------------------------------------------------------------- pieces

def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), so any epoch can be replayed exactly."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


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


def diffusion_loss(unet, noise_scheduler, latents: torch.Tensor, cond: dict, preset: Preset) -> torch.Tensor:
    """Noise the latents at random timesteps and score the UNet's prediction (diffusers' reference recipe)."""
    noise = torch.randn_like(latents)
    if preset.noise_offset:
        noise += preset.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    pred = unet(noisy, timesteps, **cond).sample
    if preset.snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=preset.snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


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
        self.hooks = list(hooks) if hooks is not None else default_hooks(preset)
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
        if p.gradient_checkpointing:
            c.unet.enable_gradient_checkpointing()
        self.trainable = self.method.trainable_parameters(c)
        if not self.trainable:
            raise ValueError(f"method {self.method.name!r} left no parameter trainable")
        self.optimizer = make_optimizer(list(self.trainable.values()), p, acc.device)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, p)
        self.scaler = self.precision.grad_scaler(self.loss_scale)
        self.unet = acc.prepare(c.unet)
        self.weight_dtype = next(p_ for p_ in c.unet.parameters() if not p_.requires_grad).dtype
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

    @property
    def position(self) -> dict:
        return {"epoch": self.state.epoch, "batch_in_epoch": self.state.batch_in_epoch,
                "skipped_steps": self.state.skipped_steps}

    def save_checkpoint(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.state.step, self.trainable, self.optimizer,
                                    self.lr_scheduler, self.scaler, self.position, self.preset,
                                    keep=self.preset.keep_checkpoints)

    # ---- one micro-batch
    def _loss(self, batch: dict) -> torch.Tensor:
        c, device = self.c, self.accelerator.device
        if "latent_params" in batch:
            params = batch["latent_params"].to(device)
        else:
            with torch.no_grad():
                params = encode_images(c.vae, batch["pixel_values"])
        latents = sample_latents(c.vae.config, params).to(device)
        cond = self.method.conditioning(c, batch, device, self.weight_dtype)
        return diffusion_loss(self.unet, c.noise_scheduler, latents, cond, self.preset)

    @torch.no_grad()
    def fixed_noise_loss(self, batch: dict, seeds: tuple[int, ...] = (0, 1, 2, 3)) -> float:
        """Loss on one fixed batch with fixed noise and timesteps (a forked, seeded RNG): unlike the training loss
        it has no sampling noise, so before/after values show real progress. Training randomness is untouched."""
        was_training = self.unet.training
        self.unet.eval()
        losses = []
        with forked_rng(self.accelerator.device), self.precision.autocast():
            for seed in seeds:
                torch.manual_seed(seed)
                losses.append(float(self._loss(batch)))
        self.unet.train(was_training)
        return sum(losses) / len(losses)

    def _batches(self):
        """Yield (epoch, batch index, collated batch) from the saved position on; this process's share only."""
        acc, n = self.accelerator, len(self.dataset)
        if n == 0:
            raise ValueError("the dataset is empty: nothing to train on (check the validation report)")
        while True:
            batches = epoch_batches(n, self.preset.batch_size, self.preset.seed, self.state.epoch)
            mine = batches[acc.process_index::acc.num_processes]
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.state.epoch)
            for i in range(self.state.batch_in_epoch, len(mine)):
                yield i, default_collate([self.dataset[j] for j in mine[i]])
            self.state.epoch, self.state.batch_in_epoch = self.state.epoch + 1, 0

    # ---- the loop
    def _micro_step(self, batch: dict) -> float:
        """Forward and backward of one micro-batch (loss scaled for fp16, divided for accumulation). Its tensors
        live only in this frame, so an exception raised from here keeps no activations alive."""
        with self.precision.autocast():
            loss = self._loss(batch)
        if not torch.isfinite(loss):
            raise TrainingStopped(nan_message(self.state.step, self.preset))
        self.accelerator.backward(self.scaler.scale(loss))
        return loss.detach().float().item()

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
        self.unet.train()
        for hook in self.hooks:
            hook.on_start(self)
        micro_losses: list[float] = []
        batches = self._batches()
        t0, first_step, skips_in_a_row = time.perf_counter(), st.step, 0
        stopped = None
        try:
            while st.step < p.max_steps:
                i, batch = next(batches)
                with acc.accumulate(self.unet):
                    micro_losses.append(self._micro_step(batch))
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
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps({"event": event, "step": self.state.step, **fields}) + "\n")


# ---------------------------------------------------------------- hooks

class Hook:
    def on_start(self, trainer: Trainer) -> None: ...

    def on_step(self, trainer: Trainer) -> None: ...

    def on_end(self, trainer: Trainer) -> None: ...


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


class LogHook(Hook):
    """tqdm bar (step, loss, lr, it/s, ETA) and log.jsonl; on resume, steps after the checkpoint are dropped from
    the log so no step appears twice. Draws loss_curve.png at the end."""

    def on_start(self, t: Trainer) -> None:
        path = t.run_dir / "log.jsonl"
        # Rows up to the resumed checkpoint stay; events logged after it (at its step or later) are replayed.
        kept = [r for r in read_log(t.run_dir)
                if ("loss" in r and r.get("step", 0) <= t.state.step) or r.get("step", 0) < t.state.step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        self.bar = tqdm(total=t.preset.max_steps, initial=t.state.step, desc=t.preset.name, unit="step")
        self.t0 = time.perf_counter()

    def on_step(self, t: Trainer) -> None:
        st = t.state
        row = {"step": st.step, "loss": st.last_loss, "lr": st.last_lr, "grad_norm": st.last_grad_norm,
               "epoch": st.epoch, "skipped_steps": st.skipped_steps, "time": round(time.perf_counter() - self.t0, 3)}
        with open(t.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        postfix = dict(loss=f"{st.last_loss:.4f}", lr=f"{st.last_lr:.2e}")
        if st.skipped_steps:
            postfix["fp16_skipped"] = st.skipped_steps
        self.bar.set_postfix(postfix)
        self.bar.update(1)

    def on_end(self, t: Trainer) -> None:
        self.bar.close()
        plot_loss(t.run_dir)


class CheckpointHook(Hook):
    """Checkpoint every `preset.checkpoint_every` steps and at the end."""

    def on_step(self, t: Trainer) -> None:
        if t.state.step % t.preset.checkpoint_every == 0 or t.state.step == t.preset.max_steps:
            t.save_checkpoint()


class ExportHook(Hook):
    """At the end, export the trained weights into final/ in the method's formats."""

    def on_end(self, t: Trainer) -> None:
        self.files = t.method.export(t.c, t.run_dir / "final")
        print("exported: " + ", ".join(str(f) for f in self.files))


class SampleHook(Hook):
    """Every `preset.sample_every` steps and at the end, images from the fixed prompts and seeds go to samples/
    (and inline in a notebook). Sampling runs under a forked RNG so it never changes the training randomness."""

    def __init__(self, seeds: tuple[int, ...] = (0,), show: bool = True):
        self.seeds, self.show = seeds, show

    def on_step(self, t: Trainer) -> None:
        if t.preset.sample_every and t.state.step % t.preset.sample_every == 0:
            self.sample(t)

    def on_end(self, t: Trainer) -> None:
        if not (t.preset.sample_every and t.state.step % t.preset.sample_every == 0):
            self.sample(t)

    def sample(self, t: Trainer) -> Path | None:
        """Sample images under a forked RNG. The VAE and text encoders come back to the GPU only for this (the
        training state stays resident); at ≥ 768 px images are drawn one at a time with VAE slicing/tiling."""
        from .models import pipeline_from_components
        from .sampling import generate, image_grid, prompt_seed_pairs
        if not t.preset.sample_prompts or not t.c.text_encoders:
            return None
        prompts, seeds = prompt_seed_pairs(list(t.preset.sample_prompts), list(self.seeds))
        device = t.accelerator.device
        release_cuda_cache()  # the last step's activations and gradients are gone: give their blocks back
        try:
            with forked_rng(device), on_device([*t.c.text_encoders, t.c.vae], device):
                t.unet.eval()
                pipe = pipeline_from_components(t.c, t.accelerator.unwrap_model(t.unet))
                images = generate(pipe, prompts, seeds, steps=t.preset.sample_steps, height=t.preset.resolution,
                                  width=t.preset.resolution)
        except torch.OutOfMemoryError:
            oom = True
        else:
            oom = False
        finally:
            t.unet.train()
        if oom:  # raised outside the handler: the exception keeps no sampling tensors alive
            raise TrainingStopped(sampling_oom_message(t.preset, t.state.step))
        path = t.run_dir / "samples" / f"step-{t.state.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid = image_grid(images, rows=1, cols=len(images), labels=prompts, title=f"step {t.state.step}")
        grid.save(path)
        if self.show:
            _display(grid)
        return path


def default_hooks(preset: Preset) -> list[Hook]:
    return [LogHook(), CheckpointHook(), SampleHook(), ExportHook()]


def _display(image) -> None:
    try:
        from IPython import get_ipython
        from IPython.display import display
        if get_ipython() is not None:
            display(image)
    except ImportError:
        pass


def plot_loss(run_dir: Path, smooth: int = 10) -> Path | None:
    """loss_curve.png from log.jsonl: raw per-step loss and a moving average."""
    rows = [r for r in read_log(run_dir) if "loss" in r]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    k = max(1, min(smooth, len(losses) // 5 or 1))
    avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, avg, label=f"moving average ({k})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion MSE")
    ax.legend()
    fig.tight_layout()
    path = Path(run_dir) / "loss_curve.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

