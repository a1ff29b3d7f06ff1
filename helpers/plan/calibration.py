"""The memory model's error band: each published peak-memory report next to helpers.plan.model's prediction for the
same setting; the band is the worst relative error on the measured ("peak") reports ("max" reports are upper
bounds, only checked). Notebook 00 prints the table (`calibration_text`).
"""
from __future__ import annotations

from functools import lru_cache

from ..core.presets import get_preset
from . import model as m
from .meta import GIB


def _sd15_dreambooth(batch: int, checkpointing: bool, optimizer: str) -> float:
    # Full UNet fine-tune, 512 px, fp16 autocast, VAE and text encoder outputs cached and freed
    p = get_preset("sd15_xattn_cifar10", "t4", method="full", resolution=512, batch_size=batch,
                   gradient_checkpointing=checkpointing, optimizer=optimizer)
    return m.training_plan(p)["phases_gib"]["training"]


def _sdxl_blog(sliced: bool) -> float:
    # SDXL base fp16 + SDPA, 4 images/prompt at 1024², stock VAE upcast to fp32 for the decode;
    # max_memory_allocated excludes the CUDA context
    counts = m.parameter_counts("sdxl")
    weights = m.gib(2 * (counts["unet"] + counts["text_encoder"] + counts["text_encoder_2"]) + 4 * counts["vae"])
    decode = m.inference_peak_gib("sdxl", 1024, 4, True, sliced, False)
    return weights + decode + m.CUDA_OVERHEAD_GIB - m.CUDA_CONTEXT_GIB


def _sdxl_lora(**fields) -> float:
    return m.training_plan(get_preset("sdxl_lora_naruto_1024", "t4", **fields))["phases_gib"]["training"]


GB = 1e9 / GIB  # reports in GB (10^9 B) → GiB
# (family, source, setting, reported GiB, "peak" (a measurement: in the band) or "max" (an upper bound), model)
REPORTS = (
    ("sd15", "ShivamShrirao/diffusers examples/dreambooth/README.md (Tesla T4)",
     "full UNet 512px bs1 grad-ckpt 8-bit Adam: 9.92 GB", 9.92 * GB, "peak", lambda: _sd15_dreambooth(1, True,
                                                                                                        "adamw8bit")),
    ("sd15", "same table", "bs2 no grad-ckpt 8-bit Adam: 13.67 GB", 13.67 * GB, "peak",
     lambda: _sd15_dreambooth(2, False, "adamw8bit")),
    ("sd15", "same table", "bs1 grad-ckpt AdamW (no 8-bit): 15.79 GB", 15.79 * GB, "peak",
     lambda: _sd15_dreambooth(1, True, "adamw")),
    ("sdxl", "huggingface/blog simple_sdxl_optimizations.md (A100)", "fp16+SDPA, 4 × 1024² per call: 21.72 GB(iB)",
     21.72, "peak", lambda: _sdxl_blog(False)),
    ("sdxl", "same blog", "+ VAE slicing: 15.40 GB(iB)", 15.40, "peak", lambda: _sdxl_blog(True)),
    ("sdxl", "kohya-ss/sd-scripts README, SDXL training", "LoRA 1024px, cached latents + text outputs, "
     "grad-ckpt: 8 GB possible, 10 GB recommended", 10 * GB, "max", lambda: _sdxl_lora()),
    ("sdxl", "diffusers examples/dreambooth/README_sdxl.md (PR #4470)", "LoRA 1024px bs1 grad-ckpt 8-bit Adam fp16, "
     "VAE on GPU: < 16 GB", 16 * GB, "max", lambda: _sdxl_lora(cache_latents=False)),
)


def calibration_table() -> list[dict]:
    """Each published report next to this model's prediction for the same setting (GiB) and the relative error."""
    rows = []
    for family, source, setting, reported, kind, model in REPORTS:
        predicted = model()
        rows.append({"family": family, "source": source, "setting": setting, "reported_gib": reported,
                     "kind": kind, "predicted_gib": predicted, "error": predicted / reported - 1})
    return rows


@lru_cache(maxsize=1)
def error_band() -> float:
    """The worst relative error of the model on the measured ("peak") reports; bounds are only checked."""
    return max(abs(r["error"]) for r in calibration_table() if r["kind"] == "peak")


def calibration_text() -> str:
    rows = [(r["family"], r["setting"], f"{r['reported_gib']:.2f}" + (" max" if r["kind"] == "max" else ""),
             f"{r['predicted_gib']:.2f}", f"{100 * r['error']:+.0f}%", r["source"]) for r in calibration_table()]
    return m.Table(("model", "setting", "reported", "predicted", "error", "source"), rows,
                   f"error band = ±{100 * error_band():.0f}% (worst measured report; 'max' rows are upper bounds)")
