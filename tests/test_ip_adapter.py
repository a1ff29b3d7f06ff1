"""SD1.5 + an IP-Adapter trained from scratch + LoRA on the tiny world (helpers.ip_adapter): the adapter layout stock
diffusers reads, training through the Trainer with exact resume, the export reproduced by a fresh stock pipeline,
generation from image embeddings (helpers.sampling), and what the issue asks the result to show: images generated
from the TRUE embedding of held-out images keep their class, variations stay closer to their own source."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from helpers.core import presets
from helpers.data import dataset as data
from helpers.data.embeddings import cosine_matrix, embedding_set
from helpers.generate import sampling
from helpers.methods import runs
from helpers.methods.diffusion import SampleDraws
from helpers.methods.ip_adapter import (
    IP_ADAPTER_FILE,
    NUM_TOKENS,
    EmbeddedDataset,
    IPAdapter,
    condition_drops,
    fresh_ip_adapter,
    round_trip_delta,
)
from helpers.models import load_components
from helpers.plan import model as memory_model
from helpers.prior.images import caption_only, fixed_embeddings
from helpers.tiny import world as tiny
from helpers.train.checkpoint import checkpoint_dirs
from helpers.train.hooks import CheckpointHook, ExportHook, Hook, LogHook, SampleHook, read_log
from helpers.train.loop import Trainer
from helpers.train.stops import TrainingStopped

pytestmark = pytest.mark.slow

EVAL_STEPS = 20  # sampling steps for the measured images (DPM-Solver), as notebook 04 draws them in tiny


def unet_inputs(unet, embeds, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(embeds)
    x = torch.randn(n, unet.config.in_channels, 8, 8, generator=g)
    hidden = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 500, 900][:n]), dict(encoder_hidden_states=hidden,
                                                     added_cond_kwargs={"image_embeds": [embeds[:, None, :]]})


class LossProbe(Hook):
    """Fixed-noise loss on a fixed batch before and after training (no sampling noise, unlike the training loss)."""

    def __init__(self, batch):
        self.batch = batch

    def on_start(self, t):
        self.before = t.fixed_noise_loss(self.batch)

    def on_end(self, t):
        self.after = t.fixed_noise_loss(self.batch)


def images_array(images):
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny preset trained to the end once (≈ 30 s), its exports in run/final."""
    root = tmp_path_factory.mktemp("ip")
    preset = presets.get_preset("prior_sd15", "tiny")
    c = load_components(preset)
    ds = data.prepare_dataset(preset, c, root=root / "storage")
    es = embedding_set(preset, records=ds.records, root=root / "storage")
    train = EmbeddedDataset(ds, es)
    probe = LossProbe(default_collate([train[i] for i in range(0, len(train), len(train) // 16)][:16]))
    trainer = Trainer(preset, c, train, root / "run",
                      hooks=[LogHook(), CheckpointHook(), ExportHook(), SampleHook(show=False), probe])
    trainer.run()
    c.unet.eval()
    return dict(preset=preset, c=c, es=es, trainer=trainer, probe=probe, run=root / "run",
                final=root / "run" / "final")


@pytest.fixture(scope="module")
def pipe(trained):
    """A stock pipeline with the finished run loaded through RunSet (as notebooks 05 and 07 load it)."""
    p = sampling.load_pipeline(trained["preset"], "cpu", progress=False)
    board = runs.RunSet(p)
    name = board.add(trained["run"])
    return p, board, name


def test_training_leaves_the_cached_vae_and_text_encoder_idle_as_the_plan_assumes(trained):
    # on a T4 the idle modules leave the GPU (0.39 GiB for SD1.5's VAE and text encoder): the plan counts them gone
    trainer = trained["trainer"]
    idle = trainer.idle_modules()
    assert trainer.dataset.latents is not None and trainer.dataset.text is not None
    assert any(m is trainer.c.vae for m in idle) and all(any(m is e for m in idle) for e in trainer.c.text_encoders)


# ---------------------------------------------------------------- the adapter's layout

def test_a_fresh_adapter_has_the_layout_stock_diffusers_reads():
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained(tiny.resolve("tiny/sd15"), subfolder="unet")
    width, dim = unet.config.cross_attention_dim, 48  # any CLIP width: read from the config, never fixed
    state = fresh_ip_adapter(unet, dim)
    assert state["image_proj"]["proj.weight"].shape == (NUM_TOKENS * width, dim)
    assert state["image_proj"]["norm.weight"].shape == (width,)
    cross = [n for n in unet.attn_processors if "attn2" in n]
    assert sorted(state["ip_adapter"]) == sorted(f"{2 * i + 1}.to_{kv}_ip.weight" for i in range(len(cross))
                                                 for kv in "kv")
    for i, name in enumerate(cross):  # initialised from the layer's own to_k / to_v (tutorial_train.py)
        attn = unet.get_submodule(name.removesuffix(".processor"))
        assert torch.equal(state["ip_adapter"][f"{2 * i + 1}.to_k_ip.weight"], attn.to_k.weight)
        assert torch.equal(state["ip_adapter"][f"{2 * i + 1}.to_v_ip.weight"], attn.to_v.weight)


def test_condition_dropout_is_5_percent_each_and_keyed_by_sample():
    draws = SampleDraws(42, 0, range(20_000))
    image, text = condition_drops(draws)
    only_image, only_text, both = (image & ~text).float().mean(), (text & ~image).float().mean(), (image & text)
    for rate in (only_image, only_text, both.float().mean()):
        assert abs(float(rate) - 0.05) < 0.006
    again = condition_drops(SampleDraws(42, 0, [7, 3, 19_999]))
    assert torch.equal(again[0], image[[7, 3, 19_999]]) and torch.equal(again[1], text[[7, 3, 19_999]])


# ---------------------------------------------------------------- training

def test_training_learns_and_only_the_adapter_and_lora_train(trained):
    trainer, probe = trained["trainer"], trained["probe"]
    print(f"ip_adapter tiny: fixed-noise loss {probe.before:.4f} → {probe.after:.4f} over {trainer.state.step} steps")
    assert probe.after < 0.97 * probe.before
    names = set(trainer.trainable)
    assert all("lora_" in n or ".processor.to_" in n or ".encoder_hid_proj." in n for n in names), names
    assert any("to_k_ip" in n for n in names) and any("lora_B" in n for n in names)
    assert all(p.dtype == torch.float32 for p in trainer.trainable.values())
    sampled = trained["run"] / "samples" / f"step-{trained['preset'].sample_every:06d}.png"
    assert sampled.is_file()  # sampled from retrieved true embeddings


class Disconnect(Hook):
    def __init__(self, at):
        self.at = at

    def on_step(self, t):
        if t.state.step == self.at:
            raise KeyboardInterrupt("the Stop button")  # the Trainer stops with a sentence, checkpoints whole


def test_a_disconnected_run_resumes_to_the_same_weights(tmp_path):
    preset = presets.get_preset("prior_sd15", "tiny", max_steps=6, checkpoint_every=2, sample_every=0,
                                max_train_images=40)

    def run(folder, hooks):
        c = load_components(preset)  # a fresh session: everything loaded again
        ds = data.prepare_dataset(preset, c, root=tmp_path / "storage")
        es = embedding_set(preset, records=ds.records, root=tmp_path / "storage")
        trainer = Trainer(preset, c, EmbeddedDataset(ds, es), folder, hooks=hooks)
        trainer.run()
        return trainer

    reference = run(tmp_path / "a", [LogHook(), CheckpointHook()])
    with pytest.raises(TrainingStopped, match="stopped by you .* step-000004, is whole"):
        run(tmp_path / "b", [LogHook(), CheckpointHook(), Disconnect(at=5)])
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["step-000002", "step-000004"]
    resumed = run(tmp_path / "b", [LogHook(), CheckpointHook()])
    assert resumed.state.resumed_from == "step-000004"
    assert reference.trainable.keys() == resumed.trainable.keys()
    for name, p in reference.trainable.items():
        assert torch.equal(p, resumed.trainable[name]), name
    ref_opt, res_opt = reference.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in ref_opt["state"]:
        for key, value in ref_opt["state"][k].items():
            assert torch.equal(value, res_opt["state"][k][key]), (k, key)
    losses = [[r["loss"] for r in read_log(tmp_path / f) if "loss" in r] for f in ("a", "b")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


# ---------------------------------------------------------------- export → fresh stock pipeline

def test_the_export_reproduces_the_trained_unet_in_a_fresh_stock_pipeline(trained):
    from diffusers import StableDiffusionPipeline
    c, es, final = trained["c"], trained["es"], trained["final"]
    stock = StableDiffusionPipeline.from_pretrained(tiny.resolve(trained["preset"].model), safety_checker=None)
    x, t, kw = unet_inputs(stock.unet, es.image_embeds[:3])
    with torch.no_grad():
        base = stock.unet(x, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
        stock.load_ip_adapter(str(final), subfolder="", weight_name=IP_ADAPTER_FILE, image_encoder_folder=None)
        stock.load_lora_weights(str(final), weight_name="pytorch_lora_weights.safetensors")
        loaded = stock.unet(x, t, **kw).sample
        again = stock.unet(x, t, **kw).sample
        own = c.unet(x, t, **kw).sample
    delta = float((loaded - own).abs().max())
    print(f"round trip through a fresh stock pipeline: max |Δ| = {delta:.2e} "
          f"(output scale {float(own.abs().mean()):.2f})")
    assert delta <= 1e-5
    assert torch.equal(loaded, again)  # deterministic: the exported LoRA carries no inference dropout
    assert not torch.allclose(base, own, atol=1e-3)  # and the adapter changed something

    # a stock pipeline call with ip_adapter_image_embeds = what helpers.sampling.generate draws
    emb = es.image_embeds[es.held_out_indices[:1]]
    ours = sampling.generate(stock, ["a photo"], [3], steps=4, image_embeds=emb)
    stock_image = stock(["a photo"], generator=[torch.Generator().manual_seed(3)], num_inference_steps=4,
                        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(emb), emb])[:, None]]).images
    assert np.array_equal(images_array(ours), images_array(stock_image))


def test_round_trip_delta_is_zero_for_the_export_and_not_for_another_adapter(trained, tmp_path):
    import shutil

    from safetensors.torch import save_file
    c, es, final = trained["c"], trained["es"], trained["final"]
    delta = round_trip_delta(c.unet, final, trained["preset"].model, es.image_embeds[:3])
    assert delta <= 1e-5
    other = tmp_path / "final"
    shutil.copytree(final, other)  # the same LoRA, an untrained adapter: the check must see it
    fresh = fresh_ip_adapter(c.unet, es.dim)
    save_file({f"{group}.{k}": v.contiguous() for group, part in fresh.items() for k, v in part.items()},
              str(other / IP_ADAPTER_FILE))
    assert round_trip_delta(c.unet, other, trained["preset"].model, es.image_embeds[:3]) > 100 * max(delta, 1e-6)


# ---------------------------------------------------------------- generation through helpers.sampling and RunSet

def test_generation_takes_one_embedding_per_image_and_refuses_what_it_cannot_use(trained, pipe):
    p, board, name = pipe
    es = trained["es"]
    e = es.image_embeds[es.held_out_indices[:2]]
    board.use(name)
    mixed = sampling.generate(p, ["", "", "a photo"], [0, 1, 0], steps=3, image_embeds=e[[0, 0, 1]])
    alone = [sampling.generate(p, [""], [0], steps=3, image_embeds=e[[0]]),
             sampling.generate(p, [""], [1], steps=3, image_embeds=e[[0]]),
             sampling.generate(p, ["a photo"], [0], steps=3, image_embeds=e[[1]])]
    # batches never mix images: each equals the image drawn alone (up to float summation order in a batch)
    assert np.abs(images_array(mixed) - images_array([a[0] for a in alone])).max() <= 2
    assert np.abs(images_array(alone[0]) - images_array(alone[2])).mean() > 10  # other embedding and prompt
    with pytest.raises(ValueError, match="pass image_embeds"):
        sampling.generate(p, ["a photo"], [0], steps=2)
    with pytest.raises(ValueError, match=r"\(1, 64\)"):
        sampling.generate(p, ["a photo"], [0], steps=2, image_embeds=torch.zeros(1, 32))
    board.use(None)  # the base model: no adapter left in the UNet
    assert sampling.ip_adapter_width(p) is None
    sampling.generate(p, ["a photo"], [0], steps=2)
    with pytest.raises(ValueError, match="no IP-Adapter"):
        sampling.generate(p, ["a photo"], [0], steps=2, image_embeds=e[:1])
    with pytest.raises(ValueError, match="conditioned on CLIP image embeddings"):
        board.variant(name)
    with pytest.raises(ValueError, match="takes no image embeddings"):
        board.variant(None, image_embeds=caption_only(es.dim))


def test_runset_switches_base_and_adapter_run_in_one_pipeline(trained, pipe, tmp_path):
    p, board, name = pipe
    c, es = trained["c"], trained["es"]
    x, t, kw = unet_inputs(p.unet, es.image_embeds[:2])
    from diffusers import UNet2DConditionModel
    stock = UNet2DConditionModel.from_pretrained(tiny.resolve(trained["preset"].model), subfolder="unet")
    with torch.no_grad():
        base = stock(x, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample
        board.use(name)
        torch.testing.assert_close(p.unet(x, t, **kw).sample, c.unet(x, t, **kw).sample, atol=1e-5, rtol=1e-4)
        board.use(None)
        torch.testing.assert_close(p.unet(x, t, encoder_hidden_states=kw["encoder_hidden_states"]).sample, base)
    assert board.needs_image_embeds(name) and not board.needs_image_embeds(None)
    held = es.held_out_indices[:2]
    variants = [board.variant(None), board.variant(name, image_embeds=fixed_embeddings(es.image_embeds[held])),
                board.variant(name, label="caption only", image_embeds=caption_only(es.dim))]
    manifests = sampling.generate_variants(p, variants, [es.captions[i] for i in held], [0, 0], tmp_path, steps=2)
    assert len(manifests) == 3 and all(len(sampling.read_manifest(m)) == 2 for m in manifests.values())
    assert "load_ip_adapter" in runs.load_snippet(trained["run"])


# ---------------------------------------------------------------- what the result must show

def test_images_from_true_held_out_embeddings_keep_their_class(trained, pipe):
    p, board, name = pipe
    es = trained["es"]
    held = es.held_out_indices
    labels = es.labels[held]
    seeds = [0, 1]
    board.use(name)
    images = sampling.generate(p, [""] * len(held) * len(seeds), [s for _ in held for s in seeds],
                               steps=EVAL_STEPS, image_embeds=es.image_embeds[held].repeat_interleave(len(seeds), 0))
    adapter = float((es.zero_shot(images) == labels.repeat_interleave(len(seeds))).float().mean())
    board.use(None)
    captions = [f"a photo of a {es.class_names[int(y)]}" for y in labels]
    base_images = sampling.generate(p, [c for c in captions for _ in seeds], [s for _ in held for s in seeds],
                                    steps=EVAL_STEPS)
    base = float((es.zero_shot(base_images) == labels.repeat_interleave(len(seeds))).float().mean())
    print(f"classified as the source class: adapter from the true image embedding (empty prompt) {adapter:.0%}, "
          f"base SD1.5 from the class caption {base:.0%} ({len(images)} images each)")
    assert adapter >= 0.70


def test_variations_stay_closer_to_their_own_source(trained, pipe):
    p, board, name = pipe
    es = trained["es"]
    held = es.held_out_indices
    sources = torch.stack([held[es.labels[held] == c][0] for c in range(6)])  # one held-out image of 6 classes
    seeds = [0, 1, 2]
    board.use(name)
    variations = sampling.generate(p, [""] * len(sources) * len(seeds), seeds * len(sources), steps=EVAL_STEPS,
                                   image_embeds=es.image_embeds[sources].repeat_interleave(len(seeds), 0))
    sims = cosine_matrix(es.encode_images(variations), es.image_embeds[sources])  # (variations, sources)
    own = torch.arange(len(sources)).repeat_interleave(len(seeds))
    own_sim = sims[torch.arange(len(own)), own]
    closer = [bool(own_sim[i] > sims[i, j]) for i in range(len(own)) for j in range(len(sources)) if j != own[i]]
    rate = sum(closer) / len(closer)
    print(f"variations closer to their own source than to another: {rate:.0%} of {len(closer)} pairs")
    assert rate >= 0.80


def test_the_t4_plan_counts_the_adapter_and_fits():
    from helpers.plan import memory
    from helpers.plan.meta import full_size_unet, lora_parameter_count
    preset = presets.get_preset("prior_sd15", "t4")
    plan = memory.estimate_vram(preset)
    unet = full_size_unet("sd15")
    adapter = sum(v.numel() for part in fresh_ip_adapter(unet, 768).values() for v in part.values())
    lora = lora_parameter_count(unet, 8, ("to_q", "to_k", "to_v"))
    print(f"prior_sd15 t4 plan: adapter {adapter / 1e6:.1f}M + LoRA {lora / 1e6:.2f}M trainable; "
          f"phases {({k: round(v, 2) for k, v in plan['phases_gib'].items()})}; peak {plan['total_gib']:.2f} "
          f"+ band {plan['band_gib']:.2f}, spare {plan['spare_gib']:.2f} GiB of {memory_model.T4_USABLE_GIB}")
    assert plan["trainable_params"] == adapter + lora
    assert plan["parts_gib"]["clip"] > 0.7 and plan["clip_encode_gib"] > 0  # the embedding cache phase
    assert plan["phases_gib"]["caching"] > plan["parts_gib"]["clip"] + plan["parts_gib"]["unet"]
    assert plan["spare_gib"] >= 1.0 and plan["verdict"] == "fits"
    with pytest.raises(ValueError, match="clip_model"):
        IPAdapter(presets.get_preset("prior_sd15", "tiny", clip_model=None))
