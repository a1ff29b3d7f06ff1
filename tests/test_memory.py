"""helpers.memory: parameter counts of the real architectures (meta device), adapter sizes checked against peft,
and the VRAM estimate's calibration and ordering."""
import pytest
import torch

from helpers import memory, tiny
from helpers.presets import PRESETS, get_preset

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_unet_has_the_published_parameter_count_on_meta():
    unet = memory.full_size_unet("sd15")
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    assert _params(unet) == 859_520_964


def test_crossattn_count_equals_every_attn2_parameter():
    unet = memory.full_size_unet("sd15")
    by_name = sum(p.numel() for name, p in unet.named_parameters() if ".attn2." in name)
    count = memory.crossattn_parameter_count(unet)
    print(f"SD1.5 attn2 parameters: {count:,}")
    assert count == by_name
    assert 43e6 <= count <= 45e6


def test_other_components_have_their_published_counts():
    sdxl = memory.parameter_counts("sdxl")
    print(sdxl)
    assert sdxl["unet"] == 2_567_463_684  # "2.6B" SDXL base UNet
    assert sdxl["text_encoder"] == 123_060_480  # CLIP ViT-L/14 text tower
    assert sdxl["text_encoder_2"] == 694_659_840  # OpenCLIP bigG text tower + projection
    assert sdxl["vae"] == 83_653_863
    assert memory.parameter_counts("sd15") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert _params(memory.full_size_clip()) == 427_616_513  # openai/clip-vit-large-patch14
    with pytest.raises(ValueError, match="family"):
        memory.parameter_counts("sd3")


def test_lora_count_matches_peft_on_the_tiny_unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    path = tiny.resolve("tiny/sd15")
    reference = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    reference.requires_grad_(False)
    reference.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGETS)))
    peft_count = sum(p.numel() for p in reference.parameters() if p.requires_grad)

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    before = _params(unet)
    assert memory.lora_parameter_count(unet, 4, LORA_TARGETS) == peft_count > 0
    assert _params(unet) == before  # the caller's model is not modified
    with pytest.raises(ValueError):
        memory.lora_parameter_count(unet, 0, LORA_TARGETS)


def test_lora_count_on_full_sdxl_matches_rank_times_in_plus_out():
    unet = memory.full_size_unet("sdxl")
    analytic = sum(16 * (m.in_features + m.out_features) for name, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))
    count = memory.lora_parameter_count(unet, 16, LORA_TARGETS)
    print(f"SDXL LoRA r16 on to_q/k/v/out: {count:,}")
    assert count == analytic


def test_t4_presets_fit_a_t4():
    presets = [get_preset(name, "t4") for name in PRESETS]
    for preset in presets:
        estimate = memory.estimate_vram(preset)
        print(preset.name, {k: round(v, 2) if isinstance(v, float) else v for k, v in estimate.items()})
        assert 0 < estimate["total_gib"] < memory.T4_USABLE_GIB
        assert estimate["verdict"] == "fits"
    table = memory.memory_plan_table(presets)
    print(table)
    assert all(name in table for name in PRESETS)


def test_activations_grow_with_resolution_batch_and_shrink_with_checkpointing():
    sdxl = get_preset("sdxl_lora_naruto_1024", "t4")
    at_1024 = memory.activation_gib(sdxl)
    at_256 = memory.activation_gib(get_preset("sdxl_lora_naruto_1024", "t4", resolution=256))
    assert at_1024 > 8 * at_256  # 16× the pixels
    one, two = (memory.activation_gib(get_preset("sd15_xattn_cifar10", "t4", batch_size=b)) for b in (1, 2))
    assert two == pytest.approx(2 * one, rel=1e-6)  # saved activations are per image
    assert memory.activation_gib(sdxl, gradient_checkpointing=False) > 5 * at_1024


def test_estimate_matches_reported_totals():
    # SD1.5 full UNet fine-tune, 512 px, batch 1, 8-bit Adam, checkpointing: reported to need ~10-12 GB.
    full = memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", method="full", resolution=512, batch_size=1,
                                           gradient_checkpointing=True))
    assert full["trainable_params"] == 859_520_964
    assert 10.0 <= full["total_gib"] <= 12.0
    # SDXL LoRA at 1024 px, batch 1, checkpointing, caches: "8 GB possible, 10 GB recommended" (kohya).
    sdxl = memory.estimate_vram(get_preset("sdxl_lora_naruto_1024", "t4"))
    assert 6.0 <= sdxl["total_gib"] <= 10.0
    no_ckpt = memory.estimate_vram(get_preset("sdxl_lora_naruto_1024", "t4", gradient_checkpointing=False))
    assert no_ckpt["verdict"] == "does not fit"


def test_estimate_refuses_tiny_presets_and_unknown_options():
    with pytest.raises(ValueError, match="t4"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "tiny"))
    with pytest.raises(ValueError, match="optimizer"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", optimizer="lion"))
    with pytest.raises(ValueError, match="method"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", method="dreambooth"))
