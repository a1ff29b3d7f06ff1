"""What DALL·E 2 is known for, on notebook 04's image-conditioned SD1.5 (helpers.methods.ip_adapter): pictures drawn back
from the CLIP image embedding of held-out pictures, variations of a given picture (its embedding, several seeds)
and interpolation strips between two embeddings (slerp). Each function switches the ONE pipeline of a RunSet
(helpers.methods.runs), draws with helpers.generate.sampling.generate (PNGs + manifest.csv under `out_dir`), measures what it drew
with the embedding set's CLIP (helpers.data.embeddings) and writes one sheet (helpers.generate.grids).

The image-conditioned images are drawn with the EMPTY caption: the picture comes from the embedding alone, and
classifier-free guidance pushes away from (empty caption, zero embedding), the condition the adapter learned for
"nothing". Measures, all by the same CLIP that made the embeddings:
  class kept      share of images CLIP zero-shot classifies as their source's class (labelled sources only), for
                  the adapter, for base SD1.5 with the class caption on the same seeds, and for the source pictures
                  themselves (how well this CLIP reads this data at all: the ceiling)
  cosine          CLIP image cosine between an image and its source picture's embedding
  closer to own   for every variation and every OTHER source: is the variation closer to its own source? (share)
  drift           along a strip, cos(image, A) − cos(image, B): falls from A's end to B's end if the strip moves
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ..data.embeddings import cosine_matrix, slerp
from ..data.sources import fill_template
from ..generate.grids import MAX_SIDE, PAGE_PX, comparison_sheets
from ..generate.sampling import generate

CAPTION = ""  # the prompt of every image-conditioned image here: the embedding alone


def spread_held_out(embeddings, count: int) -> list[int]:
    """`count` held-out pair indices taking the classes in turn (class 0's first, class 1's first, …, class 0's
    second, …), so any prefix covers the classes evenly; in index order for a source without labels."""
    held = embeddings.held_out_indices.tolist()
    if count < 1 or not held:
        raise ValueError(f"need at least one held-out pair to draw (asked {count}, held out {len(held)})")
    rank: dict[int, int] = {}
    keyed = []
    for i in held:
        label = int(embeddings.labels[i])
        rank[label] = rank.get(label, -1) + 1
        keyed.append((rank[label], label, i))
    return [i for *_, i in sorted(keyed)][:count]


def _class_caption(embeddings, row: int) -> str:
    """"a photo of a {class}" (the zero-shot template) for a labelled pair, else the pair's own caption."""
    label = int(embeddings.labels[row])
    if label >= 0 and embeddings.class_names:
        return fill_template("a photo of a {label}", embeddings.class_names[label])
    return embeddings.captions[row]


def _own_cosine(embeddings, images: list, rows: list[int]) -> torch.Tensor:
    drawn = embeddings.encode_images(images)
    return torch.nn.functional.cosine_similarity(drawn, embeddings.image_embeds[rows].float(), dim=-1)


# ---------------------------------------------------------------- pictures drawn back from true embeddings

@dataclass
class HeldOutCheck:
    rows: list[int]  # the held-out pairs drawn (indices into the embedding set)
    seeds: list[int]
    adapter_rate: float | None  # class kept by the adapter's images (None: the source has no labels)
    base_rate: float | None  # by base SD1.5 with the class caption, same seeds
    source_rate: float | None  # by the held-out pictures themselves (the ceiling)
    adapter_cosine: float  # mean CLIP image cosine to the source picture
    base_cosine: float
    sheet: Path

    def __str__(self) -> str:
        n = len(self.rows) * len(self.seeds)
        rates = "no class labels in this source: only cosines" if self.adapter_rate is None else (
            f"class kept (CLIP zero-shot): adapter from the true embedding {self.adapter_rate:.0%}, base SD1.5 + "
            f"class caption {self.base_rate:.0%}, the source pictures themselves {self.source_rate:.0%}")
        return (f"{len(self.rows)} held-out pictures × {len(self.seeds)} seeds = {n} images each\n{rates}\n"
                f"CLIP image cosine to the source picture: adapter {self.adapter_cosine:.3f}, base "
                f"{self.base_cosine:.3f}")


def held_out_check(board, run: str, embeddings, rows: list[int], seeds: list[int], steps: int, out_dir: Path,
                   size: int | None = None, sheet_rows: int = 10) -> HeldOutCheck:
    """Run `run` draws each held-out pair's picture from its TRUE image embedding (empty caption, `seeds`); base
    SD1.5 draws the class caption (the pair's own caption without labels) on the same seeds. Images in
    `out_dir/adapter` and `out_dir/base`; the sheet shows the first `sheet_rows` pictures: source | adapter per
    seed | base with the first seed."""
    out_dir, rows, seeds = Path(out_dir), [int(r) for r in rows], [int(s) for s in seeds]
    pairs = [(r, s) for r in rows for s in seeds]
    board.use(run)
    adapter = generate(board.pipe, [CAPTION] * len(pairs), [s for _, s in pairs], steps, height=size, width=size,
                       out_dir=out_dir / "adapter", image_embeds=embeddings.image_embeds[[r for r, _ in pairs]])
    board.use(None)
    base = generate(board.pipe, [_class_caption(embeddings, r) for r, _ in pairs], [s for _, s in pairs], steps,
                    height=size, width=size, out_dir=out_dir / "base")
    pictures = [embeddings.records[r].image() for r in rows]
    rates = [None, None, None]
    if embeddings.class_names and bool((embeddings.labels[rows] >= 0).all()):
        truth = embeddings.labels[[r for r, _ in pairs]]
        rates = [float((embeddings.zero_shot(images) == truth).float().mean()) for images in (adapter, base)]
        rates.append(float((embeddings.zero_shot(pictures) == embeddings.labels[rows]).float().mean()))
    k = len(seeds)
    sheet_data = [[pictures[i], *adapter[i * k:(i + 1) * k], base[i * k]] for i in range(min(sheet_rows, len(rows)))]
    labels = [f"{_class_caption(embeddings, r)}\nheld-out pair {r}" for r in rows[:sheet_rows]]
    columns = ["source picture", *[f"embedding · seed {s}" for s in seeds], f"base + caption · seed {seeds[0]}"]
    sheet = comparison_sheets(sheet_data, labels, columns, out_dir / "held_out",
                              title=f"{run}: pictures drawn back from their CLIP image embedding",
                              max_side=PAGE_PX, max_height=MAX_SIDE)[0]
    return HeldOutCheck(rows, seeds, *rates, float(_own_cosine(embeddings, adapter, [r for r, _ in pairs]).mean()),
                        float(_own_cosine(embeddings, base, [r for r, _ in pairs]).mean()), sheet)


# ---------------------------------------------------------------- variations of a given picture

def closer_to_own(similarity: torch.Tensor, own: torch.Tensor) -> float:
    """Share of (image i, other source j) pairs with similarity[i, own[i]] > similarity[i, j]: `similarity` is
    (images, sources), `own[i]` the source image i was drawn from."""
    if similarity.shape[1] < 2:
        raise ValueError("closeness to the own source needs at least two sources")
    own_sim = similarity[torch.arange(len(own)), own]
    others = torch.ones_like(similarity, dtype=torch.bool)
    others[torch.arange(len(own)), own] = False
    return float((own_sim[:, None] > similarity)[others].float().mean())


@dataclass
class Variations:
    images: list[list[Image.Image]]  # per source, per seed
    closer_rate: float  # closer_to_own over every (variation, other source) pair
    own_cosine: float  # mean CLIP image cosine of a variation to its own source
    sheet: Path

    def __str__(self) -> str:
        n = sum(len(row) for row in self.images)
        return (f"{n} variations of {len(self.images)} pictures: closer to their own source than to another in "
                f"{self.closer_rate:.0%} of pairs; mean CLIP image cosine to the own source {self.own_cosine:.3f}")


def variations(board, run: str, embeddings, pictures: list, labels: list[str], seeds: list[int], steps: int,
               out_dir: Path, size: int | None = None) -> Variations:
    """Variations of each picture in `pictures` (PIL images: held-out ones, or any of your own): its CLIP image
    embedding by the embedding set's CLIP, drawn by `run` with each seed. Rows of the sheet: picture | seeds."""
    if len(pictures) != len(labels) or len(pictures) < 2:
        raise ValueError(f"need at least two pictures, one label each (got {len(pictures)} and {len(labels)})")
    embeds = embeddings.encode_images(pictures)
    seeds = [int(s) for s in seeds]
    board.use(run)
    drawn = generate(board.pipe, [CAPTION] * len(pictures) * len(seeds), seeds * len(pictures), steps, height=size,
                     width=size, out_dir=Path(out_dir), image_embeds=embeds.repeat_interleave(len(seeds), 0))
    similarity = cosine_matrix(embeddings.encode_images(drawn), embeds)
    own = torch.arange(len(pictures)).repeat_interleave(len(seeds))
    rows = [drawn[i * len(seeds):(i + 1) * len(seeds)] for i in range(len(pictures))]
    sheet = comparison_sheets([[p, *r] for p, r in zip(pictures, rows)], labels,
                              ["given picture", *[f"seed {s}" for s in seeds]], Path(out_dir) / "variations",
                              title=f"{run}: variations (the picture's CLIP image embedding, several seeds)",
                              max_side=PAGE_PX, max_height=MAX_SIDE)[0]
    return Variations(rows, closer_to_own(similarity, own), float(similarity[torch.arange(len(own)), own].mean()),
                      sheet)


# ---------------------------------------------------------------- interpolation strips

@dataclass(frozen=True)
class Ends:
    """Two ends of a strip: their embeddings, the pictures shown beside the strip and a row label."""
    label: str
    a: torch.Tensor  # (D,) the embedding at t = 0
    b: torch.Tensor  # (D,) at t = 1
    picture_a: Image.Image
    picture_b: Image.Image


@dataclass
class Strips:
    images: list[list[Image.Image]]  # per strip, per step
    drift: list[list[float]]  # per strip, per step: cos(image, a) − cos(image, b)
    sheet: Path

    def __str__(self) -> str:
        return "\n".join(f"strip {k + 1}: cos(image, A) − cos(image, B) along the strip: "
                         + " → ".join(f"{d:+.2f}" for d in drift) for k, drift in enumerate(self.drift))


def interpolations(board, run: str, embeddings, ends: list[Ends], count: int, seed: int, steps: int,
                   out_dir: Path, size: int | None = None) -> Strips:
    """One strip per `ends`: `count` (5–7) embeddings slerped from a to b (helpers.data.embeddings.slerp), drawn by
    `run` with one seed, so only the embedding changes along a strip. Rows: picture a | the strip | picture b."""
    if not 5 <= count <= 7:
        raise ValueError(f"an interpolation strip has 5 to 7 steps, not {count}")
    board.use(run)
    images, drift = [], []
    for k, end in enumerate(ends):
        path = slerp(end.a, end.b, count)
        strip = generate(board.pipe, [CAPTION] * count, [int(seed)] * count, steps, height=size, width=size,
                         out_dir=Path(out_dir) / f"strip_{k + 1}", image_embeds=path)
        sims = cosine_matrix(embeddings.encode_images(strip), torch.stack([end.a, end.b]))
        images.append(strip)
        drift.append([float(d) for d in sims[:, 0] - sims[:, 1]])
    columns = ["A", *[f"{t:.2f}" for t in torch.linspace(0, 1, count).tolist()], "B"]  # t along the strip
    sheet = comparison_sheets([[e.picture_a, *s, e.picture_b] for e, s in zip(ends, images)],
                              [e.label for e in ends], columns, Path(out_dir) / "interpolation",
                              title=f"{run}: slerp between two CLIP image embeddings, seed {seed}",
                              max_side=PAGE_PX, max_height=MAX_SIDE)[0]
    return Strips(images, drift, sheet)
