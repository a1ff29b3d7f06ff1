"""A trained prior in use: loading it from a run, sampling image embeddings from text, and the DALLE2-pytorch
metrics on the held-out pairs of an embedding set (helpers.embeddings). What a prior feeds the image-conditioned
SD1.5 is in helpers.prior_images.

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

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer
from torch import nn

from .evaluate import bootstrap_ci
from .prior import PRIOR_DIR, SCHEDULER_DIR, MlpPrior, condition, from_prior_space, to_prior_space

CANDIDATES = 2  # DALL·E 2: sample 2 image embeddings per caption, keep the one closer to the text
PREDICT_BATCH = 64  # texts per network call (× CANDIDATES rows). Notebook 04's 1,000 held-out rows in one fp32 call
#                    of the t4 diffusion prior would peak at ≈ 4 GiB (81 tokens × 512 wide × 6 blocks); 64 plan at
#                    ≈ 0.5 GiB (helpers.memory.prior_predict_gib), 16 calls of a few ms each on a T4

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
        if n > PREDICT_BATCH:  # each row's noise comes from its own seed, so its prediction is the same in any batch
            part = lambda x, s: None if x is None else x[s:s + PREDICT_BATCH]  # noqa: E731
            return torch.cat([self.predict(part(text_embeds, s), part(text_states, s), part(text_masks, s),
                                           seeds[s:s + PREDICT_BATCH], candidates, guidance)
                              for s in range(0, n, PREDICT_BATCH)])
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


__all__ = ["Prior", "load_prior", "finished_priors", "CANDIDATES", "PREDICT_BATCH", "prior_metrics", "MetricsTable", "seed_spread",
           "true_spread", "shuffled_order", "SPREAD_SEEDS", "COLUMNS"]
