"""The T4 plan of notebook 05: which models are resident in each phase of the evaluation (GiB each, against the
14.74 GiB torch sees on a Colab T4), how long the evaluation takes, how many prompts and seeds fit a time budget,
and whether the explorer may keep SD1.5 and SDXL loaded together.

SD1.5, SDXL, the ViT-L-14 scorer and PickScore's CLIP-H do not all fit at once with room to sample, so the
evaluation runs in phases and frees each model before the next one loads:
  sd15       the SD1.5 pipeline with every SD1.5 run loaded into it, drawing every variant's images
  sdxl       the SDXL pipeline (fp16-fix VAE) with its runs, drawing
  clip       open_clip ViT-L-14 scoring every image
  pickscore  PickScore (CLIP-H) scoring every image
Weights: exact parameter counts of the real architectures on the meta device (helpers.memory_meta) × 2 B (fp16). A
loaded run adds its own tensors: crossattn keeps its tuned attn2 weights in fp32, LoRA its matrices in fp16.
Sampling room: helpers.memory.inference_peak_gib at the phase's size (one image per call from 768 px, VAE sliced and
tiled, as helpers.sampling draws). Scoring room: INFERENCE_SLACK × one batch's MLP activations. The error band, the
CUDA overhead and the 1 GiB margin are helpers.memory's. Time: generation by helpers.timing (UNet FLOPs × the
calibrated T4 speed), scoring by the scorers' FLOPs counted the same way: estimates, not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .configs import CLIP_H14_TEXT, CLIP_H14_VISION, CLIP_L14_TEXT, CLIP_L14_VISION
from .memory import (CUDA_OVERHEAD_GIB, INFERENCE_SLACK, MARGIN_GIB, T4_USABLE_GIB, error_band,
                     inference_peak_gib)
from .memory_meta import GIB, crossattn_parameter_count, full_size_unet, lora_parameter_count, parameter_counts
from .presets import Preset

SCORERS = {"clip": ("open_clip ViT-L-14 (openai)", CLIP_L14_TEXT, CLIP_L14_VISION, 768),
           "pickscore": ("PickScore v1 (CLIP-H-14)", CLIP_H14_TEXT, CLIP_H14_VISION, 1024)}
NATIVE_SIZE = {"sd15": 512, "sdxl": 1024}  # the explorer's largest usual size per family
SCORE_BATCH = 32  # images per scorer call (helpers.evaluation.score_images)


@lru_cache(maxsize=None)
def _scorer_model(name: str):
    from transformers import CLIPConfig, CLIPModel
    _, text, vision, dim = SCORERS[name]
    with torch.device("meta"):
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=dim))


def weights_gib(model: str) -> float:
    """fp16 weights of "sd15" / "sdxl" (whole pipeline) or a scorer ("clip", "pickscore"), GiB."""
    if model in SCORERS:
        return 2 * sum(p.numel() for p in _scorer_model(model).parameters()) / GIB
    return 2 * sum(parameter_counts(model).values()) / GIB


@lru_cache(maxsize=None)
def _run_gib(family: str, method: str, rank: int, targets: tuple) -> float:
    unet = full_size_unet(family)
    if method == "crossattn":
        return 4 * crossattn_parameter_count(unet) / GIB
    if method == "lora":
        return 2 * lora_parameter_count(unet, rank, targets) / GIB
    return 0.0


def run_gib(preset: Preset) -> float:
    """What one loaded run adds to its pipeline on the GPU (0 for a method this plan does not know)."""
    return _run_gib(preset.family, preset.method, preset.lora_rank, tuple(preset.lora_targets))


def scoring_room_gib(model: str, batch: int = SCORE_BATCH) -> float:
    """INFERENCE_SLACK × the largest live tensors of one batch: the MLP's input, hidden and output (fp16)."""
    _, _, vision, _ = SCORERS[model]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return INFERENCE_SLACK * 2 * batch * tokens * (2 * vision["hidden_size"] + vision["intermediate_size"]) / GIB


@lru_cache(maxsize=None)
def scorer_tflop(model: str) -> float:
    """TFLOPs to score one image: the vision tower at its input size (texts are encoded once per prompt)."""
    from torch.utils.flop_counter import FlopCounterMode
    clip = _scorer_model(model).half()
    size = SCORERS[model][2]["image_size"]
    with torch.device("meta"):
        pixels = torch.randn(1, 3, size, size, dtype=torch.float16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    return counter.get_total_flops() / 1e12


def scoring_seconds(model: str, images: int) -> float:
    from .timing import seconds_per_tflop
    return images * scorer_tflop(model) * seconds_per_tflop()


# ---------------------------------------------------------------- the evaluation, phase by phase

@dataclass
class Phase:
    name: str  # "sd15", "sdxl", "clip", "pickscore" or "all at once"
    resident: str  # what is on the GPU, in words
    gib: float  # planned peak: weights + working room + CUDA overhead
    seconds: float

    @property
    def fits(self) -> bool:
        return self.gib * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB


def evaluation_plan(runs: dict[str, list[Preset]], images: dict[str, int], sizes: dict[str, int],
                    steps: dict[str, int], pickscore: bool = True) -> list[Phase]:
    """The phases in the order the notebook runs them, then the hypothetical "all at once" row. `runs`: run presets
    per family that is drawn; `images`: images drawn per family (every variant × prompt × seed)."""
    from .timing import generation_seconds
    phases, total_images = [], sum(images.values())
    for family in runs:
        extra = sum(run_gib(p) for p in runs[family])
        room = inference_peak_gib(family, sizes[family], 1 if sizes[family] >= 768 else 4, False, True, True)
        phases.append(Phase(family, f"{family} pipeline + {len(runs[family])} run(s) ({extra:.2f} GiB), drawing "
                                    f"{images[family]} images at {sizes[family]} px",
                            weights_gib(family) + extra + room + CUDA_OVERHEAD_GIB,
                            generation_seconds(family, sizes[family], steps[family], images[family])))
    for scorer in ("clip", "pickscore") if pickscore else ("clip",):
        phases.append(Phase(scorer, f"{SCORERS[scorer][0]} scoring {total_images} images in batches of "
                                    f"{SCORE_BATCH}", weights_gib(scorer) + scoring_room_gib(scorer)
                            + CUDA_OVERHEAD_GIB, scoring_seconds(scorer, total_images)))
    everything = sum(p.gib - CUDA_OVERHEAD_GIB for p in phases) + CUDA_OVERHEAD_GIB
    phases.append(Phase("all at once", "every model above resident together", everything, 0.0))
    return phases


def plan_text(phases: list[Phase]) -> str:
    from .timing import duration
    band = error_band()
    rows = [(p.name, f"{p.gib:.1f}", f"{p.gib * (1 + band) + MARGIN_GIB:.1f}", "fits" if p.fits else "DOES NOT FIT",
             duration(p.seconds) if p.seconds else "", p.resident) for p in phases]
    header = ("phase", "GiB", "+band+margin", "verdict", "time", "resident")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    total = sum(p.seconds for p in phases)
    return "\n".join(lines + [f"T4: {T4_USABLE_GIB} GiB usable, band ±{100 * band:.0f}%, margin {MARGIN_GIB:.0f} "
                              f"GiB; phases run one after another (each model freed before the next): about "
                              f"{duration(total)} in all"])


LADDER = ((10, 4), (8, 4), (8, 3), (6, 3), (5, 3), (4, 3), (4, 2), (3, 2), (2, 2), (2, 1), (1, 1))


def choose_counts(runs: dict[str, list[Preset]], sets: dict[str, int], sizes: dict[str, int],
                  steps: dict[str, int], budget_seconds: float = 1800, pickscore: bool = True
                  ) -> tuple[int, int, list[Phase]]:
    """The largest (prompts per set, seeds) of LADDER whose plan takes at most `budget_seconds` on a T4, and that
    plan. `sets`: prompt sets per family; every family draws 1 + len(runs) variants."""
    for prompts, seeds in LADDER:
        images = {f: (1 + len(runs[f])) * sets[f] * prompts * seeds for f in runs}
        phases = evaluation_plan(runs, images, sizes, steps, pickscore)
        if sum(p.seconds for p in phases) <= budget_seconds:
            return prompts, seeds, phases
    return prompts, seeds, phases


# ---------------------------------------------------------------- the explorer

def explorer_gib(families, sizes: dict[str, int] | None = None, images_per_call: int = 1) -> float:
    """Planned peak with the pipelines of `families` resident together, the ViT-L-14 scorer and the largest
    sampling room among them (at `sizes`, default NATIVE_SIZE)."""
    families = list(dict.fromkeys(families))
    sizes = {**NATIVE_SIZE, **(sizes or {})}
    room = max(inference_peak_gib(f, sizes[f], images_per_call if sizes[f] < 768 else 1, False, True, True)
               for f in families)
    return sum(weights_gib(f) for f in families) + weights_gib("clip") + room + CUDA_OVERHEAD_GIB


def explorer_fits(families, sizes: dict[str, int] | None = None, images_per_call: int = 1) -> bool:
    """Whether these pipelines (plus scorer and sampling room) fit a T4 with the band and 1 GiB to spare."""
    return explorer_gib(families, sizes, images_per_call) * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB


__all__ = ["SCORERS", "NATIVE_SIZE", "weights_gib", "run_gib", "scoring_room_gib", "scorer_tflop",
           "scoring_seconds", "Phase", "evaluation_plan", "plan_text", "choose_counts", "explorer_gib",
           "explorer_fits"]
