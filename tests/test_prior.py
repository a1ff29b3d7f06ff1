"""The priors (helpers.methods.priors, helpers.prior) on the tiny world: both learn text → image
embedding on the tiny CLIP's embedding pairs through the Trainer, the diffusion prior's samples differ across seeds
while the MLP's do not, a shuffled caption gives a far worse match, a killed run resumes exactly, the export loads
in stock diffusers, the T4 plan fits, bad input is refused up front, and text → prior → embedding → SD1.5 + adapter
draws as the true embeddings do (beating base SD1.5 waits for a tiny base that draws the classes)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers.core.presets import PRESETS, get_preset
from helpers.data.embeddings import embedding_set
from helpers.evaluation.stats import paired_difference
from helpers.methods.priors import Ema, PriorPairs, make_network, to_prior_space
from helpers.plan import calibration as memory_calibration
from helpers.plan import model as memory_model
from helpers.prior.metrics import COLUMNS, prior_metrics, shuffled_order
from helpers.prior.priors import load_prior, train_prior
from helpers.train import checkpoint
from helpers.train.hooks import CheckpointHook, ExportHook, LogHook, read_log

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("series")]

DRIVER = Path(__file__).with_name("prior_driver.py")
PRIORS = ("prior_mlp_cifar10", "prior_diffusion_cifar10")


@pytest.fixture(scope="module")
def storage(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior-storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        yield root


@pytest.fixture(scope="module")
def embeddings(storage):
    return embedding_set(get_preset(PRIORS[0], "tiny"), device="cpu")


@pytest.fixture(scope="module")
def trained(storage, embeddings, session_runs):
    """Both tiny priors as their presets train them, once per test session (notebook 04's, when the series ran on
    this worker first): name → (Prior, Trainer). The Trainer resumes the finished run: nothing trains again."""
    out = {}
    for name in PRIORS:
        preset = get_preset(name, "tiny")
        folder = session_runs.trained(preset)
        prior, trainer = train_prior(preset, embeddings, folder, device="cpu")
        prior.name = name
        out[name] = (prior, trainer)
    return out


def test_prior_runs_live_apart_from_the_pipeline_runs(trained, session_runs):
    """A prior draws no image: its runs are under priors/, where RunSet does not look (the catalog finds them there
    as prompt → image-embedding sources, tests/test_catalog.py)."""
    from helpers.methods.runs import finished_runs
    from helpers.prior.priors import finished_priors
    root = session_runs.root
    assert {t.run_dir.name for _, t in trained.values()} <= {p.name for p in finished_priors(root)}
    assert all(t.run_dir.parent.name == "priors" for _, t in trained.values())
    assert not set(finished_runs(root)) & set(finished_priors(root))


@pytest.fixture(scope="module")
def metrics(trained, embeddings):
    table = prior_metrics([prior for prior, _ in trained.values()], embeddings)
    print(table)
    return table


# ---------------------------------------------------------------- presets

def test_prior_presets_train_on_the_adapters_embedding_pairs():
    """Same data, caption seed and CLIP as the image-conditioned SD1.5: one embedding cache, one held-out split."""
    for profile in ("t4", "tiny"):
        adapter = get_preset("prior_sd15", profile)
        for name in PRIORS:
            p = get_preset(name, profile)
            assert (p.data_source, p.data_ref, p.max_train_images, p.seed, p.clip_model) == (
                adapter.data_source, adapter.data_ref, adapter.max_train_images, adapter.seed, adapter.clip_model)
    d = get_preset("prior_diffusion_cifar10", "t4")
    assert (d.prior_timesteps, d.prior_text_tokens, d.cond_drop_prob) == (1000, 77, 0.1) and d.ema_decay > 0
    assert get_preset("prior_mlp_cifar10", "t4").ema_decay == 0  # the reference MLP: plain weights
    with pytest.raises(ValueError, match="prior_heads"):
        get_preset("prior_diffusion_cifar10", "tiny", prior_heads=3)
    with pytest.raises(ValueError, match="prior_sample_steps"):
        get_preset("prior_diffusion_cifar10", "tiny", prior_sample_steps=2000)
    assert set(PRIORS) <= set(PRESETS)


# ---------------------------------------------------------------- learning and the DALLE2-pytorch metrics

def test_both_priors_learn_and_predict_the_image_better_than_the_text_does(trained, metrics):
    for name, (prior, trainer) in trained.items():
        losses = [r["loss"] for r in read_log(trainer.run_dir) if "loss" in r]  # the whole run, however trained
        first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
        print(f"{name}: loss {first:.3f} → {last:.3f}")
        assert last < 0.2 * first, name
        # the prediction is closer to the caption's true image than the caption's own text embedding is
        assert metrics.mean(name, "cos(pred, image)") > metrics.mean(name, "cos(text, image)") + 0.03, name


def test_shuffled_caption_cosine_stays_well_below_the_matched_one(metrics):
    for name in PRIORS:
        matched, shuffled = metrics.values[name]["cos(pred, text)"], metrics.values[name]["cos(text, shuffled)"]
        print(f"{name}: matched {matched.mean():.3f}, shuffled {shuffled.mean():.3f}")
        assert shuffled.mean() < 0.5 * matched.mean(), name
        assert paired_difference(matched.numpy(), shuffled.numpy())["low"] > 0.3, name


def test_diffusion_predictions_differ_across_seeds_while_the_mlps_do_not(metrics):
    mlp = metrics.values["prior_mlp_cifar10"]["seed spread"]
    diffusion = metrics.values["prior_diffusion_cifar10"]["seed spread"]
    true = metrics.values["true images"]["seed spread"]
    print(f"seed spread: MLP {mlp.max():.2e} (max), diffusion {diffusion.mean():.4f} (min {diffusion.min():.4f}), "
          f"true images {true.mean():.4f}")
    assert mlp.abs().max() < 1e-6  # one answer per caption
    assert diffusion.min() > 1e-4  # every held-out caption gets different embeddings from different seeds
    assert diffusion.mean() > 0.1 * true.mean()  # a visible share of the spread real images of a caption have


def test_prediction_scale_matches_the_clip_image_embeddings(trained, embeddings):
    """The adapter was trained on raw CLIP image embeddings: predictions come at their typical norm."""
    rows = embeddings.held_out_indices[:8]
    typical = embeddings.image_embeds[embeddings.train_indices].norm(dim=-1).mean()
    for prior, _ in trained.values():
        states, masks = embeddings.states_of(rows)
        norms = prior.predict(embeddings.text_embeds[rows], states, masks).norm(dim=-1)
        assert torch.allclose(norms, typical.expand_as(norms), rtol=1e-4)


# ---------------------------------------------------------------- exports, EMA, resume

def test_export_loads_in_stock_diffusers_with_the_ema_weights_and_clip_stats(trained, embeddings):
    from diffusers import DDPMScheduler, PriorTransformer
    prior, trainer = trained["prior_diffusion_cifar10"]
    final = trainer.run_dir / "final"
    stock = PriorTransformer.from_pretrained(final / "prior")
    scheduler = DDPMScheduler.from_pretrained(final / "scheduler")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.prediction_type == "sample"
    typical = embeddings.image_embeds[embeddings.train_indices].norm(dim=-1).mean()
    dim = embeddings.dim
    assert torch.allclose(stock.clip_std, torch.full((1, dim), float(typical) / dim**0.5))  # set, not diffusers' 0
    assert torch.equal(stock.clip_mean, torch.zeros(1, dim))
    # the exported weights are the EMA, not the last step's weights
    ema = trainer.method.extra_state(trainer.c)
    for name, p in stock.named_parameters():
        if name.startswith("clip_"):
            continue
        assert torch.equal(p, ema[f"ema.prior.{name}"].cpu()), name
    live = dict(trainer.c.network.named_parameters())
    assert any(not torch.equal(live[n], p) for n, p in stock.named_parameters() if not n.startswith("clip_"))
    # ... and the stock model gives the loaded prior's output
    rows = embeddings.held_out_indices[:4]
    x = torch.randn(4, dim, generator=torch.Generator().manual_seed(0))
    states, masks = embeddings.states_of(rows)
    tokens = prior.text_tokens
    kwargs = dict(proj_embedding=to_prior_space(embeddings.text_embeds[rows]),
                  encoder_hidden_states=states[:, :tokens], attention_mask=masks[:, :tokens])
    with torch.no_grad():
        a = stock(x, 500, **kwargs).predicted_image_embedding
        b = prior.network(x, 500, **kwargs).predicted_image_embedding
    assert torch.equal(a, b)


def test_ema_follows_diffusers_emamodel():
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    ours, theirs = Ema(dict(net.named_parameters()), 0.95), EMAModel(net.parameters(), decay=0.95)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(30):
        net(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ours.step()
        theirs.step(net.parameters())
    for (name, shadow), reference in zip(ours.shadow.items(), theirs.shadow_params):
        assert torch.allclose(shadow, reference, atol=1e-6), name
    assert int(ours.updates) == theirs.optimization_step == 30


def run_driver(run_dir, storage, *flags):
    proc = subprocess.run([sys.executable, str(DRIVER), str(run_dir), str(storage), *flags],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, -9):
        print(proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.returncode


def newest(run_dir):
    last = checkpoint.checkpoint_dirs(run_dir)[-1]
    return last.name, load_file(str(last / "trainable.safetensors")), torch.load(last / "optimizer.pt",
                                                                                  weights_only=False)


def test_killed_prior_run_resumes_to_the_uninterrupted_one(tmp_path, monkeypatch):
    sys.path.insert(0, str(DRIVER.parent))
    from prior_driver import OVERRIDES
    storage = tmp_path / "storage"
    monkeypatch.setenv("LAB_STORAGE", str(storage))
    preset = get_preset("prior_diffusion_cifar10", "tiny", **OVERRIDES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver's kernels, so the runs are bitwise comparable
    try:
        es = embedding_set(preset, device="cpu")
        reference, resumed = tmp_path / "uninterrupted", tmp_path / "killed"
        hooks = lambda: [LogHook(), CheckpointHook(), ExportHook()]  # noqa: E731
        train_prior(preset, es, reference, hooks=hooks(), device="cpu")
        assert run_driver(resumed, storage, "--kill-after-step", "6") == -9  # last checkpoint: step 4
        assert [p.name for p in checkpoint.checkpoint_dirs(resumed)] == ["step-000004"]
        train_prior(preset, es, resumed, hooks=hooks(), device="cpu")
    finally:
        torch.set_num_threads(threads)
    (name_a, weights_a, opt_a), (name_b, weights_b, opt_b) = newest(reference), newest(resumed)
    assert name_a == name_b == "step-000012"
    assert weights_a.keys() == weights_b.keys() and "ema.updates" in weights_a
    assert int(weights_a["ema.updates"]) == 12
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for k, state in opt_a["state"].items():
        for field, value in state.items():
            assert torch.equal(value, opt_b["state"][k][field]), (k, field)
    losses = [[r["loss"] for r in read_log(run) if "loss" in r] for run in (reference, resumed)]
    assert losses[0] == losses[1] and len(losses[0]) == 12
    a, b = (load_file(str(run / "final" / "prior" / "diffusion_pytorch_model.safetensors"))
            for run in (reference, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_prior_trains_under_the_t4_fp16_rules(embeddings, tmp_path, monkeypatch):
    """LAB_T4_DTYPES=1: fp16 autocast + GradScaler on the CPU, as on a T4. The weights stay fp32, the scaler skips
    only the first steps (its initial scale is too high for the SNR-weighted loss) and the loss still drops."""
    monkeypatch.setenv("LAB_T4_DTYPES", "1")
    preset = get_preset("prior_diffusion_cifar10", "tiny", mixed_precision="fp16", max_steps=60)
    prior, trainer = train_prior(preset, embeddings, tmp_path / "t4-dtypes", hooks=[ExportHook()], device="cpu")
    losses, st = trainer.state.losses, trainer.state
    print(f"{trainer.precision.describe()}: {st.skipped_steps} skipped, loss {losses[0]:.3f} → {losses[-1]:.3f}")
    assert trainer.precision.fp16 and all(p.dtype == torch.float32 for p in trainer.trainable.values())
    assert 0 < st.skipped_steps <= 20 and st.step == 60
    assert sum(losses[-10:]) / 10 < 0.3 * sum(losses[:10]) / 10


# ---------------------------------------------------------------- bad input, refused up front

def test_bad_input_is_refused_with_a_clear_message(trained, embeddings, tmp_path):
    prior = trained["prior_diffusion_cifar10"][0]
    rows = embeddings.held_out_indices[:2]
    with pytest.raises(ValueError, match="token states"):
        prior.predict(embeddings.text_embeds[rows])
    with pytest.raises(ValueError, match="one seed per text"):
        prior.predict(embeddings.text_embeds[rows], *embeddings.states_of(rows), seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="token states"):
        PriorPairs(embeddings, rows, tokens=78)
    with pytest.raises(ValueError, match="no embedding pairs"):
        PriorPairs(embeddings, [], tokens=0)
    with pytest.raises(ValueError, match="not a prior"):
        train_prior(get_preset("prior_sd15", "tiny"), embeddings, tmp_path / "x", device="cpu")
    with pytest.raises(ValueError, match="at least two different captions"):
        shuffled_order(["a cat", "a cat"])
    (tmp_path / "lora" / "final").mkdir(parents=True)
    from helpers.methods.runs import write_run_info
    write_run_info(tmp_path / "lora" / "final", get_preset("sd15_xattn_cifar10", "tiny"))
    with pytest.raises(ValueError, match="not a prior"):
        load_prior(tmp_path / "lora")


def test_networks_have_the_preset_shapes():
    mlp = make_network(get_preset("prior_mlp_cifar10", "t4"), 768)
    assert [m.out_features for m in mlp.net if isinstance(m, torch.nn.Linear)] == [1024, 1024, 768]
    d = make_network(get_preset("prior_diffusion_cifar10", "t4"), 768)
    assert (len(d.transformer_blocks), d.config.num_attention_heads * d.config.attention_head_dim) == (6, 512)
    assert d.positional_embedding.shape[1] == 77 + 4
    assert set(COLUMNS) >= {"cos(text, image)", "cos(pred, image)", "cos(pred, text)", "cos(text, shuffled)"}


def test_predictions_go_through_the_network_in_planned_batches_with_the_same_results():
    from helpers.methods.priors import noise_scheduler, set_clip_stats
    from helpers.prior import priors as prior_eval
    preset = get_preset("prior_diffusion_cifar10", "tiny", prior_sample_steps=2)
    torch.manual_seed(0)
    net = make_network(preset, 32)
    set_clip_stats(net, torch.randn(8, 32))
    prior = prior_eval.Prior(preset.method, net.eval(), noise_scheduler(preset), 2, preset.prior_text_tokens)
    rows = 2 * prior_eval.PREDICT_BATCH + 3  # like notebook 04's 1,000 held-out rows on a T4: more than one call
    tokens = preset.prior_text_tokens
    text, states = torch.randn(rows, 32), torch.randn(rows, tokens, 32)
    masks = torch.ones(rows, tokens, dtype=torch.bool)
    seen = []
    hook = net.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    try:
        batched = prior.predict(text, states, masks, seeds=list(range(rows)))
    finally:
        hook.remove()
    assert max(seen) == prior_eval.PREDICT_BATCH * prior_eval.CANDIDATES  # the plan's batch, never all rows at once
    alone = torch.cat([prior.predict(text[i:i + 1], states[i:i + 1], masks[i:i + 1], seeds=[i]) for i in (0, rows - 1)])
    assert torch.allclose(batched[[0, rows - 1]], alone, atol=1e-5)  # a row's prediction is its own, batch or not


# ---------------------------------------------------------------- the T4 plan

def test_t4_plan_of_both_priors_fits_with_a_gib_to_spare():
    from helpers.plan import memory
    adapter = memory.estimate_vram(get_preset("prior_sd15", "t4"))
    band = memory_calibration.error_band()
    for name in PRIORS:
        preset = get_preset(name, "t4")
        e = memory.estimate_vram(preset)
        print(name, {k: round(v, 2) for k, v in e["phases_gib"].items()}, f"band {e['band_gib']:.2f}",
              f"spare {e['spare_gib']:.2f}", f"params {e['trainable_params']:,}", f"ckpt {e['checkpoint_mb']:.0f} MB")
        for phase in ("training", "sampling"):  # training the prior; generating text → prior → SD1.5 + adapter
            assert e["phases_gib"][phase] * (1 + band) + memory_model.MARGIN_GIB <= memory_model.T4_USABLE_GIB, (name, phase)
        assert e["verdict"] == "fits"
        # the plan counts the network helpers.prior builds, on top of what the adapter keeps loaded
        with torch.device("meta"):
            net = make_network(preset, 768)
        assert e["trainable_params"] == sum(p.numel() for n, p in net.named_parameters() if not n.startswith("clip_"))
        assert e["phases_gib"]["sampling"] > adapter["phases_gib"]["sampling"] - adapter["sampling_activation_gib"]
        assert e["phases_gib"]["caching"] == adapter["phases_gib"]["caching"]  # one embedding cache for both
    small = memory.estimate_vram(get_preset("prior_diffusion_cifar10", "t4"))
    double = memory.estimate_vram(get_preset("prior_diffusion_cifar10", "t4", batch_size=256))
    assert double["activation_gib"] == pytest.approx(2 * small["activation_gib"], rel=0.05)
    assert double["verdict"] == "does not fit"  # why the preset trains 128 pairs per step
    # predicting is planned at its batch: one call over notebook 04's 1,000 held-out rows would need GiBs
    from helpers.plan.live import prior_predict_bytes
    from helpers.prior import priors as prior_eval
    diffusion = get_preset("prior_diffusion_cifar10", "t4")
    planned = memory.estimate_vram(diffusion)["predict_gib"]
    assert planned == pytest.approx(memory_model.INFERENCE_SLACK * prior_predict_bytes(diffusion, 768) / 2**30)
    assert 0.1 < planned < 1.0 and planned * 1000 / prior_eval.PREDICT_BATCH > 3


# ---------------------------------------------------------------- text → prior → embedding → SD1.5 + adapter

EVAL_STEPS = 20  # sampling steps of the compared images (DPM-Solver), as notebook 04 draws them in tiny


@pytest.fixture(scope="module")
def compared(storage, embeddings, trained, session_runs):
    """The tiny adapter preset trained to the end, then base SD1.5, the adapter with each held-out caption's true
    image embedding, and with each prior's prediction, on every distinct held-out caption × 2 seeds, CLIP-scored."""
    from helpers.evaluation.clip_score import ClipScorer
    from helpers.evaluation.compare import evaluate_variants
    from helpers.generate import sampling
    from helpers.methods import runs
    from helpers.prior.images import comparison_variants, held_out_prompts
    preset = get_preset("prior_sd15", "tiny")
    adapter = session_runs.trained(preset)  # notebook 04's adapter, trained once per session
    pipe = sampling.load_pipeline(preset, "cpu", progress=False)
    board = runs.RunSet(pipe)
    name = board.add(adapter)
    base, _, true, *priors = comparison_variants(board, name, embeddings, [p for p, _ in trained.values()])
    prompts = held_out_prompts(embeddings)  # every distinct held-out caption, the classes in turn
    result = evaluate_variants(pipe, [base, true, *priors], [prompts], [0, 1], storage / "eval",
                               ClipScorer.from_profile("tiny", device="cpu"), steps=EVAL_STEPS,
                               size=preset.resolution, pairs="all")
    print(result.table)
    return result.table


def test_prompt_sources_give_the_priors_predictions_and_the_true_embeddings(trained, embeddings):
    from helpers.prior.images import held_out_prompts, prior_image_embeds, prompt_ends, true_image_embeds
    prompts = held_out_prompts(embeddings, 10)
    labels = {embeddings.captions[i]: int(embeddings.labels[i]) for i in embeddings.held_out_indices.tolist()}
    assert sorted(labels[p] for p in prompts.prompts) == list(range(10))  # one caption per class
    truth = true_image_embeds(embeddings)(list(prompts.prompts[:2]), [0, 0])
    rows = [next(i for i in embeddings.held_out_indices.tolist() if embeddings.captions[i] == p)
            for p in prompts.prompts[:2]]
    assert torch.equal(truth, embeddings.image_embeds[rows])
    with pytest.raises(KeyError, match="no held-out image"):
        true_image_embeds(embeddings)(["a photo of a unicorn"], [0])
    diffusion = trained["prior_diffusion_cifar10"][0]
    source = prior_image_embeds(diffusion, embeddings)
    same_prompt = source([prompts.prompts[0]] * 3, [0, 0, 1])
    assert torch.equal(same_prompt[0], same_prompt[1]) and not torch.equal(same_prompt[0], same_prompt[2])
    ends = prompt_ends(diffusion, embeddings, prompts.prompts[0], prompts.prompts[1])
    assert torch.equal(torch.stack([ends.a, ends.b]), source(list(prompts.prompts[:2]), [0, 0]))
    assert ends.picture_a.size == embeddings.records[0].image().size


def test_prior_driven_images_score_like_the_true_embeddings(compared):
    """The priors' embeddings draw as well as the held-out images' own embeddings (the upper bound): whatever the
    adapter makes of an embedding, the prior's prediction loses nothing measurable against the real one (the
    paired CI of prior − true reaches above zero; a wrong embedding would score clearly below)."""
    for prior in PRIORS:
        row = compared.row(prior, paired=True, reference="true image embedding")
        print(f"{prior} − true image embedding: {row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]")
        assert row["high"] > 0, prior


def test_prior_driven_images_beat_base_sd15_on_held_out_captions(compared):
    """Issue 14's bar on the committed tiny world: every distinct held-out caption (25) × 2 seeds = 50 pairs;
    measured +8.7 [+1.7, +14.9] (MLP) and +8.9 [+1.6, +15.6] (diffusion) over base SD1.5."""
    for prior in PRIORS:
        row = compared.row(prior, paired=True, reference="base SD1.5")
        print(f"{prior} − base SD1.5: {row['mean']:+.2f} [{row['low']:+.2f}, {row['high']:+.2f}]")
        assert row["low"] > 0, prior
