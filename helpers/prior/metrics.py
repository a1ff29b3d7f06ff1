"""How close a prior's predictions come, on the held-out pairs of an embedding set (helpers.data.embeddings). The
metrics are DALLE2-pytorch's (train_diffusion_prior.py, `report_cosine_sims`), each a mean over the held-out
pairs with a bootstrap 95 % CI (helpers.evaluation.stats):
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

import torch
import torch.nn.functional as F

from ..evaluation.stats import bootstrap_ci
from .priors import Prior

SPREAD_SEEDS = (0, 1, 2, 3)  # seeds per caption for the spread
COLUMNS = ("cos(text, image)", "cos(pred, image)", "cos(pred, text)", "cos(text, shuffled)", "seed spread")


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
