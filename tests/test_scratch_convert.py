"""Weights in and out: the diffusers-folder loader, diffusers → original single file → scratch round trips (checked
against diffusers' own single-file loader), strict key checks, and refusal of configs the scratch models lack."""
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

from helpers.scratch.convert import (
    IGNORED_ORIGINAL,
    KeyMismatchError,
    diffusers_to_original,
    load_model,
    load_single_file,
    original_to_scratch,
    save_single_file,
)
from helpers.scratch.folders import config_from_diffusers, load_diffusers_folder, read_configs, read_weights
from helpers.scratch.parity import max_abs_diff, randomize_, reference_unet
from helpers.scratch.unet import UNetConfig
from helpers.tiny.world import resolve

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def tiny():
    folder = Path(resolve("tiny/sd15"))
    reference = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    return folder, reference, load_diffusers_folder(folder)


def outputs(text_encoder, vae, unet, reference_style: bool):
    """The three parts on fixed random inputs (the context as wide as the text encoder's output)."""
    gen = torch.Generator().manual_seed(0)
    ids, z = torch.randint(0, 2000, (1, 77), generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    width = text_encoder.config.hidden_size if reference_style else text_encoder.config.width
    context = torch.randn(1, 77, width, generator=gen)
    with torch.no_grad():
        if reference_style:
            return text_encoder(ids)[0], vae.decode(z).sample, unet(z, 21, encoder_hidden_states=context).sample
        return text_encoder(ids), vae.decode(z), unet(z, 21, context)


def test_diffusers_folder_loads_to_equal_outputs(tiny):
    folder, reference, sd = tiny
    assert sd.default_size == 64 and sd.unet.config.cross_attention == (True, True, False)
    for ours, theirs in zip(outputs(sd.text_encoder, sd.vae, sd.unet, False),
                            outputs(reference.text_encoder, reference.vae, reference.unet, True)):
        assert max_abs_diff(ours, theirs) <= 1e-5


def test_key_table_matches_diffusers_own_single_file_converter_on_tiny_layout(tiny):
    folder, reference, sd = tiny
    cfg = config_from_diffusers(**read_configs(folder))
    original = diffusers_to_original(reference.unet.state_dict(), reference.vae.state_dict(),
                                     reference.text_encoder.state_dict(), cfg)
    # 1 ResBlock per level and an attention-free first up level: upsamplers sit at output_blocks.N.1, not .2
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in original
    assert "model.diffusion_model.output_blocks.3.2.conv.weight" in original
    for part, back in (("unet", convert_ldm_unet_checkpoint(original, dict(reference.unet.config))),
                       ("vae", convert_ldm_vae_checkpoint(original, dict(reference.vae.config)))):
        expected = getattr(reference, part).state_dict()
        assert set(back) == set(expected)
        assert all(torch.equal(back[k], expected[k]) for k in expected), part


def test_single_file_round_trip_and_diffusers_reads_our_file(tiny, tmp_path):
    folder, reference, sd = tiny
    cfg = config_from_diffusers(**read_configs(folder))
    weights = {part: read_weights(folder / part) for part in PARTS}  # diffusers-format random weights
    save_file(diffusers_to_original(weights["unet"], weights["vae"], weights["text_encoder"], cfg),
              tmp_path / "sd15.safetensors")
    ours = load_single_file(tmp_path / "sd15.safetensors", sd.tokenizer, cfg)
    for a, b in zip(outputs(ours.text_encoder, ours.vae, ours.unet, False),
                    outputs(reference.text_encoder, reference.vae, reference.unet, True)):
        assert max_abs_diff(a, b) <= 1e-5
    # the same file through diffusers' own loader (config taken from the tiny folder): same model
    theirs = StableDiffusionPipeline.from_single_file(str(tmp_path / "sd15.safetensors"), config=str(folder),
                                                      safety_checker=None, local_files_only=True)
    for a, b in zip(outputs(ours.text_encoder, ours.vae, ours.unet, False),
                    outputs(theirs.text_encoder, theirs.vae, theirs.unet, True)):
        assert max_abs_diff(a, b) <= 1e-5
    # scratch → file → scratch keeps every tensor
    save_single_file(ours, tmp_path / "again.safetensors")
    first, second = load_file(tmp_path / "sd15.safetensors"), load_file(tmp_path / "again.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    # a .ckpt pickle with the weights under "state_dict" reads the same
    torch.save({"state_dict": first, "global_step": 1}, tmp_path / "sd15.ckpt")
    assert torch.equal(load_single_file(tmp_path / "sd15.ckpt", sd.tokenizer, cfg).unet.conv_in.weight,
                       ours.unet.conv_in.weight)


def test_original_key_checks(tiny):
    folder, reference, sd = tiny
    cfg = config_from_diffusers(**read_configs(folder))
    original = diffusers_to_original(reference.unet.state_dict(), reference.vae.state_dict(),
                                     reference.text_encoder.state_dict(), cfg)
    # LDM training buffers and position ids are known extras, not errors
    extras = {"betas": torch.zeros(1000), "alphas_cumprod": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9),
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert all(IGNORED_ORIGINAL.search(k) for k in extras)
    original_to_scratch({**original, **extras}, cfg)
    broken = dict(original)
    broken["model.diffusion_model.input_blocks.1.0.in_layer.0.weight"] = broken.pop(
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight")
    with pytest.raises(KeyMismatchError, match=r"1 missing keys \[model.diffusion_model.input_blocks.1.0.in_layers"
                                               r".0.weight\]; 1 unexpected keys \[model.diffusion_model.input_blocks"
                                               r".1.0.in_layer.0.weight\]"):
        original_to_scratch(broken, cfg)
    with pytest.raises(KeyMismatchError, match="unet .diffusers layout.: 0 missing keys.*1 unexpected"):
        diffusers_to_original({**reference.unet.state_dict(), "foo.weight": torch.zeros(1)},
                              reference.vae.state_dict(), reference.text_encoder.state_dict(), cfg)


def test_old_text_encoder_files_with_text_model_prefix_load(tiny, tmp_path):
    folder, reference, sd = tiny
    copy = tmp_path / "sd15"
    shutil.copytree(folder, copy)
    state = load_file(copy / "text_encoder" / "model.safetensors")  # transformers 5 writes no prefix; 4.x did
    state = {"text_model." + k: v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    save_file(state, copy / "text_encoder" / "model.safetensors")
    ids = torch.randint(0, 2000, (1, 77))
    with torch.no_grad():
        assert torch.equal(load_diffusers_folder(copy).text_encoder(ids), sd.text_encoder(ids))


def test_read_weights_picks_the_variant_file(tmp_path):
    save_file({"w": torch.ones(1)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": torch.zeros(1)}, tmp_path / "diffusion_pytorch_model.non_ema.safetensors")
    assert read_weights(tmp_path)["w"].item() == 1.0  # non_ema is a variant, not the default file
    assert read_weights(tmp_path, variant="fp16")["w"].item() == 1.0  # no fp16 file: the plain one
    save_file({"w": torch.full((1,), 2.0, dtype=torch.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert read_weights(tmp_path, variant="fp16")["w"].item() == 2.0
    with pytest.raises(FileNotFoundError, match="no weights"):
        read_weights(tmp_path / "empty")


def test_load_to_half_precision(tiny):
    folder, _, _ = tiny
    sd = load_diffusers_folder(folder, dtype=torch.float16)
    assert {p.dtype for p in sd.unet.parameters()} == {torch.float16} and sd.dtype == torch.float16


def test_unsupported_configs_are_refused(tiny):
    folder, _, _ = tiny
    configs = read_configs(folder)
    for part, field, value, message in [("unet", "use_linear_projection", True, "use_linear_projection"),
                                        ("unet", "up_block_types", ["UpBlock2D"] * 3, "unsupported UNet blocks"),
                                        ("scheduler", "timestep_spacing", "trailing", "timestep_spacing"),
                                        ("scheduler", "prediction_type", "v_prediction", "prediction_type"),
                                        ("text_encoder", "hidden_act", "gelu", "hidden_act")]:
        changed = {**configs, part: {**configs[part], field: value}}
        with pytest.raises(ValueError, match=message):
            config_from_diffusers(**changed)


def test_a_single_swapped_tensor_breaks_parity():
    """The parity checks can fail: swapping two same-shaped norm weights (invisible at their default init of 1)
    changes the output well beyond the 1e-4 tolerance once norms are randomized."""
    cfg = UNetConfig(channels=(32, 64), cross_attention=(True, False), layers_per_block=1, context_dim=32)
    reference = randomize_(reference_unet(cfg).eval())
    state = dict(reference.state_dict())
    a, b = "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm2.weight"
    state[a], state[b] = state[b], state[a]
    ours = load_model("unet", cfg, state)
    x, context = torch.randn(1, 4, 16, 16), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert max_abs_diff(ours(x, 500, context), reference(x, 500, encoder_hidden_states=context).sample) > 1e-3


def test_fields_older_configs_omit_take_the_library_defaults(tiny):
    folder, _, _ = tiny
    configs = read_configs(folder)
    # the Hub's SD1.5 vae/config.json (diffusers 0.6) has no scaling_factor; old UNet configs lack norm_eps
    configs["vae"].pop("scaling_factor")
    configs["unet"].pop("norm_eps")
    reference = read_configs(folder)
    reference["vae"]["scaling_factor"] = 0.18215  # diffusers' default, which an omitted field takes
    reference["unet"]["norm_eps"] = 1e-5
    assert config_from_diffusers(**configs) == config_from_diffusers(**reference)
    configs["unet"].pop("cross_attention_dim")
    with pytest.raises(ValueError, match="config fields missing.*cross_attention_dim"):
        config_from_diffusers(**configs)
