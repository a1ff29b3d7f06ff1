"""The denoising objective of every UNet method, and the per-sample random draws it needs.

The loss follows diffusers' train_text_to_image(_lora)(_sdxl).py: latents drawn from the VAE's distribution (cached
or fresh), Gaussian noise (+ optional offset noise), uniform timesteps, DDPM forward noising, epsilon or v-prediction
target from the scheduler config, MSE with optional Min-SNR-γ weighting.

Every random draw of a sample comes from a generator keyed by (seed, epoch, dataset index, purpose), not from a
process's global RNG: a sample gets the same noise, timestep and latent sample whatever batch it lands in, however
many processes train, and after a resume. So a 2-process run equals a 1-process run with the same global batch.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

PURPOSES = ("latent", "noise", "offset", "timestep", "condition")  # one independent stream per kind of draw
#   ("condition": which conditioning a sample drops, for methods trained with condition dropout)


def sample_seed(seed: int, epoch: int, index: int, purpose: str) -> int:
    """A 63-bit seed for one draw of one sample; sha256, so it is the same in every process and Python run."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown draw {purpose!r}; known: {PURPOSES}")
    digest = hashlib.sha256(f"{seed}/{epoch}/{index}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class SampleDraws:
    """The random draws of one batch: row i uses the streams of sample `indices[i]` in `epoch`."""

    def __init__(self, seed: int, epoch: int, indices, device: torch.device | str = "cpu"):
        self.seed, self.epoch = int(seed), int(epoch)
        self.indices = [int(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        self.device = torch.device(device)

    def _generators(self, purpose: str) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, i, purpose)) for i in self.indices]

    def randn(self, shape: tuple[int, ...], purpose: str) -> torch.Tensor:
        """One standard-normal tensor of `shape` per sample, stacked: (batch, *shape), fp32 on the device."""
        return torch.stack([torch.randn(shape, generator=g) for g in self._generators(purpose)]).to(self.device)

    def randint(self, high: int, purpose: str) -> torch.Tensor:
        """One integer in [0, high) per sample (timesteps), as a long tensor on the device."""
        return torch.cat([torch.randint(0, high, (1,), generator=g) for g in self._generators(purpose)]
                         ).to(self.device)


def sample_latents(vae_config, latent_params: torch.Tensor, draws: SampleDraws) -> torch.Tensor:
    """Latents from the VAE's distribution parameters (mean ‖ logvar) with the VAE's scaling (and shift, if any)."""
    mean, logvar = latent_params.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    latents = mean + std * draws.randn(tuple(mean.shape[1:]), "latent").to(mean.device)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (latents - shift) * vae_config.scaling_factor


def denoising_loss(unet, noise_scheduler, latents: torch.Tensor, cond: dict, draws: SampleDraws,
                   noise_offset: float = 0.0, snr_gamma: float | None = None) -> torch.Tensor:
    """Noise the latents at the samples' timesteps and score the UNet's prediction."""
    noise = draws.randn(tuple(latents.shape[1:]), "noise").to(latents.device)
    if noise_offset:
        noise += noise_offset * draws.randn((latents.shape[1], 1, 1), "offset").to(latents.device)
    timesteps = draws.randint(noise_scheduler.config.num_train_timesteps, "timestep").to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    pred = unet(noisy, timesteps, **cond).sample
    if snr_gamma is None:
        return F.mse_loss(pred.float(), target.float())
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()
