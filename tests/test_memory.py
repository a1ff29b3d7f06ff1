"""helpers.memory: parameter counts of the real architectures (meta device), adapter sizes checked against peft,
the phases of the T4 plan, its calibration against published reports, host RAM and checkpoint sizes."""
import pytest
import torch

from helpers.core.presets import PRESETS, get_preset
from helpers.plan import calibration as memory_calibration
from helpers.plan import memory
from helpers.plan import meta as memory_meta
from helpers.plan import model as memory_model
from helpers.tiny import world as tiny

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_unet_has_the_published_parameter_count_on_meta():
    unet = memory_meta.full_size_unet("sd15")
    assert {p.device.type for p in unet.parameters()} == {"meta"}
    assert _params(unet) == 859_520_964


def test_crossattn_count_equals_every_attn2_parameter():
    unet = memory_meta.full_size_unet("sd15")
    by_name = sum(p.numel() for name, p in unet.named_parameters() if ".attn2." in name)
    count = memory_meta.crossattn_parameter_count(unet)
    print(f"SD1.5 attn2 parameters: {count:,}")
    assert count == by_name
    assert 43e6 <= count <= 45e6


def test_other_components_have_their_published_counts():
    sdxl = memory_meta.parameter_counts("sdxl")
    print(sdxl)
    assert sdxl["unet"] == 2_567_463_684  # "2.6B" SDXL base UNet
    assert sdxl["text_encoder"] == 123_060_480  # CLIP ViT-L/14 text tower
    assert sdxl["text_encoder_2"] == 694_659_840  # OpenCLIP bigG text tower + projection
    assert sdxl["vae"] == 83_653_863
    assert memory_meta.parameter_counts("sd15") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert _params(memory_meta.full_size_clip()) == 427_616_513  # openai/clip-vit-large-patch14
    with pytest.raises(ValueError, match="family"):
        memory_meta.parameter_counts("sd3")


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
    assert memory_meta.lora_parameter_count(unet, 4, LORA_TARGETS) == peft_count > 0
    assert _params(unet) == before  # the caller's model is not modified
    with pytest.raises(ValueError):
        memory_meta.lora_parameter_count(unet, 0, LORA_TARGETS)


def test_lora_count_on_full_sdxl_matches_rank_times_in_plus_out():
    unet = memory_meta.full_size_unet("sdxl")
    analytic = sum(16 * (m.in_features + m.out_features) for name, m in unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name.endswith("." + t) for t in LORA_TARGETS))
    count = memory_meta.lora_parameter_count(unet, 16, LORA_TARGETS)
    print(f"SDXL LoRA r16 on to_q/k/v/out: {count:,}")
    assert count == analytic


def test_plan_has_every_term_and_the_band_decides_the_verdict():
    presets = [get_preset(name, "t4") for name in PRESETS]
    for preset in presets:
        e = memory.estimate_vram(preset)
        print(preset.name, {k: round(v, 2) if isinstance(v, float) else v for k, v in e.items()})
        assert e["total_gib"] == max(e["phases_gib"].values()) > 0
        assert e["band_gib"] == pytest.approx(memory_calibration.error_band() * e["total_gib"])
        assert e["spare_gib"] == pytest.approx(memory_model.T4_USABLE_GIB - e["total_gib"] - e["band_gib"])
        assert e["verdict"] == ("fits" if e["spare_gib"] >= memory_model.MARGIN_GIB else "does not fit")
    table = memory.memory_plan_table(presets)
    print(table)
    assert all(name in table for name in PRESETS)


def test_every_t4_preset_fits_with_a_gib_beyond_the_band():
    # Peak = the caching phase for SDXL (UNet + both text encoders + VAE resident while the VAE encodes batches of
    # helpers.caches.CACHE_ENCODE_PIXELS // px² images; 32·256² would miss the 1 GiB margin).
    for name in PRESETS:
        e = memory.estimate_vram(get_preset(name, "t4"))
        print(name, f"peak {e['total_gib']:.2f} ({e['peak_phase']}) band {e['band_gib']:.2f} spare {e['spare_gib']:.2f}")
        assert e["total_gib"] + e["band_gib"] + 1.0 <= 14.74
        assert e["verdict"] == "fits"


def test_sampling_phase_is_modelled_on_top_of_the_training_state():
    for name in PRESETS:
        e = memory.estimate_vram(get_preset(name, "t4"))
        resident = (e["parts_gib"]["unet"] + e["parts_gib"]["clip"] + e["trainable_gib"] + e["optimizer_gib"]
                    + e["overhead_gib"])
        assert e["phases_gib"]["sampling"] > resident + e["parts_gib"]["text_encoders"] + e["parts_gib"]["vae"]
    assert memory.estimate_vram(get_preset("sdxl_lora_naruto_1024", "t4"))["images_per_call"] == 1
    assert memory.estimate_vram(get_preset("sdxl_lora_naruto_256", "t4"))["images_per_call"] == 4


def test_one_tiled_image_per_call_is_far_below_four_unsliced_at_1024px():
    one_tiled = memory_model.inference_peak_gib("sdxl", 1024, 1, False, sliced=True, tiled=True)
    four_whole = memory_model.inference_peak_gib("sdxl", 1024, 4, False, sliced=False, tiled=False)
    untiled = memory_model.inference_peak_gib("sdxl", 1024, 1, False, sliced=True, tiled=False)
    print(f"SDXL 1024 px sampling activations: 1/call tiled {one_tiled:.2f} GiB, 1/call untiled {untiled:.2f}, "
          f"4/call unsliced {four_whole:.2f}")
    assert one_tiled < untiled < four_whole
    assert one_tiled < 0.25 * four_whole


def test_calibration_reproduces_each_published_report_within_the_band():
    rows = memory_calibration.calibration_table()
    print(memory_calibration.calibration_text())
    band = memory_calibration.error_band()
    assert 0 < band < 0.3
    for family in ("sd15", "sdxl"):
        assert sum(r["family"] == family and r["kind"] == "peak" for r in rows) >= 2
    for r in rows:
        if r["kind"] == "peak":
            assert abs(r["error"]) <= band + 1e-9, r
        else:  # an upper bound ("fits 16 GB"): the model must not exceed it
            assert r["predicted_gib"] <= r["reported_gib"], r


def test_host_ram_with_the_fp16_variant_fits_colab_and_without_it_sdxl_does_not():
    sdxl, sd15 = get_preset("sdxl_lora_naruto_1024", "t4"), get_preset("sd15_xattn_cifar10", "t4")
    unet = memory_meta.parameter_counts("sdxl")["unet"]
    with_variant, without = memory_model.host_ram_gib(sdxl), memory_model.host_ram_gib(sdxl, fp16_variant=False)
    print(f"SDXL loading: {with_variant:.1f} GiB with fp16 files, {without:.1f} GiB from the fp32 files")
    assert with_variant == pytest.approx(memory_model.HOST_BASELINE_GIB + 2 * unet / 2**30)
    assert without == pytest.approx(memory_model.HOST_BASELINE_GIB + 6 * unet / 2**30)  # fp32 file pages + fp16 copy
    assert with_variant < memory_model.COLAB_RAM_GIB < without
    assert memory_model.host_ram_gib(sd15) < memory_model.host_ram_gib(sd15, fp16_variant=False) < memory_model.COLAB_RAM_GIB


def test_optimizer_state_follows_the_bitsandbytes_layout():
    assert memory_model.optimizer_state_bytes([1000], "adamw8bit") == 8000  # < 4096 elements: fp32 moments
    assert memory_model.optimizer_state_bytes([4096], "adamw8bit") == 2 * 4096 + 8 * 16  # uint8 moments + absmax/256
    assert memory_model.optimizer_state_bytes([4096], "adamw") == 8 * 4096
    with pytest.raises(ValueError, match="optimizer"):
        memory_model.optimizer_state_bytes([1], "lion")


def test_checkpoint_size_formula_matches_a_real_tiny_checkpoint(tmp_path, monkeypatch):
    from helpers.data import dataset as data
    from helpers.models import load_components
    from helpers.train.hooks import CheckpointHook
    from helpers.train.loop import Trainer
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    preset = get_preset("sd15_xattn_cifar10", "tiny", max_steps=2, checkpoint_every=2, sample_every=0)
    c = load_components(preset)
    trainer = Trainer(preset, c, data.prepare_dataset(preset, c), tmp_path / "run", hooks=[CheckpointHook()])
    trainer.run()
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    real_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    sizes = [p.numel() for p in trainer.trainable.values()]
    predicted = memory_model.checkpoint_mb(sizes, "adamw")
    print(f"tiny checkpoint: {real_mb:.3f} MB written, formula {predicted:.3f} MB ({sum(sizes):,} params)")
    assert predicted == pytest.approx(real_mb, rel=0.10)


def test_activations_grow_with_resolution_batch_and_shrink_with_checkpointing():
    sdxl = get_preset("sdxl_lora_naruto_1024", "t4")
    at_1024 = memory_model.activation_gib(sdxl)
    at_256 = memory_model.activation_gib(get_preset("sdxl_lora_naruto_1024", "t4", resolution=256))
    assert at_1024 > 8 * at_256  # 16× the pixels
    one, two = (memory_model.activation_gib(get_preset("sd15_xattn_cifar10", "t4", batch_size=b)) for b in (1, 2))
    assert two == pytest.approx(2 * one, rel=1e-6)  # saved activations are per image
    assert memory_model.activation_gib(sdxl, gradient_checkpointing=False) > 5 * at_1024


def test_estimate_matches_reported_totals():
    # SD1.5 full UNet fine-tune, 512 px, batch 1, 8-bit Adam, checkpointing: 9.92 GB on a T4 (calibration table).
    full = memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", method="full", resolution=512, batch_size=1,
                                           gradient_checkpointing=True))
    assert full["trainable_params"] == 859_520_964
    assert 8.5 <= full["phases_gib"]["training"] <= 10.0
    # SDXL LoRA at 1024 px, batch 1, checkpointing, caches: "8 GB possible, 10 GB recommended" (kohya).
    sdxl = memory.estimate_vram(get_preset("sdxl_lora_naruto_1024", "t4"))
    assert 6.0 <= sdxl["phases_gib"]["training"] <= 9.31
    no_ckpt = memory.estimate_vram(get_preset("sdxl_lora_naruto_1024", "t4", gradient_checkpointing=False))
    assert no_ckpt["verdict"] == "does not fit"


def test_estimate_refuses_tiny_presets_and_unknown_options():
    with pytest.raises(ValueError, match="t4"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "tiny"))
    with pytest.raises(ValueError, match="optimizer"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", optimizer="lion"))
    with pytest.raises(ValueError, match="method"):
        memory.estimate_vram(get_preset("sd15_xattn_cifar10", "t4", method="dreambooth"))


def test_each_presets_vram_field_is_its_plan_plus_band():
    """`Preset.vram_plan_gib` (the quick verdict of notebook 00) must not promise less than the plan says."""
    for name in PRESETS:
        p = get_preset(name, "t4")
        e = memory.estimate_vram(p)
        assert e["total_gib"] + e["band_gib"] <= p.vram_plan_gib <= e["total_gib"] + e["band_gib"] + 0.5, name
