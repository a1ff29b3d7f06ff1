"""The T4 plan of a preset, as notebooks 00, 02, 03 and 04 print it: the memory model's phases
(helpers.plan.model) with its error band (helpers.plan.calibration) and a verdict: a preset fits when its peak +
band + MARGIN_GIB ≤ T4_USABLE_GIB."""
from __future__ import annotations

from ..core.presets import Preset
from ..data.caches import CACHE_ENCODE_PIXELS
from .calibration import error_band
from .model import (
    COLAB_RAM_GIB,
    MARGIN_GIB,
    PRIOR_METHODS,
    T4_USABLE_GIB,
    prior_training_plan,
    Table,
    text_table,
    training_plan,
)


def estimate_vram(preset: Preset, encode_pixels: int = CACHE_ENCODE_PIXELS) -> dict:
    """Every term of the T4 plan of `preset` (its t4 form): GiB by part and by phase, peak, band, spare and verdict,
    host RAM while loading and checkpoint MB (helpers.plan.model says what each phase holds). `encode_pixels` sets
    the latent-cache batch (images × px² per VAE call) to try another caching rule."""
    if preset.profile != "t4":
        raise ValueError(f"memory estimates describe the real models; pass the t4 form of {preset.name!r} "
                         f"(get_preset({preset.name!r}, 't4')), not its {preset.profile!r} form")
    if preset.optimizer not in ("adamw", "adamw8bit"):
        raise ValueError(f"unknown optimizer {preset.optimizer!r}; known: ['adamw', 'adamw8bit']")
    plan = (prior_training_plan if preset.method in PRIOR_METHODS else training_plan)(preset, encode_pixels)
    band = error_band() * plan["total_gib"]
    spare = T4_USABLE_GIB - plan["total_gib"] - band
    return {**plan, "band_gib": band, "spare_gib": spare, "usable_gib": T4_USABLE_GIB,
            "verdict": "fits" if spare >= MARGIN_GIB else "does not fit"}


def memory_plan_table(presets, encode_pixels: int = CACHE_ENCODE_PIXELS) -> str:
    """A fixed-width plan (for notebook 00): GiB by part and by phase, peak vs T4_USABLE_GIB with band and spare,
    host RAM while loading, MB per checkpoint (× kept on Drive)."""
    header = ("preset", "unet", "text", "vae", "clip", "train+opt", "activ", "caching", "training", "sampling",
              "peak", "band", "spare", "RAM load", "ckpt MB", "verdict")
    rows = []
    for p in presets:
        e = estimate_vram(p, encode_pixels)
        part, ph = e["parts_gib"], e["phases_gib"]
        rows.append((p.name, f"{part['unet']:.2f}", f"{part['text_encoders']:.2f}", f"{part['vae']:.2f}",
                     f"{part['clip']:.2f}", f"{e['trainable_gib'] + e['grads_gib'] + e['optimizer_gib']:.2f}",
                     f"{e['activation_gib']:.2f}", f"{ph['caching']:.1f}", f"{ph['training']:.1f}",
                     f"{ph['sampling']:.1f}", f"{e['total_gib']:.1f} ({e['peak_phase']})", f"{e['band_gib']:.1f}",
                     f"{e['spare_gib']:.1f}", f"{e['host_ram_gib']:.1f} ({e['host_ram_no_variant_gib']:.1f})",
                     f"{e['checkpoint_mb']:.0f} × {p.keep_checkpoints}", e["verdict"]))
    return Table(header, rows, f"GiB on a T4 ({T4_USABLE_GIB} GiB usable); fits when peak + band + "
                 f"{MARGIN_GIB:.0f} GiB ≤ {T4_USABLE_GIB}. RAM load: peak host GiB with the fp16 variant files "
                 f"(without them) vs Colab's {COLAB_RAM_GIB} GiB. train+opt: fp32 trainable + grads + optimizer state.")
