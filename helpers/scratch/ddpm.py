"""The noise schedule and two samplers (DDPM and DDIM) exactly as SD1.5 uses them.

Training adds noise: x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, t ∈ 0…999, with ᾱ_t = ∏(1 − β_s) and SD1.5's
"scaled_linear" betas: β = linspace(√0.00085, √0.012, 1000)², from almost no noise (ᾱ_0 ≈ 0.999) to almost pure
noise (ᾱ_999 ≈ 0.0047).

Sampling visits a few of those timesteps, SD1.5's scheduler config says "leading" spacing with steps_offset 1:
    50 steps → 1000 // 50 = 20 apart, 0, 20, …, 980, plus 1 → 981, 961, …, 21, 1   (not 980…0: off by one)
At each step the UNet predicts ε; both samplers first estimate x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, then
    DDIM (η = 0): x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev) · ε        deterministic; the same noise direction kept
    DDPM:         x_prev = posterior mean of q(x_prev | x_t, x̂_0) + σ_t · z,  fresh noise z at every step
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .vae import randn


@dataclass(frozen=True)
class ScheduleConfig:
    num_train_timesteps: int = 1000  # timesteps the UNet was trained on
    beta_start: float = 0.00085  # β_0
    beta_end: float = 0.012  # β_999
    steps_offset: int = 1  # added to every "leading" inference timestep (981…1 instead of 980…0)


class NoiseSchedule:
    """Betas, ᾱ, inference timesteps and forward noising, shared by both samplers."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig()):
        self.config = cfg
        # "scaled_linear": linear in √β, in float32 as diffusers computes it (so ᾱ matches bit for bit)
        self.betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.num_train_timesteps,
                                    dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def timesteps(self, steps: int) -> torch.Tensor:
        """Inference timesteps, high noise first: "leading" spacing + steps_offset (50 → 981, 961, …, 1)."""
        if not 1 <= steps <= self.config.num_train_timesteps:
            raise ValueError(f"steps must be in 1…{self.config.num_train_timesteps}, got {steps}")
        ratio = self.config.num_train_timesteps // steps
        return torch.arange(steps - 1, -1, -1, dtype=torch.int64) * ratio + self.config.steps_offset

    def img2img_timesteps(self, steps: int, strength: float) -> torch.Tensor:
        """img2img skips the noisiest steps: with strength s only the last int(steps · s) timesteps run, starting from
        the input image noised to the first of them (as diffusers' img2img get_timesteps). s = 1 ignores the image."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        keep = min(int(steps * strength), steps)
        return self.timesteps(steps)[steps - keep:]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, per sample."""
        abar = self.alphas_cumprod.to(x0.device, x0.dtype)[torch.as_tensor(t, device=x0.device)].reshape(-1, 1, 1, 1)
        return abar ** 0.5 * x0 + (1 - abar) ** 0.5 * noise

    def alpha_bar(self, t: int, final: torch.Tensor) -> torch.Tensor:
        """ᾱ_t, or `final` past the end of the chain (t < 0)."""
        return self.alphas_cumprod[t] if t >= 0 else final

    def predict_x0(self, x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
        return (x - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5


# ---------------------------------------------------------------- samplers

class DDIM(NoiseSchedule):
    """Song et al. 2020. After the last step SD1.5's config uses ᾱ_0 (set_alpha_to_one=False), not 1.
    η = 0 adds no fresh noise (the usual choice); η = 1 adds as much as DDPM's posterior."""

    def __init__(self, cfg: ScheduleConfig = ScheduleConfig(), eta: float = 0.0):
        super().__init__(cfg)
        self.eta = eta

    def step(self, eps: torch.Tensor, t: int, t_prev: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step from timestep t to t_prev (< 0 after the last step)."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alpha_bar(t_prev, final=self.alphas_cumprod[0])
        x0 = self.predict_x0(x, eps, abar_t)
        variance = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        sigma = self.eta * variance ** 0.5
        x_prev = abar_prev ** 0.5 * x0 + (1 - abar_prev - sigma ** 2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + sigma * randn(eps.shape, generator, eps.device, eps.dtype)
        return x_prev


class DDPM(NoiseSchedule):
    """Ho et al. 2020 with fewer steps: the posterior between two visited timesteps, "fixed_small" variance."""

    def step(self, eps: torch.Tensor, t: int, t_prev: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alpha_bar(t_prev, final=torch.tensor(1.0))
        alpha_t = abar_t / abar_prev  # the α of the jump t → t_prev
        beta_t = 1 - alpha_t
        x0 = self.predict_x0(x, eps, abar_t)
        # posterior mean: a mix of the x̂_0 estimate and the current sample
        mean = (abar_prev ** 0.5 * beta_t / (1 - abar_t)) * x0 + (alpha_t ** 0.5 * (1 - abar_prev) / (1 - abar_t)) * x
        if t > 0:  # noise even at t = 1, the last SD1.5 step, as diffusers does
            variance = torch.clamp((1 - abar_prev) / (1 - abar_t) * beta_t, min=1e-20)
            mean = mean + variance ** 0.5 * randn(eps.shape, generator, eps.device, eps.dtype)
        return mean


SAMPLERS = {"ddim": DDIM, "ddpm": DDPM}


def make_sampler(name: str, cfg: ScheduleConfig = ScheduleConfig(), eta: float = 0.0) -> NoiseSchedule:
    """"ddim" (with η) or "ddpm"."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if name == "ddpm" and eta:
        raise ValueError("eta only applies to DDIM (DDPM always adds its posterior noise)")
    return DDIM(cfg, eta) if name == "ddim" else DDPM(cfg)


def previous_timesteps(timesteps: torch.Tensor) -> list[int]:
    """The timestep each step lands on: the next in the list, and -1 ("past the end") after the last."""
    return [*timesteps[1:].tolist(), -1]
