"""The preset table: every preset in both profiles, consistent with what the series promises."""
import dataclasses

import pytest

from helpers.core import preset_fields, presets
from helpers.core.presets import PRESETS, get_preset


def test_every_preset_has_both_profiles_and_a_comment_per_field():
    for name, forms in PRESETS.items():
        assert set(forms) == {"t4", "tiny"}, name
        for profile, p in forms.items():
            assert p.name == name and p.profile == profile
            assert p.model.startswith("tiny/") == (profile == "tiny")
    source = open(preset_fields.__file__).read()  # the fields are declared there, each with its comment
    for field in dataclasses.fields(presets.Preset):
        line = next(line for line in source.splitlines() if line.strip().startswith(f"{field.name}:"))
        assert "#" in line, f"field {field.name} has no comment"


def test_issue_numbers_for_the_t4_presets():
    x = get_preset("sd15_xattn_cifar10", "t4")
    assert (x.model, x.data_ref, x.method) == ("stable-diffusion-v1-5/stable-diffusion-v1-5", "uoft-cs/cifar10",
                                                  "crossattn")
    assert x.max_steps == 400
    s = get_preset("sdxl_lora_naruto_256", "t4")
    assert (s.model, s.vae, s.data_ref) == ("stabilityai/stable-diffusion-xl-base-1.0",
                                               "madebyollin/sdxl-vae-fp16-fix", "lambdalabs/naruto-blip-captions")
    assert (s.resolution, s.batch_size, s.grad_accum, s.max_steps, s.learning_rate, s.lora_rank) == (
        256, 12, 8, 200, 1e-4, 16)
    assert (s.optimizer, s.mixed_precision) == ("adamw8bit", "fp16")
    h = get_preset("sdxl_lora_naruto_1024", "t4")
    assert (h.resolution, h.batch_size, h.grad_accum, h.lr_schedule, h.lora_rank, h.checkpoint_every) == (
        1024, 1, 8, "cosine", 16, 30)
    assert h.gradient_checkpointing and abs(h.max_steps - 5 * 1221 / 8) < 5  # ~5 epochs of 1221 images
    p = get_preset("prior_sd15", "t4")
    assert (p.clip_model, p.lora_rank, p.lora_alpha, p.lora_dropout, p.lora_targets) == (
        "openai/clip-vit-large-patch14", 8, 16, 0.1, ("to_q", "to_k", "to_v"))


def test_tiny_forms_run_on_cpu():
    for forms in PRESETS.values():
        t = forms["tiny"]
        assert t.mixed_precision == "no" and t.optimizer == "adamw" and t.resolution <= 128


def test_overrides_and_errors():
    assert get_preset("sd15_xattn_cifar10", "tiny", method="lora").method == "lora"
    with pytest.raises(KeyError, match="unknown preset"):
        get_preset("nope", "tiny")
    with pytest.raises(KeyError, match="unknown profile"):
        get_preset("sd15_xattn_cifar10", "a100")
    with pytest.raises(TypeError, match="unknown preset fields"):
        get_preset("sd15_xattn_cifar10", "tiny", learning_rat=1)


def test_verdicts():
    t4 = get_preset("sdxl_lora_naruto_1024", "t4")
    assert "OK" in presets.runtime_verdict(t4, 15.0, True)
    assert "too little" in presets.runtime_verdict(t4, 8.0, True)
    assert "none here" in presets.runtime_verdict(t4, 0.0, False)


def test_another_method_brings_its_own_learning_rate_and_rank():
    """Notebook 02's METHOD="lora" must not train LoRA at the cross-attention learning rate (1e-5)."""
    xattn = get_preset("sd15_xattn_cifar10", "t4")
    lora = get_preset("sd15_xattn_cifar10", "t4", method="lora")
    assert xattn.learning_rate == 1e-5
    assert (lora.method, lora.learning_rate, lora.lora_rank) == ("lora", 1e-4, 16)
    assert get_preset("sd15_xattn_cifar10", "t4", method="crossattn") == xattn  # its own method: no change
    assert get_preset("sd15_xattn_cifar10", "t4", method="lora", learning_rate=3e-4).learning_rate == 3e-4
    for name, by_method in presets.METHOD_VALUES.items():  # every per-method value names a real field
        for values in by_method.values():
            assert set(values) == {"t4", "tiny"}, name
            for fields in values.values():
                assert set(fields) <= {f.name for f in dataclasses.fields(presets.Preset)}


def test_the_arithmetic_in_the_preset_comments():
    """Each t4 preset's comment states images/step, steps/epoch or epochs: recompute them from the fields."""
    import re
    source = open(presets.__file__).read()
    naruto_images = 1221  # lambdalabs/naruto-blip-captions
    for name in PRESETS:
        block = source[source.index(f'"{name}": {{'):]
        comment = block[:block.index('"t4": Preset(')]
        p = get_preset(name, "t4")
        per_step = re.search(r"(\d+) × (\d+)(?: accumulation)? = (\d+) images/step", comment)
        assert per_step, f"{name}: its comment does not state the images per step"
        if per_step:
            b, a, n = map(int, per_step.groups())
            assert (b, a, n) == (p.batch_size, p.grad_accum, p.images_per_step), name
        if p.data_source == "naruto":
            per_epoch = naruto_images / p.images_per_step
            epochs = re.search(r"(\d+) steps = ([\d,]+) images ≈ ([\d.]+) epochs", comment)
            if epochs:
                steps, images, n_epochs = int(epochs[1]), int(epochs[2].replace(",", "")), float(epochs[3])
                assert steps == p.max_steps and images == steps * p.images_per_step, name
                assert abs(n_epochs - images / naruto_images) < 0.05, name
            per = re.search(r"→ ([\d.]+) steps/epoch; 5 epochs ≈ (\d+)", comment)
            if per:
                assert abs(float(per[1]) - per_epoch) < 0.05 and abs(int(per[2]) - 5 * per_epoch) < 1, name
                assert abs(p.max_steps - 5 * per_epoch) < 2, name


def test_every_numeric_field_has_a_range_checked_when_the_preset_is_made():
    """Issue 27, item 4: max_grad_norm −1 trained by gradient ascent, snr_gamma −5 ran the loss to −309, snr_gamma 0
    trained nothing (loss 0) and exported the untouched weights, NaN max_grad_norm / noise_offset ended in a NaN stop
    that blamed the VAE. Every numeric field of Preset has a rule now; a new one without a rule fails here."""
    numeric = [f.name for f in dataclasses.fields(presets.Preset) if f.type.split(" |")[0] in ("int", "float")]
    assert sorted(numeric) == sorted(preset_fields.NUMBER_RULES)
    for field in numeric:
        for bad in (float("nan"), float("inf"), -1):
            with pytest.raises(ValueError, match=f"{field}[= ]{bad!r}"):  # resolution: the family's size rule
                get_preset("prior_diffusion_cifar10", "tiny", **{field: bad})
    for field, bad in (("max_grad_norm", -1.0), ("snr_gamma", -5.0), ("snr_gamma", 0.0), ("noise_offset", 2.0),
                       ("max_grad_norm", float("nan")), ("noise_offset", float("nan")), ("seed", 2**32)):
        with pytest.raises(ValueError, match=f"{field}={bad!r}: "):
            get_preset("sd15_xattn_cifar10", "tiny", **{field: bad})
    assert get_preset("sd15_xattn_cifar10", "tiny", snr_gamma=None, noise_offset=0.0).snr_gamma is None
    assert get_preset("sd15_xattn_cifar10", "tiny", snr_gamma=5.0, noise_offset=0.05, max_grad_norm=0.5).snr_gamma == 5
