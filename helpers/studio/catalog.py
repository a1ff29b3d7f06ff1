"""What can draw: the base models and every finished run of the series, found in the storage root, with the runs
that are missing and why. The UI-free core behind the prompt explorer (helpers.studio.explorer), the A/B study
(helpers.studio.study), notebook 05's evaluation and the app (Gradio); helpers.studio.engine draws with what is listed here.

    catalog = Catalog.scan("tiny")        # base SD1.5 / SDXL + every finished run under <storage>/runs
    catalog.names()                       # ["SD1.5 base", "SDXL base", "sd15_xattn_cifar10-crossattn-tiny", …]
    catalog.by_family()                   # {"sd15": [Entry, …], "sdxl": [Entry, …]}
    catalog.missing                       # runs of the series not usable yet, each with why and what to run

Rule this module owns:
- An image-conditioned run (notebook 04: `Method.needs_image_embeds`) draws from one CLIP image embedding per
  image, which a typed prompt does not give. It is drawable once a finished run of a method that
  `makes_image_embeds` (a prior, notebook 04 part 2) with the same CLIP and profile exists under `runs/` or
  `priors/`: then it is listed once per such source, named "<run> + <source>", and the source's
  `image_embeds_source` turns each (prompt, seed) into the embedding (helpers.generate.sampling's one per-image input).
  Without a source it is in `missing` as "not drawable from a prompt"; a source alone draws nothing and is listed
  nowhere.
- Each run folder is checked on its own: its run.json must hold a preset today's rules accept, and its final/ must
  match its manifest and hold the files its method loads (helpers.methods.runs.checked_run). A folder that fails is
  in `missing` as "not drawable: <folder>: <why>"; the bases and every other run are listed as usual. What only a
  load can tell (files that do not fit their run.json) is the engine's: that run alone is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from ..core.paths import PRIORS, RUNS, run_name, storage_root
from ..core.presets import Preset, get_preset
from ..methods import runs as runs_
from ..methods.registry import METHODS, method_class
from ..models import vae_scale_factor
from ..tiny.world import resolve
from ..train.checkpoint import checkpoint_dirs
from .drawing import RequestError

BASES = {"sd15": ("SD1.5 base", "sd15_xattn_cifar10"), "sdxl": ("SDXL base", "sdxl_lora_naruto_1024")}
# (family → shown name, the preset whose model/VAE/precision loads the base pipeline; a base draws at its own size,
# `own_size`, not the preset's resolution). Runs of the series, with the notebook and the setting that makes each:
SERIES_RUNS = (
    ("02", "sd15_xattn_cifar10", "crossattn", "run notebook 02"),
    ("02", "sd15_xattn_cifar10", "lora", "run notebook 02 with METHOD = 'lora'"),
    ("03", "sdxl_lora_naruto_256", "lora", "run notebook 03 (RESOLUTION = 256)"),
    ("03", "sdxl_lora_naruto_1024", "lora", "run notebook 03 (RESOLUTION = 1024; spans sessions on a T4)"),
    ("04", "prior_sd15", "ip_adapter", "run notebook 04"),
)
RUN_FOLDERS = (RUNS, PRIORS)  # where finished runs live under the storage root: runs/ for what a pipeline
#                                     loads, priors/ for runs that only make image embeddings (notebook 04 part 2)



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
        """What it draws at when a request leaves the size to it: a run its training size, a base model its own
        (the UNet's sample size × the VAE's scale: SD1.5 512, SDXL 1024), never the CIFAR preset's 256."""
        return self.preset.resolution if self.is_run else own_size(self.preset.model, self.preset.vae)

    @property
    def label(self) -> str:
        """A short name that wraps on a sheet: the run folder's name without its profile, in words; a run drawn
        through a prior: its method and the prior's ("ip adapter + mlp prior"), which tell two such entries apart
        in the first words, where a sheet's header and a chart's axis cut."""
        if self.source is not None:
            return f"{self.preset.method} + {runs_.run_preset(self.source).method}".replace("_", " ")
        name = self.name.replace(f"-{self.preset.profile}", "") if self.is_run else self.name
        return name.replace("_", " ").replace("-", " ")


@lru_cache(maxsize=None)
def own_size(model: str, vae: str | None = None) -> int:
    """A base model's own size in px, from its configs (no weights): what its stock pipeline draws by default."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: only when a size is asked for
    unet = UNet2DConditionModel.load_config(resolve(model), subfolder="unet")
    vae_config = (AutoencoderKL.load_config(resolve(vae)) if vae
                  else AutoencoderKL.load_config(resolve(model), subfolder="vae"))
    return unet["sample_size"] * vae_scale_factor(SimpleNamespace(**vae_config))


def shared_size(entries) -> tuple[int, str]:
    """(size, why) for drawing `entries` of one base model as a paired comparison (same noise, same size): the
    largest training size among the runs, so a base is compared with a run where the run was trained; without a run,
    the base model's own size."""
    runs = sorted((e for e in entries if e.is_run), key=lambda e: e.preset.resolution)
    if not runs:
        base = next(iter(entries))
        return base.default_size, f"{base.name}'s own size"
    return runs[-1].preset.resolution, f"the training size of {runs[-1].name}"


@dataclass(frozen=True)
class MissingRun:
    name: str  # the run folder's name
    notebook: str  # the notebook that makes it ("02", …; "" for a run the series does not know)
    why: str  # one sentence: not trained, unfinished, other profile, unknown method


def _unusable(folder: Path) -> str | None:
    """Why a finished run's final/ cannot be drawn (its manifest, run.json and the files its method loads are
    checked: helpers.methods.runs.checked_run), or None when it is whole."""
    try:
        runs_.checked_run(folder)
    except (OSError, runs_.RunError) as e:
        return f"not drawable: {e}"
    return None


def _series_name(preset: str, method: str, profile: str) -> str:
    return run_name(get_preset(preset, profile, method=method))


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
        for folder in [f for under in RUN_FOLDERS if (root / under).is_dir()
                       for f in sorted((root / under).iterdir()) if (f / "final").is_dir()]:
            try:  # each run folder on its own: a bad one is listed with why, the rest (and the bases) keep working
                preset = runs_.run_preset(folder)
            except FileNotFoundError:
                missing.append(MissingRun(folder.name, "", f"not drawable: {folder / 'final'} has no {runs_.RUN_FILE} "
                                          "(its export did not finish, or its files were removed): train it to the "
                                          "end again to export it"))
                continue
            except (OSError, runs_.RunError) as e:
                missing.append(MissingRun(folder.name, "", f"not drawable: {e}"))
                continue
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
            elif (why := _unusable(folder)) is not None:
                missing.append(MissingRun(folder.name, notebook, why))
            else:
                entries.append(Entry(folder.name, preset.family, preset.method, preset, folder))
        checked: dict[Path, str | None] = {}  # a source is checked once it would draw: paired with a run of its CLIP
        for folder, preset, notebook in conditioned:
            matching = [f for f, p in sources if p.clip_model == preset.clip_model]
            for source in matching:
                if source not in checked and (why := checked.setdefault(source, _unusable(source))) is not None:
                    missing.append(MissingRun(source.name, "", why))
            usable = [f for f in matching if checked[f] is None]
            if not usable:
                missing.append(MissingRun(folder.name, notebook, "finished, but it draws from a CLIP image embedding "
                                          "per image and nothing turns a prompt into one yet: not drawable from a "
                                          f"prompt until a prior on {preset.clip_model} embeddings is trained "
                                          "(notebook 04, part 2)"))
            elif (why := _unusable(folder)) is not None:
                missing.append(MissingRun(folder.name, notebook, why))
            else:
                entries += [Entry(f"{folder.name} + {source.name}", preset.family, preset.method, preset, folder,
                                  source) for source in usable]
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
