"""Latent and text caches: each image's VAE latent distribution and each caption's text conditioning, computed once
and saved, so training needs neither the VAE nor the text encoders at every step.

A cache is a folder `<storage>/cache/<name>-<key>/` (written atomically by helpers.core.files) whose key digests
everything its contents depend on: the models (a local folder by its files' sizes and times), their dtype, the
transform settings and the exact images or captions. Change any of these and a new cache is built; a folder that
does not match its manifest (a disconnect mid-write, a truncated file) is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core import files
from ..core.paths import cache_root
from ..core.presets import Preset
from ..models import encode_images, encode_prompts, vae_scale_factor
from ..tiny import world as tiny
from .validation import Record

CACHE_VERSION = 3  # bump when the cache layout or its contents change (2: helpers.core.files manifest + cache.json;
# 3: images decoded upright by their EXIF orientation, 16-bit/float images scaled instead of clipped)
# The latent cache is built in batches of max(1, CACHE_ENCODE_PIXELS // px²) images (256 px: 16, 1024 px: 1):
# UNet and text encoders are resident while caching, and 32 images at 256 px would not leave SDXL 1 GiB to spare
# on a T4 (helpers.plan.memory models this phase with the same constant).
CACHE_ENCODE_PIXELS = 16 * 256**2


def encode_batch_size(resolution: int, encode_pixels: int = CACHE_ENCODE_PIXELS) -> int:
    """Images per VAE call while building the latent cache at `resolution` px."""
    return max(1, encode_pixels // resolution**2)


def oriented(name: str, flip: bool) -> str:
    """The cache entry of `name` for one orientation: with random flips the mirror images are cached beside."""
    return name + "_flipped" if flip else name


# ---------------------------------------------------------------- keys

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def model_fingerprint(ref: str) -> object:
    """A Hub id as is; a local folder (the tiny models, a model of your own) by its files' contents, so a rebuilt model
    is new while the same files in another clone are not: on Colab every notebook clones the repository afresh (new
    file times), and must still find the caches an earlier VM left on Drive."""
    path = Path(tiny.resolve(ref))
    if not path.is_dir():
        return ref
    return [ref] + sorted((str(p.relative_to(path)), p.stat().st_size, _content_digest(p))
                          for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))


def _content_digest(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's first and last MiB (its whole content when small): a safetensors header names every tensor
    and its place, and retrained weights change the bytes at both ends; a multi-GB model is not read whole."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if path.stat().st_size > 2 * chunk:
            f.seek(-chunk, 2)
        h.update(f.read(chunk))
    return h.hexdigest()


def records_digest(records: list[Record]) -> str:
    """Which images, exactly: every record's key and content hash."""
    h = hashlib.sha256()
    for r in records:
        digest = r.content_hash or hashlib.sha256(r.image_bytes()).hexdigest()
        h.update(f"{r.key}\t{digest}\n".encode())
    return h.hexdigest()


def training_data_digest(records: list[Record]) -> str:
    """What a run learns from, exactly: every record's picture (content hash) and caption, in order; not where the
    files are (the same pictures in another folder, or on another VM's Drive mount, train the same)."""
    h = hashlib.sha256()
    for r in records:
        digest = r.content_hash or hashlib.sha256(r.image_bytes()).hexdigest()
        h.update(f"{digest}\t{r.caption}\n".encode())
    return h.hexdigest()


# ---------------------------------------------------------------- reuse or build

def _load(folder: Path, name: str, count: int) -> dict[str, torch.Tensor]:
    """The tensors of a cache folder after checking its manifest (checksums, sizes) and record count."""
    from safetensors.torch import load
    tensors = f"{name}.safetensors"
    manifest = files.verify(folder, [tensors, "cache.json"], read_later=[tensors])
    info = json.loads((folder / "cache.json").read_text())
    if info.get("version") != CACHE_VERSION or info.get("count") != count:
        raise ValueError("cache.json does not match (version or record count)")
    # in memory, as verified: a memory map would follow later changes to the file (a truncation kills with SIGBUS)
    loaded = load(files.read_verified(folder, tensors, manifest))
    bad = bad_values(loaded)
    if bad:  # a manifest only says the bytes are the ones written: NaN or zeroed rows are not an encoder's output
        raise ValueError(bad)
    return loaded


def bad_values(tensors: dict[str, torch.Tensor]) -> str:
    """'' when every float tensor's rows are finite and not all zeros (no VAE latent or text embedding is), else
    which rows of which tensor are not, e.g. "latent_params rows [2, 5] (2 of 20) are NaN/inf"."""
    found = []
    for key, values in tensors.items():
        if not values.is_floating_point() or values.dim() == 0 or len(values) == 0:
            continue
        rows = values.reshape(len(values), -1).float()
        for what, hit in (("are NaN/inf", ~torch.isfinite(rows).all(dim=1)),
                          ("are all zeros", (rows == 0).all(dim=1))):
            if hit.any():
                where = hit.nonzero().flatten().tolist()
                found.append(f"{key} rows {where[:10]}{' …' * (len(where) > 10)} ({len(where)} of {len(values)}) "
                             f"{what}")
    return "; ".join(found)


def cached(name: str, fields: dict, count: int, build, root: Path) -> tuple[dict, str, Path]:
    """Reuse `<root>/cache/<name>-<key>/` when it is complete and intact, else `build()` and save it atomically.
    Returns (tensors, "reused" | "built" | "rebuilt", folder)."""
    from safetensors.torch import save_file
    folder = cache_root(root) / f"{name}-{digest([CACHE_VERSION, fields])[:16]}"
    status = "built"
    if folder.exists():
        try:
            tensors = _load(folder, name, count)
            print(f"reusing cache {folder}")
            return tensors, "reused", folder
        except Exception as e:  # truncated file, bad checksum, missing manifest, NaN values: never trust it
            print(f"cache {folder} is not usable ({type(e).__name__}: {e}): rebuilding it")
            status = "rebuilt"
    else:
        print(f"building cache {folder}")
    tensors = build()
    bad = bad_values(tensors)
    if bad:
        raise ValueError(f"building the cache {folder}: {bad}, so the encoder's output is broken (a model whose "
                         f"weights hold NaN, or a float16 overflow); nothing was written. Check the model, then run "
                         f"again.")
    info = {"version": CACHE_VERSION, "name": name, "count": count, "fields": fields}

    def fill(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "cache.json").write_text(json.dumps(info, indent=1, default=str))

    try:
        files.write_folder(folder, fill, expected_bytes=sum(v.numel() * v.element_size() for v in tensors.values()))
    except OSError as e:
        # another builder (a second notebook, another VM on the same Drive) put the same cache in place between
        # our check and our rename: its cache has the same key, so it is used
        if not files.placed_by_another(e, folder):
            raise
        reused = _load(folder, name, count)
        print(f"another builder finished cache {folder} at the same moment: reusing it")
        return reused, "reused", folder
    return tensors, status, folder


def cache_latents(preset: Preset, components, records: list[Record], transform, root: Path,
                  batch_size: int | None = None) -> tuple[dict, str, Path]:
    """The latent cache of `records` as `transform` crops (and flips) them: `cached` + `encode_latents`."""
    vae = components.vae
    fields = dict(kind=preset.data_source, ref=preset.data_ref, records=records_digest(records),
                  vae=model_fingerprint(components.vae_ref), vae_dtype=str(vae.dtype), transform=transform.params())
    batch_size = batch_size or encode_batch_size(transform.resolution)
    return cached("latents", fields, len(records), lambda: encode_latents(records, transform, vae, batch_size), root)


def cache_text(components, records: list[Record], root: Path) -> tuple[dict, str, Path]:
    """The text cache of the records' captions: `cached` + `encode_text`. Only for frozen text encoders."""
    captions = [r.caption for r in records]
    # load_components puts the text encoders in the UNet's dtype; without encoders a cache can still be reused
    dtype = (components.text_encoders or [components.unet])[0].dtype
    fields = dict(model=model_fingerprint(components.model_ref), family=components.family, dtype=str(dtype),
                  captions=digest(captions))
    return cached("text", fields, len(records), lambda: encode_text(captions, components.family,
                                                                    components.tokenizers, components.text_encoders),
                  root)


# ---------------------------------------------------------------- encoders

@torch.no_grad()
def encode_latents(records: list[Record], transform, vae, batch_size: int = 8) -> dict:
    """VAE distribution parameters (fp16 on disk) of every image as `transform.apply` crops it, and of its mirror
    image when the transform flips, plus the size/crop conditioning of each. `apply` is the one place a crop is
    placed in a plain or mirrored image, for cached and uncached training alike."""
    n, r = len(records), transform.resolution // vae_scale_factor(vae.config)
    flips = (False, True) if transform.random_flip else (False,)
    out = {"original_size": torch.empty(n, 2, dtype=torch.long)}
    for flip in flips:
        out[oriented("latent_params", flip)] = torch.empty(n, 8, r, r, dtype=torch.float16)
        out[oriented("crop_top_left", flip)] = torch.empty(n, 2, dtype=torch.long)
    for start in tqdm(range(0, n, batch_size), desc="encoding images", unit="batch"):
        chunk = records[start:start + batch_size]
        # every orientation from one decode; only the crops stay in memory, never a batch of full-size images
        views = [[transform.apply(image, flip) for flip in flips]
                 for image in (rec.image() for rec in chunk)]
        sl = slice(start, start + len(chunk))
        out["original_size"][sl] = torch.tensor([v[0]["original_size"] for v in views])
        for k, flip in enumerate(flips):
            pixels = torch.stack([v[k]["pixel_values"] for v in views])
            out[oriented("latent_params", flip)][sl] = encode_images(vae, pixels).float().cpu().half()
            out[oriented("crop_top_left", flip)][sl] = torch.tensor([v[k]["crop_top_left"] for v in views])
    return out


@torch.no_grad()
def encode_text(captions: list[str], family: str, tokenizers: list, text_encoders: list, batch_size: int = 32
                ) -> dict:
    """Text conditioning of each unique caption once (CIFAR has ~60 unique captions for 50,000 images)."""
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
