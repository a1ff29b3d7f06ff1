"""The training engine on tiny models: learning, what trains, exact resume after SIGKILL, damaged checkpoints,
NaN stops, and exports that load in stock diffusers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from helpers.core import paths, presets
from helpers.data import dataset as data
from helpers.generate import grids
from helpers.methods import crossattn, lora
from helpers.methods import registry as adapters
from helpers.models import load_components
from helpers.tiny import world as tiny
from helpers.train import checkpoint, hooks
from helpers.train.hooks import CheckpointHook, ExportHook, Hook, LogHook, read_log
from helpers.train.loop import Trainer
from helpers.train.stops import TrainingStopped

DRIVER = Path(__file__).with_name("train_driver.py")


@pytest.fixture
def storage(tmp_path, monkeypatch):
    monkeypatch.setenv("LAB_STORAGE", str(tmp_path / "storage"))
    return tmp_path / "storage"


class LossProbe(Hook):
    """Fixed-noise loss on a fixed batch before and after training."""

    def __init__(self, batch):
        self.batch = batch

    def on_start(self, t):
        self.before = t.fixed_noise_loss(self.batch)

    def on_end(self, t):
        self.after = t.fixed_noise_loss(self.batch)


def fixed_batch(dataset, n=16):
    step = max(1, len(dataset) // n)
    return default_collate([dataset[i] for i in range(0, len(dataset), step)][:n])


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- learning and what trains

@pytest.mark.slow  # a learning check: 80-120 steps
@pytest.mark.parametrize("name, method, steps, overrides, max_ratio", [
    # cross-attention only, SD1.5-like, the 02 preset's tiny form: the pretrained tiny base already denoises the
    # CIFAR-like images well (fixed-noise loss ≈ 0.25), and 120 steps of attn2 take it down ≈ 6 %
    ("sd15_xattn_cifar10", "crossattn", 120, {}, 0.97),
    # LoRA r16 on the pretrained SDXL-like base: ≈ 0.39 → 0.31 in 80 steps
    ("sdxl_lora_naruto_256", "lora", 80, dict(lora_rank=16, lora_alpha=16, learning_rate=5e-3), 0.90),
])
def test_loss_drops_and_only_the_method_parameters_change(storage, tmp_path, name, method, steps, overrides,
                                                          max_ratio):
    preset = presets.get_preset(name, "tiny", method=method, max_steps=steps, sample_every=0, **overrides)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    before = snapshot(c.unet)
    probe = LossProbe(fixed_batch(ds))
    state = Trainer(preset, c, ds, tmp_path / "run", hooks=[LogHook(), probe]).run()
    assert state.step == steps
    print(f"{name}/{method}: fixed-noise loss {probe.before:.4f} → {probe.after:.4f}")
    assert probe.after < max_ratio * probe.before

    after = snapshot(c.unet)
    if method == "crossattn":
        changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
        attn2 = {k for k in before if ".attn2." in k}
        assert changed and changed <= attn2, sorted(changed - attn2)[:5]
        assert len(changed) == len(attn2)  # every attn2 tensor learned (biases of to_q/k/v are absent)
    else:
        base_keys = {k.replace(".base_layer", "") for k in after if "lora_" not in k}
        assert base_keys == set(before)  # LoRA wraps, never replaces
        for k, v in after.items():
            if "lora_" in k:
                continue
            assert torch.equal(v, before[k.replace(".base_layer", "")]), k
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in after.items())
    assert (tmp_path / "run" / "loss_curve.png").is_file()


# ---------------------------------------------------------------- kill and resume

def run_driver(run_dir, storage, *flags):
    proc = subprocess.run([sys.executable, str(DRIVER), str(run_dir), str(storage), *flags],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode


def final_state(run_dir):
    newest = checkpoint.checkpoint_dirs(run_dir)[-1]
    return (newest.name, load_file(str(newest / "trainable.safetensors")),
            torch.load(newest / "optimizer.pt", weights_only=False))


def assert_optimizer_equal(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        for name, value in a["state"][k].items():
            assert torch.equal(value, b["state"][k][name]), (k, name)


@pytest.mark.slow  # several processes, killed and resumed
def test_sigkill_between_steps_and_mid_checkpoint_resumes_exactly(tmp_path):
    storage = tmp_path / "storage"
    reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
    assert run_driver(reference, storage) == 0

    assert run_driver(resumed, storage, "--kill-after-step", "6") == -9  # last checkpoint: step 4
    assert [p.name for p in checkpoint.checkpoint_dirs(resumed)] == ["step-000004"]
    assert run_driver(resumed, storage, "--kill-in-save-of-step", "8") == -9  # dies writing step 8
    assert [p.name for p in checkpoint.checkpoint_dirs(resumed)] == ["step-000004"]  # no half checkpoint listed
    assert any(p.name.startswith(".tmp-step-000008") for p in (resumed / "checkpoints").iterdir())
    assert run_driver(resumed, storage, "--kill-after-step", "10") == -9  # resumes at 4, saves 8, dies at 10
    assert [p.name for p in checkpoint.checkpoint_dirs(resumed)] == ["step-000004", "step-000008"]
    assert run_driver(resumed, storage) == 0

    name_a, weights_a, opt_a = final_state(reference)
    name_b, weights_b, opt_b = final_state(resumed)
    assert name_a == name_b == "step-000012"
    assert weights_a.keys() == weights_b.keys()
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    assert_optimizer_equal(opt_a, opt_b)

    steps = [r["step"] for r in read_log(resumed) if "loss" in r]
    assert steps == list(range(1, 13))  # every step once, none twice
    losses_a = [r["loss"] for r in read_log(reference) if "loss" in r]
    losses_b = [r["loss"] for r in read_log(resumed) if "loss" in r]
    assert losses_a == losses_b  # the same loss curve as if never interrupted
    # samples were drawn along the way (steps 3, 6, 9, 12), in both runs, without shifting the training draws
    for run in (reference, resumed):
        assert [p.name for p in sorted((run / "samples").glob("*.png"))] == [
            "step-000003.png", "step-000006.png", "step-000009.png", "step-000012.png"]


# ---------------------------------------------------------------- damaged checkpoints, NaN, OOM advice

def small_preset(**kw):
    base = dict(method="lora", lora_rank=4, lora_alpha=4, max_train_images=16, batch_size=4, grad_accum=1,
                max_steps=10, checkpoint_every=5, keep_checkpoints=3, sample_every=0)
    return presets.get_preset("sd15_xattn_cifar10", "tiny", **{**base, **kw})


def test_corrupt_newest_checkpoint_falls_back_to_previous(storage, tmp_path):
    preset = small_preset()
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    run = tmp_path / "run"
    Trainer(preset, c, ds, run, hooks=[CheckpointHook()]).run()
    newest = run / "checkpoints" / "step-000010" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated, as by a full Drive

    c2 = load_components(preset)
    trainer = Trainer(preset, c2, ds, run, hooks=[CheckpointHook()])
    with pytest.warns(UserWarning, match="step-000010.*checksum"):
        trainer.run()
    assert trainer.state.resumed_from == "step-000005"
    checkpoint.verify(run / "checkpoints" / "step-000010")  # rewritten whole


class Poisoned(torch.utils.data.Dataset):
    """The real dataset, with NaN latents once `armed` (a corrupt cache entry or an fp16 VAE overflow)."""

    def __init__(self, base):
        self.base, self.armed = base, False
        self.cache_dirs = base.cache_dirs

    def __len__(self):
        return len(self.base)

    def set_epoch(self, epoch):
        self.base.set_epoch(epoch)

    def __getitem__(self, i):
        item = dict(self.base[i])
        if self.armed:
            item["latent_params"] = torch.full_like(item["latent_params"], float("nan"))
        return item


def test_nan_loss_stops_cleanly_and_keeps_last_good_checkpoint(storage, tmp_path):
    preset = small_preset(max_steps=20)
    c = load_components(preset)
    ds = Poisoned(data.prepare_dataset(preset, c))

    class ArmAfter7(Hook):
        def on_step(self, t):
            ds.armed = t.state.step >= 7

    run = tmp_path / "run"
    # issue 27, item 3: the inputs were NaN before the model saw them: the stop names the cache they came from,
    # not the VAE or the learning rate
    message = (r"inputs of optimizer step 8 are NaN/inf before the model sees them: latent_params of samples \[.*\] "
               r"\(from the cache .*latents-.*\)")
    with pytest.raises(TrainingStopped, match=message) as stop:
        Trainer(preset, c, ds, run, hooks=[LogHook(), CheckpointHook(), ArmAfter7()]).run()
    assert "learning rate" not in str(stop.value) and f"delete {ds.cache_dirs['latents']}" in str(stop.value)
    assert [p.name for p in checkpoint.checkpoint_dirs(run)] == ["step-000005"]
    weights = load_file(str(run / "checkpoints" / "step-000005" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert read_log(run)[-1]["event"] == "stopped"


def test_a_full_disk_while_appending_the_log_stops_with_the_folder_named(storage, tmp_path, monkeypatch):
    """Issue 27, item 8: a full disk while appending to log.jsonl gave a bare "No space left on device" (no folder,
    no stop); now the run stops like any other stop, naming the folder, with whole lines in its log."""
    import errno
    import os
    preset = small_preset(max_steps=10)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    write, full = os.write, {"after": 7}

    def write_on_a_full_disk(fd, data):  # the disk fills once step 7 is logged: log.jsonl gets a few bytes, no more
        if os.readlink(f"/proc/self/fd/{fd}").endswith("log.jsonl") and full["after"] < 0:
            write(fd, data[:5])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    class FillAfter7(Hook):
        def on_step(self, t):
            full["after"] = 7 - t.state.step

    monkeypatch.setattr(os, "write", write_on_a_full_disk)
    run = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=rf"the disk holding {run} is full: log.jsonl could not be appended "
                                              r"\(step 8\)\..*training resumes from the last checkpoint") as stop:
        Trainer(preset, c, ds, run, hooks=[FillAfter7(), LogHook(), CheckpointHook()]).run()
    assert "log.jsonl has no stopped event: the disk is full" in str(stop.value)
    monkeypatch.setattr(os, "write", write)
    assert [r["step"] for r in read_log(run)] == list(range(1, 8))  # whole lines: the cut one is gone
    assert (run / "log.jsonl").read_text().endswith("\n")
    assert [p.name for p in checkpoint.checkpoint_dirs(run)] == ["step-000005"]


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="non-finite"):
        checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.tensor([1.0, float("nan")])}, None, None, None,
                                   {}, small_preset())
    assert checkpoint.checkpoint_dirs(tmp_path) == []


def test_oom_advice_names_the_memory_fields_that_can_still_change():
    from helpers.train.stops import oom_message, sampling_oom_message
    msg = oom_message(presets.get_preset("sdxl_lora_naruto_1024", "t4"))
    for field in ("batch_size=1", "grad_accum=8", "resolution=1024"):
        assert field in msg
    # caches and checkpointing are already on: the VAE and text encoders already left the GPU, promise nothing more
    assert "cache_latents" not in msg and "gradient_checkpointing" not in msg
    msg = oom_message(presets.get_preset("sdxl_lora_naruto_256", "t4", cache_latents=False,
                                         gradient_checkpointing=False))
    assert "cache_latents=False (turn on" in msg and "gradient_checkpointing=False (turn on)" in msg
    msg = sampling_oom_message(presets.get_preset("sdxl_lora_naruto_1024", "t4"), 30)
    assert "while drawing the sample images of step 30" in msg and "already safe" in msg
    assert "batch_size" not in msg  # sampling does not depend on the training batch


# ---------------------------------------------------------------- exports load in stock diffusers

def unet_inputs(c, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = c.unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    hidden = torch.randn(2, 77, cfg.cross_attention_dim, generator=g)
    kwargs = {"encoder_hidden_states": hidden}
    if cfg.addition_embed_type == "text_time":
        pooled = torch.randn(2, c.text_encoders[1].config.projection_dim, generator=g)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]] * 2)}
    return x, t, kwargs


@pytest.mark.parametrize("name, overrides", [
    ("sdxl_lora_naruto_256", dict(max_steps=6)),
    # notebook 03's 1024 px preset in its tiny form (128 px, gradient checkpointing), shortened
    ("sdxl_lora_naruto_1024", dict(max_steps=2, grad_accum=2)),
])
def test_exported_lora_loads_in_stock_pipeline_and_kohya_roundtrips(storage, tmp_path, name, overrides):
    from diffusers import StableDiffusionXLPipeline
    preset = presets.get_preset(name, "tiny", sample_every=0, max_train_images=16, lora_alpha=8,  # alpha ≠ rank:
                                **overrides)  # the scale must survive export
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    export = ExportHook()
    Trainer(preset, c, ds, tmp_path / "run", hooks=[export]).run()
    final = tmp_path / "run" / "final"
    x, t, kw = unet_inputs(c)
    with torch.no_grad():
        c.unet.eval()
        trained = c.unet(x, t, **kw).sample
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny.resolve(preset.model))
        base = pipe.unet(x, t, **kw).sample
        pipe.load_lora_weights(final)
        loaded = pipe.unet(x, t, **kw).sample
        assert not torch.allclose(base, trained, atol=1e-4)  # training did something
        torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-4)

        pipe.unload_lora_weights()
        torch.testing.assert_close(pipe.unet(x, t, **kw).sample, base)
        path = lora.kohya_path(final)
        pipe.load_lora_weights(final, weight_name=path.name)  # fp16 in the file: fp16's rounding
        torch.testing.assert_close(pipe.unet(x, t, **kw).sample, trained, atol=2e-3, rtol=1e-3)

    assert path.name == "run.safetensors"  # named after the run (its folder here)
    kohya = load_file(str(path))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {v.dtype for v in kohya.values()} == {torch.float16}
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_output_name"] == "run"
    assert meta["ss_network_dim"] == str(preset.lora_rank) and meta["ss_network_alpha"] == "8"
    assert meta["ss_steps"] == str(preset.max_steps)
    assert meta["ss_resolution"] == f"({preset.resolution}, {preset.resolution})"
    assert meta["ss_sd_model_name"] == preset.model and len(meta["ss_captions_sha256"]) == 64


def test_exported_text_encoder_lora_loads_in_stock_pipeline(storage, tmp_path):
    """With train_text_encoder the file also carries both text encoders' LoRAs (peft key layout): a fresh stock
    pipeline's encoders give the trained encoders' states."""
    from diffusers import StableDiffusionXLPipeline
    preset = presets.get_preset("sdxl_lora_naruto_256", "tiny", sample_every=0, max_train_images=16, max_steps=3,
                                train_text_encoder=True, learning_rate=5e-2, lora_alpha=8)
    c = load_components(preset)
    Trainer(preset, c, data.prepare_dataset(preset, c), tmp_path / "run", hooks=[ExportHook()]).run()
    ids = c.tokenizers[0](["a red circle on green grass"], padding="max_length", max_length=77,
                          return_tensors="pt").input_ids
    states = lambda encoder: encoder(ids, output_hidden_states=True).hidden_states[-2]  # noqa: E731
    with torch.no_grad():
        trained = [states(encoder.eval()) for encoder in c.text_encoders]
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny.resolve(preset.model))
        base = states(pipe.text_encoder)
        pipe.load_lora_weights(tmp_path / "run" / "final")
        loaded = [states(pipe.text_encoder), states(pipe.text_encoder_2)]
        pipe.unload_lora_weights()
        torch.testing.assert_close(states(pipe.text_encoder), base)
        pipe.load_lora_weights(lora.kohya_path(tmp_path / "run" / "final"))  # the kohya file (fp16) too
        from_kohya = [states(pipe.text_encoder), states(pipe.text_encoder_2)]
    assert not torch.allclose(base, trained[0], atol=1e-3)  # the text encoder did train
    for got, want in zip(loaded, trained):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    for got, want in zip(from_kohya, trained):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)
    kohya = load_file(str(lora.kohya_path(tmp_path / "run" / "final")))
    assert {k.split("_text_model_")[0] for k in kohya if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}


def test_exported_crossattn_weights_load_into_stock_unet(storage, tmp_path):
    from diffusers import UNet2DConditionModel
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", max_steps=5, sample_every=0, max_train_images=16)
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c)
    Trainer(preset, c, ds, tmp_path / "run", hooks=[ExportHook()]).run()
    path = tmp_path / "run" / "final" / crossattn.CROSSATTN_FILE
    stock = UNet2DConditionModel.from_pretrained(tiny.resolve(preset.model), subfolder="unet")
    x, t, kw = unet_inputs(c)
    with torch.no_grad():
        c.unet.eval()
        base = stock(x, t, **kw).sample
        crossattn.load_crossattn_weights(stock, path)
        torch.testing.assert_close(stock(x, t, **kw).sample, c.unet(x, t, **kw).sample)
        assert not torch.allclose(base, c.unet(x, t, **kw).sample, atol=1e-4)
    with pytest.raises(KeyError, match="missing"):
        crossattn.load_crossattn_weights(UNet2DConditionModel.from_pretrained(tiny.resolve("tiny/sdxl"),
                                                                             subfolder="unet"), path)


def test_gradient_checkpointing_gives_the_same_update(storage, tmp_path):
    """The 1024 px preset relies on checkpointing: it must change memory, not the maths (LoRA grads included)."""
    results = []
    for checkpointing in (False, True):
        preset = presets.get_preset("sdxl_lora_naruto_1024", "tiny", max_steps=2, grad_accum=2, resolution=64,
                                    sample_every=0, max_train_images=8, gradient_checkpointing=checkpointing)
        c = load_components(preset)
        trainer = Trainer(preset, c, data.prepare_dataset(preset, c), tmp_path / f"run-{checkpointing}", hooks=[])
        trainer.run()
        results.append({k: v.detach().clone() for k, v in trainer.trainable.items()})
    plain, checkpointed = results
    assert plain.keys() == checkpointed.keys()
    assert any(v.abs().sum() > 0 for k, v in plain.items() if "lora_B" in k)
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["crossattn", "lora"])
def test_fp16_base_trains_fp32_weights(method):
    """On a T4 the frozen UNet is fp16; what trains must be fp32 (GradScaler cannot unscale fp16 gradients)."""
    from diffusers import UNet2DConditionModel

    from helpers.models import Components
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", method=method)
    unet = UNet2DConditionModel.from_pretrained(tiny.resolve(preset.model), subfolder="unet", dtype=torch.float16)
    c = Components("sd15", unet, vae=None)
    m = adapters.make_method(preset)
    m.setup(c)
    trainable = m.trainable_parameters(c)
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    frozen = [p for p in unet.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.float16 for p in frozen)


# ---------------------------------------------------------------- finished runs load back into ONE pipeline

def test_finished_runs_load_back_and_switch_in_one_stock_pipeline(storage, tmp_path):
    """crossattn and LoRA runs into one stock SD1.5 pipeline: base / each run / a LoRA scale, switched in place."""
    from helpers.generate import sampling
    from helpers.methods import runs
    c_by_method, folders = {}, {}
    for method in ("crossattn", "lora"):
        preset = presets.get_preset("sd15_xattn_cifar10", "tiny", method=method, max_steps=4, sample_every=0,
                                    max_train_images=16)
        c = load_components(preset)
        folders[method] = paths.run_folder(preset)
        assert folders[method].name == f"sd15_xattn_cifar10-{method}-tiny"
        Trainer(preset, c, data.prepare_dataset(preset, c), folders[method], hooks=[ExportHook()]).run()
        c_by_method[method] = c
    pipe = sampling.load_pipeline(presets.get_preset("sd15_xattn_cifar10", "tiny"), "cpu")
    x, t, kw = unet_inputs(c_by_method["crossattn"])

    def out():
        with torch.no_grad():
            return pipe.unet(x, t, **kw).sample

    base = out()
    board = runs.RunSet(pipe)
    names = {m: board.add(folders[m]) for m in folders}
    assert runs.finished_runs(storage) == sorted(folders.values())
    torch.testing.assert_close(out(), base)  # loading switches nothing on
    for method, c in c_by_method.items():
        board.use(names[method])
        with torch.no_grad():
            c.unet.eval()
            trained = c.unet(x, t, **kw).sample
        torch.testing.assert_close(out(), trained, atol=1e-5, rtol=1e-4)
    board.use(names["lora"], 0.0)
    torch.testing.assert_close(out(), base, atol=1e-6, rtol=1e-5)  # LoRA scale 0 = the base model
    board.use(None)
    torch.testing.assert_close(out(), base)
    variants = [board.variant(None), board.variant(names["lora"], 0.5)]
    assert [v.name for v in variants] == ["base", "sd15_xattn_cifar10-lora-tiny ×0.5"]
    with pytest.raises(FileNotFoundError, match="not a finished run"):
        runs.run_preset(tmp_path)


# ---------------------------------------------------------------- samples during training

@pytest.mark.slow  # draws full-size samples
def test_samples_show_a_thumbnail_sheet_and_keep_the_full_grid_in_the_run(storage, tmp_path, monkeypatch):
    from PIL import Image

    shown = []
    monkeypatch.setattr(hooks, "_display", shown.append)  # what a notebook would receive (IPython's display)
    preset = presets.get_preset("sd15_xattn_cifar10", "tiny", resolution=512, max_steps=1, sample_every=1,
                                sample_steps=2, max_train_images=2, batch_size=2, checkpoint_every=1)
    c = load_components(preset)
    Trainer(preset, c, data.prepare_dataset(preset, c), tmp_path / "run", hooks=[hooks.SampleHook()]).run()
    full = Image.open(tmp_path / "run" / "samples" / "step-000001.png")
    prompts = len(preset.sample_prompts)
    assert full.width == prompts * 512  # every sample at full size, in the run folder (on Drive in Colab)
    (sheet,) = shown
    assert sheet.width == prompts * grids.THUMB_PX < full.width
