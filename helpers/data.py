"""Dataset sources, the training transform (with SDXL size/crop conditioning), latent and text caches, and the
torch Dataset the training loop consumes.

    records = load_source("cifar10", "uoft-cs/cifar10")        # lazy Records: key, load() -> bytes, caption
    report = validate(records, 256, tokenizer)                   # helpers.validation: per-file report
    dataset = prepare_dataset(preset, components, report)        # caches built once, then reused

Every random choice of a sample (crop offset, flip) comes from a generator seeded by (seed, epoch, index), so a
sample is identical whenever it is drawn: a resumed run sees exactly the data an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import runtime, tiny
from .checkpoint import sha256_file, write_file
from .presets import Preset
from .validation import (DatasetError, Issue, Record, ValidationReport, caption_length_figure,  # noqa: F401
                         caption_token_lengths, open_rgb, preview_grid, validate)

TRAIN_TEMPLATES = ("a photo of a {label}", "a blurry photo of a {label}", "a close-up photo of a {label}",
                   "a low resolution photo of a {label}", "a cropped photo of the {label}",
                   "a bright photo of a {label}")
# Never trained on: notebook 02 prompts with these to see whether the model learned the class, not the sentence.
HELD_OUT_TEMPLATES = ("a painting of a {label}", "a pixelated photo of the {label}", "a sketch of a {label}")
CIFAR10_CLASSES = tiny.CIFAR10_CLASSES
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CACHE_VERSION = 1  # bump when the cache layout or its contents change
# The latent cache is built in batches of max(1, CACHE_ENCODE_PIXELS // px²) images (256 px: 16, 1024 px: 1):
# UNet and text encoders are resident while caching, and 32 images at 256 px would not leave SDXL 1 GiB to spare
# on a T4 (helpers.memory models this phase with the same constant).
CACHE_ENCODE_PIXELS = 16 * 256**2


# ---------------------------------------------------------------- small helpers

def fill_template(template: str, label: str) -> str:
    """'a photo of a {label}' + 'airplane' → 'a photo of an airplane'."""
    if label[:1].lower() in "aeiou":
        template = template.replace("a {label}", "an {label}")
    return template.format(label=label)


def cifar_caption(class_name: str, seed: int, index: int) -> str:
    """The caption of image `index`: a training template chosen by (seed, index), the same on every run."""
    rng = random.Random(f"{seed}/{index}")  # str seeds hash with sha512: stable across processes
    return fill_template(rng.choice(TRAIN_TEMPLATES), class_name)


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index), decorrelated between neighbours."""
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


# ---------------------------------------------------------------- sources

@dataclass(eq=False)
class FileBytes:
    """Lazy handle: the bytes of one file (picklable, so DataLoader workers can use it)."""
    path: str

    def __call__(self) -> bytes:
        return Path(self.path).read_bytes()


@dataclass(eq=False)
class RowBytes:
    """Lazy handle: the encoded image of one row of a (memory-mapped) `datasets` table."""
    table: object
    column: str
    index: int

    def __call__(self) -> bytes:
        cell = self.table[self.index][self.column]
        return cell["bytes"] if cell.get("bytes") else Path(cell["path"]).read_bytes()


def _load_hf(ref: str):
    """A Hub dataset, or a local image folder through datasets' `imagefolder` (same code path, same columns)."""
    import datasets
    try:
        return (datasets.load_dataset("imagefolder", data_dir=ref, split="train") if Path(ref).is_dir()
                else datasets.load_dataset(ref, split="train"))
    except Exception as e:
        raise DatasetError(f"cannot load dataset {ref!r}: {type(e).__name__}: {e}") from e


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
        labels, captions = [None] * len(ds), [t.strip() if t else t for t in ds["text"]]
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


def _read_metadata(meta: Path) -> tuple[dict[Path, dict], list[Record]]:
    """Rows of metadata.jsonl / metadata.csv by image path; unreadable lines become problem records."""
    import csv
    rows, problems = {}, []
    try:
        if meta.suffix == ".jsonl":
            lines = meta.read_text(errors="replace").splitlines()
            parsed = []
            for n, line in enumerate(lines, 1):
                if line.strip():
                    try:
                        parsed.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        problems.append(Record(f"{meta}:{n}", None, None, problem=f"not valid JSON: {e}",
                                               problem_code="bad_metadata"))
        else:
            with open(meta, newline="", errors="replace") as f:
                parsed = list(csv.DictReader(f))
    except OSError as e:
        return {}, [Record(str(meta), None, None, problem=f"cannot read: {e}", problem_code="bad_metadata")]
    for row in parsed:
        if not isinstance(row, dict) or not row.get("file_name"):
            problems.append(Record(str(meta), None, None, problem=f"row without file_name: {str(row)[:80]}",
                                   problem_code="bad_metadata"))
            continue
        rows[meta.parent / row["file_name"]] = row
    return rows, problems


def _caption_text(value) -> str | None:
    """A caption from a .txt path or a metadata cell; None when there is none (or it cannot be read)."""
    if isinstance(value, Path):
        try:
            return value.read_text(errors="replace").strip()
        except OSError:
            return None
    return None if value is None else str(value).strip()


def load_folder(ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """A folder of images with captions in same-name .txt files or in metadata.jsonl / metadata.csv
    (columns file_name + text or caption; a .txt file wins). Scanned here, not through `datasets`, so that every
    stray caption and every missing file becomes a line in the validation report."""
    root = Path(ref)
    if not root.is_dir():
        raise DatasetError(f"image folder {ref!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    meta_rows, records = {}, []
    for meta in (p for p in files if p.name in ("metadata.jsonl", "metadata.csv")):
        rows, problems = _read_metadata(meta)
        meta_rows.update(rows)
        records += problems
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {p.with_suffix("") for p in images}
    for txt in (p for p in files if p.suffix.lower() == ".txt" and p.with_suffix("") not in stems):
        records.append(Record(str(txt), None, _caption_text(txt), problem_code="orphan_caption",
                              problem=f"caption file with no image (no {txt.stem}.png/.jpg/… beside it)"))
    for path, row in meta_rows.items():
        if not path.is_file():
            records.append(Record(str(path), None, None, problem_code="missing_file",
                                  problem="named in the metadata file but does not exist"))
    found = []
    for path in images[:limit] if limit is not None else images:
        row, txt = meta_rows.get(path, {}), path.with_suffix(".txt")
        caption = _caption_text(txt if txt.is_file() else row.get("text", row.get("caption")))
        label = row.get("label")
        found.append(Record(str(path), FileBytes(str(path)), caption,
                            int(label) if str(label).lstrip("-").isdigit() else None))
    return found + records


SOURCES = {"cifar10": load_cifar10, "naruto": load_naruto, "folder": load_folder}


def load_source(kind: str, ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """Records of one source: "cifar10", "naruto" (Hub id or local image folder) or "folder" (a user's folder).
    `limit` keeps the first N images; `seed` picks CIFAR caption templates."""
    if kind not in SOURCES:
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {sorted(SOURCES)}")
    return SOURCES[kind](tiny.resolve(ref), limit, seed)


# Where each source kind lives per profile, for notebooks that swap a preset's data (SOURCE = "naruto", ...).
SOURCE_REFS = {"cifar10": {"t4": "uoft-cs/cifar10", "tiny": "tiny/cifar10"},
               "naruto": {"t4": "lambdalabs/naruto-blip-captions", "tiny": "tiny/naruto"}}


def with_source(preset: Preset, source: str = "preset", folder: str = "") -> Preset:
    """`preset` with its data swapped: "preset" keeps it, "cifar10"/"naruto" use the profile's copy, "folder"
    uses your image folder `folder`."""
    if source == "preset":
        return preset
    if source == "folder":
        if not folder or not Path(folder).is_dir():
            raise DatasetError(f"SOURCE='folder' needs FOLDER set to an existing image folder, not {folder!r}")
        return replace(preset, dataset="folder", dataset_ref=str(folder))
    if source not in SOURCE_REFS:
        raise DatasetError(f"unknown source {source!r}; choose 'preset', 'folder' or one of {sorted(SOURCE_REFS)}")
    return replace(preset, dataset=source, dataset_ref=SOURCE_REFS[source][preset.profile])


def load_preset_records(preset: Preset) -> list[Record]:
    return load_source(preset.dataset, tiny.resolve(preset.dataset_ref), preset.max_train_images, preset.seed)


# ---------------------------------------------------------------- transform

def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → 3×H×W float in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


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

    @staticmethod
    def draws(generator: torch.Generator | None) -> torch.Tensor:
        """The three uniforms every sample uses (flip, top, left); always drawn, so cached and uncached paths
        make the same choices from the same generator."""
        return torch.rand(3, generator=generator)

    def apply(self, image: Image.Image, flip: bool = False, offsets: tuple[float, float] = (0.0, 0.0)) -> dict:
        """Deterministic core: `offsets` in [0, 1) place a random crop (ignored for center crop)."""
        r, (w, h) = self.resolution, image.size
        rh, rw = self.resized_size(h, w)
        resized = image.resize((rw, rh), self.resample, reducing_gap=None)  # PIL resize antialiases when shrinking
        if self.center_crop:
            top, left = int(round((rh - r) / 2.0)), int(round((rw - r) / 2.0))
        else:
            top, left = min(int(offsets[0] * (rh - r + 1)), rh - r), min(int(offsets[1] * (rw - r + 1)), rw - r)
        pixels = to_tensor(resized.crop((left, top, left + r, top + r)))
        if flip:
            pixels, left = pixels.flip(-1), rw - r - left
        return {"pixel_values": pixels, "original_size": (h, w), "crop_top_left": (top, left), "flipped": flip}

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> dict:
        u = self.draws(generator)
        return self.apply(image, self.random_flip and bool(u[0] < 0.5), (float(u[1]), float(u[2])))


# ---------------------------------------------------------------- caches on disk

def _ref_fingerprint(ref: str) -> object:
    """A Hub id as is; a local folder (tiny models) by its files' sizes and mtimes, so a rebuilt model is new."""
    path = Path(tiny.resolve(ref))
    if not path.is_dir():
        return ref
    return [ref] + sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                          for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _dataset_identity(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        digest = r.content_hash or hashlib.sha256(r.image_bytes()).hexdigest()
        h.update(f"{r.key}\t{digest}\n".encode())
    return h.hexdigest()


def _verify(folder: Path, count: int) -> dict[str, torch.Tensor]:
    """Load a cache folder, checking its manifest, checksums and sizes. Raises on any mismatch."""
    from safetensors.torch import load_file
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("version") != CACHE_VERSION or manifest.get("count") != count:
        raise ValueError("manifest does not match (version or record count)")
    tensors = {}
    for name, digest in manifest["files"].items():
        if sha256_file(folder / name) != digest:
            raise ValueError(f"{name}: checksum mismatch")
        tensors.update(load_file(folder / name))
    return tensors


def cached(name: str, fields: dict, count: int, build, root: Path) -> tuple[dict, str, Path]:
    """Reuse `<root>/cache/<name>-<key>/` when it is complete and intact, else `build()` and save it atomically.
    Returns (tensors, "reused" | "built" | "rebuilt", folder)."""
    from safetensors.torch import save_file
    folder = Path(root) / "cache" / f"{name}-{_digest([CACHE_VERSION, fields])[:16]}"
    status = "built"
    if folder.exists():
        try:
            tensors = _verify(folder, count)
            print(f"reusing cache {folder}")
            return tensors, "reused", folder
        except Exception as e:  # truncated file, bad checksum, missing manifest: never trust it
            print(f"cache corrupt ({type(e).__name__}: {e}): rebuilding {folder}")
            status = "rebuilt"
    else:
        print(f"building cache {folder}")
    tensors = build()
    for stale in folder.parent.glob(folder.name + ".tmp*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    weights = {k: v.contiguous() for k, v in tensors.items()}
    write_file(tmp / f"{name}.safetensors", lambda path: save_file(weights, str(path)))
    manifest = {"version": CACHE_VERSION, "name": name, "count": count, "fields": fields,
                "files": {f"{name}.safetensors": sha256_file(tmp / f"{name}.safetensors")}}
    write_file(tmp / "manifest.json", lambda path: path.write_text(json.dumps(manifest, indent=1, default=str)))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return tensors, status, folder


@torch.no_grad()
def encode_latents(records: list[Record], transform: TrainTransform, vae, batch_size: int = 8) -> dict:
    """VAE distribution parameters (fp16 on disk) of every centre-cropped image, and of its mirror image when
    the transform flips, plus the size/crop conditioning of each."""
    from .models import encode_images, vae_scale_factor
    n, r = len(records), transform.resolution // vae_scale_factor(vae.config)
    out = {"latent_params": torch.empty(n, 8, r, r, dtype=torch.float16),
           "original_size": torch.empty(n, 2, dtype=torch.long), "crop_top_left": torch.empty(n, 2, dtype=torch.long)}
    if transform.random_flip:
        out["latent_params_flipped"] = torch.empty(n, 8, r, r, dtype=torch.float16)
        out["crop_top_left_flipped"] = torch.empty(n, 2, dtype=torch.long)
    for start in tqdm(range(0, n, batch_size), desc="encoding images", unit="batch"):
        batch = [transform.apply(open_rgb(rec.image_bytes())[0]) for rec in records[start:start + batch_size]]
        pixels = torch.stack([b["pixel_values"] for b in batch])
        sl = slice(start, start + len(batch))
        out["latent_params"][sl] = encode_images(vae, pixels).float().cpu().half()
        out["original_size"][sl] = torch.tensor([b["original_size"] for b in batch])
        out["crop_top_left"][sl] = torch.tensor([b["crop_top_left"] for b in batch])
        if transform.random_flip:
            out["latent_params_flipped"][sl] = encode_images(vae, pixels.flip(-1)).float().cpu().half()
            rw = [transform.resized_size(*b["original_size"])[1] for b in batch]
            out["crop_top_left_flipped"][sl] = torch.tensor(
                [(b["crop_top_left"][0], w - transform.resolution - b["crop_top_left"][1]) for b, w in zip(batch, rw)])
    return out


@torch.no_grad()
def encode_text(captions: list[str], family: str, tokenizers: list, text_encoders: list, batch_size: int = 32
                ) -> dict:
    """Text conditioning of each unique caption once (CIFAR has ~60 unique captions for 50,000 images)."""
    from .models import encode_prompts
    if not text_encoders:
        raise ValueError("building the text cache needs the text encoders: load_components(..., "
                         "with_text_encoders=True)")
    unique = list(dict.fromkeys(captions))
    hidden, pooled = [], []
    for start in tqdm(range(0, len(unique), batch_size), desc="encoding captions", unit="batch"):
        h, p = encode_prompts(family, tokenizers, text_encoders, unique[start:start + batch_size])
        hidden.append(h.float().cpu().half())
        if p is not None:
            pooled.append(p.float().cpu().half())
    where = {c: i for i, c in enumerate(unique)}
    out = {"prompt_embeds": torch.cat(hidden), "caption_index": torch.tensor([where[c] for c in captions])}
    if pooled:
        out["pooled_prompt_embeds"] = torch.cat(pooled)
    return out


# ---------------------------------------------------------------- the Dataset

class TrainDataset(torch.utils.data.Dataset):
    """Items: {"pixel_values" 3×R×R in [-1, 1] | "latent_params" 8×r×r (mean ‖ logvar), "caption",
    "original_size" (h, w), "crop_top_left" (top, left), "index"} plus "prompt_embeds" 77×D and, for SDXL,
    "pooled_prompt_embeds" when text is cached.

    Call `set_epoch(e)` before iterating each epoch (and before creating the DataLoader iterator: worker
    processes copy the dataset then; so no persistent_workers)."""

    def __init__(self, records: list[Record], transform: TrainTransform, seed: int = 0,
                 latents: dict | None = None, text: dict | None = None):
        if latents is not None and not transform.center_crop:
            raise ValueError("cached latents were encoded from one centre crop: a random crop cannot be applied "
                             "to them. Use center_crop=True, or cache_latents=False for random crops.")
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
        u = self.transform.draws(sample_generator(self.seed, self.epoch, index))
        flip = self.transform.random_flip and bool(u[0] < 0.5)
        item = {"caption": record.caption, "index": index}
        if self.latents is not None:
            suffix = "_flipped" if flip else ""
            item["latent_params"] = self.latents["latent_params" + suffix][index].float()
            item["original_size"] = self.latents["original_size"][index].clone()
            item["crop_top_left"] = self.latents["crop_top_left" + suffix][index].clone()
        else:
            out = self.transform.apply(open_rgb(record.image_bytes())[0], flip, (float(u[1]), float(u[2])))
            item["pixel_values"] = out["pixel_values"]
            item["original_size"] = torch.tensor(out["original_size"], dtype=torch.long)
            item["crop_top_left"] = torch.tensor(out["crop_top_left"], dtype=torch.long)
        if self.text is not None:
            c = int(self.text["caption_index"][index])
            item["prompt_embeds"] = self.text["prompt_embeds"][c].float()
            if "pooled_prompt_embeds" in self.text:
                item["pooled_prompt_embeds"] = self.text["pooled_prompt_embeds"][c].float()
        return item


def collate(batch: list[dict]) -> dict:
    """Stack tensors (and the indices into a LongTensor); captions stay a list of str."""
    out = {}
    for key in batch[0]:
        values = [b[key] for b in batch]
        out[key] = (torch.stack(values) if isinstance(values[0], torch.Tensor) else
                    torch.tensor(values) if key == "index" else values)
    return out


# ---------------------------------------------------------------- one entry point

def prepare_dataset(preset: Preset, components, report: ValidationReport | None = None,
                    root: str | Path | None = None, encode_batch_size: int | None = None) -> TrainDataset:
    """load → validate (skip bad files) → build or reuse the caches the preset asks for → TrainDataset.

    Idempotent: every notebook can call it; the second call reuses the caches (checksums verified). Pass the
    `report` of an earlier `validate` to skip validating again. Caches live in `<storage_root>/cache/`."""
    transform = TrainTransform(preset.resolution, preset.center_crop, preset.random_flip)
    if preset.cache_latents and not preset.center_crop:
        raise ValueError(f"preset {preset.name}: cache_latents needs center_crop=True (a cache holds one crop per "
                         "image); set center_crop=True or cache_latents=False")
    if report is None:
        report = validate(load_preset_records(preset), preset.resolution, components.tokenizers[0], "skip")
        print(report.summary().splitlines()[0])
    records = report.records
    if not records:
        raise DatasetError(f"no usable images in {preset.dataset_ref!r}:\n{report.summary()}")
    root = Path(root) if root is not None else runtime.storage_root()
    latents = text = None
    status, dirs = {}, {}
    identity = dict(kind=preset.dataset, ref=preset.dataset_ref, records=_dataset_identity(records))
    if preset.cache_latents:
        vae = components.vae
        fields = dict(identity, vae=_ref_fingerprint(components.vae_ref), vae_dtype=str(vae.dtype),
                      transform=transform.params())
        batch = encode_batch_size or max(1, CACHE_ENCODE_PIXELS // preset.resolution ** 2)
        latents, status["latents"], dirs["latents"] = cached(
            "latents", fields, len(records), lambda: encode_latents(records, transform, vae, batch), root)
    if preset.cache_text and not preset.train_text_encoder:  # a trained text encoder changes the embeddings
        captions = [r.caption for r in records]
        # load_components puts the text encoders in the UNet's dtype; without encoders a cache can still be reused
        dtype = (components.text_encoders or [components.unet])[0].dtype
        fields = dict(model=_ref_fingerprint(components.model_ref), family=components.family, dtype=str(dtype),
                      captions=_digest(captions))
        text, status["text"], dirs["text"] = cached(
            "text", fields, len(records), lambda: encode_text(captions, components.family, components.tokenizers,
                                                              components.text_encoders), root)
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


__all__ = ["Record", "Issue", "ValidationReport", "DatasetError", "validate", "open_rgb", "caption_token_lengths",
           "caption_length_figure", "preview_grid", "TRAIN_TEMPLATES", "HELD_OUT_TEMPLATES", "CIFAR10_CLASSES",
           "fill_template", "cifar_caption", "sample_generator", "load_source", "load_preset_records", "load_cifar10",
           "load_naruto", "load_folder", "records_from_hf", "SOURCE_REFS", "with_source", "TrainTransform", "to_tensor",
           "encode_latents", "encode_text", "cached", "TrainDataset", "collate", "prepare_dataset", "cache_summary"]
