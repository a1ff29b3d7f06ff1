"""Each scratch part against its diffusers / transformers reference: random weights (norms and biases jittered too),
the reference's state dict loaded into the scratch module through convert.load_model, fp32, max |diff| ≤ 1e-4.
Small configs here; tests/test_scratch_full.py runs the real SD1.5 sizes."""
import pytest
import torch

from helpers.scratch.clip import CLIPTextConfig
from helpers.scratch.convert import KeyMismatchError, load_model, strip_text_model
from helpers.scratch.parity import max_abs_diff, randomize_, reference_text_encoder, reference_unet, reference_vae
from helpers.scratch.unet import UNetConfig
from helpers.scratch.vae import VAEConfig

TOL = 1e-4
# the SD1.5 block pattern (3 attention levels + 1 plain, 2 ResBlocks) and the repo's tiny SD1.5 pattern
SD15_PATTERN = UNetConfig(channels=(32, 64, 64, 64), layers_per_block=2, heads=4, context_dim=48, groups=16)
TINY_PATTERN = UNetConfig(channels=(32, 64, 64), cross_attention=(True, True, False), layers_per_block=1, heads=8,
                          context_dim=32)


def report(name, diff):
    print(f"[parity] {name}: max abs diff {diff:.2e}")
    assert diff <= TOL, f"{name}: {diff}"


@pytest.fixture(scope="module", params=[SD15_PATTERN, TINY_PATTERN], ids=["sd15-pattern", "tiny-pattern"])
def unets(request):
    torch.manual_seed(0)
    reference = randomize_(reference_unet(request.param).eval())
    return request.param, reference, load_model("unet", request.param, reference.state_dict())


@pytest.mark.parametrize("height,width", [(64, 64), (32, 32), (24, 40), (28, 44)], ids=["64x64", "32x32", "24x40",
                                                                                      "28x44-odd"])
def test_unet_matches_diffusers(unets, height, width):
    cfg, reference, ours = unets
    batch = 1 if height * width > 32 * 32 else 2
    gen = torch.Generator().manual_seed(height + width)
    latents = torch.randn(batch, 4, height, width, generator=gen)
    context = torch.randn(batch, 77, cfg.context_dim, generator=gen)
    timesteps = torch.tensor([981, 1][:batch])
    with torch.no_grad():
        expected = reference(latents, timesteps, encoder_hidden_states=context).sample
        got = ours(latents, timesteps, context)
    assert expected.abs().mean() > 0.05  # a real signal, not a collapsed output
    report(f"UNet {cfg.channels} {height}x{width}", max_abs_diff(got, expected))


@pytest.mark.parametrize("cfg", [VAEConfig(channels=(8, 16, 32, 32), layers_per_block=1, groups=8),
                                 VAEConfig(channels=(16, 32, 32), layers_per_block=2, groups=4)],
                         ids=["tiny-4-levels", "3-levels"])
def test_vae_encode_decode_match_diffusers(cfg):
    torch.manual_seed(1)
    reference = randomize_(reference_vae(cfg).eval())
    ours = load_model("vae", cfg, reference.state_dict())
    gen = torch.Generator().manual_seed(0)
    for height, width in [(64, 64), (48, 80)]:
        images = torch.rand(2, 3, height, width, generator=gen) * 2 - 1
        with torch.no_grad():
            posterior = reference.encode(images).latent_dist
            mean, logvar = ours.encode(images)
            report(f"VAE {cfg.channels} encode mean {height}x{width}", max_abs_diff(mean, posterior.mean))
            report(f"VAE {cfg.channels} encode logvar {height}x{width}", max_abs_diff(logvar, posterior.logvar))
            sample_ours = ours.sample(mean, logvar, torch.Generator().manual_seed(3))
            report("VAE sample with the same generator", max_abs_diff(sample_ours,
                                                                    posterior.sample(torch.Generator().manual_seed(3))))
            latents = torch.randn(2, cfg.latent_channels, height // cfg.downscale, width // cfg.downscale,
                                  generator=gen)
            report(f"VAE {cfg.channels} decode {height}x{width}",
                   max_abs_diff(ours.decode(latents), reference.decode(latents).sample))


def test_vae_groupnorm_eps_is_1e6():
    ours = load_model("vae", VAEConfig(channels=(8, 16), layers_per_block=1, groups=8),
                      reference_vae(VAEConfig(channels=(8, 16), layers_per_block=1, groups=8)).state_dict())
    eps = {m.eps for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert eps == {1e-6}


@pytest.mark.parametrize("tokens", [77, 16])
def test_text_encoder_matches_transformers(tokens):
    cfg = CLIPTextConfig(vocab_size=1000, width=64, layers=3, heads=4, mlp_width=128)
    torch.manual_seed(2)
    reference = randomize_(reference_text_encoder(cfg).eval())
    ours = load_model("text_encoder", cfg, strip_text_model(reference.state_dict()))
    ids = torch.randint(0, cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        report(f"text encoder {tokens} tokens", max_abs_diff(ours(ids), reference(ids)[0]))


def test_text_encoder_is_causal():
    cfg = CLIPTextConfig(vocab_size=100, width=32, layers=2, heads=4, mlp_width=64)
    ours = load_model("text_encoder", cfg, strip_text_model(reference_text_encoder(cfg).state_dict()))
    ids = torch.randint(0, 100, (1, 77))
    changed = ids.clone()
    changed[0, 40:] = (changed[0, 40:] + 1) % 100  # later tokens must not change earlier outputs
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[:, :40], b[:, :40]) and not torch.allclose(a[:, 40:], b[:, 40:])


def test_wrong_weights_are_refused_with_the_key_names():
    state = reference_unet(TINY_PATTERN).state_dict()
    state["extra.weight"] = state.pop("conv_in.weight")
    with pytest.raises(KeyMismatchError, match=r"1 missing keys \[conv_in.weight\].*1 unexpected keys \[extra.weight"):
        load_model("unet", TINY_PATTERN, state)
    state = reference_unet(TINY_PATTERN).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model("unet", UNetConfig(**{**TINY_PATTERN.__dict__, "context_dim": 16}), state)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        UNetConfig(channels=(30, 60), cross_attention=(True, False))
    with pytest.raises(ValueError, match="entries"):
        UNetConfig(channels=(32, 64), cross_attention=(True,))
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(width=30, heads=4)
