"""The training transform (with SDXL size/crop conditioning) and the torch Dataset the training loop consumes.

    records = sources.load_preset_records(preset)                 # helpers.data.sources: lazy Records
    report = validation.validate(records, 256, tokenizer)         # helpers.data.validation: per-file report
    dataset = prepare_dataset(preset, components, report)         # helpers.data.caches built once, then reused

Every random choice of a sample (crop offset, flip) is made by `TrainTransform.choose` from (seed, epoch, index),
so a sample is identical whenever it is drawn, from the images or from the caches: a resumed run sees exactly the
data an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..core import paths
from ..core.presets import Preset
from . import caches
from .caches import oriented
from .report import DatasetError, ValidationReport
from .sources import load_preset_records
from .validation import Record, validate


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index), decorrelated between neighbours."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → 3×H×W float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


# ---------------------------------------------------------------- transform

class TrainTransform:
    """Resize the short side to `resolution` (antialiased), crop a square (center or random), optionally flip.

    Also returns SDXL's micro-conditioning: `original_size` (h, w) before resizing and `crop_top_left`
    (top, left) in the resized image, as diffusers' train_text_to_image_sdxl.py. One difference: for a flipped
    sample diffusers reports left = resolution - left; we report where the crop sits in the mirrored image,
    resized_width - resolution - left, which is 0 for a centred crop of a square image, as SDXL saw in training.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 interpolation: str = "bilinear"):
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.interpolation = interpolation
        self.resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                         "lanczos": Image.Resampling.LANCZOS}[interpolation]

    def params(self) -> dict:
        return dict(resolution=self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                    interpolation=self.interpolation)

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """Short side → resolution, long side scaled and truncated (torchvision's Resize(int) rule)."""
        r = self.resolution
        return (r, max(r, int(r * w / h))) if h <= w else (max(r, int(r * h / w)), r)

    def choose(self, seed: int, epoch: int, index: int) -> tuple[bool, tuple[float, float]]:
        """(flip, crop offsets in [0, 1)) of sample `index` in `epoch`: the one place they are decided. The three
        uniforms are always drawn, so the flip does not depend on the crop mode."""
        u = torch.rand(3, generator=sample_generator(seed, epoch, index))
        return self.random_flip and bool(u[0] < 0.5), (float(u[1]), float(u[2]))

    def crop_top_left(self, size: tuple[int, int], offsets: tuple[float, float] = (0.0, 0.0),
                      flip: bool = False) -> tuple[int, int]:
        """(top, left) of the crop in the resized image of original `size` (h, w), or, with `flip`, in its mirror
        image. `offsets` place a random crop (ignored for a center crop)."""
        r = self.resolution
        rh, rw = self.resized_size(*size)
        if self.center_crop:
            top, left = int(round((rh - r) / 2.0)), int(round((rw - r) / 2.0))
        else:
            top, left = min(int(offsets[0] * (rh - r + 1)), rh - r), min(int(offsets[1] * (rw - r + 1)), rw - r)
        return (top, rw - r - left) if flip else (top, left)

    def apply(self, image: Image.Image, flip: bool = False, offsets: tuple[float, float] = (0.0, 0.0)) -> dict:
        """The crop of `image` placed by `offsets`, mirrored if `flip`, with its size/crop conditioning. Cached
        latents are encoded from this too, so both paths crop and flip identically."""
        r, (w, h) = self.resolution, image.size
        rh, rw = self.resized_size(h, w)
        resized = image.resize((rw, rh), self.resample, reducing_gap=None)  # PIL resize antialiases when shrinking
        top, left = self.crop_top_left((h, w), offsets)
        pixels = to_tensor(resized.crop((left, top, left + r, top + r)))
        return {"pixel_values": pixels.flip(-1) if flip else pixels, "original_size": (h, w),
                "crop_top_left": self.crop_top_left((h, w), offsets, flip), "flipped": flip}


# ---------------------------------------------------------------- the Dataset

def require_center_crop(transform: TrainTransform) -> None:
    if not transform.center_crop:
        raise ValueError("cached latents hold one centre crop per image: a random crop cannot be applied to them. "
                         "Use center_crop=True, or cache_latents=False for random crops.")


class TrainDataset(torch.utils.data.Dataset):
    """Items: {"pixel_values" 3×R×R in [-1, 1] | "latent_params" 8×r×r (mean ‖ logvar), "caption",
    "original_size" (h, w), "crop_top_left" (top, left), "index"} plus "prompt_embeds" 77×D and, for SDXL,
    "pooled_prompt_embeds" when text is cached.

    Call `set_epoch(e)` before iterating each epoch (and before creating the DataLoader iterator: worker
    processes copy the dataset then; so no persistent_workers)."""

    def __init__(self, records: list[Record], transform: TrainTransform, seed: int = 0,
                 latents: dict | None = None, text: dict | None = None):
        if latents is not None:
            require_center_crop(transform)
        self.records, self.transform, self.seed, self.epoch = records, transform, seed, 0
        self.latents, self.text = latents, text
        self.cache_status: dict[str, str] = {}  # "latents"/"text" → "built" | "reused" | "rebuilt"
        self.cache_dirs: dict[str, Path] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        flip, offsets = self.transform.choose(self.seed, self.epoch, index)
        item = {"caption": record.caption, "index": index}
        if self.latents is not None:
            item["latent_params"] = self.latents[oriented("latent_params", flip)][index].float()
            item["original_size"] = self.latents["original_size"][index].clone()
            item["crop_top_left"] = self.latents[oriented("crop_top_left", flip)][index].clone()
        else:
            out = self.transform.apply(record.image(), flip, offsets)  # a file changed since validation stops here
            item["pixel_values"] = out["pixel_values"]
            item["original_size"] = torch.tensor(out["original_size"], dtype=torch.long)
            item["crop_top_left"] = torch.tensor(out["crop_top_left"], dtype=torch.long)
        if self.text is not None:
            c = int(self.text["caption_index"][index])
            item["prompt_embeds"] = self.text["prompt_embeds"][c].float()
            if "pooled_prompt_embeds" in self.text:
                item["pooled_prompt_embeds"] = self.text["pooled_prompt_embeds"][c].float()
        return item


# ---------------------------------------------------------------- one entry point

def prepare_dataset(preset: Preset, components, report: ValidationReport | None = None,
                    root: str | Path | None = None, encode_batch_size: int | None = None) -> TrainDataset:
    """load → validate (skip bad files) → build or reuse the caches the preset asks for → TrainDataset.

    Idempotent: every notebook can call it; the second call reuses the caches (checksums verified). Pass the
    `report` of an earlier `validate` to skip validating again. Caches live in `<storage>/cache/`
    (helpers.core.paths)."""
    transform = TrainTransform(preset.resolution, preset.center_crop, preset.random_flip)
    if preset.cache_latents:
        require_center_crop(transform)  # before validating and encoding, not after
    if report is None:
        report = validate(load_preset_records(preset), preset.resolution, components.tokenizers[0], "skip")
        print(report.summary().splitlines()[0])
    records = report.records
    if not records:
        raise DatasetError(f"no usable images in {preset.data_ref!r}:\n{report.summary()}")
    paths.require_lasting_storage(preset.profile, "building or reusing the caches")
    root = Path(root) if root is not None else paths.storage_root()
    latents = text = None
    status, dirs = {}, {}
    if preset.cache_latents:
        latents, status["latents"], dirs["latents"] = caches.cache_latents(preset, components, records, transform,
                                                                           root, encode_batch_size)
    if preset.cache_text and not preset.train_text_encoder:  # a trained text encoder changes the embeddings
        text, status["text"], dirs["text"] = caches.cache_text(components, records, root)
    dataset = TrainDataset(records, transform, preset.seed, latents, text)
    dataset.cache_status, dataset.cache_dirs = status, dirs
    return dataset


def cache_summary(dataset: TrainDataset) -> str:
    """Where each cache of `dataset` lives, its size on disk and whether it was built or reused."""
    if not dataset.cache_dirs:
        return "no caches (images and captions are encoded at every step)"
    lines = []
    for name, folder in dataset.cache_dirs.items():
        size = sum(p.stat().st_size for p in folder.iterdir())
        lines.append(f"{name:<8} {dataset.cache_status[name]:<8} {size / 2**20:8.2f} MiB  {folder}")
    return "\n".join(lines)


def describe_item(item: dict) -> str:
    """One training sample as a reader wants it: the shape of each tensor, the values of short ones (SDXL's original
    size and crop corner are two numbers each, not a shape of 2), and plain values as they are."""
    lines = []
    for key, value in item.items():
        if hasattr(value, "shape") and value.numel() <= 4:
            shown = tuple(round(v, 3) if isinstance(v, float) else v for v in value.flatten().tolist())
        elif hasattr(value, "shape"):
            shown = f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
        else:
            shown = repr(value)
        lines.append(f"{key:<16} {shown}")
    return "\n".join(lines)
