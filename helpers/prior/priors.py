"""A prior in use: training one (`train_prior`, through the Trainer), finding and loading finished ones, and
sampling image embeddings from text (`Prior.predict`). The networks and the training method are in
helpers.methods.priors; what a prior feeds the image-conditioned SD1.5 is in helpers.prior.images.

Sampling: the MLP maps a text embedding to one image embedding. The diffusion prior runs DDIM from seeded noise
(eta 0, "trailing" timesteps so the first step starts from pure noise) on its x0 predictions, draws CANDIDATES
embeddings per text and keeps the one with the higher cosine to the text (DALL·E 2); `guidance` > 1 mixes in the
text-free prediction (classifier-free guidance, possible because training dropped the text). Predictions come at
the typical norm of the raw CLIP image embeddings (helpers.methods.priors).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, PriorTransformer
from torch import nn

from ..core.paths import prior_folder, priors_root
from ..core.presets import Preset
from ..core.runtime import device as default_device
from ..methods.priors import (
    PRIOR_DIR,
    SCHEDULER_DIR,
    MlpPrior,
    PriorPairs,
    PriorState,
    condition,
    from_prior_space,
    to_prior_space,
)
from ..methods.runs import is_finished, run_preset
from ..train.loop import Trainer

CANDIDATES = 2  # DALL·E 2: sample 2 image embeddings per caption, keep the one closer to the text
PREDICT_BATCH = 64  # texts per network call (× CANDIDATES rows). Notebook 04's 1,000 held-out rows in one fp32 call
#                    of the t4 diffusion prior would peak at ≈ 4 GiB (81 tokens × 512 wide × 6 blocks); 64 plan at
#                    ≈ 0.5 GiB (helpers.plan.memory.prior_predict_gib), 16 calls of a few ms each on a T4



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
    folder = priors_root(root)
    return sorted(p for p in folder.iterdir() if is_finished(p)) if folder.is_dir() else []


def load_prior(run_dir: str | Path, device: torch.device | str = "cpu") -> Prior:
    """A finished prior run (its final/ folder: the exported, EMA-averaged network) ready to predict."""
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


def train_prior(preset: Preset, embeddings, run_dir: str | Path | None = None, hooks: list | None = None,
                device: torch.device | str | None = None):
    """Train `preset`'s prior on the training pairs of `embeddings` (an EmbeddingSet) through the Trainer, into
    `run_dir` (default: `paths.prior_folder(preset)`), resuming from its newest checkpoint. Returns (Prior, Trainer)."""
    if preset.method not in ("mlp_prior", "diffusion_prior"):
        raise ValueError(f"preset {preset.name!r} trains {preset.method!r}, not a prior")
    if preset.clip_model and getattr(embeddings, "clip_ref", preset.clip_model) != preset.clip_model:
        raise ValueError(f"preset {preset.name!r} is for {preset.clip_model!r} embeddings, these come from "
                         f"{embeddings.clip_ref!r}")
    device = torch.device(device or default_device())
    tokens = preset.prior_text_tokens if preset.method == "diffusion_prior" else 0
    train = embeddings.train_indices
    dataset = PriorPairs(embeddings, train, tokens)
    state = PriorState(embeddings.image_embeds[train], device)
    run_dir = Path(run_dir) if run_dir is not None else prior_folder(preset)
    trainer = Trainer(preset, state, dataset, run_dir, hooks=hooks)
    trainer.run()
    return load_prior(run_dir, device), trainer
