"""helpers.sampling: seeded generation on the tiny SD1.5 / SDXL pipelines, manifests, variants of one pipeline."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.core.presets import get_preset
from helpers.generate import sampling


@pytest.fixture(scope="module")
def sd15():
    return sampling.load_pipeline(get_preset("sd15_xattn_cifar10", "tiny"), device="cpu", progress=False)


def _array(image):
    return np.asarray(image).astype(np.int16)


def test_same_seed_same_image_different_seed_different(sd15):
    prompts, seeds = ["a photo of a cat", "a photo of a cat", "a photo of a ship"], [7, 8, 7]
    first = sampling.generate(sd15, prompts, seeds, steps=2, batch_size=2)
    again = sampling.generate(sd15, prompts, seeds, steps=2, batch_size=2)
    assert [im.size for im in first] == [(64, 64)] * 3
    for a, b in zip(first, again):
        assert np.array_equal(_array(a), _array(b))
    assert np.abs(_array(first[0]) - _array(first[1])).mean() > 1.0  # seed 7 vs 8, same prompt
    # per-image generators: the noise of a pair does not depend on which batch it lands in
    alone = sampling.generate(sd15, prompts[2:], seeds[2:], steps=2, batch_size=1)[0]
    assert np.abs(_array(alone) - _array(first[2])).max() <= 2


def test_saved_files_and_manifest_match(sd15, tmp_path):
    prompts, seeds = sampling.prompt_seed_pairs(["a photo of a frog", "a photo of a ship"], [3, 4])
    assert prompts == ["a photo of a frog"] * 2 + ["a photo of a ship"] * 2 and seeds == [3, 4, 3, 4]
    images = sampling.generate(sd15, prompts, seeds, steps=2, out_dir=tmp_path, prefix="base_")
    rows = sampling.read_manifest(tmp_path / "base_manifest.csv")
    assert [(r["prompt"], r["seed"]) for r in rows] == list(zip(prompts, seeds))
    assert [r["file"] for r in rows] == [str(tmp_path / f"base_{i:03d}_seed{s}.png") for i, s in enumerate(seeds)]
    for row, image in zip(rows, images):
        assert np.array_equal(_array(Image.open(row["file"])), _array(image))  # PNG is lossless


def test_generate_on_tiny_sdxl_with_the_fixed_vae():
    preset = get_preset("sdxl_lora_naruto_256", "tiny")
    pipe = sampling.load_pipeline(preset, device="cpu", progress=False)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert pipe.vae.config.force_upcast is False  # preset.vae (the fp16-fix stand-in) was swapped in
    images = sampling.generate(pipe, ["a green frog", "a man in a suit"], [1, 2], steps=2, height=64, width=64)
    assert [im.size for im in images] == [(64, 64)] * 2
    assert np.abs(_array(images[0]) - _array(images[1])).mean() > 1.0


def test_generate_rejects_misaligned_input(sd15):
    with pytest.raises(ValueError, match="seed"):
        sampling.generate(sd15, ["a", "b"], [1], steps=2)
    with pytest.raises(ValueError):
        sampling.generate(sd15, [], [], steps=2)


def attn2_variants(pipe):
    """base, an identical copy, and the UNet's cross-attention weights perturbed: real, observable states."""
    import torch
    original = {k: v.clone() for k, v in pipe.unet.state_dict().items() if ".attn2." in k}
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    calls = []

    def setter(name, weights):
        def apply(p):
            calls.append(name)
            missing, unexpected = p.unet.load_state_dict(weights, strict=False)
            assert not unexpected
        return apply
    return [sampling.Variant(n, setter(n, w)) for n, w in (("base", original), ("base again", original),
                                                          ("attn2 ×1.5", perturbed))], calls


def test_generate_variants_one_folder_and_manifest_each_same_noise(sd15, tmp_path):
    variants, calls = attn2_variants(sd15)
    prompts, seeds = sampling.prompt_seed_pairs(["a photo of a cat", "a green frog"], [5, 6])
    manifests = sampling.generate_variants(sd15, variants, prompts, seeds, tmp_path, steps=2)
    assert calls == ["base", "base again", "attn2 ×1.5"]  # each variant applied once, in order, before its images
    assert manifests == {v.name: tmp_path / sampling.folder_name(v.name) / "manifest.csv" for v in variants}
    assert sampling.folder_name("attn2 ×1.5") == "attn2_1.5" and sampling.folder_name("base again") == "base_again"
    images = {}
    for name, manifest in manifests.items():
        rows = sampling.read_manifest(manifest)
        assert [(r["prompt"], r["seed"]) for r in rows] == list(zip(prompts, seeds))
        assert all(Path(r["file"]).parent == manifest.parent for r in rows)
        images[name] = [_array(Image.open(r["file"])) for r in rows]
    for a, b, c in zip(images["base"], images["base again"], images["attn2 ×1.5"]):
        assert np.array_equal(a, b)  # same (prompt, seed), same weights: the same image
        assert np.abs(a - c).mean() > 1.0  # the variant's apply changed the pipeline


def test_check_variants_rejects_bad_lists():
    ok = sampling.Variant("base", lambda pipe: None)
    assert sampling.check_variants((ok,)) == [ok]
    with pytest.raises(ValueError, match="no variants"):
        sampling.check_variants([])
    with pytest.raises(ValueError, match="must differ"):
        sampling.check_variants([ok, sampling.Variant("base", lambda pipe: None)])
    with pytest.raises(ValueError, match="must differ"):  # distinct names, one folder
        sampling.check_variants([sampling.Variant("lora 1", print), sampling.Variant("lora/1", print)])
    with pytest.raises(ValueError, match="callable"):
        sampling.check_variants([sampling.Variant("tuned", None)])
    with pytest.raises(ValueError, match="not a Variant"):
        sampling.check_variants(["base"])
    with pytest.raises(ValueError, match="not a Variant"):
        sampling.check_variants([sampling.Variant(" ×", print)])


# ---------------------------------------------------------------- negative prompt, per-call arguments, callbacks

def test_negative_prompt_reaches_the_pipeline(sd15):
    import torch
    prompts, seeds = ["a photo of a cat", "a photo of a ship"], [3, 4]
    plain = sampling.generate(sd15, prompts, seeds, steps=3)
    negative = sampling.generate(sd15, prompts, seeds, steps=3, negative_prompt="a photo of a frog")
    assert all(np.abs(_array(a) - _array(b)).mean() > 1.0 for a, b in zip(plain, negative))
    # the same negative prompt given to the stock pipeline directly: the same pixels
    direct = sd15(prompt=prompts[:1], negative_prompt=["a photo of a frog"], num_inference_steps=3,
                  generator=[torch.Generator().manual_seed(3)], height=64, width=64).images[0]
    assert np.abs(_array(direct) - _array(negative[0])).max() <= 2


def test_pipeline_calls_never_put_two_image_embeddings_in_one_call():
    import torch
    assert sampling.pipeline_calls(5, 2) == [[0, 1], [2, 3], [4]]
    e = torch.tensor([[1.0, 0], [0, 1], [1, 0], [1, 0], [0, 1]])
    calls = sampling.pipeline_calls(5, 2, e)
    assert sorted(i for call in calls for i in call) == list(range(5)) and all(len(c) <= 2 for c in calls)
    assert all(len({tuple(e[i].tolist()) for i in call}) == 1 for call in calls)  # one embedding per call
    assert len(calls) == 3  # [0, 2], [3], [1, 4]: as few calls as the grouping allows


def test_a_text_only_pipeline_refuses_image_embeddings(sd15):
    import torch
    with pytest.raises(ValueError, match="no IP-Adapter loaded"):
        sampling.generate(sd15, ["a photo of a cat"], [0], steps=2, image_embeds=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="must be callable"):
        sampling.check_variants([sampling.Variant("tuned", print, image_embeds=torch.zeros(1, 64))])


def test_step_callback_sees_every_denoising_step_and_can_stop_a_call(sd15):
    steps_seen = []

    def count(pipe, step, timestep, kwargs):
        steps_seen.append(step)
        return kwargs

    sampling.generate(sd15, ["a green frog"] * 2, [1, 2], steps=3, step_callback=count)
    sd15.scheduler.set_timesteps(3)
    assert len(steps_seen) == len(sd15.scheduler.timesteps)  # one call of two images: one callback per step

    def stop_at_first(pipe, step, timestep, kwargs):
        pipe._interrupt = True
        return kwargs

    stopped = sampling.generate(sd15, ["a green frog"], [1], steps=3, step_callback=stop_at_first)
    full = sampling.generate(sd15, ["a green frog"], [1], steps=3)
    assert np.abs(_array(stopped[0]) - _array(full[0])).mean() > 1.0  # decoded after one step, not three
    # a stopped call is the last one: no further calls are drawn (a time limit frees the GPU at once)
    steps_seen.clear()
    assert len(sampling.generate(sd15, ["a green frog"] * 3, [1, 2, 3], steps=3, batch_size=1,
                                 step_callback=lambda *a: (count(*a), stop_at_first(*a))[1])) == 1
    assert steps_seen == [0]
    assert len(sampling.generate(sd15, ["a green frog"] * 2, [1, 2], steps=2, batch_size=1)) == 2  # not sticky


def test_img2img_from_an_init_image_on_the_loaded_components(sd15):
    from diffusers import AutoPipelineForImage2Image
    img2img = AutoPipelineForImage2Image.from_pipe(sd15)
    assert img2img.unet is sd15.unet  # no second copy of the weights
    init = Image.fromarray(np.tile(np.linspace(0, 255, 96, dtype=np.uint8)[None, :, None], (96, 1, 3)))
    light = sampling.generate(img2img, ["a photo of a cat"], [0], steps=4, height=64, width=64, image=init,
                              strength=0.25)[0]
    heavy = sampling.generate(img2img, ["a photo of a cat"], [0], steps=4, height=64, width=64, image=init,
                              strength=1.0)[0]
    target = _array(init.resize((64, 64)))
    assert light.size == heavy.size == (64, 64)
    assert np.abs(_array(light) - target).mean() < np.abs(_array(heavy) - target).mean()
