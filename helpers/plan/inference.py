"""The T4 plan of notebook 05: which models are resident in each phase of the evaluation (GiB each, against the
14.74 GiB torch sees on a Colab T4), how long the evaluation takes, how many prompts and seeds fit a time budget,
and whether the explorer may keep SD1.5 and SDXL loaded together.

SD1.5, SDXL, the ViT-L-14 scorer and PickScore's CLIP-H do not all fit at once with room to sample, so the
evaluation runs in phases and frees each model before the next one loads:
  sd15       the SD1.5 pipeline with every SD1.5 run loaded into it, drawing every variant's images
  sdxl       the SDXL pipeline (fp16-fix VAE) with its runs, drawing
  clip       open_clip ViT-L-14 scoring every image
  pickscore  PickScore (CLIP-H) scoring every image
Weights: exact parameter counts of the real architectures on the meta device (helpers.plan.meta) × 2 B (fp16). A
loaded run adds its own tensors: crossattn keeps its tuned attn2 weights in fp32, LoRA its matrices in fp16.
Sampling room: helpers.plan.memory.inference_peak_gib at the phase's size (one image per call from 768 px, VAE sliced and
tiled, as helpers.generate.sampling draws). Scoring room: INFERENCE_SLACK × one batch's MLP activations. The error band, the
CUDA overhead and the 1 GiB margin are helpers.plan.memory's. Time: generation by helpers.plan.timing (UNet FLOPs × the
calibrated T4 speed), scoring by the scorers' FLOPs counted the same way: estimates, not measurements.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ..core.presets import Preset, get_preset
from .calibration import error_band
from .meta import (
    GIB,
    SCORERS,
    crossattn_parameter_count,
    full_size_scorer,
    full_size_unet,
    lora_parameter_count,
    make_trainable,
    safety_checker_parameters,
    weights_gib,
)
from .model import (
    COLAB_RAM_GIB,
    CUDA_OVERHEAD_GIB,
    HAS_FP16_VARIANT,
    INFERENCE_SLACK,
    MARGIN_GIB,
    T4_USABLE_GIB,
    host_ram_gib,
    inference_peak_gib,
    load_ram_gib,
    prior_source_gib,
)
from .timing import RANGE, duration, generation_seconds, scorer_tflop, seconds_per_tflop, setup_seconds, span

NATIVE_SIZE = {"sd15": 512, "sdxl": 1024}  # each family's own size: what a base draws at when asked for size 0
BASE_PRESETS = {"sd15": "sd15_xattn_cifar10", "sdxl": "sdxl_lora_naruto_1024"}  # what loads each base pipeline
#                                                                               (helpers.studio.catalog.BASES)
SCORE_BATCH = 32  # images per scorer call (helpers.evaluation.score_images)


def pipeline_gib(family: str, safety_checker: bool = True) -> float:
    """fp16 weights of a family's inference pipeline as helpers.generate.sampling.load_pipeline loads it: SD1.5 with its
    safety checker when the path asks for one (helpers.studio.engine does)."""
    return weights_gib(family) + (weights_gib("safety_checker") if safety_checker and family == "sd15" else 0.0)


def pipeline_ram_gib(family: str, safety_checker: bool = True) -> float:
    """Peak host RAM while a family's inference pipeline loads one component at a time (helpers.plan.memory's rule),
    SD1.5's safety checker included when the path loads it."""
    base = get_preset(BASE_PRESETS[family], "t4")
    checker = safety_checker and family == "sd15"
    return max(host_ram_gib(base), load_ram_gib(safety_checker_parameters(), HAS_FP16_VARIANT[base.model]) * checker)


@lru_cache(maxsize=None)
def _run_gib(family: str, method: str, rank: int, targets: tuple, clip_model: str | None) -> float:
    unet = full_size_unet(family)
    if method == "crossattn":
        return 4 * crossattn_parameter_count(unet) / GIB
    if method == "lora":
        return 2 * lora_parameter_count(unet, rank, targets) / GIB
    if method == "ip_adapter":  # its LoRA and adapter, as the method's own setup builds them
        return 2 * sum(make_trainable(unet, method, rank, targets, 0.0, clip_model)) / GIB
    return 0.0


def run_gib(preset: Preset) -> float:
    """What one loaded run adds to its pipeline on the GPU (0 for a method this plan does not know)."""
    return _run_gib(preset.family, preset.method, preset.lora_rank, tuple(preset.lora_targets), preset.clip_model)


def scoring_room_gib(model: str, batch: int = SCORE_BATCH) -> float:
    """INFERENCE_SLACK × the largest live tensors of one batch: the MLP's input, hidden and output (fp16)."""
    _, _, vision, _ = SCORERS[model]
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    return INFERENCE_SLACK * 2 * batch * tokens * (2 * vision["hidden_size"] + vision["intermediate_size"]) / GIB


def scoring_seconds(model: str, images: int) -> float:
    return images * scorer_tflop(model) * seconds_per_tflop()


# ---------------------------------------------------------------- the evaluation, phase by phase

@dataclass
class Phase:
    name: str  # "sd15", "sdxl", "clip", "pickscore" or "all at once"
    resident: str  # what is on the GPU, in words
    gib: float  # planned peak: weights + working room + CUDA overhead
    seconds: float
    ram_gib: float = 0.0  # peak host RAM while this phase loads its models, one component at a time

    @property
    def fits(self) -> bool:
        return self.gib * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB


SCORER_FILE_BYTES = {"clip": 4, "pickscore": 6}  # host bytes per weight while a scorer loads: open_clip reads the
#   fp32 state dict into memory and copies it into the GPU model (4 B); PickScore is fp32 files converted to an fp16
#   copy by transformers (4 + 2 B, helpers.plan.memory.load_ram_gib)


def scorer_ram_gib(scorer: str) -> float:
    n = sum(p.numel() for p in full_size_scorer(scorer).parameters())
    return load_ram_gib(n, True) + (SCORER_FILE_BYTES[scorer] - 2) * n / GIB


def evaluation_plan(runs: dict[str, list[Preset]], images: dict[str, int], sizes: dict[str, int],
                    steps: dict[str, int], pickscore: bool = True, safety_checker: bool = True,
                    sources: dict[str, list[Preset]] | None = None) -> list[Phase]:
    """The phases in the order the notebook runs them (first a fresh VM's installs and downloads), then the
    hypothetical "all at once" row. `runs`: run presets
    per family that is drawn; `images`: images drawn per family (every variant × prompt × seed); `sources`: per
    family, the priors an image-conditioned run draws through (their CLIP text tower, weights, one prediction
    batch); `safety_checker`: SD1.5 loads its checker (helpers.studio.engine does)."""
    models = [m for f in runs for m in (f, "safety_checker")[:1 + (safety_checker and f == "sd15")]]
    models += ["clip"] + ["pickscore"] * pickscore + ["clip_l14"] * any((sources or {}).values())
    seconds, what = setup_seconds(models)  # a fresh Colab VM: only Drive lasts, every model downloads again
    phases, total_images = [Phase("setup", what, 0.0, seconds)], sum(images.values())
    for family in runs:
        extra = sum(run_gib(p) for p in runs[family])
        prompt_sources = (sources or {}).get(family, [])
        held = sum(prior_source_gib(p) for p in prompt_sources)
        checker = safety_checker and family == "sd15"
        room = inference_peak_gib(family, sizes[family], 1 if sizes[family] >= 768 else 4, False, True, True)
        ram = pipeline_ram_gib(family, checker)
        resident = (f"{family} pipeline{' + safety checker' if checker else ''} + {len(runs[family])} run(s) "
                    f"({extra:.2f} GiB)" + (f" + {len(prompt_sources)} prior(s) ({held:.2f} GiB)" if held else "")
                    + f", drawing {images[family]} images at {sizes[family]} px")
        phases.append(Phase(family, resident, pipeline_gib(family, checker) + extra + held + room + CUDA_OVERHEAD_GIB,
                            generation_seconds(family, sizes[family], steps[family], images[family]), ram))
    for scorer in ("clip", "pickscore") if pickscore else ("clip",):
        phases.append(Phase(scorer, f"{SCORERS[scorer][0]} scoring {total_images} images in batches of "
                                    f"{SCORE_BATCH}", weights_gib(scorer) + scoring_room_gib(scorer)
                            + CUDA_OVERHEAD_GIB, scoring_seconds(scorer, total_images), scorer_ram_gib(scorer)))
    everything = sum(p.gib - CUDA_OVERHEAD_GIB for p in phases if p.gib) + CUDA_OVERHEAD_GIB
    phases.append(Phase("all at once", "every model above resident together", everything, 0.0,
                        max(p.ram_gib for p in phases)))
    return phases


def plan_text(phases: list[Phase]) -> str:
    band = error_band()
    rows = [(p.name, *((f"{p.gib:.1f}", f"{p.gib * (1 + band) + MARGIN_GIB:.1f}", "fits" if p.fits else "DOES NOT FIT",
                        f"{p.ram_gib:.1f}") if p.gib else ("", "", "", "")),
             span(p.seconds, "download" if p.name == "setup" else "extrapolated") if p.seconds else "", p.resident)
            for p in phases]
    header = ("phase", "GiB", "+band+margin", "verdict", "RAM GiB", "time", "resident")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    total = sum(p.seconds for p in phases)
    low = sum(p.seconds * RANGE["download" if p.name == "setup" else "extrapolated"][0] for p in phases)
    high = sum(p.seconds * RANGE["download" if p.name == "setup" else "extrapolated"][1] for p in phases)
    return "\n".join(lines + [f"T4: {T4_USABLE_GIB} GiB usable, band ±{100 * band:.0f}%, margin {MARGIN_GIB:.0f} "
                              f"GiB; RAM: peak host RAM while the phase loads, one component at a time (Colab: "
                              f"{COLAB_RAM_GIB} GiB); phases run one after another (each model freed before the "
                              f"next): ≈ {duration(total)} in all ({duration(low)}–{duration(high)}; times: "
                              "helpers.plan.timing, anchored on a published T4 SDXL speed, downloads at ≈ 40 MB/s)"])


LADDER = ((10, 4), (8, 4), (8, 3), (6, 3), (5, 3), (4, 3), (4, 2), (3, 2), (2, 2), (2, 1), (1, 1))


def choose_counts(runs: dict[str, list[Preset]], sets: dict[str, int], sizes: dict[str, int],
                  steps: dict[str, int], budget_seconds: float = 1800, pickscore: bool = True,
                  safety_checker: bool = True, sources: dict[str, list[Preset]] | None = None
                  ) -> tuple[int, int, list[Phase]]:
    """The largest (prompts per set, seeds) of LADDER whose drawing and scoring take at most `budget_seconds` on a T4
    (a fresh VM's installs and downloads come on top), and that plan. `sets`: prompt sets per family; every family
    draws 1 + len(runs) variants."""
    for prompts, seeds in LADDER:
        images = {f: (1 + len(runs[f])) * sets[f] * prompts * seeds for f in runs}
        phases = evaluation_plan(runs, images, sizes, steps, pickscore, safety_checker, sources)
        if sum(p.seconds for p in phases if p.name != "setup") <= budget_seconds:  # the downloads come on top
            return prompts, seeds, phases
    return prompts, seeds, phases


# ---------------------------------------------------------------- the explorer

def explorer_gib(families, sizes: dict[str, int] | None = None, images_per_call: int = 1,
                 safety_checker: bool = True) -> float:
    """Planned peak with the pipelines of `families` resident together (SD1.5 with its safety checker when the
    engine loads one), the ViT-L-14 scorer and the largest sampling room among them (at `sizes`, default
    NATIVE_SIZE)."""
    families = list(dict.fromkeys(families))
    sizes = {**NATIVE_SIZE, **(sizes or {})}
    room = max(inference_peak_gib(f, sizes[f], images_per_call if sizes[f] < 768 else 1, False, True, True)
               for f in families)
    return sum(pipeline_gib(f, safety_checker) for f in families) + weights_gib("clip") + room + CUDA_OVERHEAD_GIB


def explorer_fits(families, sizes: dict[str, int] | None = None, images_per_call: int = 1,
                  safety_checker: bool = True) -> bool:
    """Whether these pipelines (plus scorer and sampling room) fit a T4 with the band and 1 GiB to spare."""
    gib = explorer_gib(families, sizes, images_per_call, safety_checker)
    return gib * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB
