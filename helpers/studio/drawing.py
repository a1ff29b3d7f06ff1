"""A drawing request (`Request`), what it drew (`Drawn`, `Result`: sheet PNG + settings JSON), the bounds a request is
checked against (LIMITS, MAX_SIZE) and the errors a person sees (`RequestError`, `Interrupted`, `TimeLimit`,
`advice_for` on out of memory). helpers.studio.engine checks and draws requests; helpers.studio.catalog lists what can draw.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..generate.grids import comparison_sheets
from ..generate.sampling import folder_name

LIMITS = dict(steps=(1, 150), guidance=(0.0, 30.0), seed=(0, 2**32 - 1), scale=(0.0, 2.0), count=(1, 4),
              strength=(0.05, 1.0))
MAX_SIZE = 2048  # px a side; the size rule has no upper end, a T4 has (SDXL at 1024 is its native size)


class RequestError(ValueError):
    """A request that cannot be drawn, said in one sentence for the person who made it."""


class Interrupted(RequestError):
    """`should_stop()` said stop: the pipeline stopped between denoising steps."""


class TimeLimit(Interrupted):
    """The request ran past its time limit: the pipeline stopped between denoising steps."""


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
    clip_score: float | None  # 100 · cos(image, prompt) by the engine's scorer; None without one or when withheld
    size: int
    withheld: bool = False  # SD1.5's safety checker replaced the picture by a black square: not scored

    @property
    def score_text(self) -> str:
        """What a person reads under the image: its CLIP score, or why it has none."""
        if self.withheld:
            return "withheld by the SD1.5 safety checker"
        return "" if self.clip_score is None else f"CLIP {self.clip_score:.1f}"


@dataclass
class Result:
    request: Request
    images: list[Drawn]
    seconds: float
    clip_model: str | None
    labels: dict[str, str] = field(default_factory=dict)  # model → its short label (Entry.label)
    note: str = ""  # how the size was chosen when the request left it to the models (helpers.studio.engine)

    def by_model(self) -> dict[str, list[Drawn]]:
        out: dict[str, list[Drawn]] = {}
        for drawn in self.images:
            out.setdefault(drawn.model, []).append(drawn)
        return out

    def settings(self) -> dict:
        request = {k: v for k, v in asdict(self.request).items() if k != "init_image"}
        request["init_image"] = None if self.request.init_image is None else "given"
        return {"request": request, "clip_model": self.clip_model, "seconds": round(self.seconds, 3),
                "images": [{"model": d.model, "seed": d.seed, "size": d.size, "clip_score": d.clip_score,
                            "withheld": d.withheld} for d in self.images], "note": self.note}

    def save(self, folder: str | Path, stem: str | None = None) -> tuple[Path, Path]:
        """A sheet (rows = seeds, columns = models, CLIP scores in the row labels) and the settings as JSON."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or time.strftime("%Y%m%d-%H%M%S-") + folder_name(self.request.prompt[:40])
        by_model = self.by_model()
        models = list(by_model)
        rows = [[by_model[m][k].image for m in models] for k in range(self.request.count)]

        def label(k: int) -> str:
            drawn = [by_model[m][k] for m in models]
            text = " | ".join("withheld" if d.withheld else "–" if d.clip_score is None else f"{d.clip_score:.1f}"
                              for d in drawn)
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


def checked_number(value, what: str, integer: bool):
    """`value` as a number within LIMITS[what], or a RequestError saying why not."""
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


def open_upload(image) -> Image.Image:
    """An uploaded init image (a PIL image or a path) as RGB, or a RequestError saying it cannot be read."""
    try:
        return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
    except Exception as e:  # any unreadable upload: PIL raises several kinds
        raise RequestError(f"cannot read the init image ({type(e).__name__}: {e}); upload a PNG or JPEG") from e
