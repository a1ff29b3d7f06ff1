"""The T4's dtype rules on a CPU (LAB_T4_DTYPES=1), through the same Trainer, samplers and scorer as a T4 run:
fp16 frozen UNet, VAE and text encoders, fp32 trained weights, a real torch.autocast("cpu", float16) and a real
torch.amp.GradScaler("cpu"). Plus the T4-only paths that a CPU can still reach: CUDA fork devices, fp16 variant
files, GradScaler-skipped steps, re-running a stopped run in the same kernel, sampling memory rules."""
from __future__ import annotations

import gc
import json
import shutil
import weakref

import pytest
import torch
from safetensors.torch import load_file

from helpers.core import presets
from helpers.core.precision import T4_DTYPES_ENV, cuda_fork_devices, precision_for
from helpers.data import dataset as data
from helpers.evaluation.clip_score import ClipScorer
from helpers.generate import sampling
from helpers.methods import lora
from helpers.models import load_components, pipeline_from_components
from helpers.tiny import world as tiny
from helpers.train import checkpoint
from helpers.train.hooks import CheckpointHook, ExportHook, Hook, LogHook, SampleHook, read_log
from helpers.train.loop import Trainer
from helpers.train.stops import TrainingStopped


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "storage"))
    return tmp_path / "storage"


@pytest.fixture
def t4_dtypes(monkeypatch):
    monkeypatch.setenv(T4_DTYPES_ENV, "1")


def small(name="sdxl_lora_naruto_256", **kw):
    base = dict(max_train_images=8, batch_size=2, grad_accum=2, max_steps=2, checkpoint_every=1, sample_every=0,
                keep_checkpoints=3)
    return presets.get_preset(name, "tiny", **{**base, **kw})


class AutocastProbe(Hook):
    """Records, from inside the UNet's forward, whether fp16 autocast is on and the dtypes it sees."""

    def on_start(self, t):
        self.seen = []
        t.c.unet.conv_in.register_forward_hook(
            lambda m, args, out: self.seen.append((torch.is_autocast_enabled("cpu"), m.weight.dtype, out.dtype)))


# ---------------------------------------------------------------- item 1: fork_rng devices

def test_cuda_fork_devices_never_passes_none():
    # accelerate's device on one GPU is `cuda` with no index; fork_rng(devices=[None]) fails on a T4
    assert torch.device("cuda").index is None
    assert cuda_fork_devices(torch.device("cuda")) == [torch.cuda.current_device() if torch.cuda.is_available()
                                                       else 0]
    assert cuda_fork_devices(torch.device("cuda", 0)) == [0]
    assert cuda_fork_devices(torch.device("cuda", 1)) == [1]
    assert cuda_fork_devices(torch.device("cpu")) == []


# ---------------------------------------------------------------- the T4-dtype mode end to end

def test_t4_dtype_mode_trains_checkpoints_resumes_samples_and_scores(storage, tmp_path, t4_dtypes):
    preset = small(sample_every=2, sample_prompts=presets.NARUTO_PROMPTS[:2], sample_steps=2)
    c = load_components(preset)
    assert c.unet.dtype == torch.float16 and all(e.dtype == torch.float16 for e in c.text_encoders)
    assert c.vae.dtype == torch.float16  # the fp16-fix VAE stays fp16; the stock SDXL VAE would be upcast
    ds = data.prepare_dataset(preset, c)
    run = tmp_path / "run"
    probe = AutocastProbe()
    trainer = Trainer(preset, c, ds, run, hooks=[LogHook(), CheckpointHook(), SampleHook(show=False), probe])
    state = trainer.run()
    assert trainer.precision.fp16 and trainer.scaler.is_enabled()  # a real GradScaler("cpu")
    assert isinstance(trainer.scaler, torch.amp.GradScaler) and trainer.scaler._device == "cpu"
    assert probe.seen and all(on for on, _, _ in probe.seen)  # forward passes ran under fp16 autocast
    assert {w for _, w, _ in probe.seen} == {torch.float16} and {o for _, _, o in probe.seen} == {torch.float16}
    trained = trainer.trainable
    assert all(p.dtype == torch.float32 for p in trained.values())  # GradScaler cannot unscale fp16 grads
    frozen = [p for p in c.unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float16 for p in frozen)
    assert state.step == 2 and (run / "samples" / "step-000002.png").is_file()
    saved = torch.load(checkpoint.checkpoint_dirs(run)[-1] / "state.pt", weights_only=False)
    assert saved["scaler"]["scale"] > 0  # the scaler state travels with the checkpoint

    # resume: one more step from the step-2 checkpoint on fresh components, scaler state restored
    more = Trainer(presets.get_preset(preset.name, "tiny", **{**_fields(preset), "max_steps": 3}),
                   load_components(preset), ds, run, hooks=[LogHook(), CheckpointHook()])
    more.run()
    assert more.state.resumed_from == "step-000002" and more.state.step == 3
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3]

    # one CLIP score with the fp16 open_clip scorer on the samples
    scorer = ClipScorer.from_profile("tiny", device="cpu")
    assert scorer.precision.fp16
    from PIL import Image
    image = Image.open(run / "samples" / "step-000002.png").convert("RGB").crop((0, 0, 64, 64))
    score = scorer.score([image], [presets.NARUTO_PROMPTS[0]])
    assert score.shape == (1,) and abs(score[0]) <= 100


def _fields(preset):
    from dataclasses import asdict
    return {k: v for k, v in asdict(preset).items() if k not in ("name", "profile")}


# ---------------------------------------------------------------- item 8: GradScaler-skipped steps

def test_skipped_fp16_steps_spend_neither_the_step_budget_nor_the_warmup(storage, tmp_path, t4_dtypes):
    # A loss scale of 2**24 overflows fp16 gradients for the first steps, as 65536 often does on a real T4.
    preset = small(max_steps=4, warmup_steps=2, lr_schedule="cosine", learning_rate=1e-3)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    run = tmp_path / "run"
    trainer = Trainer(preset, c, ds, run, hooks=[LogHook(), CheckpointHook()], loss_scale=2.0**24)
    state = trainer.run()
    skips = [r for r in read_log(run) if r.get("event") == "skipped"]
    print(f"skipped {state.skipped_steps} steps; loss scale now {trainer.scaler.get_scale():g}")
    assert state.skipped_steps >= 1 and len(skips) == state.skipped_steps
    assert state.step == preset.max_steps
    # every counted step is a real update: the optimizer stepped max_steps times, the LR schedule too
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {preset.max_steps}
    assert trainer.lr_scheduler.last_epoch == preset.max_steps
    assert [r["step"] for r in read_log(run) if "loss" in r] == [1, 2, 3, 4]
    meta = json.loads((checkpoint.checkpoint_dirs(run)[-1] / "meta.json").read_text())
    assert meta["position"]["skipped_steps"] == state.skipped_steps


# ---------------------------------------------------------------- item 7: a second Trainer after a stop

class PoisonAfter(Hook):
    """Turns one trained weight into NaN after step `n`, so step n + 1 stops with a NaN loss."""

    def __init__(self, n):
        self.n = n

    def on_step(self, t):
        if t.state.step == self.n:
            with torch.no_grad():
                next(iter(t.trainable.values())).fill_(float("nan"))


class ActivationRefs(Hook):
    """Weak references to the UNet's activations of every forward pass."""

    def on_start(self, t):
        self.refs = []
        t.c.unet.conv_out.register_forward_hook(lambda m, args, out: self.refs.append(weakref.ref(out)))


@pytest.mark.parametrize("method", ["lora", "crossattn"])
def test_rerun_after_a_stop_in_the_same_kernel_resumes_like_an_uninterrupted_run(storage, tmp_path, method):
    preset = small("sd15_xattn_cifar10", method=method, max_steps=4, checkpoint_every=2, batch_size=2,
                   grad_accum=1)
    c0 = load_components(preset)
    reference = Trainer(preset, c0, data.prepare_dataset(preset, c0), tmp_path / "ref", hooks=[])
    reference.run()
    expected = {k: v.detach().clone() for k, v in reference.trainable.items()}

    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    run = tmp_path / "run"
    refs = ActivationRefs()
    with pytest.raises(TrainingStopped, match="NaN") as stopped:
        Trainer(preset, c, ds, run, hooks=[CheckpointHook(), PoisonAfter(3), refs]).run()
    gc.collect()
    # the exception (kept alive here, as a notebook keeps sys.last_value) holds no activations
    assert refs.refs and all(r() is None for r in refs.refs), "a stopped run keeps activations alive"
    assert stopped.value.__context__ is None and stopped.value.__cause__ is None

    again = Trainer(preset, c, ds, run, hooks=[CheckpointHook()])  # the same components, as a re-run cell
    again.run()
    assert again.state.resumed_from == "step-000002" and again.state.step == 4
    assert again.trainable.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(again.trainable[k].detach(), v, atol=1e-6, rtol=1e-5)
    if method == "crossattn":  # a fresh (no checkpoint) re-run also starts from the base attn2 weights
        fresh = Trainer(presets.get_preset(preset.name, "tiny", **{**_fields(preset), "max_steps": 4}), c, ds,
                        tmp_path / "fresh", hooks=[])
        fresh.run()
        for k, v in expected.items():
            torch.testing.assert_close(fresh.trainable[k].detach(), v, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- item 3: sampling memory rules

@pytest.mark.slow  # draws large samples
def test_large_samples_are_drawn_one_at_a_time_with_vae_slicing_and_tiling(storage):
    preset = presets.get_preset("sdxl_lora_naruto_1024", "tiny")
    c = load_components(preset)
    pipe = pipeline_from_components(c)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    prompts, seeds = sampling.prompt_seed_pairs(["a red circle", "a blue square", "a frog"], [0])
    small_images = sampling.generate(pipe, prompts, seeds, steps=1, height=64, width=64)
    assert batches == [2 * 3]  # below 768 px: the 3 prompts in one call (× 2 for classifier-free guidance)
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling
    batches.clear()
    big = sampling.generate(pipe, prompts[:2], seeds[:2], steps=1, height=768, width=768)
    assert batches == [2, 2]  # one image per call
    assert pipe.vae.use_slicing and pipe.vae.use_tiling and pipe.vae.tile_sample_min_size == sampling.VAE_TILE_PX
    assert len(small_images) == 3 and big[0].size == (768, 768)
    assert sampling.images_per_call(1024, 1024) == 1 and sampling.images_per_call(512, 512) == 4


def test_out_of_memory_while_sampling_is_reported_as_sampling_after_the_checkpoint(storage, tmp_path):
    preset = small(max_steps=2, sample_every=2, sample_prompts=presets.NARUTO_PROMPTS[:1], sample_steps=1)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)

    def oom_at_inference(module, args):
        if not module.training:  # sampling runs the UNet in eval mode
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    c.unet.register_forward_pre_hook(oom_at_inference)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="while drawing the sample images of step 2.*already safe"):
        Trainer(preset, c, ds, run, hooks=[CheckpointHook(), SampleHook(show=False)]).run()
    assert [p.name for p in checkpoint.checkpoint_dirs(run)][-1] == "step-000002"


# ---------------------------------------------------------------- item 4: what leaves the GPU after caching

def test_cached_runs_leave_the_vae_and_text_encoders_idle(storage, tmp_path):
    preset = small()
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    trainer = Trainer(preset, c, ds, tmp_path / "run", hooks=[])
    trainer._setup()
    assert trainer.idle_modules() == [c.vae, *c.text_encoders]
    uncached = small(cache_latents=False, cache_text=False)
    trainer = Trainer(uncached, c2 := load_components(uncached), data.prepare_dataset(uncached, c2),
                      tmp_path / "run2", hooks=[])
    trainer._setup()
    assert trainer.idle_modules() == []
    te = small(train_text_encoder=True)
    trainer = Trainer(te, c3 := load_components(te), data.prepare_dataset(te, c3), tmp_path / "run3", hooks=[])
    trainer._setup()
    assert trainer.idle_modules() == [c3.vae]  # a trained text encoder works in every step


# ---------------------------------------------------------------- item 6: fp16 variant files

def test_fp16_loading_prefers_the_fp16_variant_and_falls_back_without_one(storage, tmp_path, t4_dtypes):
    folder = tmp_path / "sdxl-fp16-only"
    shutil.copytree(tiny.resolve("tiny/sdxl"), folder)
    for plain in [folder / "unet" / "diffusion_pytorch_model.safetensors",
                  folder / "text_encoder" / "model.safetensors", folder / "text_encoder_2" / "model.safetensors"]:
        plain.unlink()  # only the fp16 copies are left: loading can only have used them
    preset = presets.get_preset("sdxl_lora_naruto_256", "tiny", model=str(folder))
    c = load_components(preset)
    assert c.unet.dtype == torch.float16
    reference = load_file(str(folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"))
    assert torch.equal(c.unet.state_dict()["conv_in.weight"], reference["conv_in.weight"])
    # the SD1.5-like folder has no fp16 variant: fp16 loading falls back to its plain files
    sd15 = load_components(presets.get_preset("sd15_xattn_cifar10", "tiny"))
    assert sd15.unet.dtype == torch.float16


def test_fp32_loading_ignores_the_fp16_variant(storage, tmp_path):
    folder = tmp_path / "sdxl-plain"
    shutil.copytree(tiny.resolve("tiny/sdxl"), folder)
    for variant in folder.rglob("*.fp16.safetensors"):
        variant.write_bytes(b"not a safetensors file")  # would fail if fp32 loading read it
    c = load_components(presets.get_preset("sdxl_lora_naruto_256", "tiny", model=str(folder)))
    assert c.unet.dtype == torch.float32


# ---------------------------------------------------------------- item 10: the VAE's own down-sampling factor

def test_a_vae_with_another_downsampling_factor_caches_and_trains(storage, tmp_path):
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64, force_upcast=False)
    vae.save_pretrained(tmp_path / "vae4x")
    preset = small("sd15_xattn_cifar10", vae=str(tmp_path / "vae4x"), max_steps=1, batch_size=2, grad_accum=1)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    assert ds.latents["latent_params"].shape[-2:] == (16, 16)  # 64 px / 4, not / 8
    assert Trainer(preset, c, ds, tmp_path / "run", hooks=[]).run().step == 1


def test_precision_rule_is_fp32_on_cpu_unless_asked():
    assert not precision_for("fp16", "cpu", t4_dtypes=False).fp16
    assert precision_for("fp16", "cpu", t4_dtypes=True).fp16
    assert precision_for("fp16", "cuda").fp16 and not precision_for("no", "cuda").fp16
    with pytest.raises(ValueError, match="bf16"):
        precision_for("bf16", "cpu")


def test_exported_t4_dtype_lora_loads_in_stock_fp16_pipeline(storage, tmp_path, t4_dtypes):
    """An export from fp16 training is fp32 on disk and loads into a stock fp16 pipeline."""
    from diffusers import StableDiffusionXLPipeline
    preset = small(max_steps=2)
    c = load_components(preset)
    Trainer(preset, c, data.prepare_dataset(preset, c), tmp_path / "run", hooks=[ExportHook()]).run()
    weights = load_file(str(tmp_path / "run" / "final" / lora.LORA_FILE))
    assert {v.dtype for v in weights.values()} == {torch.float32}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny.resolve(preset.model), dtype=torch.float16,
                                                     variant="fp16")
    pipe.load_lora_weights(tmp_path / "run" / "final")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


# ---------------------------------------------------------------- fp16 loads of a repository without fp16 files

def test_an_fp16_load_without_fp16_files_logs_no_error(t4_dtypes, capfd):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    from helpers.models import from_pretrained, has_fp16_variant
    vae_fix, clip = tiny.resolve("tiny/sdxl-vae-fp16-fix"), tiny.resolve("tiny/clip")  # like their Hub repos: no fp16
    assert has_fp16_variant(vae_fix) is False and has_fp16_variant(tiny.resolve("tiny/sdxl"), "unet") is True
    capfd.readouterr()
    vae = from_pretrained(AutoencoderKL, vae_fix, None, torch.float16)  # diffusers logs to the process's stderr
    model = from_pretrained(CLIPModel, clip, None, torch.float16)
    assert vae.dtype == model.dtype == torch.float16
    said = capfd.readouterr().err
    assert "error occurred" not in said and "unsafe serialization" not in said, said
