"""The priors of notebook 04: CLIP text embedding (and optionally the caption's token states) → CLIP image
embedding, which the image-conditioned SD1.5 (helpers.methods.ip_adapter) then draws. Both train through the one Trainer
as methods (`mlp_prior`, `diffusion_prior`) on the cached embedding pairs (helpers.data.embeddings).

- `mlp_prior`: the reference project's baseline, 3 linear layers trained with MSE. It predicts the conditional MEAN
  image embedding of a caption: one answer per caption, whatever the seed.
- `diffusion_prior`: after DALL·E 2 and lucidrains' DALLE2-pytorch, on diffusers' `PriorTransformer` in a small
  configuration. It predicts the clean image embedding (x0) from a noised one under a cosine schedule, with the
  text embedding, the token states and the timestep as extra tokens; the text is dropped for `cond_drop_prob` of
  the samples (classifier-free guidance); the weights are averaged (EMA) and the average is what is exported.
  Sampling (helpers.prior.metrics) draws 2 candidates per caption and keeps the one whose cosine to the text is higher;
  helpers.prior.images turns prompts into embeddings for the image-conditioned SD1.5.

Both work on L2-normalised embeddings scaled by √dim (DALLE2-pytorch's `image_embed_scale`, so a dimension has a
spread of about 1, like the noise). `PriorTransformer.post_process_latents` maps the prior's space back to CLIP's
(z · clip_std + clip_mean); diffusers creates both at ZERO, so they are set here: clip_mean = 0 and clip_std =
(mean norm of the training image embeddings) / √dim, which returns a prediction at the scale of the raw CLIP image
embeddings the adapter was trained on. Predictions are L2-normalised first (DALLE2-pytorch's
`sampling_final_clamp_l2norm`), so every prediction has that typical norm. The MLP carries the same two buffers.

    prior, trainer = train_prior(get_preset("prior_diffusion_cifar10", profile), es)  # es = embedding_set(...)
    embeds = prior.predict(text_embeds, text_states, text_masks, seeds=[0, 1])        # (n, D), raw CLIP scale
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PriorTransformer
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..core.presets import Preset
from .diffusion import SampleDraws
from .method import Method

PRIOR_DIR, SCHEDULER_DIR = "prior", "scheduler"  # final/ subfolders: the network (save_pretrained), its schedule
ADAPTER_PRESET = "prior_sd15"  # the image-conditioned SD1.5 (helpers.methods.ip_adapter) whose embedding space priors fill


# ---------------------------------------------------------------- the embedding space

def to_prior_space(embeds: torch.Tensor) -> torch.Tensor:
    """CLIP embeddings (n, D), any scale → L2-normalised × √D (float32)."""
    return F.normalize(embeds.float(), dim=-1) * math.sqrt(embeds.shape[-1])


def set_clip_stats(network: nn.Module, train_image_embeds: torch.Tensor) -> None:
    """clip_mean = 0, clip_std = mean training-image-embedding norm / √D: `post_process_latents` then maps the
    prior's √D-scaled space to the raw CLIP scale. Frozen: statistics of the data, not weights to learn."""
    dim = train_image_embeds.shape[-1]
    norm = train_image_embeds.float().norm(dim=-1).mean()
    with torch.no_grad():
        network.clip_mean.copy_(torch.zeros(1, dim))
        network.clip_std.copy_(torch.full((1, dim), float(norm) / math.sqrt(dim)))
    if isinstance(network.clip_mean, nn.Parameter):
        network.clip_mean.requires_grad_(False)
        network.clip_std.requires_grad_(False)


def from_prior_space(network: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The prior's outputs (n, D) → CLIP image embeddings at the training set's typical norm."""
    return network.post_process_latents(to_prior_space(z)).float()


# ---------------------------------------------------------------- the networks

class MlpPrior(ModelMixin, ConfigMixin):
    """The reference project's prior: text embedding → Linear → GELU → Linear → GELU → Linear → image
    embedding. A diffusers model, so `save_pretrained` / `from_pretrained` work as for the PriorTransformer, and
    it carries the same `clip_mean` / `clip_std` and `post_process_latents`."""

    @register_to_config
    def __init__(self, embedding_dim: int = 768, hidden_dim: int = 1024):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, embedding_dim))
        self.register_buffer("clip_mean", torch.zeros(1, embedding_dim))
        self.register_buffer("clip_std", torch.zeros(1, embedding_dim))

    def forward(self, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.net(text_embeds)

    def post_process_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.clip_std.to(latents.device) + self.clip_mean.to(latents.device)


def make_network(preset: Preset, dim: int) -> nn.Module:
    """The prior network of `preset` for embeddings of width `dim` (weights from the current RNG state)."""
    if preset.method == "mlp_prior":
        return MlpPrior(embedding_dim=dim, hidden_dim=preset.prior_width)
    tokens = preset.prior_text_tokens
    return PriorTransformer(num_attention_heads=preset.prior_heads,
                            attention_head_dim=preset.prior_width // preset.prior_heads,
                            num_layers=preset.prior_layers, embedding_dim=dim, num_embeddings=tokens,
                            additional_embeddings=4,  # text embedding, timestep, noised image, prediction token
                            encoder_hid_proj_type="linear" if tokens else None, norm_in_type="layer")


def noise_scheduler(preset: Preset):
    """Training schedule: cosine betas (squaredcos_cap_v2), x0 prediction; never clip (embeddings exceed ±1)."""
    return DDPMScheduler(num_train_timesteps=preset.prior_timesteps, beta_schedule="squaredcos_cap_v2",
                         prediction_type="sample", clip_sample=False)


# ---------------------------------------------------------------- data

class PriorPairs(torch.utils.data.Dataset):
    """(text, image) embedding pairs for the Trainer: rows `indices` of an embedding set (helpers.data.embeddings), each
    item {index, text_embed, image_embed, text_states (N, W), text_mask (N,)} with N = `tokens` (0: no states)."""

    def __init__(self, embeddings, indices, tokens: int):
        self.es, self.indices, self.tokens = embeddings, torch.as_tensor(indices, dtype=torch.long), int(tokens)
        if len(self.indices) == 0:
            raise ValueError("no embedding pairs to train on (is every pair held out?)")
        if self.tokens > embeddings.text_states.shape[1]:
            raise ValueError(f"the prior reads {self.tokens} token states; the cache holds "
                             f"{embeddings.text_states.shape[1]} per caption")
        if self.tokens and embeddings.text_states.shape[2] != embeddings.dim:
            raise ValueError(f"token states {embeddings.text_states.shape[2]} wide do not match the "
                             f"{embeddings.dim}-wide embeddings: set prior_text_tokens=0 for this CLIP")

    @property
    def records(self) -> list | None:
        """The pairs' image records (their digest names the training data in checkpoints), None if unknown."""
        records = getattr(self.es, "records", None)
        return [records[int(i)] for i in self.indices] if records else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        row = int(self.indices[i])
        item = {"index": i, "text_embed": self.es.text_embeds[row], "image_embed": self.es.image_embeds[row]}
        if self.tokens:
            states, masks = self.es.states_of([row])
            item["text_states"], item["text_mask"] = states[0, :self.tokens], masks[0, :self.tokens]
        return item


# ---------------------------------------------------------------- training: the methods

class Ema:
    """Exponential moving average of parameters, with diffusers' EMAModel decay rule (min(decay, (1 + n) /
    (10 + n)) for the n-th update, n from 0, so early weights are forgotten fast). Its state is tensors only (the
    averages and the update count; EMAModel counts in a Python int), so a checkpoint holds it exactly."""

    def __init__(self, params: dict[str, nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = {n: p.detach().clone().float() for n, p in params.items()}
        self.updates = torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def step(self) -> None:
        n = int(self.updates)
        decay = 0.0 if n == 0 else min(self.decay, (1 + n) / (10 + n))  # n = 0: start from the weights
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - decay)
        self.updates += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {**{f"ema.{n}": t for n, t in self.shadow.items()}, "ema.updates": self.updates}

    @torch.no_grad()
    def copy_to(self, network: nn.Module, prefix: str) -> None:
        """Put the averages into `network` (whose parameter `name` is `prefix + name` here)."""
        params = dict(network.named_parameters())
        for name, t in self.shadow.items():
            params[name.removeprefix(prefix)].copy_(t)


@dataclass
class PriorState:
    """What a prior run holds (the Trainer's `components`): the training image embeddings set the clip stats;
    `setup` builds the network, EMA and schedule."""
    train_image_embeds: torch.Tensor
    device: torch.device
    network: nn.Module | None = None
    ema: Ema | None = None
    scheduler: object = None


class PriorMethod(Method):
    """Shared by both priors: the network is built in `setup` (from the preset seed, like a LoRA's init), trains
    whole in fp32, and is exported with `save_pretrained` (EMA weights when there is an EMA). A finished prior is a
    prompt → image-embedding source (`image_embeds_source`): with it the catalog draws notebook 04's
    image-conditioned run from a typed prompt."""
    makes_image_embeds = True
    draws_images = False

    def idle_modules(self, state: PriorState, dataset) -> list[nn.Module]:
        return []  # it trains on cached embeddings with nothing else loaded

    def setup(self, state: PriorState) -> None:
        dim = state.train_image_embeds.shape[1]
        state.network = make_network(self.preset, dim)
        set_clip_stats(state.network, state.train_image_embeds)
        state.network.to(state.device).train()
        state.scheduler = noise_scheduler(self.preset) if self.name == "diffusion_prior" else None
        state.ema = (Ema(self.trainable_parameters(state), self.preset.ema_decay) if self.preset.ema_decay
                     else None)

    def modules(self, state: PriorState) -> dict[str, nn.Module]:
        return {"prior": state.network}

    def extra_state(self, state: PriorState) -> dict[str, torch.Tensor]:
        return state.ema.state() if state.ema is not None else {}

    def after_step(self, state: PriorState) -> None:
        if state.ema is not None:
            state.ema.step()

    def export(self, state: PriorState, out_dir: Path, run=None) -> list[Path]:
        network = copy.deepcopy(state.network).to("cpu").eval()
        if state.ema is not None:
            state.ema.copy_to(network, "prior.")
        out_dir.mkdir(parents=True, exist_ok=True)
        network.save_pretrained(out_dir / PRIOR_DIR)
        paths = [out_dir / PRIOR_DIR]
        if state.scheduler is not None:
            state.scheduler.save_pretrained(out_dir / SCHEDULER_DIR)
            paths.append(out_dir / SCHEDULER_DIR)
        return paths


class MlpPriorMethod(PriorMethod):
    """MSE between the predicted and the true image embedding in the √D-scaled space."""
    name = "mlp_prior"

    def loss(self, state, batch, models, draws: SampleDraws, dtype) -> torch.Tensor:
        device = draws.device
        text, target = to_prior_space(batch["text_embed"].to(device)), to_prior_space(batch["image_embed"].to(device))
        return F.mse_loss(models["prior"](text).float(), target)


class DiffusionPriorMethod(PriorMethod):
    """MSE of the predicted clean embedding (x0) at a uniform timestep, the text dropped for `cond_drop_prob` of
    the samples. With `snr_gamma` set, each sample's loss is weighted by 1 + min(SNR(t), γ): Salimans & Ho's
    "SNR + 1" weighting (the v-prediction loss, written for an x0 model) capped as Min-SNR caps it. Plain x0 MSE
    weighs every noise level alike, and a small prior then learns the caption's MEAN embedding long before it
    learns to keep what a slightly noised embedding already says, so its samples barely differ (measured on the
    tiny world: seed-to-seed cosine 0.999 plain, 0.989 weighted, 0.955 between true images of one class).
    Every draw is keyed by (seed, epoch, sample) (helpers.methods.diffusion): a resumed run draws what an uninterrupted
    one does."""
    name = "diffusion_prior"

    def loss(self, state, batch, models, draws: SampleDraws, dtype) -> torch.Tensor:
        device, scheduler = draws.device, state.scheduler
        x0 = to_prior_space(batch["image_embed"].to(device))
        noise = draws.randn((x0.shape[1],), "noise")
        t = draws.randint(scheduler.config.num_train_timesteps, "timestep")
        keep = draws.randint(1_000_000, "condition") >= round(self.preset.cond_drop_prob * 1_000_000)
        cond = condition(batch["text_embed"].to(device), batch.get("text_states"), batch.get("text_mask"), keep)
        noisy = scheduler.add_noise(x0, noise, t)
        pred = models["prior"](noisy, t, **cond).predicted_image_embedding
        per_sample = F.mse_loss(pred.float(), x0, reduction="none").mean(dim=1)
        if self.preset.snr_gamma is None:
            return per_sample.mean()
        alphas = scheduler.alphas_cumprod.to(device)[t]
        return (per_sample * (1 + (alphas / (1 - alphas)).clamp(max=self.preset.snr_gamma))).mean()


def condition(text_embeds: torch.Tensor, text_states: torch.Tensor | None, text_masks: torch.Tensor | None,
              keep: torch.Tensor | None = None) -> dict:
    """PriorTransformer keyword arguments. Rows where `keep` is False lose their text: a zero text embedding and
    every token masked out, the "no caption" input of classifier-free guidance."""
    device = text_embeds.device
    proj = to_prior_space(text_embeds)
    keep = torch.ones(len(proj), dtype=torch.bool, device=device) if keep is None else keep.to(device)
    out = {"proj_embedding": proj * keep[:, None]}
    if text_states is not None:
        out["encoder_hidden_states"] = text_states.to(device).float() * keep[:, None, None]
        out["attention_mask"] = text_masks.to(device).bool() & keep[:, None]
    return out
