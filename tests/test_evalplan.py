"""helpers.evalplan: notebook 05's T4 plan from the real architectures (meta device), phase by phase."""
import pytest

from helpers.core import presets
from helpers.plan import inference as evalplan
from helpers.plan import meta as memory_meta
from helpers.plan import model as memory_model
from helpers.plan import timing
from helpers.plan.calibration import error_band
from helpers.plan.model import MARGIN_GIB, T4_USABLE_GIB


def test_weights_are_the_real_parameter_counts_in_fp16():
    gib = 2**30
    assert memory_meta.weights_gib("sd15") * gib / 2 == pytest.approx(1.066e9, rel=0.01)  # UNet 860M + VAE + text
    assert memory_meta.weights_gib("sdxl") * gib / 2 == pytest.approx(3.469e9, rel=0.01)  # UNet 2.57B + two texts
    assert memory_meta.weights_gib("clip") * gib / 2 == pytest.approx(427.6e6, rel=0.01)  # ViT-L/14
    assert memory_meta.weights_gib("pickscore") * gib / 2 == pytest.approx(986e6, rel=0.01)  # CLIP-H/14
    assert timing.scorer_tflop("pickscore") > 2 * 0.9 * timing.scorer_tflop("clip")  # wider and deeper


@pytest.mark.slow  # full-size models on the meta device, every phase
def test_phases_fit_one_at_a_time_but_not_all_at_once_and_the_counts_fit_the_budget():
    runs = {"sd15": [presets.get_preset("sd15_xattn_cifar10", "t4")],
            "sdxl": [presets.get_preset("sdxl_lora_naruto_256", "t4"), presets.get_preset("sdxl_lora_naruto_1024", "t4")]}
    sets, sizes, steps = {"sd15": 3, "sdxl": 3}, {"sd15": 256, "sdxl": 1024}, {"sd15": 25, "sdxl": 20}
    prompts, seeds, phases = evalplan.choose_counts(runs, sets, sizes, steps, budget_seconds=1800)
    assert [p.name for p in phases] == ["setup", "sd15", "sdxl", "clip", "pickscore", "all at once"]
    assert all(p.fits for p in phases[:-1]) and not phases[-1].fits
    assert phases[-1].gib == pytest.approx(sum(p.gib for p in phases[:-1]) - 3 * memory_model.CUDA_OVERHEAD_GIB)
    assert sum(p.seconds for p in phases[1:]) <= 1800  # drawing and scoring; a fresh VM's downloads come on top
    ladder = list(evalplan.LADDER)
    bigger = ladder[ladder.index((prompts, seeds)) - 1]  # the next larger set would not finish in 30 minutes
    images = {f: (1 + len(runs[f])) * sets[f] * bigger[0] * bigger[1] for f in runs}
    assert sum(p.seconds for p in evalplan.evaluation_plan(runs, images, sizes, steps)[1:]) > 1800
    text = evalplan.plan_text(phases)
    assert "DOES NOT FIT" in text and "all at once" in text


def test_the_plan_counts_what_notebook_05_loads_and_downloads():
    from helpers.plan.model import COLAB_RAM_GIB, host_ram_gib
    sd15, sdxl = presets.get_preset("sd15_xattn_cifar10", "t4"), presets.get_preset("sdxl_lora_naruto_1024", "t4")
    adapter, prior = presets.get_preset("prior_sd15", "t4"), presets.get_preset("prior_diffusion_cifar10", "t4")
    runs, images = {"sd15": [sd15, adapter], "sdxl": [sdxl]}, {"sd15": 12, "sdxl": 8}
    sizes, steps = {"sd15": 256, "sdxl": 1024}, {"sd15": 25, "sdxl": 20}
    with_all = {p.name: p for p in evalplan.evaluation_plan(runs, images, sizes, steps, sources={"sd15": [prior]})}
    bare = {p.name: p for p in evalplan.evaluation_plan({"sd15": [sd15]}, {"sd15": 12}, sizes, steps,
                                                        safety_checker=False)}
    # SD1.5's safety checker (304M parameters), the adapter run and the prior it draws through are on the GPU
    assert memory_meta.weights_gib("safety_checker") == pytest.approx(2 * 303_981_588 / 2**30)
    extra = with_all["sd15"].gib - bare["sd15"].gib
    assert extra == pytest.approx(memory_meta.weights_gib("safety_checker") + evalplan.run_gib(adapter)
                                  + memory_model.prior_source_gib(prior))
    assert evalplan.run_gib(adapter) > 0.03  # its LoRA and IP-Adapter (the plan counted 0 for it before)
    # host RAM per phase, one component at a time: SDXL's UNet; PickScore's fp32 files read whole into fp16
    assert with_all["sdxl"].ram_gib == pytest.approx(host_ram_gib(sdxl)) and with_all["sdxl"].ram_gib < COLAB_RAM_GIB
    assert with_all["pickscore"].ram_gib > with_all["clip"].ram_gib
    # a fresh VM downloads SD1.5 (+ checker), SDXL, CLIP-L for the scorer and the prior, PickScore's 3.9 GB
    setup = with_all["setup"]
    for name in ("SD1.5 2.1 GB", "SD1.5 safety checker 0.6 GB", "SDXL + fp16-fix VAE 7.1 GB",
                 "CLIP ViT-L-14 scorer 1.7 GB", "CLIP ViT-L/14 (the prior's) 1.7 GB", "PickScore 3.9 GB"):
        assert name in setup.resident
    mb = sum(timing.model_download_mb(m) for m in ("sd15", "safety_checker", "sdxl", "clip", "pickscore", "clip_l14"))
    assert setup.seconds == pytest.approx(timing.INSTALL_SECONDS + mb / timing.DOWNLOAD_MB_S)


def test_explorer_keeps_both_families_at_native_sizes_only_when_the_plan_says_so():
    both = evalplan.explorer_gib(["sd15", "sdxl"])
    assert both > memory_meta.weights_gib("sd15") + memory_meta.weights_gib("sdxl") + memory_meta.weights_gib("clip")
    assert evalplan.explorer_fits(["sd15", "sdxl"]) == (both * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB)
    assert evalplan.explorer_fits(["sd15"]) and not evalplan.explorer_fits(["sd15", "sdxl"], {"sdxl": 2048})
