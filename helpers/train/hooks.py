"""Everything around the training loop, as hooks the Trainer calls at start, after each optimizer step and at the
end: logging (tqdm with ETA, log.jsonl, loss curve), checkpoints, sample grids and the final export. Only the main
process runs their side effects; with several processes the others wait at a barrier."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..core.files import write_folder
from ..core.precision import forked_rng
from ..core.presets import Preset
from ..generate.grids import image_grid, thumbnail_sheet
from ..generate.sampling import generate, prompt_seed_pairs
from ..methods.method import RunFacts
from ..methods.runs import write_run_info
from ..models import on_device, pipeline_from_components, release_cuda_cache
from .stops import TrainingStopped, append_log, sampling_oom_message

if TYPE_CHECKING:  # for types only: the loop imports this module
    from .loop import Trainer


class Hook:
    """Base: every method is optional. Hooks run in every process; side effects belong to the main one."""

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
        self.bar = None
        if not t.is_main_process:
            return
        path = t.run_dir / "log.jsonl"
        # Rows up to the resumed checkpoint stay; events logged after it (at its step or later) are replayed.
        kept = [r for r in read_log(t.run_dir)
                if ("loss" in r and r.get("step", 0) <= t.state.step) or r.get("step", 0) < t.state.step]
        if t.phase_changes:  # a continued run: the new phase starts here
            kept.append({"event": "phase", "step": t.state.step, **t.phase_changes})
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        # Redrawn at most once a second: a notebook gets one output message per redraw, and thousands of them
        # (one per step) overflow the kernel's output queue (nbval then loses the cell's end and times out).
        self.bar = tqdm(total=t.preset.max_steps, initial=t.state.step, desc=t.preset.name, unit="step",
                        mininterval=1.0)
        self.t0 = time.perf_counter()

    def on_step(self, t: Trainer) -> None:
        if self.bar is None:
            return
        st = t.state
        row = {"step": st.step, "loss": st.last_loss, "lr": st.last_lr, "grad_norm": st.last_grad_norm,
               "epoch": st.epoch, "skipped_steps": st.skipped_steps, "time": round(time.perf_counter() - self.t0, 3)}
        append_log(t.run_dir, row)  # a full disk: NoSpaceError naming the folder, and the run stops
        postfix = dict(loss=f"{st.last_loss:.4f}", lr=f"{st.last_lr:.2e}")
        if st.skipped_steps:
            postfix["fp16_skipped"] = st.skipped_steps
        self.bar.set_postfix(postfix, refresh=False)  # shown at the next redraw, not one redraw per step
        self.bar.update(1)

    def on_end(self, t: Trainer) -> None:
        if self.bar is None:
            return
        self.bar.close()
        plot_loss(t.run_dir)


class CheckpointHook(Hook):
    """Checkpoint every `preset.checkpoint_every` steps and at the end."""

    def on_step(self, t: Trainer) -> None:
        if t.state.step % t.preset.checkpoint_every == 0 or t.state.step == t.preset.max_steps:
            if t.is_main_process:
                t.save_checkpoint()
            t.accelerator.wait_for_everyone()


class ExportHook(Hook):
    """At the end, export the trained weights into final/ in the method's formats."""

    def on_end(self, t: Trainer) -> None:
        if t.is_main_process:
            final = t.run_dir / "final"
            names = []

            def fill(tmp: Path) -> None:  # final/ appears whole or not at all
                run = RunFacts(t.run_dir.name, t.state.step, getattr(t.dataset, "records", None))
                names.extend(path.name for path in t.method.export(t.c, tmp, run))
                names.append(write_run_info(tmp, t.preset).name)

            exported = sum(p.numel() * 4 for p in t.trainable.values())
            write_folder(final, fill, expected_bytes=2 * exported + 2**20)  # diffusers + kohya files
            self.files = [final / name for name in names]
            print("exported: " + ", ".join(str(f) for f in self.files))
        t.accelerator.wait_for_everyone()


class SampleHook(Hook):
    """Every `preset.sample_every` steps and at the end, images from the fixed prompts and seeds go to samples/ at
    full size, and a thumbnail sheet inline in a notebook. Sampling runs under a forked RNG so it never changes the
    training randomness."""

    def __init__(self, seeds: tuple[int, ...] = (0,), show: bool = True):
        self.seeds, self.show = seeds, show

    def on_step(self, t: Trainer) -> None:
        if t.preset.sample_every and t.state.step % t.preset.sample_every == 0:
            self.sample(t)

    def on_end(self, t: Trainer) -> None:
        # sample_every = 0 means no samples at all; a final sample only when the last step was not just sampled
        if t.preset.sample_every and t.state.step % t.preset.sample_every != 0:
            self.sample(t)

    def sample(self, t: Trainer) -> Path | None:
        """Sample images under a forked RNG. The VAE and text encoders come back to the GPU only for this (the
        training state stays resident); at ≥ 768 px images are drawn one at a time with VAE slicing/tiling."""
        if not t.preset.sample_prompts or not t.method.draws_images:
            return None
        if not t.is_main_process:
            t.accelerator.wait_for_everyone()
            return None
        prompts, seeds = prompt_seed_pairs(list(t.preset.sample_prompts), list(self.seeds))
        device = t.accelerator.device
        release_cuda_cache()  # the last step's activations and gradients are gone: give their blocks back
        try:
            with forked_rng(device), on_device([*t.c.text_encoders, t.c.vae], device):
                t.c.unet.eval()
                pipe = pipeline_from_components(t.c)
                embeds = t.method.sample_image_embeds(t, prompts, seeds) if t.method.needs_image_embeds else None
                images = generate(pipe, prompts, seeds, steps=t.preset.sample_steps, height=t.preset.resolution,
                                  width=t.preset.resolution, image_embeds=embeds, progress=False)
        except torch.OutOfMemoryError:
            oom = True
        else:
            oom = False
        finally:
            t.c.unet.train()
        t.accelerator.wait_for_everyone()
        if oom:  # raised outside the handler: the exception keeps no sampling tensors alive
            raise TrainingStopped(sampling_oom_message(t.preset, t.state.step))
        path = t.run_dir / "samples" / f"step-{t.state.step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        title = f"step {t.state.step}"
        image_grid(images, rows=1, cols=len(images), labels=prompts, title=title).save(path)  # full size, on Drive
        if self.show:  # a notebook keeps what it shows in its file: thumbnails, not six 1024 px images per sample
            _display(thumbnail_sheet(images, prompts, f"{title} · full size: {path}"))
        return path


def default_hooks(preset: Preset) -> list[Hook]:
    """Export comes before the end-of-run sample, so a failure while sampling never loses final/."""
    return [LogHook(), CheckpointHook(), ExportHook(), SampleHook()]


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
    return plot_losses({"loss": Path(run_dir)}, Path(run_dir) / "loss_curve.png", smooth)


def plot_losses(runs: dict[str, Path], path: Path, smooth: int = 10) -> Path | None:
    """Several runs' loss curves on one plot (raw, faint, and a moving average each); a continued run's new
    phases are marked with a dotted line. Runs without a log are left out; None when none has one."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    drawn = 0
    for label, run_dir in runs.items():
        log = read_log(run_dir)
        rows = [r for r in log if "loss" in r]
        if not rows:
            continue
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        k = max(1, min(smooth, len(losses) // 5 or 1))
        avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        line, = ax.plot(steps, avg, label=f"{label} (moving average of {k})")
        ax.plot(steps, losses, alpha=0.25, color=line.get_color())
        for phase in (r for r in log if r.get("event") == "phase"):
            ax.axvline(phase["step"], color=line.get_color(), linestyle=":", linewidth=1)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("diffusion MSE")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
