"""What a prior feeds the image-conditioned SD1.5 (helpers.methods.ip_adapter): prompt → image-embedding sources for a
`Variant` or the catalog (`(prompts, seeds) → (N, D)`, helpers.generate.sampling), the five-way comparison of notebook 04
and interpolation ends between two prompts.

Sources: a prior's prediction from the prompt (the image's seed is also the prior's seed, so the diffusion prior
gives every seed its own embedding), a held-out caption's TRUE image embedding (the upper bound a prior could reach)
and, from helpers.methods.ip_adapter, zeros (the caption alone).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..core.precision import precision_for
from ..data.embeddings import ClipEncoder, cosine_matrix
from ..evaluation.prompts import PromptSet
from ..methods.runs import run_preset
from .priors import Prior, load_prior
from .variations import Ends, spread_held_out

ImageEmbeds = Callable[[list[str], list[int]], torch.Tensor]


def held_out_prompts(embeddings, count: int | None = None, name: str = "held-out captions") -> PromptSet:
    """Up to `count` distinct captions of held-out pairs, the classes taken in turn (helpers.prior.variations' rule, so
    any prefix covers the classes evenly), as the prompt set of the image comparison."""
    rows = spread_held_out(embeddings, len(embeddings.held_out_indices))
    captions = list(dict.fromkeys(embeddings.captions[i] for i in rows))
    return PromptSet(name, tuple(captions[:count]), "held-out")


def true_image_embeds(embeddings) -> ImageEmbeds:
    """(prompts, seeds) → the embedding of each held-out caption's own image (its first held-out image). Any other
    prompt is an error."""
    rows = {}
    for i in embeddings.held_out_indices.tolist():
        rows.setdefault(embeddings.captions[i], i)

    def embeds(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        unknown = sorted({p for p in prompts if p not in rows})
        if unknown:
            raise KeyError(f"no held-out image for {unknown[:3]}: the true-embedding variant draws held-out captions")
        return embeddings.image_embeds[[rows[p] for p in prompts]].float()
    return embeds


def prior_image_embeds(prior: Prior, embeddings, guidance: float = 1.0) -> ImageEmbeds:
    """(prompts, seeds) → the prior's image embedding for each prompt. Prompts go through the embedding set's CLIP
    (the one the prior and the adapter were trained on)."""
    def encode(texts: list[str]):
        states, masks = embeddings.encode_text_states(texts) if prior.text_tokens else (None, None)
        return embeddings.encode_text(texts), states, masks
    return _prompt_embeds(prior, encode, guidance)


def prompt_source(run_dir: str | Path, device: torch.device | str = "cpu", guidance: float = 1.0) -> ImageEmbeds:
    """A finished prior run on its own as (prompts, seeds) → image embeddings: what the catalog draws an
    image-conditioned run of the same CLIP with (`Method.image_embeds_source`). The prompts are encoded by the
    run's CLIP in the dtype its embedding cache used (fp16 on a GPU)."""
    preset, device = run_preset(Path(run_dir)), torch.device(device)
    encoder = ClipEncoder(preset.clip_model, device, precision_for(preset.mixed_precision, device).weight_dtype,
                          text_only=True)
    return _prompt_embeds(load_prior(run_dir, device), encoder.text, guidance)


def _prompt_embeds(prior: Prior, encode: Callable, guidance: float) -> ImageEmbeds:
    """(prompts, seeds) → predictions, each distinct prompt encoded once by `encode(texts)` → (embeds, token
    states, masks)."""
    def embeds(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        distinct = list(dict.fromkeys(prompts))
        where = [distinct.index(p) for p in prompts]
        text, states, masks = encode(distinct)
        if prior.text_tokens:
            states, masks = states[where], masks[where]
        else:
            states = masks = None
        return prior.predict(text[where], states, masks, seeds=list(seeds), guidance=guidance)
    return embeds


def comparison_variants(board, run: str, embeddings, priors: Sequence[Prior]) -> list:
    """The variants of notebook 04's comparison, on the ONE pipeline of `board` (helpers.methods.runs.RunSet) with the
    image-conditioned run `run` loaded: base SD1.5; the run with the caption only (a zero image embedding, what
    the adapter learned for "no image"); with each held-out caption's TRUE image embedding; with each prior's
    prediction from the caption."""
    return [board.variant(None, label="base SD1.5"),
            board.variant(run, label="caption only", image_embeds=caption_only(embeddings.dim)),
            board.variant(run, label="true image embedding", image_embeds=true_image_embeds(embeddings)),
            *[board.variant(run, label=p.name or p.kind, image_embeds=prior_image_embeds(p, embeddings))
              for p in priors]]


def prompt_ends(prior: Prior, embeddings, prompt_a: str, prompt_b: str, seed: int = 0):
    """Interpolation ends (helpers.prior.variations.Ends) between two prompts: the prior's predictions from them, shown
    beside the strip with the held-out picture whose embedding is closest to each prediction."""
    a, b = prior_image_embeds(prior, embeddings)([prompt_a, prompt_b], [seed, seed])
    held = embeddings.held_out_indices
    near = held[cosine_matrix(torch.stack([a, b]), embeddings.image_embeds[held]).argmax(dim=1)].tolist()
    label = f"{prior.name or prior.kind}: '{prompt_a}' → '{prompt_b}'\nbeside: nearest held-out pictures"
    return Ends(label, a, b, embeddings.records[near[0]].image(), embeddings.records[near[1]].image())


# ---------------------------------------------------------------- other image-embedding sources

def caption_only(dim: int):
    """An `image_embeds` source for Variants: zeros (the caption alone; the adapter learned zeros = no image)."""
    return lambda prompts, seeds: torch.zeros(len(prompts), dim)


def fixed_embeddings(embeds: torch.Tensor):
    """An `image_embeds` source that gives row i to image i (true embeddings of chosen images, a slerp strip)."""
    embeds = torch.as_tensor(embeds).float()

    def source(prompts, seeds):
        if len(prompts) != len(embeds):
            raise ValueError(f"{len(embeds)} embeddings for {len(prompts)} images")
        return embeds
    return source
