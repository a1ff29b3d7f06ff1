"""A trained prior in use: loading it from a run, sampling image embeddings from text, the DALLE2-pytorch
metrics on the held-out pairs of an embedding set (helpers.embeddings), and the embeddings it feeds the
image-conditioned SD1.5 (a `Variant`'s `image_embeds`, helpers.sampling).

Sampling: the MLP maps a text embedding to one image embedding. The diffusion prior runs DDIM from seeded noise
(eta 0, "trailing" timesteps so the first step starts from pure noise) on its x0 predictions, draws CANDIDATES = 2
embeddings per text and keeps the one with the higher cosine to the text (DALL·E 2); `guidance` > 1 mixes in the
text-free prediction (classifier-free guidance, possible because training dropped the text). Predictions come at
the typical norm of the raw CLIP image embeddings (helpers.prior).

The metrics are DALLE2-pytorch's (train_diffusion_prior.py, `report_cosine_sims`), each a mean over the held-out
pairs with a bootstrap 95 % CI (helpers.evaluate):
  cos(text, image)     the CLIP text embedding vs its own image's embedding: the baseline, no prior involved
  cos(pred, image)     the prior's prediction from the caption vs the caption's true image
  cos(pred, text)      the prediction vs the caption it came from
  cos(text, shuffled)  the caption vs the prediction for ANOTHER held-out caption (a seeded shuffle in which no pair
                       keeps its own caption): how much of cos(pred, text) any prediction gets for free
and the spread across seeds: 1 − the mean cosine between predictions for the same caption with different seeds
(0 for the MLP by construction). The `true images` row gives the spread a perfect prior would show: 1 − the mean
cosine between training images that share a caption.

An MLP trained with MSE predicts a caption's MEAN image embedding, which is closer on average to every image of the
caption than any single sample: it may well win cos(pred, image) and still draw the same picture for every seed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer
from torch import nn

from .evaluate import bootstrap_ci
from .prior import PRIOR_DIR, SCHEDULER_DIR, MlpPrior, condition, from_prior_space, to_prior_space
from .prompts import PromptSet

CANDIDATES = 2  # DALL·E 2: sample 2 image embeddings per caption, keep the one closer to the text

SPREAD_SEEDS = (0, 1, 2, 3)  # seeds per caption for the spread
COLUMNS = ("cos(text, image)", "cos(pred, image)", "cos(pred, text)", "cos(text, shuffled)", "seed spread")


# ---------------------------------------------------------------- a trained prior, sampling

@dataclass
class Prior:
    """A trained prior (EMA weights for the diffusion prior) that turns text into CLIP image embeddings."""
    kind: str  # "mlp_prior" or "diffusion_prior"
    network: nn.Module
    scheduler: object = None  # the training schedule (diffusion only)
    sample_steps: int = 64
    text_tokens: int = 0
    name: str = ""

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def predict(self, text_embeds: torch.Tensor, text_states: torch.Tensor | None = None,
                text_masks: torch.Tensor | None = None, seeds=0, candidates: int = CANDIDATES,
                guidance: float = 1.0) -> torch.Tensor:
        """Image embeddings (n, D) at the raw CLIP scale for n texts. `seeds`: one int for all rows or one per
        row (the diffusion prior's starting noise; the MLP ignores it). The diffusion prior draws `candidates`
        per row and keeps the one closest to its text; `guidance` > 1 applies classifier-free guidance."""
        n = len(text_embeds)
        seeds = [int(seeds)] * n if isinstance(seeds, int) else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"need one seed per text ({n}), got {len(seeds)}")
        self.network.eval()
        device = self.device
        text_embeds = text_embeds.to(device).float()
        if self.kind == "mlp_prior":
            return from_prior_space(self.network, self.network(to_prior_space(text_embeds))).cpu()
        if self.text_tokens and text_states is None:
            raise ValueError(f"this prior reads {self.text_tokens} token states per text: pass text_states and "
                             "text_masks (EmbeddingSet.encode_text_states)")
        states = masks = None
        if self.text_tokens:
            states = text_states[:, :self.text_tokens].repeat_interleave(candidates, 0)
            masks = text_masks[:, :self.text_tokens].repeat_interleave(candidates, 0)
        texts = text_embeds.repeat_interleave(candidates, 0)
        noise = torch.cat([torch.randn(candidates, text_embeds.shape[1], generator=torch.Generator().manual_seed(s))
                           for s in seeds])
        z = self._sample(noise.to(device), condition(texts, states, masks), guidance)
        z = z.view(n, candidates, -1)
        closeness = F.cosine_similarity(z, text_embeds[:, None, :], dim=-1)
        best = z[torch.arange(n), closeness.argmax(dim=1)]
        return from_prior_space(self.network, best).cpu()

    def _sample(self, x: torch.Tensor, cond: dict, guidance: float) -> torch.Tensor:
        """DDIM (eta 0, "trailing" timesteps so the first step starts from pure noise) on x0 predictions."""
        sampler = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", clip_sample=False,
                                            set_alpha_to_one=True)
        sampler.set_timesteps(self.sample_steps, device=x.device)
        if guidance != 1.0:
            empty = condition(cond["proj_embedding"], cond.get("encoder_hidden_states"), cond.get("attention_mask"),
                              torch.zeros(len(x), dtype=torch.bool))
            cond = {k: torch.cat([empty[k], v]) for k, v in cond.items()}
        for t in sampler.timesteps:
            inputs = torch.cat([x, x]) if guidance != 1.0 else x
            pred = self.network(inputs, t, **cond).predicted_image_embedding.float()
            if guidance != 1.0:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
            x = sampler.step(pred, t, x).prev_sample
        return x


def finished_priors(root: str | Path | None = None) -> list[Path]:
    """Finished prior runs under `<root>/priors` (default: the storage root), sorted by name."""
    from .prior import PRIORS_DIR
    from .runs import is_finished
    from .runtime import storage_root
    folder = Path(root or storage_root()) / PRIORS_DIR
    return sorted(p for p in folder.iterdir() if is_finished(p)) if folder.is_dir() else []


def load_prior(run_dir: str | Path, device: torch.device | str = "cpu") -> Prior:
    """A finished prior run (its final/ folder: the exported, EMA-averaged network) ready to predict."""
    from .runs import run_preset
    run_dir = Path(run_dir)
    preset = run_preset(run_dir)
    final = run_dir / "final"
    if preset.method == "mlp_prior":
        network = MlpPrior.from_pretrained(final / PRIOR_DIR)
        scheduler = None
    elif preset.method == "diffusion_prior":
        network = PriorTransformer.from_pretrained(final / PRIOR_DIR)
        scheduler = DDPMScheduler.from_pretrained(final / SCHEDULER_DIR)
    else:
        raise ValueError(f"{run_dir.name} is a {preset.method!r} run, not a prior (mlp_prior, diffusion_prior)")
    return Prior(preset.method, network.to(device).eval(), scheduler, preset.prior_sample_steps,
                 preset.prior_text_tokens if preset.method == "diffusion_prior" else 0, run_dir.name)



# ---------------------------------------------------------------- the metrics

def shuffled_order(captions: Sequence[str], seed: int = 0) -> torch.Tensor:
    """A seeded permutation of the rows in which no row gets a caption equal to its own (DALLE2-pytorch rolls the
    batch by one; a roll of a class-sorted split would pair most rows with their own class)."""
    n = len(captions)
    if len(set(captions)) < 2:
        raise ValueError("a shuffled-caption check needs at least two different captions")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    for _ in range(100 * n):  # swap away every row that kept its caption; converges in a few passes
        clash = [i for i in range(n) if captions[int(order[i])] == captions[i]]
        if not clash:
            return order
        i = clash[0]
        j = int(torch.randint(0, n, (1,), generator=g))
        order[i], order[j] = order[j].clone(), order[i].clone()
    raise ValueError("could not shuffle the captions so that each row gets another caption (one caption dominates)")


def _text_inputs(embeddings, rows: torch.Tensor, prior: Prior):
    states, masks = embeddings.states_of(rows) if prior.text_tokens else (None, None)
    return embeddings.text_embeds[rows], states, masks


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def seed_spread(prior: Prior, embeddings, rows: torch.Tensor, seeds: Sequence[int] = SPREAD_SEEDS) -> torch.Tensor:
    """Per row: 1 − the mean cosine between the prior's predictions for that row's caption under `seeds`."""
    text = _text_inputs(embeddings, rows, prior)
    preds = F.normalize(torch.stack([prior.predict(*text, seeds=s) for s in seeds], dim=1), dim=-1)  # (n, S, D)
    sims = preds @ preds.transpose(1, 2)
    off = ~torch.eye(len(seeds), dtype=torch.bool)
    return (1 - sims[:, off].mean(dim=1)).clamp(min=0)  # ≥ 0: float error would give −1e-8 for equal predictions


def true_spread(embeddings) -> torch.Tensor:
    """Per training caption shown with ≥ 2 images: 1 − the mean cosine between those images' embeddings."""
    train = embeddings.train_indices
    images = F.normalize(embeddings.image_embeds[train].float(), dim=-1)
    groups: dict[str, list[int]] = {}
    for k, i in enumerate(train.tolist()):
        groups.setdefault(embeddings.captions[i], []).append(k)
    out = []
    for members in groups.values():
        if len(members) > 1:
            x = images[members]
            sims = x @ x.T
            out.append(1 - sims[~torch.eye(len(members), dtype=torch.bool)].mean())
    if not out:
        raise ValueError("no training caption has two images: the true spread is undefined")
    return torch.stack(out)


# ---------------------------------------------------------------- the table

@dataclass
class MetricsTable:
    """One row per prior (and `true images`): each metric's mean and CI (`frame`); `values` keeps the per-pair
    numbers. Shown as "mean [low, high]" cells."""
    frame: object  # DataFrame: prior, n, and per column its mean, "<column> low", "<column> high"
    values: dict[str, dict[str, torch.Tensor]]
    level: float = 0.95

    def mean(self, prior: str, column: str) -> float:
        return float(self.values[prior][column].mean())

    def cells(self):
        """The table as text cells: "0.974 [0.966, 0.981]" ("—" where a metric does not apply)."""
        import pandas as pd
        rows = []
        for _, r in self.frame.iterrows():
            rows.append({"prior": r["prior"], "n": r["n"], **{
                c: f"{r[c]:.3f} [{r[c + ' low']:.3f}, {r[c + ' high']:.3f}]" if pd.notna(r.get(c)) else "—"
                for c in COLUMNS}})
        return pd.DataFrame(rows).set_index("prior")

    def caption(self) -> str:
        return (f"Prior metrics on {self.frame['n'].iloc[0]} held-out pairs (DALLE2-pytorch's cosines): mean "
                f"[{self.level:.0%} bootstrap CI]. seed spread: 1 − mean cosine between one caption's predictions "
                f"with {len(SPREAD_SEEDS)} seeds (true images: between training images sharing a caption)")

    def __str__(self) -> str:
        return self.caption() + "\n" + self.cells().to_string()

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return f"<p>{self.caption()}</p>" + self.cells().to_html()


def prior_metrics(priors: Sequence[Prior], embeddings, seed: int = 0, spread_seeds: Sequence[int] = SPREAD_SEEDS,
                  level: float = 0.95) -> MetricsTable:
    """The metrics of each prior on the held-out pairs of `embeddings` (predictions with `seed`), and the
    `true images` reference row."""
    rows_idx = embeddings.held_out_indices
    if len(rows_idx) < 2:
        raise ValueError("the embedding set has fewer than 2 held-out pairs: nothing to measure on")
    names = [p.name or p.kind for p in priors]
    if len(set(names)) != len(names):
        raise ValueError(f"priors need distinct names, got {names}")
    captions = [embeddings.captions[i] for i in rows_idx.tolist()]
    order = shuffled_order(captions, seed)
    text, image = embeddings.text_embeds[rows_idx], embeddings.image_embeds[rows_idx]
    values: dict[str, dict[str, torch.Tensor]] = {}
    for name, prior in zip(names, priors):
        t, states, masks = _text_inputs(embeddings, rows_idx, prior)
        pred = prior.predict(t, states, masks, seeds=seed)
        shuffled = prior.predict(t[order], *(x[order] if x is not None else None for x in (states, masks)),
                                 seeds=seed)
        values[name] = {COLUMNS[0]: _cos(text, image), COLUMNS[1]: _cos(pred, image), COLUMNS[2]: _cos(pred, text),
                        COLUMNS[3]: _cos(text, shuffled),
                        COLUMNS[4]: seed_spread(prior, embeddings, rows_idx, spread_seeds)}
    values["true images"] = {COLUMNS[4]: true_spread(embeddings)}
    import pandas as pd
    table_rows = []
    for name, columns in values.items():
        row = {"prior": name, "n": len(next(iter(columns.values())))}
        for column, v in columns.items():
            row[column], row[column + " low"], row[column + " high"] = bootstrap_ci(v.numpy(), level=level)
        table_rows.append(row)
    return MetricsTable(pd.DataFrame(table_rows), values, level)


# ---------------------------------------------------------------- what the prior feeds SD1.5

def held_out_prompts(embeddings, limit: int | None = None, per_class: bool = False,
                     name: str = "held-out captions") -> PromptSet:
    """The distinct captions of the held-out pairs (the first `limit`), as a prompt set for the image comparison;
    `per_class`: only the first caption of each class (sources with labels)."""
    rows = embeddings.held_out_indices.tolist()
    if per_class:
        if not bool((embeddings.labels[rows] >= 0).all()):
            raise ValueError("per_class needs labels: this source has none")
        firsts = {}
        for i in rows:
            firsts.setdefault(int(embeddings.labels[i]), i)
        rows = [firsts[k] for k in sorted(firsts)]
    captions = list(dict.fromkeys(embeddings.captions[i] for i in rows))
    return PromptSet(name, tuple(captions[:limit]), "held-out")


def true_image_embeds(embeddings) -> Callable[[list[str], list[int]], torch.Tensor]:
    """(prompts, seeds) → the embedding of each held-out caption's own image (its first held-out image): the upper
    bound a prior could reach. Any other prompt is an error."""
    rows = {}
    for i in embeddings.held_out_indices.tolist():
        rows.setdefault(embeddings.captions[i], i)

    def embeds(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        unknown = sorted({p for p in prompts if p not in rows})
        if unknown:
            raise KeyError(f"no held-out image for {unknown[:3]}: the true-embedding variant draws held-out captions")
        return embeddings.image_embeds[[rows[p] for p in prompts]].float()
    return embeds


def prior_image_embeds(prior: Prior, embeddings, guidance: float = 1.0) -> Callable[[list[str], list[int]],
                                                                                      torch.Tensor]:
    """(prompts, seeds) → the prior's image embedding for each prompt, with the image's seed as the prior's seed
    (so the diffusion prior gives each seed its own embedding). Prompts go through the embedding set's CLIP."""
    def encode(texts: list[str]):
        states, masks = embeddings.encode_text_states(texts) if prior.text_tokens else (None, None)
        return embeddings.encode_text(texts), states, masks
    return _prompt_embeds(prior, encode, guidance)


def prompt_source(run_dir: str | Path, device: torch.device | str = "cpu",
                  guidance: float = 1.0) -> Callable[[list[str], list[int]], torch.Tensor]:
    """A finished prior run on its own as (prompts, seeds) → image embeddings (`helpers.sampling.ImageEmbeds`):
    what the catalog draws an image-conditioned run of the same CLIP with (`Method.image_embeds_source`). The
    prompts are encoded by the run's CLIP in the dtype its embedding cache used (fp16 on a GPU)."""
    from .embeddings import ClipEncoder
    from .precision import precision_for
    from .runs import run_preset
    preset, device = run_preset(Path(run_dir)), torch.device(device)
    encoder = ClipEncoder(preset.clip_model, device, precision_for(preset.mixed_precision, device).weight_dtype,
                          text_only=True)
    return _prompt_embeds(load_prior(run_dir, device), encoder.text, guidance)


def _prompt_embeds(prior: Prior, encode: Callable, guidance: float):
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
    """The variants of notebook 04's comparison, on the ONE pipeline of `board` (helpers.runs.RunSet) with the
    image-conditioned run `run` loaded: base SD1.5; the run with the caption only (a zero image embedding, what
    the adapter learned for "no image"); with each held-out caption's TRUE image embedding (the upper bound a prior
    could reach); with each prior's prediction from the caption."""
    from .ip_adapter import caption_only
    return [board.variant(None, label="base SD1.5"),
            board.variant(run, label="caption only", image_embeds=caption_only(embeddings.dim)),
            board.variant(run, label="true image embedding", image_embeds=true_image_embeds(embeddings)),
            *[board.variant(run, label=p.name or p.kind, image_embeds=prior_image_embeds(p, embeddings))
              for p in priors]]


__all__ = ["Prior", "load_prior", "finished_priors", "CANDIDATES", "prior_metrics", "MetricsTable", "seed_spread",
           "true_spread", "shuffled_order", "held_out_prompts", "true_image_embeds", "prior_image_embeds",
           "prompt_source", "comparison_variants", "SPREAD_SEEDS", "COLUMNS"]
