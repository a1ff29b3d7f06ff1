"""Drawing with what the catalog lists (helpers.studio.catalog): the UI-free core behind the prompt explorer
(helpers.studio.explorer, ipywidgets), the A/B study (helpers.studio.study), notebook 05's evaluation and the app (Gradio). No face
loads a model or calls a pipeline itself; they all come here. Requests, results and errors: helpers.studio.drawing.

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
    variant = engine.variant(name, 0.5)   # a helpers.generate.sampling.Variant for helpers.evaluation.evaluate_variants
    engine.unload()                       # free every pipeline (and `engine.release_scorer()` the CLIP scorer)

Rules this module owns:
- One pipeline per base model (family, weights, VAE, precision) is loaded on first use and kept; every catalog run
  of that base is loaded into it once (helpers.methods.runs.RunSet) and switched on per image, so a T4 never holds two
  copies of a UNet. A run that does not load into it (files that do not fit its run.json) is left out with a
  warning and refused by name (`Engine.unusable`); its base model and the other runs draw as if it were not there.
  Under the T4's rules (fp16 on a GPU, or the T4-dtype mode on a CPU, helpers.core.precision), before
  a second base model loads, the T4 plan (helpers.plan.inference.explorer_fits) decides whether both fit; if not, the
  other one is freed first. `unload()` frees them: variants handed out hold their pipeline weakly.
- SD1.5 loads with its safety checker (`safety_checker=True`, counted by the plan): the engine's pictures reach
  people (explorer, study raters, the app's public link). A picture it withholds (a black square) is marked
  (`Drawn.withheld`) and never scored; evaluations count and leave it out (helpers.evaluation).
- Size 0 / None: a run draws at its training size, a base alone at its own size (SD1.5 512, SDXL 1024), a base
  beside runs of its model at their training size, said in `Result.note` (`Engine.sizes`).
- A request draws `count` images per model with seeds seed, seed+1, …: every model starts from the same noise per
  seed (one CPU generator per image, helpers.generate.sampling), so the images differ only by the weights.
- All drawing goes through helpers.generate.sampling.generate; with an init image the same call runs the family's img2img
  pipeline built from the loaded components (no weight copy).
- `Engine.check` validates a request before anything loads; a `RequestError` carries one sentence for a person:
  empty prompt, unknown or no model, a size the family's size rule (helpers.core.configs.check_image_size) refuses or
  above MAX_SIZE, steps / guidance / seed / scale / count / strength outside LIMITS, an unreadable init image.
  An out-of-memory error while drawing becomes a RequestError with advice (`advice_for`), never a traceback;
  `should_stop()` returning True stops between denoising steps and raises `Interrupted`.
- A `time_limit` (seconds from the call, loading included: the app's per-request limit) holds on the machine the
  engine runs on: before drawing, the request's time is estimated here (`Engine.estimate`: steps × seconds per UNet
  step at its size, plus the VAE decodes, from a speed measured once per base model (helpers.studio.pace), times how
  much slower than estimated that base model's drawings under a limit went, each moving it halfway), and a request
  whose estimate does not fit is refused with `TimeLimit`: one sentence with the estimate, the limit and the smaller
  size, fewer steps or fewer images that would fit. While drawing, it stops between denoising steps (`TimeLimit`) as
  soon as the next step, at the estimate scaled by how fast this drawing actually goes, would end past the limit, so
  no step starts that cannot end in time. Without a time limit (the explorer) nothing is measured.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from ..core.configs import check_image_size, image_size_multiple
from ..core.precision import precision_for
from ..core.runtime import device as default_device
from ..evaluation.clip_score import ClipScorer
from ..generate.sampling import generate, images_per_call, load_pipeline, pipeline_calls, withheld
from ..methods import runs as runs_
from ..models import release_cuda_cache
from ..plan.inference import explorer_fits
from ..plan.timing import duration
from ..prior.images import prompt_source
from .catalog import Catalog, Entry, shared_size
from .drawing import (
    MAX_SIZE,
    Drawn,
    Interrupted,
    Request,
    RequestError,
    Result,
    TimeLimit,
    advice_for,
    checked_number,
    open_upload,
)
from .pace import Pace

FIT_SIZES = (1536, 1024, 768, 512, 384, 256, 192, 128, 64)  # smaller sizes a refusal may offer, largest first


class Engine:
    """Pipelines per base model, runs switched inside them, validated generation with CLIP scores."""

    def __init__(self, catalog: Catalog, scorer="auto", device: torch.device | str | None = None,
                 safety_checker: bool = True):
        self.catalog = catalog
        self.device = torch.device(device or default_device())
        self._scorer = scorer  # "auto" = the profile's ClipScorer on first use; None = no scores
        self.safety_checker = safety_checker  # SD1.5's checker: the engine's pictures reach people (the explorer,
        #   the A/B study's raters, the app's public link); a picture it withholds is marked, never scored
        self._pipes: dict[tuple, tuple] = {}  # base key → (pipe, RunSet), most recently used last
        self._img2img: dict[tuple, object] = {}
        self._sources: dict[Path, object] = {}  # source run folder → its ImageEmbeds (a loaded prior)
        self.unusable: dict[str, str] = {}  # run folder name → why its final/ did not load into its pipeline
        self._paces: dict[tuple, Pace] = {}  # base key → its speed on this machine (measured once, kept)
        self._slower: dict[tuple, float] = {}  # base key → actual / estimated seconds of its last drawing

    # ---- scorer
    @property
    def scorer(self):
        if isinstance(self._scorer, str):
            self._scorer = ClipScorer.from_profile(self.catalog.profile, device=self.device)
        return self._scorer

    def release_scorer(self) -> None:
        """Free the CLIP scorer (it loads again on next use)."""
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
        if self._pipes and precision_for(entry.preset.mixed_precision, self.device).fp16:  # the T4's rules
            families = [k[0] for k in self._pipes] + [entry.family]
            if not explorer_fits(families, safety_checker=self.safety_checker):
                self.unload()
        base = self._base_entry(entry)
        try:
            pipe = load_pipeline(base.preset, self.device, progress=False, safety_checker=self.safety_checker)
        except (OSError, ValueError, KeyError) as e:
            if not base.is_run:
                raise
            # a run whose run.json names a base model no base entry has: only this run fails
            raise RequestError(f"{entry.name} cannot be drawn: the base model its run.json names "
                               f"({base.preset.model}, {base.preset.family}) does not load ({type(e).__name__}: "
                               f"{runs_.first_line(e)})") from None
        board = runs_.RunSet(pipe)
        for run in self.catalog.runs():  # once per run folder, also when several sources draw it
            name = run.folder.name
            if run.base_key == key and name not in board.loaded and name not in self.unusable:
                try:
                    board.add(run.folder, name)  # its expected notices are silenced where it loads (methods.runs)
                except runs_.RunError as e:  # one run that does not load never takes its base model down
                    self.unusable[name] = str(e)
                    warnings.warn(f"{name} is left out: {e}", stacklevel=2)
        self._pipes[key] = (pipe, board)
        return self._pipes[key]

    def pipeline(self, name: str):
        """The loaded pipeline that draws `name` (loading it and its runs if needed), switched to the base model."""
        pipe, board = self._runset(self.catalog.get(name))
        board.use(None)
        return pipe

    def variant(self, name: str, scale: float = 1.0, label: str | None = None):
        """A helpers.generate.sampling.Variant of `name` at `scale` on its pipeline (`pipeline(name)`), labelled `label`
        (default: the catalog name, with ×scale when it is not 1)."""
        entry = self.catalog.get(name)
        _, board = self._runset(entry)
        if entry.is_run and entry.folder.name in self.unusable:
            raise RequestError(f"{name} cannot be drawn: {self.unusable[entry.folder.name]}")
        label = label or (name if scale == 1.0 or not entry.is_run else f"{name} ×{scale:g}")
        embeds = None
        if entry.source is not None:  # looked up on each call, so the variant does not keep the prior (and its
            source = entry.source   # CLIP) alive after unload(): a later call loads it again
            embeds = lambda prompts, seeds: self._image_embeds(source)(prompts, seeds)  # noqa: E731
        return board.variant(entry.folder.name if entry.is_run else None, scale, label, image_embeds=embeds)

    def _image_embeds(self, source: Path):
        """The ImageEmbeds of a source run (a prior), loaded on first use and kept."""
        if source not in self._sources:
            self._sources[source] = prompt_source(source, self.device)
        return self._sources[source]

    def unload(self) -> None:
        """Free every pipeline (they load again on next use)."""
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

    # ---- time on this machine
    def pace(self, name: str) -> Pace:
        """How fast `name`'s pipeline draws on this machine (helpers.studio.pace), measured on first use and kept."""
        entry = self.catalog.get(name)
        if entry.base_key not in self._paces:
            self._paces[entry.base_key] = Pace.measure(self.pipeline(entry.name))
        return self._paces[entry.base_key]

    def _plan(self, request: Request, entries: list[Entry], sizes: list[int], embeds=None) -> list[tuple]:
        """The pipeline calls `request` makes, in order: (entry, size, images, steps, seconds a step, seconds of
        its VAE decodes), at this machine's pace. An img2img upload's encode counts as one more decode."""
        cfg = 2 if request.guidance > 1.0 else 1  # diffusers' classifier-free guidance doubles the UNet batch
        plan = []
        for k, (entry, size) in enumerate(zip(entries, sizes)):
            pace, steps = self.pace(entry.name), self._steps_per_call(entry, request)
            slower, given = self._slower.get(entry.base_key, 1.0), None if embeds is None else embeds[k]
            decodes = 2 if request.init_image is not None else 1
            for call in pipeline_calls(request.count, images_per_call(size, size), given):
                plan.append((entry, size, len(call), steps, slower * pace.step_seconds(size, cfg * len(call)),
                             slower * decodes * len(call) * pace.decode_seconds(size)))
        return plan

    @staticmethod
    def _seconds(plan: list[tuple]) -> float:
        return sum(steps * step + decode for _, _, _, steps, step, decode in plan)

    def estimate(self, request: Request) -> float:
        """Seconds `request` takes to draw on this machine once its pipelines are loaded (loads and measures them)."""
        request = self.check(request)
        entries = [self.catalog.get(m) for m in request.models]
        return self._seconds(self._plan(request, entries, self.sizes(request, entries)[0]))

    def _what_fits(self, request: Request, entries: list[Entry], sizes: list[int], seconds: float) -> list[str]:
        """What a refused request could ask for instead, each alone: a smaller size, fewer steps, fewer images."""
        fits = []
        multiple = max(image_size_multiple(e.family) for e in entries)
        for size in (s for s in FIT_SIZES if s < max(sizes) and s % multiple == 0):
            if self._seconds(self._plan(request, entries, [min(size, s) for s in sizes])) <= seconds:
                fits.append(f"at {size} px")
                break
        for steps in range(request.steps - 1, 0, -1):
            if self._seconds(self._plan(replace(request, steps=steps), entries, sizes)) <= seconds:
                fits.append(f"with {steps} step{'s' if steps > 1 else ''}")
                break
        for count in range(request.count - 1, 0, -1):
            if self._seconds(self._plan(replace(request, count=count), entries, sizes)) <= seconds:
                fits.append(f"with {count} image{'s' if count > 1 else ''} per model")
                break
        return fits

    def _refuse_if_too_slow(self, request: Request, entries: list[Entry], sizes: list[int], plan: list[tuple],
                            time_limit: float, spent: float) -> None:
        """TimeLimit, before anything draws, when `spent` seconds (loading) + the plan's estimate exceed the limit."""
        seconds = self._seconds(plan)
        if spent + seconds <= time_limit:
            return
        parts = []
        for entry in dict.fromkeys(e for e, *_ in plan):
            rows = [row for row in plan if row[0] is entry]
            images, steps, size = sum(r[2] for r in rows), rows[0][3], rows[0][1]
            slowest, slower = max(r[4] for r in rows), self._slower.get(entry.base_key, 1.0)
            parts.append(f"{entry.name}: {images} image{'s' if images > 1 else ''} × {steps} steps at {size} px, "
                         f"{slowest:.2g} s a step; measured here: {self.pace(entry.name).measured}"
                         + (f", and its last drawing took ×{slower:.2g} its estimate" if slower != 1.0 else ""))
        loading = f", after {spent:.0f} s of loading" if spent >= 1 else ""
        fits = self._what_fits(request, entries, sizes, time_limit) if seconds > time_limit else []
        advice = (f"it would fit {', or '.join(fits)}" if fits else
                  "ask again: the model is loaded now" if seconds <= time_limit else
                  "no smaller size, fewer steps or fewer images fit it here: ask the app for a longer limit "
                  "(--time-limit)")
        raise TimeLimit(f"This request would take about {duration(seconds)} to draw on this machine "
                        f"({'; '.join(parts)}){loading}, more than the {time_limit:g} s limit, so it was not "
                        f"started: {advice}.")

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
        init = None if request.init_image is None else open_upload(request.init_image)
        return replace(request, prompt=request.prompt.strip(), models=models, size=size,
                       negative_prompt=request.negative_prompt.strip(),
                       steps=checked_number(request.steps, "steps", True),
                       guidance=float(checked_number(request.guidance, "guidance", False)),
                       seed=checked_number(request.seed, "seed", True),
                       scale=float(checked_number(request.scale, "scale", False)),
                       count=checked_number(request.count, "count", True), init_image=init,
                       strength=float(checked_number(request.strength, "strength", False)))

    def generate(self, request: Request, progress: Callable[[float, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, time_limit: float | None = None) -> Result:
        """Draw `request.count` images per model (checked first), score them, and return them in request order.
        `progress(fraction, text)` after every denoising step; `should_stop()` is asked there too. With a
        `time_limit` (seconds from this call, loading included), a request estimated not to fit is refused before it
        draws, and the drawing stops between steps before a step that would end past the limit (`TimeLimit`; module
        docstring)."""
        request = self.check(request)
        start, drawn = time.perf_counter(), []
        seeds = [request.seed + k for k in range(request.count)]
        entries = [self.catalog.get(m) for m in request.models]
        state = {"done": 0, "total": 1, "model": "", "stopped": None, "drawing": start}
        plan: list[tuple] = []  # with a time limit: the calls, at this machine's pace (_plan)

        def next_step_ends_late(now: float) -> bool:
            """Would the next step (and the decode before it, at a call's end) end past the limit, at the estimate
            scaled by how much slower than estimated this drawing has gone so far?"""
            done, estimated = state["done"], 0.0
            for k, (_, _, _, steps, step, decode) in enumerate(plan):
                if done > steps:
                    done, estimated = done - steps, estimated + steps * step + decode
                    continue
                estimated += done * step
                following = step if done < steps else decode + (plan[k + 1][4] if k + 1 < len(plan) else 0.0)
                if k + 1 == len(plan) and done == steps:
                    return False  # only the last decode is left: stopping saves nothing
                slower = max(1.0, (now - state["drawing"]) / max(estimated, 1e-9))
                return now - start + following * slower > time_limit
            return False

        def on_step(pipe, step, timestep, kwargs):
            state["done"] += 1
            if progress is not None:
                progress(min(1.0, state["done"] / state["total"]), f"{state['model']}: step {step + 1}")
            now = time.perf_counter()
            if time_limit is not None and (now - start > time_limit or plan and next_step_ends_late(now)):
                state["stopped"] = "time"
            elif should_stop is not None and should_stop():
                state["stopped"] = "asked"
            if state["stopped"]:
                pipe._interrupt = True  # diffusers skips the remaining steps of this call (and generate the rest)
            return kwargs

        try:
            variants = [self.variant(e.name, request.scale) for e in entries]
            sizes, note = self.sizes(request, entries)
            prompts = [request.prompt] * request.count
            embeds = [v.image_embeds(prompts, seeds) if v.image_embeds is not None else None for v in variants]
            calls = [len(pipeline_calls(request.count, images_per_call(s, s), e)) for s, e in zip(sizes, embeds)]
            state["total"] = max(1, sum(n * self._steps_per_call(e, request) for n, e in zip(calls, entries)))
            if time_limit is not None:  # on this machine, before anything draws
                plan = self._plan(request, entries, sizes, embeds)
                self._refuse_if_too_slow(request, entries, sizes, plan, time_limit, time.perf_counter() - start)
                state["drawing"] = time.perf_counter()
            for entry, variant, size, image_embeds in zip(entries, variants, sizes, embeds):
                pipe, _ = self._runset(entry)
                variant.apply(pipe)
                if request.init_image is not None:
                    pipe = self._img2img_pipe(entry, pipe)
                state["model"] = entry.name
                began = time.perf_counter()
                images = generate(pipe, prompts, seeds, request.steps, request.guidance, size, size,
                                  negative_prompt=request.negative_prompt, step_callback=on_step,
                                  image=request.init_image, strength=request.strength, image_embeds=image_embeds,
                                  progress=False)  # the explorer's and the app's own progress show it
                if state["stopped"] == "time":
                    raise TimeLimit(f"This request took longer than the {time_limit:g} s limit and was stopped "
                                    f"while drawing with {entry.name} (after {state['done']} of {state['total']} "
                                    "steps): ask for fewer steps or images, or a smaller size.")
                if state["stopped"]:
                    raise Interrupted(f"stopped while drawing with {entry.name} (after {state['done']} of "
                                      f"{state['total']} steps)")
                if plan:  # how this machine went against the estimate: half of it (geometric) moves the next one
                    estimated = self._seconds([row for row in plan if row[0] is entry])
                    self._slower[entry.base_key] = (self._slower.get(entry.base_key, 1.0)
                                                    * ((time.perf_counter() - began) / max(estimated, 1e-9)) ** 0.5)
                drawn += [Drawn(entry.name, s, im, None, size, withheld(im)) for s, im in zip(seeds, images)]
            scorer, shown = self.scorer, [d for d in drawn if not d.withheld]  # a black square gets no score
            if scorer is not None and shown:
                scores = scorer.score([d.image for d in shown], [request.prompt] * len(shown))
                for d, score in zip(shown, scores):
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
                      None if self._scorer is None else self.scorer.name, {e.name: e.label for e in entries}, note)

    def sizes(self, request: Request, entries: list[Entry]) -> tuple[list[int], str]:
        """The size each entry draws at, and how it was chosen. A size in the request: all at it. Left to the
        models (0 / None): a run at its training size; a base alone at its own size; a base beside runs of its own
        model at their training size (helpers.studio.catalog.shared_size), so base and run compare like for like."""
        if request.size:
            return [request.size] * len(entries), ""
        sizes, notes = [], []
        for entry in entries:
            if entry.is_run:
                sizes.append(entry.default_size)
                continue
            size, why = shared_size([e for e in entries if e.base_key == entry.base_key])
            sizes.append(size)
            if any(e.is_run and e.base_key == entry.base_key for e in entries):
                notes.append(f"{entry.name} drawn at {size} px, {why}, to pair with it")
        return sizes, "; ".join(notes)

    def save_folder(self, request: Request) -> Path:
        """Where Save puts a request's sheet: the first chosen run's folder (explorer/), else <storage>/explorer."""
        run = next((self.catalog.get(m) for m in request.models if self.catalog.get(m).is_run), None)
        return (run.folder if run is not None else self.catalog.root) / "explorer"
