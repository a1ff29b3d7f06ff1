"""Finished runs: what a run records about itself (final/run.json), and loading runs back into ONE stock pipeline
whose adapters are switched per variant (a T4 cannot hold two copies of SDXL). Run folders are named by
helpers.core.paths.

    pipe = sampling.load_pipeline(preset)
    runs = RunSet(pipe)
    tuned = runs.add(run_folder)                     # the run's final/ into the pipeline, switched off
    variants = [runs.variant(None), runs.variant(tuned), runs.variant(tuned, 0.5)]   # base, tuned, tuned ×0.5
"""
from __future__ import annotations

import json
import weakref
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors import safe_open

from ..core import files
from ..core.notices import LORA_WITHOUT_TEXT_ENCODER, SECOND_ADAPTER, expected
from ..core.presets import Preset
from ..data.embeddings import embed_dim
from ..generate.sampling import ImageEmbeds, Variant
from ..models import family_of
from ..tiny.world import resolve
from .crossattn import CROSSATTN_FILE, attn2_parameters, base_attn2, read_crossattn_weights, restore_base_attn2
from .ip_adapter import IP_ADAPTER_FILE, read_ip_adapter
from .lora import LORA_FILE
from .registry import make_method

RUN_FILE = "run.json"  # in final/: the preset the run was trained with


class RunError(ValueError):
    """A finished run that cannot be used; the message names its folder and why, in one sentence."""


def write_run_info(final_dir: Path, preset: Preset) -> Path:
    path = Path(final_dir) / RUN_FILE
    path.write_text(json.dumps({"preset": asdict(preset)}, indent=2))
    return path


def run_preset(folder: Path) -> Preset:
    """The preset a finished run was trained with (from final/run.json); RunError when that file is not a run.json
    this version can use (not JSON, fields missing, values today's rules refuse)."""
    path = Path(folder) / "final" / RUN_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a finished run: {path} is missing (train it to the end first)")
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
    values = info.get("preset") if isinstance(info, dict) else None
    if not isinstance(values, dict):
        raise RunError(f"{path} holds no preset (it is not a run.json written by a training run)")
    known = {f.name for f in fields(Preset)}
    absent = sorted(f.name for f in fields(Preset) if f.name not in values and f.default is MISSING)
    if absent:
        raise RunError(f"{path} lacks the preset fields {absent} (written by another version, or edited)")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in known}
    try:
        return Preset(**values)
    except (TypeError, ValueError) as e:
        reasons = str(e).split(":\n  ", 1)[-1].replace("\n  ", "; ")
        raise RunError(f"{path} holds values today's rules refuse: {reasons}") from None


def first_line(error: BaseException) -> str:
    """An exception's message in one line: its first line, with the next one when the first only introduces it
    ("Error(s) in loading state_dict for UNet2DConditionModel:")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or ["no message"]
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]


# What each drawable method's loader reads from final/ (besides run.json).
RUN_FILES = {"crossattn": (CROSSATTN_FILE,), "lora": (LORA_FILE,), "ip_adapter": (LORA_FILE, IP_ADAPTER_FILE)}


def checked_run(folder: Path) -> Preset:
    """The preset of a finished run whose final/ is whole: run.json reads and holds a valid preset, final/'s
    manifest verifies (every file's size and sha256, run.json included) and the files its method's loader reads
    are there. A RunError naming the folder and why otherwise."""
    preset = run_preset(folder)
    final = Path(folder) / "final"
    try:
        files.verify(final, RUN_FILES.get(preset.method, ()))
    except files.FolderError as e:
        why = str(e).split(": ", 1)[-1]
        raise RunError(f"{final}: {why} (its run.json says a {preset.method!r} run on {preset.family})") from None
    return preset


def is_finished(folder: Path) -> bool:
    return (Path(folder) / "final" / RUN_FILE).is_file()


def load_snippet(folder: Path) -> str:
    """Lines that load a finished LoRA run into stock diffusers outside this project and draw one picture, runnable as
    printed where the run is (the tiny profile: its committed model folder on the CPU in fp32; t4: the Hub id on CUDA
    in fp16); an IP-Adapter run adds its adapter file and draws from a CLIP image embedding."""
    preset = run_preset(folder)
    cls = "StableDiffusionXLPipeline" if preset.family == "sdxl" else "StableDiffusionPipeline"
    t4 = preset.profile == "t4"
    device, dtype = ("cuda", "torch.float16") if t4 else ("cpu", "torch.float32")
    model = preset.model if t4 else str(resolve(preset.model))
    vae = "" if not preset.vae else (
        f"vae = diffusers.AutoencoderKL.from_pretrained({(preset.vae if t4 else str(resolve(preset.vae)))!r}, "
        f"torch_dtype={dtype})\n")
    lines = ("import diffusers, torch\n"
             f"final = {str(Path(folder) / 'final')!r}  # this run's final/ folder\n" + vae +
             f"pipe = diffusers.{cls}.from_pretrained({model!r}, {'vae=vae, ' if vae else ''}"
             f"torch_dtype={dtype}).to({device!r})\n"
             f"pipe.load_lora_weights(final, weight_name={LORA_FILE!r})")
    size, steps = preset.resolution, preset.sample_steps
    if preset.method == "ip_adapter":
        return lines + (
            f"\npipe.load_ip_adapter(final, subfolder=\"\", weight_name={IP_ADAPTER_FILE!r}, image_encoder_folder=None)\n"
            f"emb = torch.randn(1, {embed_dim(preset.clip_model)})  # a (1, D) CLIP image embedding of {preset.clip_model}\n"
            f"embeds = torch.cat([torch.zeros_like(emb), emb])[:, None].to({device!r}, {dtype})  # zeros: unconditional\n"
            f"image = pipe(\"\", ip_adapter_image_embeds=[embeds], height={size}, width={size}, "
            f"num_inference_steps={steps}).images[0]")
    prompt = (preset.sample_prompts or ("a photo of a cat",))[0]
    return lines + f"\nimage = pipe({prompt!r}, height={size}, width={size}, num_inference_steps={steps}).images[0]"


def finished_runs(root: Path, under: str = "runs") -> list[Path]:
    """Run folders under `root/<under>` (default `runs`) with a final/run.json, sorted by name."""
    runs = Path(root) / under
    return sorted(p for p in runs.iterdir() if (p / "final" / RUN_FILE).is_file()) if runs.is_dir() else []


# ---------------------------------------------------------------- a finished run inside a stock pipeline

class LoadedCrossAttn:
    """A crossattn run's attn2 weights (fp32, CPU), put in place by `apply` and taken out by RunSet's
    restore_base_attn2."""

    def __init__(self, pipe, final_dir: Path, name: str):
        weights = read_crossattn_weights(pipe.unet, Path(final_dir) / CROSSATTN_FILE)
        self.weights = {n: w.to(torch.float32) for n, w in weights.items()}

    def apply(self, pipe, scale: float) -> None:
        """attn2 = base + scale · (tuned − base); the base copy is the pipeline's own weights, kept on the CPU."""
        params, base = attn2_parameters(pipe.unet), base_attn2(pipe.unet)
        with torch.no_grad():
            for n, tuned in self.weights.items():
                value = base[n] + scale * (tuned - base[n]) if scale != 1.0 else tuned
                params[n].copy_(value.to(params[n].dtype))

    def switch_off(self, pipe) -> None:
        pass  # RunSet puts the base attn2 back for every variant


class LoadedLora:
    """A LoRA run as a named peft adapter of the pipeline (stock `load_lora_weights`)."""

    def __init__(self, pipe, final_dir: Path, name: str):
        path = Path(final_dir) / LORA_FILE
        with safe_open(str(path), "pt") as f:
            unet_only = not any(key.startswith("text_encoder") for key in f.keys())
        # expected and said by diffusers/peft on every such load: no text-encoder keys in a UNet-only run; a second
        # named adapter in one UNet (how RunSet keeps several runs). Any other notice still shows.
        with expected(SECOND_ADAPTER, *(LORA_WITHOUT_TEXT_ENCODER if unet_only else ())):
            pipe.load_lora_weights(Path(final_dir), weight_name=LORA_FILE, adapter_name=name)
        self.name = name

    def apply(self, pipe, scale: float) -> None:
        """Only this run's adapter active, at `scale` (diffusers' set_adapters; other loaded runs are off)."""
        pipe.enable_lora()
        pipe.set_adapters([self.name], adapter_weights=[scale])

    def switch_off(self, pipe) -> None:
        pass  # RunSet disables every LoRA adapter before it switches


class LoadedIPAdapter(LoadedLora):
    """An IP-Adapter run: its LoRA, and its adapter installed by stock `load_ip_adapter` while it is active."""

    def __init__(self, pipe, final_dir: Path, name: str):
        super().__init__(pipe, final_dir, name)
        self.state = read_ip_adapter(Path(final_dir) / IP_ADAPTER_FILE)

    def apply(self, pipe, scale: float) -> None:
        """LoRA at `scale` and this run's adapter installed, at `scale` too."""
        super().apply(pipe, scale)
        # no image encoder, by design: embeddings come given (its notice is silenced in helpers.core.notices)
        pipe.load_ip_adapter(self.state, subfolder="", weight_name="", image_encoder_folder=None)
        pipe.set_ip_adapter_scale(scale)

    def switch_off(self, pipe) -> None:
        if getattr(pipe.unet, "encoder_hid_proj", None) is not None:
            pipe.unload_ip_adapter()


LOADERS = {"crossattn": LoadedCrossAttn, "lora": LoadedLora, "ip_adapter": LoadedIPAdapter}  # by preset.method


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
        if preset.method not in LOADERS:
            raise ValueError(f"{folder.name} is a {preset.method!r} run, which draws no pictures in a pipeline "
                             f"(drawable: {sorted(LOADERS)})")
        try:
            self.loaded[name] = (method, LOADERS[preset.method](self.pipe, folder / "final", name))
        except Exception as e:  # a run.json that does not fit its files: leave the pipeline as it was
            self._remove_adapter(name)
            raise RunError(f"{folder / 'final'} does not load into the {family} pipeline ({type(e).__name__}: "
                           f"{first_line(e)})") from e
        self.use(None)
        return name

    def _remove_adapter(self, name: str) -> None:
        """Take out whatever a failed load of run `name` put into the pipeline (a half-installed LoRA adapter)."""
        adapters = getattr(self.pipe, "get_list_adapters", lambda: {})()
        if any(name in names for names in adapters.values()):
            self.pipe.delete_adapters(name)

    def use(self, name: str | None, scale: float = 1.0) -> None:
        """Switch the pipeline to run `name` at LoRA/weight scale `scale`; None = the base model."""
        restore_base_attn2(self.pipe.unet)
        for _, loaded in self.loaded.values():
            loaded.switch_off(self.pipe)
        if any(m.uses_lora for m, _ in self.loaded.values()):
            self.pipe.disable_lora()
        if name is None:
            return
        if name not in self.loaded:
            raise KeyError(f"no run {name!r} loaded; loaded: {sorted(self.loaded)}")
        self.loaded[name][1].apply(self.pipe, scale)

    def needs_image_embeds(self, name: str | None) -> bool:
        """Whether run `name` draws from CLIP image embeddings (notebook 04's IP-Adapter runs)."""
        return name is not None and self.loaded[name][0].needs_image_embeds

    def variant(self, name: str | None, scale: float = 1.0, label: str | None = None,
                image_embeds: ImageEmbeds | None = None) -> Variant:
        """A Variant for evaluation: `name` at `scale` (None = "base"). A run that `needs_image_embeds` takes
        `image_embeds`, where each image's embedding comes from: (prompts, seeds) → (N, D) (helpers.generate.sampling), e.g.
        a prior (helpers.prior.images.prompt_source), true embeddings (helpers.prior.images.fixed_embeddings,
        nearest_true_embeds) or zeros for the caption alone (helpers.prior.images.caption_only); any other run takes
        none. The variant holds this RunSet weakly: once its pipeline is freed, `apply` says so."""
        if name is not None and name not in self.loaded:
            raise KeyError(f"no run {name!r} loaded; loaded: {sorted(self.loaded)}")
        label = label or ("base" if name is None else name if scale == 1.0 else f"{name} ×{scale:g}")
        if image_embeds is not None and not self.needs_image_embeds(name):
            raise ValueError(f"{label!r} takes no image embeddings (only image-conditioned runs do)")
        if image_embeds is None and self.needs_image_embeds(name):
            raise ValueError(f"run {name!r} is conditioned on CLIP image embeddings: pass image_embeds=(prompts, "
                             "seeds) → (N, D), e.g. a prior's embeddings or helpers.methods.ip_adapter.caption_only(dim)")
        board = weakref.ref(self)  # a variant must not keep its pipeline alive: unloading frees the pipeline

        def apply(pipe) -> None:
            runs = board()
            if runs is None:
                raise RuntimeError(f"variant {label!r} cannot be applied: its pipeline was freed (e.g. by "
                                   "Engine.unload()); ask for the variant again")
            runs.use(name, scale)
        return Variant(label, apply, image_embeds)


