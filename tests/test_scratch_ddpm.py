"""The scratch noise schedule and samplers against diffusers' DDPMScheduler / DDIMScheduler built from the real SD1.5
scheduler config: betas, ᾱ and timesteps must be identical, single steps equal to float32 rounding."""
import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionImg2ImgPipeline

from helpers.scratch.ddpm import DDIM, DDPM, NoiseSchedule, make_sampler, previous_timesteps
from helpers.tiny.world import SD15_SCHEDULER


def test_betas_and_alphas_cumprod_identical():
    ours = NoiseSchedule()
    for scheduler in (DDPMScheduler.from_config(SD15_SCHEDULER), DDIMScheduler.from_config(SD15_SCHEDULER)):
        assert torch.equal(ours.betas, scheduler.betas)
        assert torch.equal(ours.alphas_cumprod, scheduler.alphas_cumprod)
    assert ours.betas[0].item() == pytest.approx(0.00085) and ours.betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("steps", [1, 7, 20, 25, 50, 999, 1000])
def test_timesteps_leading_with_offset(steps):
    ours = NoiseSchedule().timesteps(steps)
    for scheduler in (DDPMScheduler.from_config(SD15_SCHEDULER), DDIMScheduler.from_config(SD15_SCHEDULER)):
        scheduler.set_timesteps(steps)
        assert torch.equal(ours, scheduler.timesteps)
    if steps == 50:  # the SD1.5 50-step schedule: 981, 961, ..., 1 (not 980 ... 0)
        assert ours[:3].tolist() == [981, 961, 941] and ours[-1].item() == 1


@pytest.mark.parametrize("steps,strength", [(50, 0.8), (50, 0.75), (10, 0.3), (10, 1.0), (10, 0.05), (7, 0.5)])
def test_img2img_timesteps_match_pipeline_get_timesteps(steps, strength):
    scheduler = DDIMScheduler.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    theirs, _ = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=scheduler), steps,
                                                             strength, "cpu")
    assert torch.equal(NoiseSchedule().img2img_timesteps(steps, strength), theirs)


def test_add_noise_matches():
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([1, 500, 981])
    theirs = DDIMScheduler.from_config(SD15_SCHEDULER).add_noise(x0, noise, t)
    assert torch.allclose(NoiseSchedule().add_noise(x0, noise, t), theirs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("make_ours, scheduler_cls, step_kwargs, seed", [
    (lambda: DDIM(eta=0.0), DDIMScheduler, {"eta": 0.0}, 1),
    (lambda: DDIM(eta=1.0), DDIMScheduler, {"eta": 1.0}, 1),
    (lambda: DDPM(), DDPMScheduler, {}, 2),
], ids=["ddim-eta0", "ddim-eta1", "ddpm"])
def test_sampler_steps_match_with_same_noise(make_ours, scheduler_cls, step_kwargs, seed):
    steps, ours = 10, make_ours()
    scheduler = scheduler_cls.from_config(SD15_SCHEDULER)
    scheduler.set_timesteps(steps)
    timesteps = ours.timesteps(steps)
    x = torch.randn(2, 4, 8, 8)
    g_ours, g_theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for t, t_prev in zip(timesteps.tolist(), previous_timesteps(timesteps)):
        eps = torch.randn(2, 4, 8, 8)
        theirs = scheduler.step(eps, t, x, generator=g_theirs, **step_kwargs).prev_sample
        mine = ours.step(eps, t, t_prev, x, generator=g_ours)
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-6), (t, (mine - theirs).abs().max())
        x = theirs


def test_ddim_eta0_is_deterministic_and_ddpm_is_not():
    eps, x = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    a = DDIM().step(eps, 501, 481, x, generator=torch.Generator().manual_seed(0))
    b = DDIM().step(eps, 501, 481, x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    c = DDPM().step(eps, 501, 481, x, generator=torch.Generator().manual_seed(0))
    d = DDPM().step(eps, 501, 481, x, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(c, d)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="steps"):
        NoiseSchedule().timesteps(0)
    with pytest.raises(ValueError, match="strength"):
        NoiseSchedule().img2img_timesteps(10, 1.5)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_sampler("euler")
    with pytest.raises(ValueError, match="eta"):
        make_sampler("ddpm", eta=0.5)
