"""The real SD1.5 sizes (random weights, fp32, CPU): configs as on the Hub → scratch configs, diffusers weights →
original single-file layout (checked with diffusers' own single-file converter) → scratch models, then one forward
of each part compared with diffusers / transformers. The UNet runs at an 8×8 latent to fit the CI budget; the
scratch models share the reference's tensors (assign=True), so the 3.4 GB UNet exists once."""
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    infer_diffusers_model_type,
)
from transformers import CLIPTextConfig as HFTextConfig
from transformers import CLIPTextModel

from helpers.core.configs import SD15_UNET
from helpers.core.configs import SD_VAE as SD15_VAE
from helpers.scratch.convert import SDConfig, diffusers_to_original, load_model, original_to_scratch
from helpers.scratch.folders import config_from_diffusers
from helpers.scratch.parity import max_abs_diff, randomize_
from helpers.tiny.world import SD15_SCHEDULER

pytestmark = pytest.mark.slow

# unet/ and vae/ config.json of stable-diffusion-v1-5 come from helpers.core.configs (the one copy of the real configs)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)


def report(name, diff):
    print(f"[parity full SD1.5] {name}: max abs diff {diff:.2e}")
    assert diff <= 1e-4, f"{name}: {diff}"


@pytest.fixture(scope="module")
def full():
    torch.manual_seed(0)
    refs = {"unet": randomize_(UNet2DConditionModel(**SD15_UNET).eval()),
            "vae": randomize_(AutoencoderKL(**SD15_VAE).eval()),
            "text_encoder": randomize_(CLIPTextModel(HFTextConfig(**SD15_TEXT)).eval())}
    cfg = config_from_diffusers(dict(refs["unet"].config), dict(refs["vae"].config),
                                refs["text_encoder"].config.to_dict(), SD15_SCHEDULER)
    original = diffusers_to_original(*(refs[p].state_dict() for p in ("unet", "vae", "text_encoder")), cfg)
    states = original_to_scratch(original, cfg)
    ours = {part: load_model(part, getattr(cfg, part), states[part]) for part in refs}
    return cfg, refs, original, ours


def test_hub_configs_are_the_scratch_defaults(full):
    cfg, refs, _, ours = full
    assert cfg == SDConfig()
    assert sum(p.numel() for p in ours["unet"].parameters()) == 859_520_964  # the "860M" UNet
    assert sum(p.numel() for p in ours["vae"].parameters()) == sum(p.numel() for p in refs["vae"].parameters())


def test_original_layout_is_what_diffusers_single_file_loader_reads(full):
    cfg, refs, original, _ = full
    assert infer_diffusers_model_type(original) == "v1"
    assert len(original) == 686 + 248 + 196  # UNet + VAE + CLIP tensors of v1-5-pruned-emaonly
    back = {"unet": convert_ldm_unet_checkpoint(original, dict(refs["unet"].config)),
            "vae": convert_ldm_vae_checkpoint(original, dict(refs["vae"].config)),
            "text_encoder": convert_ldm_clip_checkpoint(original)}
    for part, state in back.items():
        expected = refs[part].state_dict()
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
        assert set(state) == set(expected), part
        assert all(torch.equal(state[k], expected[k]) for k in expected), part


def test_text_encoder(full):
    _, refs, _, ours = full
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        report("text encoder 1x77", max_abs_diff(ours["text_encoder"](ids), refs["text_encoder"](ids)[0]))


def test_vae(full):
    _, refs, _, ours = full
    gen = torch.Generator().manual_seed(1)
    image, latents = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1, torch.randn(1, 4, 8, 8, generator=gen)
    with torch.no_grad():
        posterior = refs["vae"].encode(image).latent_dist
        mean, logvar = ours["vae"].encode(image)
        report("VAE encode mean 64x64", max_abs_diff(mean, posterior.mean))
        report("VAE encode logvar 64x64", max_abs_diff(logvar, posterior.logvar))
        report("VAE decode 8x8 latent", max_abs_diff(ours["vae"].decode(latents), refs["vae"].decode(latents).sample))


def test_unet(full):
    _, refs, _, ours = full
    gen = torch.Generator().manual_seed(2)
    latents, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 768, generator=gen)
    with torch.no_grad():
        expected = refs["unet"](latents, 981, encoder_hidden_states=context).sample
        report("UNet 8x8 latent, batch 2", max_abs_diff(ours["unet"](latents, 981, context), expected))
