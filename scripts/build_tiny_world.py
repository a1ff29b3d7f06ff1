"""Pretrain the tiny world on a CPU, deterministically, and write it to helpers/tiny/assets/tiny_world/ (committed).

    python scripts/build_tiny_world.py                 # every stage, ≤ 30 min on 2 cores (two stages at a time)
    python scripts/build_tiny_world.py --stages sd15   # one stage again (earlier stages' results are reused)
    python scripts/build_tiny_world.py --quick         # 5 % of the steps: a smoke test of the whole build

Stages: `vae` (8× autoencoder on all three generated sets) and `clip` (text + vision, contrastive, on captioned
pictures of all three sets), then `sd15` and `sdxl` (UNets on the GENERAL set only, text from the frozen tiny CLIP,
latents from the VAE), then `export` (Hub-layout folders; the CLIP also in open_clip's layout). With `--jobs 2` (the
default) the two stages of each pair run side by side, one process and one torch thread each: on 2 cores that is
faster than one process with 2 threads, whose threads wait on each other. Stage results wait in outputs/tiny_build/
so a later stage can be re-run alone; the report (times, loss curves) goes to build_report/.
Every stage is seeded, so a rebuild on the same library versions gives the same weights.
CI never runs this: tests load the committed folders.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers.data.sources import CIFAR10_CLASSES  # noqa: E402
from helpers.tiny import pictures as td
from helpers.tiny import world as tiny

WORK = tiny.REPO_ROOT / "outputs" / "tiny_build"
REPORT = tiny.WORLD_DIR / "build_report"
# Steps per stage and what each sees per step (batch); --quick scales steps by 0.05.
STEPS = {"vae": 4500, "clip": 1500, "sd15": 3000, "sdxl": 2400}
BATCH = {"vae": 8, "clip": 96, "sd15": 32, "sdxl": 32}  # the VAE sees 64 px crops, the UNets whole 64 px pictures
# Peak learning rates (AdamW, warmup then cosine). At 2e-3 the VAE stalls at 17-20 dB (flat colours come back
# shifted); at 2e-4 it passes 23 dB in a quarter of the steps. The UNets sample better at 3e-4 than at 1e-3 or 1e-4.
LR = {"vae": 2e-4, "clip": 5e-4, "sd15": 3e-4, "sdxl": 3e-4}
WAVES = (("vae", "clip"), ("sd15", "sdxl"), ("export",))  # stages of a wave need only earlier waves' results
SNR_GAMMA = 5.0  # Min-SNR-γ loss weighting of the UNets (Hang et al. 2023): faster convergence at few steps
EMA_DECAY = 0.999  # the UNets are saved as the exponential moving average of their weights (smoother samples)
COUNTS = {"general": 2400, "cifar": 1500, "naruto": 300}  # pictures drawn for the build (seed td.BUILD_SEED)


# ---------------------------------------------------------------- small tools

def seed_all(offset: int) -> torch.Generator:
    random.seed(td.BUILD_SEED + offset)
    np.random.seed(td.BUILD_SEED + offset)
    torch.manual_seed(td.BUILD_SEED + offset)
    return torch.Generator().manual_seed(td.BUILD_SEED + offset)


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL RGB → float N×3×H×W in [-1, 1] (the diffusers convention)."""
    return torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images])).permute(0, 3, 1, 2) / 127.5 - 1


def cosine_lr(opt, step: int, total: int, peak: float, warmup: int = 30) -> None:
    lr = peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))
    for group in opt.param_groups:
        group["lr"] = lr


@functools.cache  # one drawing per process, whichever stages it runs
def draw_sets(quick: bool) -> dict:
    """Every picture the build trains on, drawn once from BUILD_SEED (held-out tests use another seed)."""
    scale = 0.25 if quick else 1.0
    rng = random.Random(td.BUILD_SEED)
    general = [td.draw_general(rng, 64) for _ in range(int(COUNTS["general"] * scale))]
    labels = [k % 10 for k in range(int(COUNTS["cifar"] * scale))]
    cifar = [td.draw_cifar(CIFAR10_CLASSES[k], rng, 32) for k in labels]
    naruto = [td.draw_naruto(rng, 128) for _ in range(int(COUNTS["naruto"] * scale))]
    return {"general": general, "cifar": (cifar, labels), "naruto": naruto}


class Curve:
    """Loss per step, kept for the report (JSON + PNG) and printed now and then."""

    def __init__(self, name: str, total: int):
        self.name, self.total, self.values, self.start = name, total, [], time.time()

    def add(self, step: int, loss: float) -> None:
        self.values.append(loss)
        if step % max(1, self.total // 10) == 0 or step == self.total - 1:
            recent = np.mean(self.values[-20:])
            print(f"  {self.name} step {step + 1}/{self.total} loss {recent:.4f} ({time.time() - self.start:.0f} s)",
                  flush=True)

    def summary(self) -> dict:
        return {"steps": self.total, "seconds": round(time.time() - self.start, 1),
                "final_loss": float(np.mean(self.values[-50:])), "curve": [round(v, 5) for v in self.values]}


# ---------------------------------------------------------------- stage: VAE

def train_vae(sets: dict, steps: int) -> dict:
    """Reconstruction (MSE + a little L1) with a tiny KL weight, as SD's VAE: almost an autoencoder whose latents
    still form a smooth Gaussian posterior. Trained on 64 px crops (it is convolutional) of every set at the sizes
    the notebooks use: general 64 px, CIFAR-like 32 → 64 px, Naruto-like 64 and 128 px."""
    gen = seed_all(1)
    cifar64 = [im.resize((64, 64), Image.BICUBIC) for im in sets["cifar"][0]]
    naruto = [im for im, _ in sets["naruto"]]
    pool = [to_tensor([im for im, _ in sets["general"]]), to_tensor(cifar64),
            to_tensor([im.resize((64, 64), Image.BICUBIC) for im in naruto]), to_tensor(naruto)]
    vae = tiny.make_vae(scaling_factor=1.0)
    with torch.no_grad():  # the posterior starts narrow (log σ² ≈ -8, σ ≈ 0.02): sampling it ≈ its mean from step 1
        vae.quant_conv.bias[vae.config.latent_channels:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=LR["vae"], weight_decay=0.0)
    curve = Curve("vae", steps)
    crop = 64
    for step in range(steps):
        cosine_lr(opt, step, steps, LR["vae"], warmup=50)
        source = pool[step % len(pool)]
        idx = torch.randint(len(source), (BATCH["vae"],), generator=gen)
        size = source.shape[-1]
        y, x = torch.randint(0, size - crop + 1, (2,), generator=gen).tolist()
        batch = source[idx, :, y:y + crop, x:x + crop]
        posterior = vae.encode(batch).latent_dist
        # Decoded from a SAMPLE of the posterior, as SD's VAE is trained, so σ stays small next to the latents'
        # spread: fine-tuning draws its training latents from the posterior (helpers.methods.diffusion.sample_latents, like
        # diffusers' scripts). Decoding only the mean would leave σ untrained at ≈ 1, and fine-tunes learn that noise.
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, batch) + 0.1 * F.l1_loss(recon, batch) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve.add(step, loss.item())
    # SD scales latents to unit variance: scaling_factor = 1 / std of the posterior means on the pretraining set.
    with torch.no_grad():
        latents = torch.cat([vae.encode(pool[0][i:i + 128]).latent_dist.mean for i in range(0, len(pool[0]), 128)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    vae.save_pretrained(WORK / "vae")
    with torch.no_grad():
        posterior = vae.encode(pool[0][:128]).latent_dist
    return {**curve.summary(), "latent_std": round(latents.std().item(), 4),
            "posterior_std": round(posterior.std.mean().item(), 4)}


# ---------------------------------------------------------------- stage: CLIP

def clip_pixels(images: list[Image.Image]) -> torch.Tensor:
    """What open_clip's preprocessing gives at 32 px: bicubic resize, then OpenAI's mean/std."""
    x = to_tensor([im.resize((tiny.CLIP_IMAGE_SIZE,) * 2, Image.BICUBIC) for im in images]) * 0.5 + 0.5
    mean, std = torch.tensor(tiny.CLIP_MEAN).view(3, 1, 1), torch.tensor(tiny.CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def train_clip(sets: dict, steps: int) -> dict:
    """Contrastive pretraining. A batch holds a third of each set; pairs with the same caption (or the same CIFAR
    class) count as matches in the soft targets, so repeated captions are not pushed apart."""
    gen = seed_all(2)
    rng = random.Random(td.BUILD_SEED + 2)
    tokenizer = tiny.tokenizer()
    clip = tiny.make_clip()
    cifar, labels = sets["cifar"]
    general_pix, cifar_pix = clip_pixels([im for im, _ in sets["general"]]), clip_pixels(cifar)
    naruto_pix = clip_pixels([im for im, _ in sets["naruto"]])
    general_caps, naruto_caps = [c for _, c in sets["general"]], [c for _, c in sets["naruto"]]
    opt = torch.optim.AdamW(clip.parameters(), lr=LR["clip"], weight_decay=0.1)
    curve = Curve("clip", steps)
    third = BATCH["clip"] // 3
    for step in range(steps):
        cosine_lr(opt, step, steps, LR["clip"])
        gi = torch.randint(len(general_caps), (third,), generator=gen).tolist()
        ci = torch.randint(len(cifar), (third,), generator=gen).tolist()
        ni = torch.randint(len(naruto_caps), (third,), generator=gen).tolist()
        texts = ([general_caps[i] for i in gi] + [td.cifar_clip_caption(CIFAR10_CLASSES[labels[i]], rng) for i in ci]
                 + [naruto_caps[i] for i in ni])
        groups = [general_caps[i] for i in gi] + [f"cifar/{labels[i]}" for i in ci] + [naruto_caps[i] for i in ni]
        pixels = torch.cat([general_pix[gi], cifar_pix[ci], naruto_pix[ni]])
        ids = tokenizer(texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
        img = F.normalize(clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output), dim=-1)
        txt = F.normalize(clip.text_projection(clip.text_model(input_ids=ids).pooler_output), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = torch.tensor([[a == b for b in groups] for a in groups], dtype=torch.float32)
        target = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.add(step, loss.item())
    clip.save_pretrained(WORK / "clip")
    return curve.summary()


# ---------------------------------------------------------------- stages: the two base UNets

@torch.no_grad()
def encode_general(sets: dict, family: str):
    """Cached training inputs of the general set: scaled VAE latents and the frozen tiny CLIP's text states."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(WORK / "vae")
    images = to_tensor([im for im, _ in sets["general"]])
    latents = torch.cat([vae.encode(images[i:i + 128]).latent_dist.mean for i in range(0, len(images), 128)])
    latents = latents * vae.config.scaling_factor
    captions = [c for _, c in sets["general"]]
    encoders = tiny.text_encoders(WORK / "clip", family)
    states, pooled = tiny.encode_prompts(encoders, tiny.tokenizer(), captions + [""], family)
    return latents, states, pooled


def train_unet(sets: dict, family: str, steps: int) -> dict:
    """Epsilon prediction on the general set with SD's noise schedule, Min-SNR-weighted; 10 % of captions dropped
    (SD1.5: the empty prompt's states, SDXL: zeros, as its pipeline's force_zeros_for_empty_prompt) so guidance
    works. The saved UNet is the EMA of the trained one."""
    from diffusers import DDPMScheduler
    gen = seed_all(3 if family == "sd15" else 4)
    latents, states, pooled = encode_general(sets, family)
    n = len(latents)
    empty_states, empty_pooled = states[n], pooled[n] if pooled is not None else None
    if family == "sdxl":
        empty_states, empty_pooled = torch.zeros_like(empty_states), torch.zeros_like(empty_pooled)
    unet = tiny.make_unet(family)
    ema = copy.deepcopy(unet).requires_grad_(False)
    schedule = DDPMScheduler(**{k: v for k, v in tiny.SD15_SCHEDULER.items()
                                if k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")})
    snr = schedule.alphas_cumprod / (1 - schedule.alphas_cumprod)
    opt = torch.optim.AdamW(unet.parameters(), lr=LR[family], weight_decay=0.01)
    curve = Curve(family, steps)
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]], dtype=torch.float32)
    for step in range(steps):
        cosine_lr(opt, step, steps, LR[family], warmup=50)
        idx = torch.randint(n, (BATCH[family],), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < 0.1
        text = torch.where(drop[:, None, None], empty_states, states[idx])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        extra = {}
        if family == "sdxl":
            extra = {"added_cond_kwargs": {"text_embeds": torch.where(drop[:, None], empty_pooled, pooled[idx]),
                                           "time_ids": time_ids.expand(len(idx), -1)}}
        pred = unet(schedule.add_noise(x0, noise, t), t, text, **extra).sample
        weight = snr[t].clamp(max=SNR_GAMMA) / snr[t]  # Min-SNR-γ for ε-prediction
        loss = (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # EMA with the usual warm-up, so early averages are not stuck at the random init
            decay = min(EMA_DECAY, (1 + step) / (10 + step))
            for averaged, p in zip(ema.parameters(), unet.parameters()):
                averaged.lerp_(p, 1 - decay)
        curve.add(step, loss.item())
    ema.save_pretrained(WORK / f"unet_{family}")
    return curve.summary()


# ---------------------------------------------------------------- report

def write_report(report: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    REPORT.mkdir(parents=True, exist_ok=True)
    path = REPORT / "report.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    seconds = {**old.get("stage_seconds", {}), **report.get("stage_seconds", {})}
    old.update(report)
    old["stage_seconds"] = seconds
    path.write_text(json.dumps(old, indent=1))
    stages = [s for s in STEPS if s in old]
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3))
    for ax, stage in zip(np.atleast_1d(axes), stages):
        curve = np.asarray(old[stage]["curve"])
        smooth = np.convolve(curve, np.ones(20) / 20, mode="valid") if len(curve) > 40 else curve
        ax.plot(curve, alpha=0.3)
        ax.plot(np.arange(len(smooth)) + (len(curve) - len(smooth)), smooth)
        ax.set_title(f"{stage}: {old[stage]['steps']} steps, {old[stage]['seconds']:.0f} s")
        ax.set_yscale("log")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(REPORT / "loss_curves.png", dpi=80)


def run_stage(stage: str, quick: bool) -> dict:
    """One stage in this process; its summary is also left in outputs/tiny_build/stage_<name>.json."""
    sets = draw_sets(quick) if stage != "export" else {}
    steps = max(5, int(STEPS.get(stage, 0) * (0.05 if quick else 1)))
    print(f"stage {stage}", flush=True)
    if stage == "vae":
        summary = train_vae(sets, steps)
    elif stage == "clip":
        summary = train_clip(sets, steps)
    elif stage in ("sd15", "sdxl"):
        summary = train_unet(sets, stage, steps)
    elif stage == "export":
        from tiny_world_export import export_all
        t0 = time.time()
        export_all(WORK)
        summary = {"seconds": round(time.time() - t0, 1)}
    else:
        raise SystemExit(f"unknown stage {stage!r}")
    (WORK / f"stage_{stage}.json").write_text(json.dumps(summary))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", default=[s for wave in WAVES for s in wave])
    parser.add_argument("--quick", action="store_true", help="5 %% of the steps (smoke test; do not commit)")
    parser.add_argument("--jobs", type=int, default=2, help="stages run side by side (one torch thread each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per stage process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one stage of a parallel wave
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    every = [s for wave in WAVES for s in wave]
    unknown = sorted(set(args.stages) - set(every))
    if unknown:
        raise SystemExit(f"unknown stages {unknown}; known: {every}")
    if args.child:
        run_stage(args.stages[0], args.quick)
        return
    start = time.time()
    report: dict = {}
    for wave in WAVES:
        chosen = [stage for stage in wave if stage in args.stages]
        if args.jobs > 1 and len(chosen) > 1:
            # One child process per stage; each prints its own progress and writes stage_<name>.json.
            command = [sys.executable, __file__, "--child", "--threads", str(args.threads)]
            children = [subprocess.Popen(command + ["--stages", stage] + (["--quick"] if args.quick else []))
                        for stage in chosen]
            if any([child.wait() != 0 for child in children]):
                raise SystemExit(f"a stage of {chosen} failed")
            for stage in chosen:
                report[stage] = json.loads((WORK / f"stage_{stage}.json").read_text())
        else:
            for stage in chosen:
                report[stage] = run_stage(stage, args.quick)
        for stage in chosen:
            report.setdefault("stage_seconds", {})[stage] = report[stage]["seconds"]
    if sorted(args.stages) == sorted(every):
        report["total_seconds"] = round(time.time() - start, 1)
    report.update(threads_per_stage=args.threads, jobs=args.jobs, quick=args.quick)
    print(f"total {time.time() - start:.0f} s")
    write_report(report)


if __name__ == "__main__":
    main()
