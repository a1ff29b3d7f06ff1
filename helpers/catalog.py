"""What can draw, and drawing with it: the UI-free core behind the prompt explorer (helpers.explorer, ipywidgets),
the A/B study (helpers.study), notebook 05's evaluation and the app (Gradio). No face loads a model or calls a
pipeline itself; they all come here.

    catalog = Catalog.scan("tiny")        # base SD1.5 / SDXL + every finished run under <storage>/runs
    catalog.names()                       # ["SD1.5 base", "SDXL base", "sd15_xattn_cifar10-crossattn-tiny", …]
    catalog.by_family()                   # {"sd15": [Entry, …], "sdxl": [Entry, …]}
    catalog.missing                       # runs of the series not usable yet, each with why and what to run
    engine = Engine(catalog)              # loads nothing until asked
    result = engine.generate(Request("a photo of a cat", ("SD1.5 base", "sd15_xattn_cifar10-crossattn-tiny"),
                                     seed=0, steps=25, size=256, scale=1.0, count=1),
                             progress=lambda fraction, text: ..., should_stop=lambda: False)
    result.images                         # [Drawn(model, seed, image, clip_score, size)], in request order
    result.save(folder)                   # (sheet PNG, settings JSON)
    pipe = engine.pipeline("SDXL base")   # the loaded pipeline itself (evaluation; img2img pipelines via from_pipe)
    variant = engine.variant(name, 0.5)   # a helpers.sampling.Variant for helpers.evaluation.evaluate_variants
    engine.unload()                       # free every pipeline (and `engine.release_scorer()` the CLIP scorer)

Rules this module owns:
- One pipeline per base model (family, weights, VAE, precision) is loaded on first use and kept; every catalog run
  of that base is loaded into it once (helpers.runs.RunSet) and switched on per image, so a T4 never holds two
  copies of a UNet. On a GPU, before a second base model loads, the T4 plan (helpers.evalplan.explorer_fits) decides
  whether both fit; if not, the other one is freed first.
- `Engine.check` validates a request before anything loads; a `RequestError` carries one sentence for a person:
  empty prompt, unknown or no model, a size the family's size rule (helpers.configs.check_image_size) refuses or
  above MAX_SIZE, steps / guidance / seed / scale / count / strength outside LIMITS, an unreadable init image.
  An out-of-memory error while drawing becomes a RequestError with advice (`advice_for`), never a traceback;
  `should_stop()` returning True stops between denoising steps and raises `Interrupted`; so does a request that
  runs past its `time_limit` (seconds from the call), raising `TimeLimit` (the app's per-request limit).
- A request draws `count` images per model with seeds seed, seed+1, …: every model starts from the same noise per
  seed (one CPU generator per image, helpers.sampling), so the images differ only by the weights.
- All drawing goes through helpers.sampling.generate; with an init image the same call runs the family's img2img
  pipeline built from the loaded components (no weight copy).
- An image-conditioned run (notebook 04: `Method.needs_image_embeds`) draws from one CLIP image embedding per
  image, which a typed prompt does not give. It is drawable once a finished run of a method that
  `makes_image_embeds` (a prior, notebook 04 part 2) with the same CLIP and profile exists under `runs/` or
  `priors/`: then it is listed once per such source, named "<run> + <source>", and the source's
  `image_embeds_source` turns each (prompt, seed) into the embedding (helpers.sampling's one per-image input).
  Without a source it is in `missing` as "not drawable from a prompt"; a source alone draws nothing and is listed
  nowhere.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from . import runs as runs_
from . import ip_adapter  # noqa: F401  (registers notebook 04's "ip_adapter" method)
from .adapters import METHODS, make_method, method_class
from .checkpoint import checkpoint_dirs
from .configs import check_image_size
from .presets import Preset, get_preset
from .prior import PRIORS_DIR  # (also registers the prior methods)
from .runtime import storage_root

BASES = {"sd15": ("SD1.5 base", "sd15_xattn_cifar10"), "sdxl": ("SDXL base", "sdxl_lora_naruto_1024")}
# (family → shown name, the preset whose model/VAE/precision loads the base pipeline and whose resolution is its
# default size). Runs of the series, with the notebook and the setting that makes each:
SERIES_RUNS = (
    ("02", "sd15_xattn_cifar10", "crossattn", "run notebook 02"),
    ("02", "sd15_xattn_cifar10", "lora", "run notebook 02 with METHOD = 'lora'"),
    ("03", "sdxl_lora_naruto_256", "lora", "run notebook 03 (RESOLUTION = 256)"),
    ("03", "sdxl_lora_naruto_1024", "lora", "run notebook 03 (RESOLUTION = 1024; spans sessions on a T4)"),
    ("04", "prior_sd15", "ip_adapter", "run notebook 04"),
)
LIMITS = dict(steps=(1, 150), guidance=(0.0, 30.0), seed=(0, 2**32 - 1), scale=(0.0, 2.0), count=(1, 4),
              strength=(0.05, 1.0))
MAX_SIZE = 2048  # px a side; the size rule has no upper end, a T4 has (SDXL at 1024 is its native size)
RUN_FOLDERS = ("runs", PRIORS_DIR)  # where finished runs live under the storage root: runs/ for what a pipeline
#                                     loads, priors/ for runs that only make image embeddings (notebook 04 part 2)


class RequestError(ValueError):
    """A request that cannot be drawn, said in one sentence for the person who made it."""


class Interrupted(RequestError):
    """`should_stop()` said stop: the pipeline stopped between denoising steps."""


class TimeLimit(Interrupted):
    """The request ran past its time limit: the pipeline stopped between denoising steps."""


@dataclass(frozen=True)
class Entry:
    name: str  # what a person picks: "SD1.5 base", "SDXL base" or a run folder's name
    family: str  # "sd15" or "sdxl"
    kind: str  # "base" or the run's method ("crossattn", "lora", …)
    preset: Preset  # base: the preset that loads its pipeline; run: the preset it was trained with
    folder: Path | None = None  # the run folder (None for a base model)
    source: Path | None = None  # image-conditioned run: the finished run (a prior) whose `image_embeds_source`
    #                             turns each prompt into the image embedding it draws from (None: text only)

    @property
    def is_run(self) -> bool:
        return self.folder is not None

    @property
    def base_key(self) -> tuple:
        """Entries with equal keys draw with one pipeline (same family, weights, VAE and precision)."""
        p = self.preset
        return (p.family, p.model, p.vae, p.vae_fp32, p.mixed_precision)

    @property
    def default_size(self) -> int:
        return self.preset.resolution

    @property
    def label(self) -> str:
        """A short name that wraps on a sheet: the run folder's name without its profile, in words."""
        name = self.name.replace(f"-{self.preset.profile}", "") if self.is_run else self.name
        return name.replace("_", " ").replace("-", " ")


@dataclass(frozen=True)
class MissingRun:
    name: str  # the run folder's name
    notebook: str  # the notebook that makes it ("02", …; "" for a run the series does not know)
    why: str  # one sentence: not trained, unfinished, other profile, unknown method


def _series_name(preset: str, method: str, profile: str) -> str:
    return runs_.run_name(get_preset(preset, profile, method=method))


@dataclass
class Catalog:
    profile: str
    root: Path
    entries: list[Entry]
    missing: list[MissingRun] = field(default_factory=list)

    @classmethod
    def scan(cls, profile: str, root: Path | None = None) -> "Catalog":
        """The base models of `profile` and every finished run under `root/runs` (default: storage_root()) that
        this profile can load, an image-conditioned one once per prompt → embedding source (a prior under
        `root/runs` or `root/priors` with the same CLIP); the series' runs that are not there (or not loadable or
        drawable) go to `missing`."""
        root = Path(root) if root is not None else storage_root()
        entries = [Entry(label, family, "base", get_preset(preset, profile)) for family, (label, preset)
                   in BASES.items()]
        missing, sources, conditioned = [], [], []
        for folder in [f for under in RUN_FOLDERS for f in runs_.finished_runs(root, under)]:
            preset = runs_.run_preset(folder)
            notebook = next((nb for nb, p, m, _ in SERIES_RUNS if (p, m) == (preset.name, preset.method)), "")
            if preset.profile != profile:
                continue  # another profile's run (tiny models next to real ones): not this catalog's
            method = method_class(preset.method)
            if method is None:
                missing.append(MissingRun(folder.name, notebook, f"finished, but its method {preset.method!r} "
                                          f"cannot be loaded here yet (known: {sorted(METHODS)})"))
            elif method.makes_image_embeds:
                sources.append((folder, preset))
            elif method.needs_image_embeds:
                conditioned.append((folder, preset, notebook))
            else:
                entries.append(Entry(folder.name, preset.family, preset.method, preset, folder))
        for folder, preset, notebook in conditioned:
            usable = [f for f, p in sources if p.clip_model == preset.clip_model]
            if not usable:
                missing.append(MissingRun(folder.name, notebook, "finished, but it draws from a CLIP image embedding "
                                          "per image and nothing turns a prompt into one yet: not drawable from a "
                                          f"prompt until a prior on {preset.clip_model} embeddings is trained "
                                          "(notebook 04, part 2)"))
            entries += [Entry(f"{folder.name} + {source.name}", preset.family, preset.method, preset, folder, source)
                        for source in usable]
        found = {e.folder.name for e in entries if e.is_run} | {m.name for m in missing}
        for notebook, preset, method, how in SERIES_RUNS:
            name = _series_name(preset, method, profile)
            if name in found:
                continue
            steps = checkpoint_dirs(root / "runs" / name) if (root / "runs" / name).is_dir() else []
            why = (f"unfinished ({len(steps)} checkpoint{'s' * (len(steps) != 1)}, no final/): {how} again to "
                   "resume" if steps else f"not trained yet: {how}")
            missing.append(MissingRun(name, notebook, why))
        return cls(profile, root, entries, missing)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def runs(self) -> list[Entry]:
        return [e for e in self.entries if e.is_run]

    def get(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise RequestError(f"unknown model {name!r}; choose one of {self.names()}")

    def by_family(self) -> dict[str, list[Entry]]:
        out: dict[str, list[Entry]] = {}
        for entry in self.entries:
            out.setdefault(entry.family, []).append(entry)
        return out

    def note(self) -> str:
        """One line about the runs: how many are ready, or what to do when there are none."""
        if not self.runs():
            return (f"No finished runs under {self.root / 'runs'} yet: only the base models can draw. Train one "
                    "with notebook 02 or 03 (tiny profile: a minute), then scan again.")
        return f"{len(self.runs())} finished run(s) under {self.root / 'runs'}; {len(self.missing)} not ready."

    def missing_text(self) -> str:
        return "\n".join(f"  {m.name}" + (f" (notebook {m.notebook})" if m.notebook else "") + f": {m.why}"
                         for m in self.missing) or "  none"


# ---------------------------------------------------------------- requests and results

@dataclass(frozen=True)
class Request:
    prompt: str
    models: tuple[str, ...]  # catalog names, drawn in this order
    negative_prompt: str = ""
    seed: int = 0  # first seed; image k of a model uses seed + k
    steps: int = 25  # denoising steps
    guidance: float = 7.5  # classifier-free guidance scale
    size: int | None = None  # square side in px; None = each model's own default (its training resolution)
    scale: float = 1.0  # LoRA / weight scale of runs (0 = the base model, 1 = as trained)
    count: int = 1  # images per model
    init_image: object = None  # img2img: a PIL image or image path; None = text to image
    strength: float = 0.8  # img2img: how much of the init image is re-noised (1 = all of it)


@dataclass
class Drawn:
    model: str
    seed: int
    image: Image.Image
    clip_score: float | None  # 100 · cos(image, prompt) by the engine's scorer; None without one
    size: int


@dataclass
class Result:
    request: Request
    images: list[Drawn]
    seconds: float
    clip_model: str | None
    labels: dict[str, str] = field(default_factory=dict)  # model → its short label (Entry.label)

    def by_model(self) -> dict[str, list[Drawn]]:
        out: dict[str, list[Drawn]] = {}
        for drawn in self.images:
            out.setdefault(drawn.model, []).append(drawn)
        return out

    def settings(self) -> dict:
        request = {k: v for k, v in asdict(self.request).items() if k != "init_image"}
        request["init_image"] = None if self.request.init_image is None else "given"
        return {"request": request, "clip_model": self.clip_model, "seconds": round(self.seconds, 3),
                "images": [{"model": d.model, "seed": d.seed, "size": d.size, "clip_score": d.clip_score}
                           for d in self.images]}

    def save(self, folder: str | Path, stem: str | None = None) -> tuple[Path, Path]:
        """A sheet (rows = seeds, columns = models, CLIP scores in the row labels) and the settings as JSON."""
        from .grids import comparison_sheets
        from .sampling import folder_name
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or time.strftime("%Y%m%d-%H%M%S-") + folder_name(self.request.prompt[:40])
        by_model = self.by_model()
        models = list(by_model)
        rows = [[by_model[m][k].image for m in models] for k in range(self.request.count)]

        def label(k: int) -> str:
            scores = [by_model[m][k].clip_score for m in models]
            text = " | ".join("–" if s is None else f"{s:.1f}" for s in scores)
            return f"{self.request.prompt}\nseed {by_model[models[0]][k].seed} · CLIP {text}"

        columns = [self.labels.get(m, m) for m in models]
        sheet = comparison_sheets(rows, [label(k) for k in range(len(rows))], columns, folder / stem,
                                  title=f"{self.request.steps} steps · guidance {self.request.guidance:g} · "
                                        f"scale {self.request.scale:g}")[0]
        settings = folder / f"{stem}.json"
        settings.write_text(json.dumps(self.settings(), indent=2))
        return sheet, settings


def advice_for(error: BaseException, request: Request | None = None) -> str | None:
    """A person's next step for an out-of-memory error (None for any other error)."""
    text = str(error).lower()
    if not (isinstance(error, torch.OutOfMemoryError) or "out of memory" in text):
        return None
    size = f" at {request.size} px" if request is not None and request.size else ""
    return (f"Out of GPU memory{size}. Draw a smaller size (SDXL 1024 → 768, SD1.5 512 → 384), fewer images per "
            "model, or fewer ticked models of another family (each family keeps its own pipeline loaded); then "
            "press Generate again. If it persists, restart the runtime to free memory other cells still hold.")


def _number(value, what: str, integer: bool):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise RequestError(f"{what} must be a number, got {value!r}")
    if integer:
        if float(value) != int(value):
            raise RequestError(f"{what} must be a whole number, got {value!r}")
        value = int(value)
    low, high = LIMITS[what]
    if not low <= value <= high:
        raise RequestError(f"{what} {value!r} is out of range: use {low} to {high}")
    return value


def _open_image(image) -> Image.Image:
    try:
        return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    except Exception as e:  # any unreadable upload: PIL raises several kinds
        raise RequestError(f"cannot read the init image ({type(e).__name__}: {e}); upload a PNG or JPEG") from e


# ---------------------------------------------------------------- the engine

@contextmanager
def _quiet():
    import warnings

    from diffusers.utils import logging as diffusers_logging
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


class Engine:
    """Pipelines per base model, runs switched inside them, validated generation with CLIP scores."""

    def __init__(self, catalog: Catalog, scorer="auto", device: torch.device | str | None = None):
        from .runtime import device as default_device
        self.catalog = catalog
        self.device = torch.device(device or default_device())
        self._scorer = scorer  # "auto" = the profile's ClipScorer on first use; None = no scores
        self._pipes: dict[tuple, tuple] = {}  # base key → (pipe, RunSet), most recently used last
        self._img2img: dict[tuple, object] = {}
        self._sources: dict[Path, object] = {}  # source run folder → its ImageEmbeds (a loaded prior)

    # ---- scorer
    @property
    def scorer(self):
        if isinstance(self._scorer, str):
            from .evaluate import ClipScorer
            self._scorer = ClipScorer.from_profile(self.catalog.profile, device=self.device)
        return self._scorer

    def release_scorer(self) -> None:
        """Free the CLIP scorer (it loads again on next use)."""
        from .models import release_cuda_cache
        if self._scorer is not None:
            self._scorer = "auto"
        release_cuda_cache()

    # ---- pipelines
    def loaded(self) -> list[str]:
        """Names of the base models whose pipelines are resident, least recently used first."""
        return [next((e.name for e in self.catalog.entries if e.base_key == key and not e.is_run), key[1])
                for key in self._pipes]

    def _base_entry(self, entry: Entry) -> Entry:
        return next((e for e in self.catalog.entries if not e.is_run and e.base_key == entry.base_key), entry)

    def _runset(self, entry: Entry):
        key = entry.base_key
        if key in self._pipes:
            self._pipes[key] = self._pipes.pop(key)  # most recently used last
            return self._pipes[key]
        if self.device.type == "cuda" and self._pipes:
            from .evalplan import explorer_fits
            families = [k[0] for k in self._pipes] + [entry.family]
            if not explorer_fits(families):
                self.unload()
        from .sampling import load_pipeline
        pipe = load_pipeline(self._base_entry(entry).preset, self.device, progress=False)
        board = runs_.RunSet(pipe)
        with _quiet():  # diffusers/peft say a UNet-only LoRA has no text-encoder keys, once per run: expected
            for run in self.catalog.runs():  # once per run folder, also when several sources draw it
                if run.base_key == key and run.folder.name not in board.loaded:
                    board.add(run.folder, run.folder.name)
        self._pipes[key] = (pipe, board)
        return self._pipes[key]

    def pipeline(self, name: str):
        """The loaded pipeline that draws `name` (loading it and its runs if needed), switched to the base model."""
        pipe, board = self._runset(self.catalog.get(name))
        board.use(None)
        return pipe

    def variant(self, name: str, scale: float = 1.0, label: str | None = None):
        """A helpers.sampling.Variant of `name` at `scale` on its pipeline (`pipeline(name)`), labelled `label`
        (default: the catalog name, with ×scale when it is not 1)."""
        entry = self.catalog.get(name)
        _, board = self._runset(entry)
        label = label or (name if scale == 1.0 or not entry.is_run else f"{name} ×{scale:g}")
        embeds = self._image_embeds(entry.source) if entry.source is not None else None
        return board.variant(entry.folder.name if entry.is_run else None, scale, label, image_embeds=embeds)

    def _image_embeds(self, source: Path):
        """The ImageEmbeds of a source run (a prior), loaded on first use and kept."""
        if source not in self._sources:
            method = make_method(runs_.run_preset(source))
            self._sources[source] = method.image_embeds_source(source / "final", self.device)
        return self._sources[source]

    def unload(self) -> None:
        """Free every pipeline (they load again on next use)."""
        from .models import release_cuda_cache
        self._pipes.clear()
        self._img2img.clear()
        self._sources.clear()
        release_cuda_cache()

    def _img2img_pipe(self, entry: Entry, pipe):
        if entry.base_key not in self._img2img:
            from diffusers import AutoPipelineForImage2Image
            img2img = AutoPipelineForImage2Image.from_pipe(pipe)  # the same modules: no second copy of weights
            img2img.set_progress_bar_config(disable=True)
            self._img2img[entry.base_key] = img2img
        return self._img2img[entry.base_key]

    def _steps_per_call(self, entry: Entry, request: Request) -> int:
        """Denoising steps one pipeline call runs (the callback count): the scheduler's timesteps for
        `request.steps` (PNDM adds one), the last `strength` share of them for img2img."""
        scheduler = self._runset(entry)[0].scheduler
        scheduler.set_timesteps(request.steps)
        n = len(scheduler.timesteps)
        return max(1, min(int(request.steps * request.strength), request.steps)) if request.init_image else n

    # ---- requests
    def check(self, request: Request) -> Request:
        """The request with numbers normalised, or a RequestError saying what to change. Loads nothing."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise RequestError("Type a prompt first: it is empty.")
        if not isinstance(request.negative_prompt, str):
            raise RequestError("the negative prompt must be text (or empty)")
        models = (request.models,) if isinstance(request.models, str) else tuple(request.models or ())
        if not models:
            raise RequestError("Tick at least one model to draw with.")
        if len(set(models)) != len(models):
            raise RequestError(f"each model once, please: {list(models)}")
        entries = [self.catalog.get(m) for m in models]
        size = request.size
        if size is not None:
            if isinstance(size, float) and size.is_integer():
                size = int(size)
            for family in dict.fromkeys(e.family for e in entries):
                try:
                    check_image_size(size, family)
                except ValueError as e:
                    raise RequestError(str(e)) from None
            if size > MAX_SIZE:
                raise RequestError(f"image size {size} is above {MAX_SIZE} px, more than a T4 can draw")
        init = None if request.init_image is None else _open_image(request.init_image)
        return replace(request, prompt=request.prompt.strip(), models=models, size=size,
                       negative_prompt=request.negative_prompt.strip(),
                       steps=_number(request.steps, "steps", True), guidance=float(_number(request.guidance,
                                                                                           "guidance", False)),
                       seed=_number(request.seed, "seed", True), scale=float(_number(request.scale, "scale", False)),
                       count=_number(request.count, "count", True), init_image=init,
                       strength=float(_number(request.strength, "strength", False)))

    def generate(self, request: Request, progress: Callable[[float, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, time_limit: float | None = None) -> Result:
        """Draw `request.count` images per model (checked first), score them, and return them in request order.
        `progress(fraction, text)` after every denoising step; `should_stop()` is asked there too, and past
        `time_limit` seconds from this call (loading included) the drawing stops there with `TimeLimit`."""
        from .models import release_cuda_cache
        from .sampling import generate, images_per_call, pipeline_calls
        request = self.check(request)
        start, drawn = time.perf_counter(), []
        seeds = [request.seed + k for k in range(request.count)]
        entries = [self.catalog.get(m) for m in request.models]
        state = {"done": 0, "total": 1, "model": "", "stopped": None}

        def on_step(pipe, step, timestep, kwargs):
            state["done"] += 1
            if progress is not None:
                progress(min(1.0, state["done"] / state["total"]), f"{state['model']}: step {step + 1}")
            if time_limit is not None and time.perf_counter() - start > time_limit:
                state["stopped"] = "time"
            elif should_stop is not None and should_stop():
                state["stopped"] = "asked"
            if state["stopped"]:
                pipe._interrupt = True  # diffusers skips the remaining steps of this call (and generate the rest)
            return kwargs

        try:
            variants = [self.variant(e.name, request.scale) for e in entries]
            sizes = [request.size or e.default_size for e in entries]
            prompts = [request.prompt] * request.count
            embeds = [v.image_embeds(prompts, seeds) if v.image_embeds is not None else None for v in variants]
            calls = [len(pipeline_calls(request.count, images_per_call(s, s), e)) for s, e in zip(sizes, embeds)]
            state["total"] = max(1, sum(n * self._steps_per_call(e, request) for n, e in zip(calls, entries)))
            for entry, variant, size, image_embeds in zip(entries, variants, sizes, embeds):
                pipe, _ = self._runset(entry)
                variant.apply(pipe)
                if request.init_image is not None:
                    pipe = self._img2img_pipe(entry, pipe)
                state["model"] = entry.name
                images = generate(pipe, prompts, seeds, request.steps, request.guidance, size, size,
                                  negative_prompt=request.negative_prompt, step_callback=on_step,
                                  image=request.init_image, strength=request.strength, image_embeds=image_embeds)
                if state["stopped"] == "time":
                    raise TimeLimit(f"This request took longer than the {time_limit:g} s limit and was stopped "
                                    f"while drawing with {entry.name} (after {state['done']} of {state['total']} "
                                    "steps): ask for fewer steps or images, or a smaller size.")
                if state["stopped"]:
                    raise Interrupted(f"stopped while drawing with {entry.name} (after {state['done']} of "
                                      f"{state['total']} steps)")
                drawn += [Drawn(entry.name, s, im, None, size) for s, im in zip(seeds, images)]
            scorer = self.scorer
            if scorer is not None:
                scores = scorer.score([d.image for d in drawn], [request.prompt] * len(drawn))
                for d, score in zip(drawn, scores):
                    d.clip_score = float(score)
        except RequestError:
            raise
        except (RuntimeError, torch.OutOfMemoryError) as e:
            advice = advice_for(e, request)
            if advice is None:
                raise
            release_cuda_cache()
            raise RequestError(advice) from e
        return Result(request, drawn, time.perf_counter() - start,
                      None if self._scorer is None else self.scorer.name, {e.name: e.label for e in entries})

    def save_folder(self, request: Request) -> Path:
        """Where Save puts a request's sheet: the first chosen run's folder (explorer/), else <storage>/explorer."""
        run = next((self.catalog.get(m) for m in request.models if self.catalog.get(m).is_run), None)
        return (run.folder if run is not None else self.catalog.root) / "explorer"


__all__ = ["BASES", "SERIES_RUNS", "LIMITS", "MAX_SIZE", "RUN_FOLDERS", "RequestError", "Interrupted", "TimeLimit", "Entry",
           "MissingRun", "Catalog", "Request", "Drawn", "Result", "Engine", "advice_for"]
