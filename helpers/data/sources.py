"""Where training images and captions come from: CIFAR-10 (captioned from templates), the Naruto BLIP captions, or
a user's image folder (helpers.data.folders). Each source returns lazy `Record`s (helpers.data.validation) that `validate`
checks next.

    records = load_source("cifar10", "uoft-cs/cifar10")        # key, load() -> bytes, caption, label
    records = load_preset_records(with_source(preset, "folder", "/content/my_images"))
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

from ..core.presets import CIFAR10, CIFAR10_CLASSES, NARUTO, Preset
from ..tiny import world as tiny
from .captions import clean_caption
from .folders import FileBytes, load_folder
from .report import DatasetError
from .validation import Record

TRAIN_TEMPLATES = ("a photo of a {label}", "a blurry photo of a {label}", "a close-up photo of a {label}",
                   "a low resolution photo of a {label}", "a cropped photo of the {label}",
                   "a bright photo of a {label}")
# Never trained on: notebook 02 prompts with these to see whether the model learned the class, not the sentence.
HELD_OUT_TEMPLATES = ("a painting of a {label}", "a pixelated photo of the {label}", "a sketch of a {label}")


# ---------------------------------------------------------------- captions from templates

def fill_template(template: str, label: str) -> str:
    """'a photo of a {label}' + 'airplane' → 'a photo of an airplane'."""
    if label[:1].lower() in "aeiou":
        template = template.replace("a {label}", "an {label}")
    return template.format(label=label)


def cifar_caption(class_name: str, seed: int, index: int) -> str:
    """The caption of image `index`: a training template chosen by (seed, index), the same on every run."""
    rng = random.Random(f"{seed}/{index}")  # str seeds hash with sha512: stable across processes
    return fill_template(rng.choice(TRAIN_TEMPLATES), class_name)


# ---------------------------------------------------------------- lazy image bytes of a Hub table

@dataclass(eq=False)
class RowBytes:
    """Lazy handle: the encoded image of one row of a (memory-mapped) `datasets` table."""
    table: object
    column: str
    index: int

    def __call__(self) -> bytes:
        cell = self.table[self.index][self.column]
        return cell["bytes"] if cell.get("bytes") else Path(cell["path"]).read_bytes()


# ---------------------------------------------------------------- Hub datasets (and local copies of them)

def _load_hf(ref: str):
    """A Hub dataset, or a local image folder through datasets' `imagefolder` (same code path, same columns)."""
    import datasets
    local = Path(ref).is_dir()
    quiet = local and not datasets.utils.are_progress_bars_disabled()
    if quiet:  # a local folder reads in a moment: its three bars (resolve, "download", split) say nothing
        datasets.disable_progress_bars()
    try:
        return (datasets.load_dataset("imagefolder", data_dir=ref, split="train") if local
                else datasets.load_dataset(ref, split="train"))  # a Hub download keeps its bars: a long step
    except Exception as e:
        raise DatasetError(f"cannot load dataset {ref!r}: {type(e).__name__}: {e}") from e
    finally:
        if quiet:
            datasets.enable_progress_bars()


def records_from_hf(ds, kind: str, ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """Records of a loaded `datasets.Dataset`: "cifar10" (columns img|image + label, captioned from
    TRAIN_TEMPLATES) or "naruto" (image + text). Images stay encoded: our validator must see the raw bytes."""
    import datasets
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    column = "img" if "img" in ds.column_names else "image"  # uoft-cs/cifar10 says img, imagefolder says image
    needed = {"cifar10": "label", "naruto": "text"}[kind]
    if column not in ds.column_names or needed not in ds.column_names:
        raise DatasetError(f"{ref}: a {kind} dataset needs columns {column!r} and {needed!r}, found {ds.column_names}")
    ds = ds.cast_column(column, datasets.Image(decode=False))
    if kind == "cifar10":
        names = list(getattr(ds.features["label"], "names", None) or CIFAR10_CLASSES)  # ClassLabel on the Hub
        labels = [int(y) for y in ds["label"]]
        captions = [cifar_caption(names[y], seed, i) for i, y in enumerate(labels)]
    else:
        labels, captions = [None] * len(ds), [clean_caption(t) if t else t for t in ds["text"]]
    if len(ds) == 0:
        return []
    local = ds[0][column].get("bytes") is None  # imagefolder: paths on disk; Hub parquet: bytes in the table
    cells = list(ds.select_columns([column])[column]) if local else None
    return [Record(cells[i]["path"], FileBytes(cells[i]["path"]), captions[i], labels[i]) if local else
            Record(f"{ref}/train/{i}", RowBytes(ds, column, i), captions[i], labels[i]) for i in range(len(ds))]


def load_cifar10(ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """CIFAR-10: Hub `uoft-cs/cifar10`, or an image folder whose metadata.jsonl has an int `label`."""
    return records_from_hf(_load_hf(ref), "cifar10", ref, limit, seed)


def load_naruto(ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """lambdalabs/naruto-blip-captions, or an image folder with a `text` column: BLIP captions as given."""
    return records_from_hf(_load_hf(ref), "naruto", ref, limit, seed)


# ---------------------------------------------------------------- choosing a source

SOURCES = {"cifar10": load_cifar10, "naruto": load_naruto, "folder": load_folder}


def load_source(kind: str, ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """Records of one source: "cifar10", "naruto" (Hub id or local image folder) or "folder" (a user's folder).
    `limit` keeps the first N images; `seed` picks CIFAR caption templates."""
    if kind not in SOURCES:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {sorted(SOURCES)}")
    if not str(ref).strip():  # Path("") is the current folder: never scan (or train on) it by accident
        raise DatasetError(f"no {kind} dataset given: the reference is empty; set a folder, a Hub id or tiny/<name>")
    return SOURCES[kind](tiny.resolve(ref), limit, seed)


# Where each source kind lives per profile, for notebooks that swap a preset's data (SOURCE = "naruto", ...).
SOURCE_REFS = {"cifar10": {"t4": CIFAR10, "tiny": "tiny/cifar10"},
               "naruto": {"t4": NARUTO, "tiny": "tiny/naruto"}}


def with_source(preset: Preset, source: str = "preset", folder: str = "") -> Preset:
    """`preset` with its data swapped: "preset" keeps it, "cifar10"/"naruto" use the profile's copy, "folder"
    uses your image folder `folder`."""
    if source == "preset":
        return preset
    if source == "folder":
        if not folder or not Path(folder).is_dir():
            raise DatasetError(f"SOURCE='folder' needs FOLDER set to an existing image folder, not {folder!r}")
        return replace(preset, data_source="folder", data_ref=str(folder))
    if source not in SOURCE_REFS:
        raise DatasetError(f"unknown source {source!r}; choose 'preset', 'folder' or one of {sorted(SOURCE_REFS)}")
    return replace(preset, data_source=source, data_ref=SOURCE_REFS[source][preset.profile])


def load_preset_records(preset: Preset) -> list[Record]:
    """The records of a preset's dataset, as many as it trains on, captioned with its seed."""
    return load_source(preset.data_source, preset.data_ref, preset.max_train_images, preset.seed)
