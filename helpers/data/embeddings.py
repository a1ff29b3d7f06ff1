"""CLIP embeddings of a training set, computed once and cached: the projected text and image embedding of every
(image, caption) pair, the caption's token states, labels and a fixed held-out split. The image-conditioned SD1.5
(notebook 04, helpers.methods.ip_adapter) trains on the image embeddings; the priors (helpers.prior) learn text → image on
the pairs; the held-out split is never trained on and is where both are measured.

    es = embedding_set(preset)                        # preset.clip_model; or embedding_set(("naruto", ref), clip)
    es.image_embeds[es.train_indices]                 # (n_train, D) float32
    es.encode_images([pil_image])                     # a NEW image with the same CLIP → (1, D)

D is the CLIP's projection width read from its config (768 for openai/clip-vit-large-patch14, 64 for tiny/clip).
The embeddings are the raw projections (`CLIPModel.get_text_features` / `get_image_features`, NOT L2-normalised):
the IP-Adapter takes them as they are; normalise where a cosine is meant (`cosine`).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core import paths, runtime
from ..core.configs import CLIP_L14_TEXT, CLIP_L14_VISION
from ..core.precision import precision_for
from ..core.presets import CIFAR10_CLASSES, CLIP_L14, Preset
from ..models import release_cuda_cache
from ..tiny import world as tiny
from . import caches
from .report import DatasetError
from .sources import fill_template, load_source
from .validation import Record, validate

EMBEDDINGS_VERSION = 1  # bump when what the cache holds changes
HELD_OUT_FRACTION = 0.1  # per class (per set without labels): ceil(10 %) of the images, never all of a class
TEXT_BATCH, IMAGE_BATCH = 64, 64  # captions / images per CLIP call (ViT-L/14 fp16 at 224 px: ≈ 0.5 GiB at 64)


# ---------------------------------------------------------------- the CLIP, its dims from its config

def clip_config(clip_ref: str):
    """The CLIPConfig of `clip_ref`: openai/clip-vit-large-patch14 from helpers.core.configs (no download: the memory
    plan needs it offline), anything else from its folder or the Hub."""
    from transformers import CLIPConfig
    if clip_ref == CLIP_L14:
        return CLIPConfig(text_config=CLIP_L14_TEXT, vision_config=CLIP_L14_VISION,
                          projection_dim=CLIP_L14_VISION["projection_dim"])
    return CLIPConfig.from_pretrained(tiny.resolve(clip_ref))


def embed_dim(clip_ref: str) -> int:
    """Width of the projected embeddings (`projection_dim`): 768 for ViT-L/14, 64 for the tiny CLIP."""
    return int(clip_config(clip_ref).projection_dim)


class ClipEncoder:
    """CLIPModel + tokenizer + image processor of `clip_ref`, frozen, in `dtype` on `device`. Text is tokenized as
    SD1.5's pipeline does (padded to 77, no attention mask), so for ViT-L/14 the token states equal SD1.5's
    `encoder_hidden_states` (its text encoder is that text tower). `text_only`: the text tower and its projection
    alone (CLIPTextModelWithProjection from the same files, the same numbers; ViT-L/14: 0.25 of 0.8 GiB in fp16),
    for a prompt → embedding source that never sees a picture."""

    def __init__(self, clip_ref: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 text_only: bool = False):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModelWithProjection, CLIPTokenizer
        from transformers.utils import logging as transformers_logging
        path = tiny.resolve(clip_ref)
        self.device, self.dtype = torch.device(device), dtype
        level = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # text_only: the vision weights in the files are left unused
        try:
            model = (CLIPTextModelWithProjection if text_only else CLIPModel).from_pretrained(path, dtype=dtype)
        finally:
            transformers_logging.set_verbosity(level)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.processor = None if text_only else CLIPImageProcessor.from_pretrained(path)

    @torch.no_grad()
    def text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(projected embeds (n, D), last hidden states (n, 77, W), real-token mask (n, 77)), float32 on the CPU."""
        tok = self.tokenizer(list(texts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        out = self.model.text_model(tok.input_ids.to(self.device))
        embeds = self.model.text_projection(out.pooler_output)
        return embeds.float().cpu(), out.last_hidden_state.float().cpu(), tok.attention_mask.bool()

    @torch.no_grad()
    def images(self, images: list) -> torch.Tensor:
        """Projected image embeds (n, D), float32 on the CPU, of PIL images (any size: the processor resizes)."""
        if self.processor is None:
            raise ValueError("this encoder was loaded text_only: it cannot embed pictures")
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        out = self.model.vision_model(pixels.to(self.device, self.dtype))
        return self.model.visual_projection(out.pooler_output).float().cpu()


# ---------------------------------------------------------------- the set

@dataclass
class EmbeddingSet:
    """CLIP embeddings of N training pairs (row i = record i). Every tensor is on the CPU.

    text_embeds       (N, D) float32  projected text embedding of each pair's caption
    image_embeds      (N, D) float32  projected image embedding of each pair's image
    text_states       (U, 77, W) float32  last hidden states of each DISTINCT caption (U ≤ N: CIFAR's templates give
                                      60 captions for 50,000 images); W is the text width (768 for ViT-L/14)
    text_masks        (U, 77) bool    real tokens (start, words, end) of each distinct caption; the rest is padding
    text_state_index  (N,) long       row of `text_states` / `text_masks` for each pair
    captions          list[str] (N)
    labels            (N,) long       class id (CIFAR-10), -1 where the source has none
    class_names       tuple[str, ...] name of each class id (() without labels)
    held_out          (N,) bool       the fixed held-out split: never trained on, kept for metrics
    keys              list[str] (N)   record keys (file path or dataset row)
    """
    clip_ref: str
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    text_states: torch.Tensor
    text_masks: torch.Tensor
    text_state_index: torch.Tensor
    captions: list[str]
    labels: torch.Tensor
    class_names: tuple[str, ...]
    held_out: torch.Tensor
    keys: list[str]
    records: list[Record] = field(default_factory=list, repr=False)  # the images themselves (lazy)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where new inputs are encoded
    dtype: torch.dtype = torch.float32  # CLIP weights' dtype (fp16 on a T4)
    status: str = ""  # "built" | "reused" | "rebuilt" (the cache)
    folder: Path | None = None  # the cache folder
    _encoder: ClipEncoder | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        """D, the embedding width."""
        return int(self.image_embeds.shape[1])

    @property
    def train_indices(self) -> torch.Tensor:
        return torch.nonzero(~self.held_out).flatten()

    @property
    def held_out_indices(self) -> torch.Tensor:
        return torch.nonzero(self.held_out).flatten()

    def states_of(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """(token states (n, 77, W), masks (n, 77)) of pairs `indices`."""
        rows = self.text_state_index[torch.as_tensor(indices, dtype=torch.long)]
        return self.text_states[rows], self.text_masks[rows]

    # ---- new inputs, same CLIP (loaded on first use)
    @property
    def encoder(self) -> ClipEncoder:
        if self._encoder is None:
            self._encoder = ClipEncoder(self.clip_ref, self.device, self.dtype)
        return self._encoder

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings (n, D) of new texts."""
        return _batched(lambda chunk: self.encoder.text(chunk)[0], list(texts), TEXT_BATCH)

    def encode_text_states(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden states (n, 77, W), real-token masks (n, 77)) of new texts."""
        outs = [self.encoder.text(list(texts)[i:i + TEXT_BATCH])[1:] for i in range(0, len(texts), TEXT_BATCH)]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def encode_images(self, images: list) -> torch.Tensor:
        """Projected image embeddings (n, D) of PIL images."""
        return _batched(self.encoder.images, list(images), IMAGE_BATCH)

    def zero_shot(self, images: list, template: str = "a photo of a {}") -> torch.Tensor:
        """Class id (n,) of each image by CLIP zero-shot over `class_names` (cosine to the filled template)."""
        if not self.class_names:
            raise ValueError("zero-shot classification needs class names: this source has no labels")
        classes = self.encode_text([fill_template(template.replace("{}", "{label}"), c) for c in self.class_names])
        return (cosine_matrix(self.encode_images(images), classes)).argmax(dim=1)

    def release(self) -> None:
        """Free the CLIP (the cached tensors stay)."""
        self._encoder = None
        release_cuda_cache()


def _batched(fn, items: list, size: int) -> torch.Tensor:
    if not items:
        raise ValueError("nothing to encode: the list is empty")
    return torch.cat([fn(items[i:i + size]) for i in range(0, len(items), size)])


# ---------------------------------------------------------------- vector helpers

def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of `a` (n, D) with every row of `b` (m, D) → (n, m)."""
    a, b = torch.nn.functional.normalize(a.float(), dim=-1), torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` embeddings (steps, D) from `a` to `b` (both ends included): the direction moves along the great
    circle (spherical interpolation), the length linearly. A straight line would pass through shorter vectors
    than CLIP ever produces; slerp keeps every point on the sphere the embeddings live on."""
    if steps < 2:
        raise ValueError(f"an interpolation needs at least 2 steps (the two ends), got {steps}")
    a, b = a.float().flatten(), b.float().flatten()
    if a.shape != b.shape:
        raise ValueError(f"cannot interpolate embeddings of different widths {tuple(a.shape)} and {tuple(b.shape)}")
    t = torch.linspace(0, 1, steps)[:, None]
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    omega = torch.arccos(torch.clamp(ua @ ub, -1.0, 1.0))
    if omega < 1e-4:  # (nearly) the same direction: slerp's formula divides by sin ω ≈ 0
        direction = (1 - t) * ua + t * ub
    else:
        direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
    direction = torch.nn.functional.normalize(direction, dim=-1)
    return direction * ((1 - t) * na + t * nb)


# ---------------------------------------------------------------- the held-out split

def held_out_split(records: list[Record], fraction: float = HELD_OUT_FRACTION) -> torch.Tensor:
    """(N,) bool: per class (one group without labels), the ceil(fraction · n) images whose content hash sorts
    first, never a whole class. Depends only on the images' bytes, so it is the same wherever the files live."""
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    groups: dict[object, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.label, []).append(i)
    out = torch.zeros(len(records), dtype=torch.bool)
    for members in groups.values():
        n = min(math.ceil(fraction * len(members)), len(members) - 1)
        ranked = sorted(members, key=lambda i: (_content_digest(records[i]), records[i].key))
        out[ranked[:max(n, 0)]] = True
    return out


def _content_digest(record: Record) -> str:
    return record.content_hash or hashlib.sha256(record.image_bytes()).hexdigest()


# ---------------------------------------------------------------- one entry point

def embedding_set(source: Preset | tuple[str, str], clip_ref: str | None = None,
                  device: torch.device | str | None = None, *, records: list[Record] | None = None,
                  root: str | Path | None = None, held_out_fraction: float = HELD_OUT_FRACTION) -> EmbeddingSet:
    """The CLIP embeddings of every training pair of `source`, from the cache `<root>/cache/clip_embeddings-<key>/`
    (root: the storage root) or computed once and saved atomically. The key digests the images, captions, labels,
    the CLIP and its dtype, and the split; a damaged cache is rebuilt.

    `source` is a Preset (its data, `max_train_images`, caption seed, `clip_model`, and fp16 on a GPU) or a
    (kind, ref) pair as helpers.data.sources takes ("cifar10" | "naruto" | "folder", Hub id, folder or tiny/<name>).
    Pass `records` (e.g. a TrainDataset's `.records`) to embed exactly those, in that order; otherwise the source
    is loaded and validated as helpers.data.prepare_dataset does, so the rows match its dataset."""
    if isinstance(source, Preset):
        paths.require_lasting_storage(source.profile, "building or reusing the CLIP embedding cache")
        kind, ref, limit, seed = source.data_source, source.data_ref, source.max_train_images, source.seed
        clip_ref = clip_ref or source.clip_model
        mixed, resolution = source.mixed_precision, source.resolution
    else:
        (kind, ref), limit, seed, mixed, resolution = source, None, 0, "fp16", 64
    if not clip_ref:
        raise ValueError("no CLIP given: pass clip_ref (e.g. 'openai/clip-vit-large-patch14' or 'tiny/clip') or a "
                         "preset whose clip_model is set")
    device = torch.device(device or runtime.device())
    dtype = precision_for(mixed, device).weight_dtype
    if records is None:
        from transformers import CLIPTokenizer
        report = validate(load_source(kind, ref, limit, seed), resolution,
                          CLIPTokenizer.from_pretrained(tiny.resolve(clip_ref)), "skip")
        print(report.summary().splitlines()[0])
        records = report.records
    records = list(records)
    if not records:
        raise DatasetError(f"no usable images in {ref!r}: nothing to embed")
    captions = [r.caption for r in records]
    labels = torch.tensor([-1 if r.label is None else int(r.label) for r in records], dtype=torch.long)
    fields = dict(kind="clip_embeddings", version=EMBEDDINGS_VERSION, source=kind, ref=str(ref),
                  records=caches.records_digest(records), captions=caches.digest(captions),
                  labels=caches.digest(labels.tolist()), clip=caches.model_fingerprint(clip_ref), dtype=str(dtype),
                  held_out_fraction=held_out_fraction)
    root = Path(root) if root is not None else paths.storage_root()
    encoder: list[ClipEncoder] = []

    def build() -> dict:
        encoder.append(ClipEncoder(clip_ref, device, dtype))
        return _encode(encoder[0], records, captions, labels, held_out_split(records, held_out_fraction))

    tensors, status, folder = caches.cached("clip_embeddings", fields, len(records), build, root)
    index = tensors["text_state_index"].long()
    return EmbeddingSet(
        clip_ref=clip_ref, text_embeds=tensors["caption_embeds"].float()[index],
        image_embeds=tensors["image_embeds"].float(), text_states=tensors["text_states"].float(),
        text_masks=tensors["text_masks"].bool(), text_state_index=index, captions=captions,
        labels=tensors["labels"].long(), class_names=CIFAR10_CLASSES if bool((labels >= 0).any()) else (),
        held_out=tensors["held_out"].bool(), keys=[r.key for r in records], records=records, device=device,
        dtype=dtype, status=status, folder=folder, _encoder=encoder[0] if encoder else None)


def _encode(encoder: ClipEncoder, records: list[Record], captions: list[str], labels: torch.Tensor,
            held_out: torch.Tensor) -> dict:
    """The cache's tensors: embeddings in float32 (small), token states in fp16 (77 × W per distinct caption)."""
    distinct = list(dict.fromkeys(captions))
    where = {c: i for i, c in enumerate(distinct)}
    caption_embeds, states, masks = [], [], []
    for start in tqdm(range(0, len(distinct), TEXT_BATCH), desc="CLIP text", unit="batch"):
        e, s, m = encoder.text(distinct[start:start + TEXT_BATCH])
        caption_embeds.append(e), states.append(s.half()), masks.append(m)
    image_embeds = []
    for start in tqdm(range(0, len(records), IMAGE_BATCH), desc="CLIP images", unit="batch"):
        image_embeds.append(encoder.images([r.image() for r in records[start:start + IMAGE_BATCH]]))
    return {"caption_embeds": torch.cat(caption_embeds), "text_states": torch.cat(states),
            "text_masks": torch.cat(masks).to(torch.uint8), "image_embeds": torch.cat(image_embeds),
            "text_state_index": torch.tensor([where[c] for c in captions], dtype=torch.long),
            "labels": labels, "held_out": held_out.to(torch.uint8)}


def nearest_rows(embeddings, prompts: list[str], pool=None) -> torch.Tensor:
    """For each prompt, the index of the pair in `pool` (default: the held-out pairs, all pairs if none is held
    out) whose caption is closest to it (CLIP text cosine by the embedding set's CLIP; ties to the first pair)."""
    if pool is None:
        pool = embeddings.held_out_indices if len(embeddings.held_out_indices) else torch.arange(len(embeddings))
    pool = torch.as_tensor(pool, dtype=torch.long)
    if len(pool) == 0:
        raise ValueError("no pairs to retrieve image embeddings from")
    return pool[cosine_matrix(embeddings.encode_text(list(prompts)), embeddings.text_embeds[pool]).argmax(dim=1)]


def nearest_true_embeds(embeddings, pool=None):
    """An `image_embeds` source that needs no prior: for each prompt, the TRUE image embedding of the `nearest_rows`
    pair. A retrieval stand-in, NOT text → image: every prompt gets one of the pool's real pictures, whatever the
    seed."""
    return lambda prompts, seeds: embeddings.image_embeds[nearest_rows(embeddings, prompts, pool)].float()
