"""End to end on the repo's tiny SD1.5 (random weights, CPU, fp32): the scratch txt2img / img2img against diffusers'
StableDiffusionPipeline / StableDiffusionImg2ImgPipeline with the same weights, seed and scheduler config."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image, ImageDraw

from helpers.scratch.folders import load_diffusers_folder
from helpers.scratch.parity import max_abs_diff
from helpers.scratch.pipeline import from_pil, to_pil
from helpers.tiny.world import resolve

TOL = 1e-3


@pytest.fixture(scope="module")
def models():
    folder = resolve("tiny/sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_diffusers_folder(folder)


def reference(pipe, scheduler_class=DDIMScheduler, img2img=False):
    components = {**pipe.components, "scheduler": scheduler_class.from_config(pipe.scheduler.config)}
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    out = cls(**components, requires_safety_checker=False)
    out.set_progress_bar_config(disable=True)
    return out


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def report(name, diff):
    print(f"[end to end] {name}: max abs diff {diff:.2e}")
    assert diff <= TOL, f"{name}: {diff}"


def test_txt2img_ddim_cfg_negative_prompt(models):
    pipe, sd = models
    theirs = reference(pipe)("a red fox in the snow", negative_prompt="blurry", num_inference_steps=10,
                             guidance_scale=7.5, generator=seeded(3), output_type="pt").images
    ours = sd.txt2img("a red fox in the snow", "blurry", steps=10, guidance_scale=7.5, seed=3, progress=False)
    assert ours.shape == (1, 3, 64, 64) and ours.std() > 0.01
    report("txt2img DDIM 10 steps CFG 7.5", max_abs_diff(ours, theirs))


def test_txt2img_same_initial_latents_batch_of_two(models):
    pipe, sd = models
    latents = torch.randn(2, 4, 8, 8, generator=seeded(5))
    prompts, negatives = ["a cat", "a dog on a beach"], ["", "low quality"]
    theirs = reference(pipe)(prompts, negative_prompt=negatives, num_inference_steps=6, latents=latents,
                             output_type="pt").images
    ours = sd.txt2img(prompts, negatives, steps=6, latents=latents, progress=False)
    report("txt2img batch 2, given latents", max_abs_diff(ours, theirs))


def test_txt2img_ddpm_sampler_and_no_guidance(models):
    pipe, sd = models
    theirs = reference(pipe, DDPMScheduler)("a house", num_inference_steps=8, generator=seeded(7),
                                            output_type="pt").images
    report("txt2img DDPM 8 steps", max_abs_diff(sd.txt2img("a house", steps=8, seed=7, sampler="ddpm",
                                                           progress=False), theirs))
    theirs = reference(pipe)("a house", num_inference_steps=5, guidance_scale=1.0, generator=seeded(7),
                             output_type="pt").images
    report("txt2img no CFG", max_abs_diff(sd.txt2img("a house", steps=5, guidance_scale=1.0, seed=7,
                                                     progress=False), theirs))


def test_txt2img_non_square(models):
    pipe, sd = models
    theirs = reference(pipe)("a tree", height=48, width=80, num_inference_steps=4, generator=seeded(1),
                             output_type="pt").images
    report("txt2img 48x80", max_abs_diff(sd.txt2img("a tree", height=48, width=80, steps=4, seed=1,
                                                    progress=False), theirs))


@pytest.mark.parametrize("strength", [0.75, 0.3])
def test_img2img_matches_diffusers(models, strength):
    pipe, sd = models
    image = Image.new("RGB", (64, 64), (30, 90, 200))
    ImageDraw.Draw(image).ellipse([16, 16, 48, 48], fill=(240, 200, 40))
    # same generator → the VAE posterior sample is drawn first, then the noise, in both pipelines
    theirs = reference(pipe, img2img=True)("a sun", image=image, strength=strength, num_inference_steps=10,
                                           negative_prompt="dark", generator=seeded(11), output_type="pt").images
    ours = sd.img2img("a sun", image, strength, "dark", steps=10, seed=11, progress=False)
    report(f"img2img strength {strength}", max_abs_diff(ours, theirs))


def test_seeds_and_conversions(models):
    _, sd = models
    a = sd.txt2img("a boat", steps=3, seed=0, progress=False)
    assert torch.equal(a, sd.txt2img("a boat", steps=3, seed=0, progress=False))
    assert not torch.allclose(a, sd.txt2img("a boat", steps=3, seed=1, progress=False))
    # PIL ↔ tensor round trip is exact on 8-bit values
    pil = to_pil(a)[0]
    assert pil.size == (64, 64)
    assert to_pil(from_pil(pil))[0].tobytes() == pil.tobytes()


def test_bad_input_is_refused(models):
    _, sd = models
    with pytest.raises(ValueError, match="multiples of 8"):
        sd.txt2img("x", height=60, steps=1, progress=False)
    with pytest.raises(ValueError, match="negative prompts"):
        sd.txt2img(["a", "b"], ["only one"], steps=1, progress=False)
    with pytest.raises(ValueError, match="leaves no step"):
        sd.img2img("x", Image.new("RGB", (64, 64)), strength=0.05, steps=10, progress=False)
    with pytest.raises(ValueError, match="latents have shape"):
        sd.txt2img("x", steps=1, latents=torch.zeros(1, 4, 4, 4), progress=False)
