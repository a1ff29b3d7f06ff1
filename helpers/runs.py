"""Finished runs: one naming rule for run folders, what a run records about itself, and loading runs back into ONE
stock pipeline whose adapters are switched per variant (a T4 cannot hold two copies of SDXL).

    pipe = sampling.load_pipeline(preset)
    runs = RunSet(pipe)
    tuned = runs.add(run_folder)                     # the run's final/ into the pipeline, switched off
    variants = [runs.variant(None), runs.variant(tuned), runs.variant(tuned, 0.5)]   # base, tuned, tuned ×0.5
"""
from __future__ import annotations

import json
import weakref
from dataclasses import asdict, fields
from pathlib import Path

from .adapters import make_method, restore_base_attn2
from .models import family_of
from .presets import Preset
from .runtime import run_dir
from .sampling import ImageEmbeds, Variant

RUN_FILE = "run.json"  # in final/: the preset the run was trained with


def run_name(preset: Preset, suffix: str = "") -> str:
    """The folder name of a run: preset, method and profile (`sd15_xattn_cifar10-lora-tiny`), and a suffix for a
    second run of the same preset with other settings (`…-tiny-b`)."""
    return f"{preset.name}-{preset.method}-{preset.profile}" + (f"-{suffix}" if suffix else "")


def run_folder(preset: Preset, root: Path | None = None, suffix: str = "") -> Path:
    """`<storage>/runs/<run_name(preset, suffix)>/`, created if needed."""
    return run_dir(run_name(preset, suffix), root)


def write_run_info(final_dir: Path, preset: Preset) -> Path:
    path = Path(final_dir) / RUN_FILE
    path.write_text(json.dumps({"preset": asdict(preset)}, indent=2))
    return path


def run_preset(folder: Path) -> Preset:
    """The preset a finished run was trained with (from final/run.json)."""
    path = Path(folder) / "final" / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run: {path} is missing (train it to the end first)")
    values = json.loads(path.read_text())["preset"]
    known = {f.name for f in fields(Preset)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    return Preset(**values)


def is_finished(folder: Path) -> bool:
    return (Path(folder) / "final" / RUN_FILE).is_file()


def load_snippet(folder: Path) -> str:
    """Three lines that load a finished LoRA run into stock diffusers (outside this project); an IP-Adapter run
    adds its adapter file and shows how to generate from an image embedding."""
    preset = run_preset(folder)
    cls = "StableDiffusionXLPipeline" if preset.family == "sdxl" else "StableDiffusionPipeline"
    final = str(Path(folder) / "final")
    lines = ("import diffusers, torch\n"
             f"pipe = diffusers.{cls}.from_pretrained({preset.model!r}, torch_dtype=torch.float16).to(\"cuda\")\n"
             f"pipe.load_lora_weights({final!r}, weight_name=\"pytorch_lora_weights.safetensors\")")
    if preset.method == "ip_adapter":
        lines += (f"\npipe.load_ip_adapter({final!r}, subfolder=\"\", weight_name=\"ip_adapter.safetensors\", "
                  "image_encoder_folder=None)\n"
                  f"# emb: (1, D) CLIP image embedding of {preset.clip_model}; zeros = the unconditional half\n"
                  "embeds = torch.cat([torch.zeros_like(emb), emb])[:, None].half().cuda()\n"
                  "image = pipe(\"a prompt\", ip_adapter_image_embeds=[embeds]).images[0]")
    return lines


def finished_runs(root: Path, under: str = "runs") -> list[Path]:
    """Run folders under `root/<under>` (default `runs`) with a final/run.json, sorted by name."""
    runs = Path(root) / under
    return sorted(p for p in runs.iterdir() if (p / "final" / RUN_FILE).is_file()) if runs.is_dir() else []


class RunSet:
    """Runs loaded into one pipeline; `use(name, scale)` switches to one of them (or to the base with None)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.loaded: dict[str, tuple] = {}  # name → (method, what its load returned)

    def add(self, folder: Path, name: str | None = None) -> str:
        folder = Path(folder)
        preset = run_preset(folder)
        name = name or folder.name
        if name in self.loaded:
            raise ValueError(f"a run named {name!r} is already loaded")
        family = family_of(self.pipe)
        if preset.family != family:
            raise ValueError(f"{folder.name} was trained on {preset.family}, this pipeline is {family}")
        method = make_method(preset)
        self.loaded[name] = (method, method.load(self.pipe, folder / "final", name))
        self.use(None)
        return name

    def use(self, name: str | None, scale: float = 1.0) -> None:
        """Switch the pipeline to run `name` at LoRA/weight scale `scale`; None = the base model."""
        restore_base_attn2(self.pipe.unet)
        for method, loaded in self.loaded.values():
            method.switch_off(self.pipe, loaded)
        if any(m.uses_lora for m, _ in self.loaded.values()):
            self.pipe.disable_lora()
        if name is None:
            return
        if name not in self.loaded:
            raise KeyError(f"no run {name!r} loaded; loaded: {sorted(self.loaded)}")
        method, loaded = self.loaded[name]
        method.apply(self.pipe, loaded, scale)

    def needs_image_embeds(self, name: str | None) -> bool:
        """Whether run `name` draws from CLIP image embeddings (notebook 04's IP-Adapter runs)."""
        return name is not None and self.loaded[name][0].needs_image_embeds

    def variant(self, name: str | None, scale: float = 1.0, label: str | None = None,
                image_embeds: ImageEmbeds | None = None) -> Variant:
        """A Variant for evaluation: `name` at `scale` (None = "base"). A run that `needs_image_embeds` takes
        `image_embeds`, where each image's embedding comes from: (prompts, seeds) → (N, D) (helpers.sampling), e.g.
        a prior (`Method.image_embeds_source`), true embeddings (helpers.ip_adapter.fixed_embeddings,
        nearest_true_embeds) or zeros for the caption alone (helpers.ip_adapter.caption_only); any other run takes
        none. The variant holds this RunSet weakly: once its pipeline is freed, `apply` says so."""
        if name is not None and name not in self.loaded:
            raise KeyError(f"no run {name!r} loaded; loaded: {sorted(self.loaded)}")
        label = label or ("base" if name is None else name if scale == 1.0 else f"{name} ×{scale:g}")
        if image_embeds is not None and not self.needs_image_embeds(name):
            raise ValueError(f"{label!r} takes no image embeddings (only image-conditioned runs do)")
        if image_embeds is None and self.needs_image_embeds(name):
            raise ValueError(f"run {name!r} is conditioned on CLIP image embeddings: pass image_embeds=(prompts, "
                             "seeds) → (N, D), e.g. a prior's embeddings or helpers.ip_adapter.caption_only(dim)")
        board = weakref.ref(self)  # a variant must not keep its pipeline alive: unloading frees the pipeline

        def apply(pipe) -> None:
            runs = board()
            if runs is None:
                raise RuntimeError(f"variant {label!r} cannot be applied: its pipeline was freed (e.g. by "
                                   "Engine.unload()); ask for the variant again")
            runs.use(name, scale)
        return Variant(label, apply, image_embeds)


__all__ = ["is_finished", "load_snippet", "run_name", "run_folder", "write_run_info", "run_preset", "finished_runs", "RunSet", "RUN_FILE"]
