"""CLIP score per image, bootstrap confidence intervals, paired baseline-vs-fine-tuned comparisons, result tables.

CLIP score here = 100 · cos(image features, text features) of one image and its prompt, reported RAW: torchmetrics'
CLIPScore clamps it at 0 (max(100·cos, 0)); we do not, so a mean over images is an unbiased mean of the cosine.
Scores from different CLIP models are not comparable, so every score travels with the model's `name`.

Comparisons are paired: baseline and fine-tuned images are generated from the same prompt AND seed (same starting
noise, see helpers.sampling), so the per-pair difference removes most of the prompt-to-prompt and seed-to-seed
variation and the bootstrap CI of the mean difference says whether fine-tuning changed the score.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .precision import Precision, precision_for
from .runtime import device as default_device
from .tiny import resolve

BASELINE = "baseline"
RESULT_COLUMNS = ("image_path", "prompt", "seed", "variant", "clip_model", "score")
# open_clip models per profile: (model, pretrained tag). The tiny one is a random-weight open_clip in local-dir form.
CLIP_MODELS = {"t4": ("ViT-L-14", "openai"), "tiny": ("tiny/open_clip", None)}


# ---------------------------------------------------------------- images in, uint8 RGB out

def to_pil(image) -> Image.Image:
    """A PIL image, a file path, or an HWC (or HW) uint8 array/tensor in 0-255 or float one in [0, 1] → RGB PIL.

    Floats become uint8 by round(x · 255) BEFORE the CLIP preprocessing, so a float image and its uint8 version
    go through identical pixels and get identical scores."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, Path)):
        return Image.open(image).convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"cannot score a {type(image).__name__}; pass PIL images, paths or HWC arrays")
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"image array of shape {image.shape} is not HWC; for CHW use .permute(1, 2, 0)")
    if image.ndim not in (2, 3):
        raise ValueError(f"image array must be HW or HWC, got shape {image.shape}")
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all() or image.min(initial=0) < 0 or image.max(initial=0) > 1:
            raise ValueError("float images must be in [0, 1] (for [-1, 1] use (x + 1) / 2)")
        image = np.round(image * 255).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"integer images must be uint8 in 0-255, got {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    return Image.fromarray(image).convert("RGB")


# ---------------------------------------------------------------- the scorer

def pixel_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype pixels must have to enter `model.visual`: that of its input layer.

    Not `next(model.parameters()).dtype`: open_clip's precision="fp16" keeps the positional embeddings and the
    LayerNorms in fp32, so the first parameter is fp32 while the patch embedding (`visual.conv1`) is fp16."""
    visual = model.visual
    first = getattr(visual, "conv1", None)
    if not isinstance(first, (torch.nn.Conv2d, torch.nn.Linear)):
        first = next((m for m in visual.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))), None)
    if first is None:
        raise ValueError(f"cannot tell the input dtype of {type(visual).__name__}: it has no Conv2d or Linear layer")
    return first.weight.dtype


class ClipScorer:
    """An open_clip model loaded once (eval mode, no grad) that scores image–prompt pairs in batches. Its dtype comes
    from helpers.precision: fp16 on a T4 (and in the CPU T4-dtype test mode), fp32 otherwise."""

    def __init__(self, model: str = "ViT-L-14", pretrained: str | None = "openai",
                 device: torch.device | str | None = None, precision: Precision | None = None):
        import open_clip
        if device is None:
            device = precision.device if precision is not None else default_device()
        self.device = torch.device(device)
        self.precision = precision if precision is not None else precision_for("fp16", self.device)
        local = resolve(model)
        if model.startswith("tiny/") or Path(local).is_dir():
            spec, pretrained = "local-dir:" + local, None  # open_clip's local folder layout; weights are in it
            self.name = "open_clip tiny (random)" if model == "tiny/open_clip" else f"open_clip {Path(local).name}"
        else:
            spec = model
            self.name = f"open_clip {model} ({pretrained or 'random'})"
        # OpenAI's CLIP was trained with QuickGELU; open_clip's plain "ViT-L-14" config uses GELU unless told.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            spec, pretrained=pretrained, device=self.device, force_quick_gelu=pretrained == "openai",
            precision=self.precision.open_clip_precision)
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(spec)
        self.dtype = pixel_dtype(self.model)

    @classmethod
    def from_profile(cls, profile: str, device: torch.device | str | None = None,
                     precision: Precision | None = None) -> "ClipScorer":
        if profile not in CLIP_MODELS:
            raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(CLIP_MODELS)}")
        return cls(*CLIP_MODELS[profile], device=device, precision=precision)

    def __repr__(self) -> str:
        return f"ClipScorer({self.name} on {self.device}, {self.precision.open_clip_precision})"

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens).float()

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(to_pil(im)) for im in images]).to(self.device, self.dtype)
        return self.model.encode_image(pixels).float()

    def score(self, images: Sequence, prompts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """100 · cos(image, prompt) for each aligned pair (not clamped at 0), as float64 numbers."""
        if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
            images = list(images)  # a batch N×H×W×C
        images, prompts = list(images), [str(p) for p in prompts]
        if not images or len(images) != len(prompts):
            raise ValueError(f"need one prompt per image (got {len(images)} images, {len(prompts)} prompts)")
        unique = sorted(set(prompts))  # seeds repeat prompts: encode each text once
        text = torch.cat([self.text_features(unique[i:i + batch_size]) for i in range(0, len(unique), batch_size)])
        text = torch.nn.functional.normalize(text, dim=-1)
        row = {p: k for k, p in enumerate(unique)}
        scores = []
        starts = range(0, len(images), batch_size)
        for start in tqdm(starts, desc=f"CLIP score ({self.name})", disable=len(starts) < 3):
            feats = torch.nn.functional.normalize(self.image_features(images[start:start + batch_size]), dim=-1)
            idx = torch.tensor([row[p] for p in prompts[start:start + batch_size]], device=feats.device)
            scores.append(100 * (feats * text[idx]).sum(-1))
        return torch.cat(scores).cpu().double().numpy()


# ---------------------------------------------------------------- statistics

def _as_values(values, what: str = "values") -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D list of numbers, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"{what} contain NaN or infinity")
    return values


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its percentile-bootstrap confidence interval (resampling with replacement,
    numpy Generator seeded with `seed`, so the same data give the same interval)."""
    values = _as_values(values)
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1 (got {level}, {n_boot})")
    rng = np.random.default_rng(seed)
    rows = max(1, 2**22 // values.size)  # resample in chunks of ≤ 4M indices to bound memory
    means = np.concatenate([values[rng.integers(0, values.size, (min(rows, n_boot - done), values.size))].mean(1)
                            for done in range(0, n_boot, rows)])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def paired_difference(tuned, baseline, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Mean of tuned − baseline over aligned pairs (same prompt and seed) with its bootstrap CI, the number of
    pairs and how many the tuned image won. A CI excluding 0 means a change beyond seed/prompt noise."""
    tuned, baseline = _as_values(tuned, "tuned scores"), _as_values(baseline, "baseline scores")
    if tuned.shape != baseline.shape:
        raise ValueError(f"paired scores must align one to one (got {tuned.size} tuned, {baseline.size} baseline)")
    mean, low, high = bootstrap_ci(tuned - baseline, n_boot, level, seed)
    return {"mean_diff": mean, "low": low, "high": high, "n": int(tuned.size), "wins": int((tuned > baseline).sum())}


# ---------------------------------------------------------------- result tables

def results_frame(rows: Iterable[dict], csv_path: str | Path | None = None):
    """Per-image results as a pandas DataFrame with RESULT_COLUMNS (pandas comes with `datasets`); with
    `csv_path`, also written there as CSV."""
    import pandas as pd
    frame = pd.DataFrame(list(rows))
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
    if frame.empty or missing:
        raise ValueError(f"results need rows with columns {RESULT_COLUMNS}; missing {missing or 'all rows'}")
    frame = frame[list(RESULT_COLUMNS)].astype({"seed": int, "score": float})
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(csv_path, index=False)
    return frame


def score_manifest(scorer: ClipScorer, manifest: str | Path, variant: str, batch_size: int = 32):
    """Score every image listed in a helpers.sampling manifest.csv → results_frame rows for `variant`."""
    from .sampling import read_manifest
    rows = read_manifest(manifest)
    if not rows:
        raise ValueError(f"{manifest} lists no images")
    scores = scorer.score([r["file"] for r in rows], [r["prompt"] for r in rows], batch_size)
    return results_frame({"image_path": r["file"], "prompt": r["prompt"], "seed": r["seed"], "variant": variant,
                          "clip_model": scorer.name, "score": s} for r, s in zip(rows, scores))


class ScoreTable:
    """Summary of a results frame: per (variant, CLIP model) n, mean and CI, plus one paired row per non-baseline
    variant (pairs matched on prompt and seed). Prints as text, renders as HTML in a notebook."""

    def __init__(self, rows: list[dict], level: float):
        self.rows, self.level = rows, level

    def row(self, variant: str, paired: bool = False) -> dict:
        """The summary row of `variant` (paired=True: its difference to the baseline)."""
        name = f"{variant} − {BASELINE}" if paired else variant
        for r in self.rows:
            if r["variant"] == name and r["paired"] == paired:
                return r
        raise KeyError(f"no {'paired ' if paired else ''}row for variant {variant!r}")

    @property
    def frame(self):
        import pandas as pd
        return pd.DataFrame(self.rows)

    def _cells(self) -> list[list[str]]:
        pct = f"{self.level:.0%} CI"
        cells = [["variant", "n", "mean", pct, "wins", "clip_model"]]
        for r in self.rows:
            sign = "+" if r["paired"] else ""
            wins = f"{r['wins']}/{r['n']}" if r["paired"] else ""
            cells.append([r["variant"], str(r["n"]), f"{r['mean']:{sign}.2f}",
                          f"[{r['low']:{sign}.2f}, {r['high']:{sign}.2f}]", wins, r["clip_model"]])
        return cells

    def __str__(self) -> str:
        cells = self._cells()
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)

    def to_markdown(self) -> str:
        cells = self._cells()
        lines = ["| " + " | ".join(row) + " |" for row in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head, *body = self._cells()
        th = "".join(f"<th>{c}</th>" for c in head)
        trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"

    __repr__ = __str__


def score_table(results, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> ScoreTable:
    """Summarise a results frame (or rows): mean and bootstrap CI per variant and CLIP model, then for each
    variant other than "baseline" the paired difference to the baseline on matching prompt and seed."""
    frame = results if hasattr(results, "groupby") else results_frame(results)
    rows = []
    for (model, variant), group in frame.groupby(["clip_model", "variant"], sort=False):
        mean, low, high = bootstrap_ci(group["score"], n_boot, level, seed)
        rows.append(dict(variant=variant, n=len(group), mean=mean, low=low, high=high, wins=None, paired=False,
                         clip_model=model))
    for model, by_model in frame.groupby("clip_model", sort=False):
        base = by_model[by_model["variant"] == BASELINE]
        for variant in [v for v in by_model["variant"].unique() if v != BASELINE]:
            tuned = by_model[by_model["variant"] == variant]
            pairs = tuned.merge(base, on=["prompt", "seed"], suffixes=("", "_base"))
            if base.empty or pairs.empty:
                continue
            if pairs.duplicated(["prompt", "seed"]).any():
                raise ValueError(f"{variant!r} vs baseline: a (prompt, seed) pair appears more than once")
            d = paired_difference(pairs["score"], pairs["score_base"], n_boot, level, seed)
            rows.append(dict(variant=f"{variant} − {BASELINE}", n=d["n"], mean=d["mean_diff"], low=d["low"],
                             high=d["high"], wins=d["wins"], paired=True, clip_model=model))
    return ScoreTable(rows, level)


def record_run_summary(csv_path: str | Path, row: dict, key: str = "method"):
    """Add (or replace, by `key`) one run's summary row in a CSV shared by runs, e.g. crossattn vs LoRA on the same
    data, and return the whole table as a DataFrame."""
    import pandas as pd
    path = Path(csv_path)
    frame = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    if not frame.empty and key in frame.columns:
        frame = frame[frame[key] != row[key]]
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return frame
