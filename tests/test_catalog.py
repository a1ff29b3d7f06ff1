"""helpers.catalog on tiny finished runs: what exists and what is missing, one pipeline per family with runs
switched, validated requests with a sentence per mistake, images with CLIP scores, out-of-memory advice, stops."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_runs import train_tiny_ip_adapter_run, train_tiny_run

from helpers.core import files, paths, presets
from helpers.evaluation.clip_score import ClipScorer
from helpers.generate import sampling
from helpers.methods import runs
from helpers.studio.catalog import Catalog
from helpers.studio.drawing import Interrupted, Request, RequestError, TimeLimit, advice_for
from helpers.studio.engine import Engine

CROSSATTN, LORA = "sd15_xattn_cifar10-crossattn-tiny", "sd15_xattn_cifar10-lora-tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        for method in ("crossattn", "lora"):
            train_tiny_run(root, method)
    # an interrupted 03 run (checkpoints, no final/), a finished run of a method this engine cannot load, and a
    # finished run of the other profile
    (root / "runs" / "sdxl_lora_naruto_256-lora-tiny" / "checkpoints" / "step-000010").mkdir(parents=True)
    for name, change in (("prior_sd15-prior-tiny", dict(method="prior")),
                         ("prior_sd15-ip_adapter-tiny", dict(method="ip_adapter", name="prior_sd15")),
                         ("sd15_xattn_cifar10-lora-t4", dict(profile="t4"))):
        final = root / "runs" / name / "final"
        final.mkdir(parents=True)
        info = json.loads((root / "runs" / LORA / "final" / runs.RUN_FILE).read_text())
        info["preset"].update(change)
        (final / runs.RUN_FILE).write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def engine(root):
    return Engine(Catalog.scan("tiny", root), device="cpu")


def _array(image):
    return np.asarray(image).astype(np.int16)


def test_scan_lists_bases_and_finished_runs_by_family_and_says_what_is_missing(root):
    catalog = Catalog.scan("tiny", root)
    assert catalog.names() == ["SD1.5 base", "SDXL base", CROSSATTN, LORA]
    assert {f: [e.name for e in es] for f, es in catalog.by_family().items()} == {
        "sd15": ["SD1.5 base", CROSSATTN, LORA], "sdxl": ["SDXL base"]}
    assert [e.kind for e in catalog.runs()] == ["crossattn", "lora"]
    assert catalog.get(LORA).label == "sd15 xattn cifar10 lora"
    why = {m.name: m.why for m in catalog.missing}
    assert set(why) == {"sdxl_lora_naruto_256-lora-tiny", "sdxl_lora_naruto_1024-lora-tiny", "prior_sd15-prior-tiny",
                        "prior_sd15-ip_adapter-tiny"}
    assert why["prior_sd15-ip_adapter-tiny"].startswith("finished, but it draws from a CLIP image embedding")
    assert next(m.notebook for m in catalog.missing if m.name == "prior_sd15-ip_adapter-tiny") == "04"
    assert why["sdxl_lora_naruto_256-lora-tiny"].startswith("unfinished (1 checkpoint, no final/)")
    assert why["sdxl_lora_naruto_1024-lora-tiny"] == "not trained yet: run notebook 03 (RESOLUTION = 1024; spans " \
                                                     "sessions on a T4)"
    assert "method 'prior' cannot be loaded here" in why["prior_sd15-prior-tiny"]
    assert "sd15_xattn_cifar10-lora-t4" not in catalog.names() + list(why)  # another profile's run
    assert "2 finished run(s)" in catalog.note()
    with pytest.raises(RequestError, match="unknown model 'nope'; choose one of"):
        catalog.get("nope")


def test_an_empty_storage_offers_the_base_models_and_says_how_to_get_runs(tmp_path):
    catalog = Catalog.scan("tiny", tmp_path)
    assert catalog.names() == ["SD1.5 base", "SDXL base"] and not catalog.runs()
    assert catalog.note().startswith("No finished runs under") and "notebook 02 or 03" in catalog.note()
    assert len(catalog.missing) == 5


@pytest.mark.parametrize("change, message", [
    (dict(prompt="   "), "Type a prompt first"),
    (dict(models=()), "Tick at least one model"),
    (dict(models=("SD1.5 base", "SD1.5 base")), "each model once"),
    (dict(models=("SD1.5 base", "nope")), "unknown model 'nope'"),
    (dict(size=100), r"image size 100 is not allowed for sd15: use a multiple of 64 px \(e.g. 128\)"),
    (dict(models=("SDXL base", "SD1.5 base"), size=96), "not allowed for sd15"),  # SDXL alone would take 96
    (dict(size=4096), "above 2048 px"),
    (dict(size="64"), "not allowed"),
    (dict(steps=0), r"steps 0 is out of range: use 1 to 150"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(guidance=-1), "guidance -1 is out of range"),
    (dict(seed=-3), "seed -3 is out of range"),
    (dict(scale=float("nan")), "scale must be a number"),
    (dict(count=5), "count 5 is out of range: use 1 to 4"),
    (dict(strength=0.0, init_image=Image.new("RGB", (8, 8))), "strength 0.0 is out of range"),
    (dict(init_image="/no/such/file.png"), "cannot read the init image"),
])
def test_bad_requests_get_one_sentence_before_anything_loads(root, change, message):
    engine = Engine(Catalog.scan("tiny", root), device="cpu")
    request = Request(**{**dict(prompt="a photo of a cat", models=("SD1.5 base",), steps=2), **change})
    with pytest.raises(RequestError, match=message):
        engine.generate(request)
    assert engine.loaded() == [] and engine._scorer == "auto"  # nothing was loaded for a bad request


def test_check_normalises_numbers_from_a_form(tmp_path):
    engine = Engine(Catalog.scan("tiny", tmp_path), device="cpu")
    checked = engine.check(Request(" a cat ", ["SD1.5 base"], seed=3.0, steps=4.0, size=128.0, count=2.0))
    assert (checked.prompt, checked.models, checked.seed, checked.steps, checked.size, checked.count) == (
        "a cat", ("SD1.5 base",), 3, 4, 128, 2)
    assert isinstance(checked.seed, int) and isinstance(checked.guidance, float)


def test_generate_switches_runs_in_one_pipeline_same_noise_and_scores(engine, root):
    request = Request("a photo of a cat", ("SD1.5 base", CROSSATTN, LORA), seed=5, steps=3, count=2)
    seen = []
    result = engine.generate(request, progress=lambda fraction, text: seen.append((fraction, text)))
    assert [(d.model, d.seed, d.size) for d in result.images] == [
        (m, s, 64) for m in request.models for s in (5, 6)]
    assert engine.loaded() == ["SD1.5 base"]  # one pipeline for the family, both runs inside it
    assert seen[-1][0] == pytest.approx(1.0) and all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    assert seen[0][1].startswith("SD1.5 base: step 1")
    # the base images are exactly what the stock pipeline draws for (prompt, seed); runs differ from it
    fresh = sampling.load_pipeline(presets.get_preset("sd15_xattn_cifar10", "tiny"), "cpu", progress=False)
    reference = sampling.generate(fresh, [request.prompt] * 2, [5, 6], steps=3)
    by_model = result.by_model()
    for drawn, ref in zip(by_model["SD1.5 base"], reference):
        assert np.abs(_array(drawn.image) - _array(ref)).max() <= 2
    for run in (CROSSATTN, LORA):
        assert np.abs(_array(by_model[run][0].image) - _array(reference[0])).mean() > 1.0
    # CLIP scores are the profile scorer's on these very images
    scores = ClipScorer.from_profile("tiny", device="cpu").score([d.image for d in result.images],
                                                                  [request.prompt] * 6)
    np.testing.assert_allclose([d.clip_score for d in result.images], scores, atol=1e-4)
    assert result.clip_model == engine.scorer.name
    # scale 0 is the base model again, for both kinds of run
    zero = engine.generate(Request("a photo of a cat", (CROSSATTN, LORA), seed=5, steps=3, scale=0.0))
    for drawn in zero.images:
        assert np.abs(_array(drawn.image) - _array(reference[0])).max() <= 2


def test_families_keep_their_own_pipelines_and_sizes(engine):
    result = engine.generate(Request("a green frog", ("SDXL base", "SD1.5 base"), steps=2))
    assert [(d.model, d.size, d.image.size) for d in result.images] == [("SDXL base", 64, (64, 64)),
                                                                        ("SD1.5 base", 64, (64, 64))]  # their own
    assert sorted(engine.loaded()) == ["SD1.5 base", "SDXL base"]  # a CPU holds both
    same = engine.generate(Request("a green frog", ("SDXL base", "SD1.5 base"), steps=2, size=128))
    assert {d.image.size for d in same.images} == {(128, 128)}
    assert engine.pipeline("SDXL base") is engine.pipeline("SDXL base")
    variant = engine.variant(LORA, 0.5)
    assert variant.name == f"{LORA} ×0.5" and variant.image_embeds is None


def test_negative_prompt_and_img2img_go_through_the_same_path(engine):
    base = Request("a photo of a cat", ("SD1.5 base",), seed=1, steps=3)
    plain = engine.generate(base).images[0].image
    negative = engine.generate(Request(**{**base.__dict__, "negative_prompt": "a photo of a frog"})).images[0].image
    assert np.abs(_array(plain) - _array(negative)).mean() > 1.0
    init = Image.new("RGB", (80, 80), (20, 200, 40))
    light = engine.generate(Request(**{**base.__dict__, "init_image": init, "strength": 0.2, "steps": 5}))
    heavy = engine.generate(Request(**{**base.__dict__, "init_image": init, "strength": 1.0, "steps": 5}))
    green = _array(init.resize((64, 64)))
    assert np.abs(_array(light.images[0].image) - green).mean() < np.abs(_array(heavy.images[0].image) - green).mean()
    assert light.settings()["request"]["init_image"] == "given"


def test_should_stop_interrupts_between_steps_and_the_engine_still_works(engine):
    with pytest.raises(Interrupted, match="stopped while drawing with SD1.5 base"):
        engine.generate(Request("a photo of a ship", ("SD1.5 base", LORA), steps=10), should_stop=lambda: True)
    assert len(engine.generate(Request("a photo of a ship", ("SD1.5 base",), steps=2)).images) == 1


def test_a_time_limit_stops_between_steps_says_so_and_the_engine_still_works(engine, monkeypatch):
    monkeypatch.setattr(Engine, "_refuse_if_too_slow", lambda *args: None)  # a machine slower than its estimate
    request = Request("a photo of a ship", ("SD1.5 base", LORA), steps=40, count=2)
    engine.generate(Request("a photo of a ship", ("SD1.5 base",), steps=1))  # loaded: the limit meets the steps
    seen = []
    with pytest.raises(TimeLimit, match=r"took longer than the 0.01 s limit and was stopped while drawing with "
                                        r"SD1.5 base \(after 1 of \d+ steps\): ask for fewer steps") as caught:
        engine.generate(request, progress=lambda fraction, text: (seen.append(text), time.sleep(0.02)),
                        time_limit=0.01)
    assert isinstance(caught.value, Interrupted) and seen == ["SD1.5 base: step 1"]  # the second model never ran
    assert len(engine.generate(request, time_limit=600).images) == 4  # a limit it meets changes nothing


def test_out_of_memory_becomes_advice_other_errors_stay_errors(engine):
    def oom(fraction, text):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(RequestError, match="Out of GPU memory at 128 px. Draw a smaller size") as caught:
        engine.generate(Request("a photo of a ship", ("SD1.5 base",), steps=2, size=128), progress=oom)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)
    assert advice_for(RuntimeError("CUDA error: out of memory")) is not None
    assert advice_for(RuntimeError("shape mismatch")) is None

    def broken(fraction, text):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        engine.generate(Request("a photo of a ship", ("SD1.5 base",), steps=2), progress=broken)


def test_save_writes_a_sheet_and_the_settings(engine, root, tmp_path):
    request = Request("a photo of a cat", ("SD1.5 base", LORA), seed=2, steps=2, count=2)
    result = engine.generate(request)
    assert engine.save_folder(request) == root / "runs" / LORA / "explorer"
    assert engine.save_folder(Request("x", ("SD1.5 base",))) == root / "explorer"
    sheet, settings = result.save(tmp_path, "cat")
    assert sheet == tmp_path / "cat_1.png" and Image.open(sheet).size[0] > 2 * 128
    saved = json.loads(settings.read_text())
    assert saved["request"]["models"] == ["SD1.5 base", LORA] and saved["request"]["seed"] == 2
    assert [(i["model"], i["seed"]) for i in saved["images"]] == [(m, s) for m in request.models for s in (2, 3)]
    assert saved["images"][0]["clip_score"] == pytest.approx(result.images[0].clip_score)


# ---------------------------------------------------------------- one bad run folder (issue 27, item 1)

def _relabelled(good: Path, folder: Path, **preset_values) -> Path:
    """A copy of the finished run `good` whose run.json says `preset_values`, its manifest rewritten to match (as a
    run exported by another version, or a folder put together by hand, would be)."""
    shutil.copytree(good, folder)

    def fill(tmp):
        for path in (good / "final").iterdir():
            if path.name not in (files.MANIFEST, runs.RUN_FILE):
                shutil.copy(path, tmp / path.name)
        info = json.loads((good / "final" / runs.RUN_FILE).read_text())
        info["preset"].update(preset_values)
        (tmp / runs.RUN_FILE).write_text(json.dumps(info))
    files.write_folder(folder / "final", fill)
    return folder


@pytest.fixture(scope="module")
def broken_root(root, tmp_path_factory):
    """The finished LoRA run, and beside it one folder per way a run folder goes bad."""
    broken = tmp_path_factory.mktemp("broken-storage")
    good = root / "runs" / LORA
    shutil.copytree(good, broken / "runs" / LORA)

    def copy(name: str) -> Path:
        shutil.copytree(good, broken / "runs" / name)
        return broken / "runs" / name / "final"

    copy("garbage-run-json").joinpath(runs.RUN_FILE).write_bytes(b"\x00\x93 not json {")
    for name, change in (("lacks-a-field", lambda p: p.pop("resolution")),
                         ("refused-value", lambda p: p.update(batch_size=0))):
        final = copy(name)
        info = json.loads((final / runs.RUN_FILE).read_text())
        change(info["preset"])
        (final / runs.RUN_FILE).write_text(json.dumps(info))
    weights = copy("truncated-weights") / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for path in copy("empty-final").iterdir():
        path.unlink()
    _relabelled(good, broken / "runs" / "other-method", method="crossattn")
    sdxl = presets.get_preset("sdxl_lora_naruto_1024", "tiny")  # the SDXL base's model and VAE
    _relabelled(good, broken / "runs" / "other-family", family="sdxl", model=sdxl.model, vae=sdxl.vae)
    return broken


def test_a_bad_run_folder_is_listed_with_its_folder_and_reason_and_the_scan_goes_on(broken_root):
    """A garbage run.json, a missing field or a value today's rules refuse made the scan raise (the app did not
    start); truncated weights, an empty final/ or a run.json of another method were listed as drawable."""
    catalog = Catalog.scan("tiny", broken_root)
    assert catalog.names() == ["SD1.5 base", "SDXL base", "other-family", LORA]  # its manifest holds: a load decides
    why = {m.name: m.why for m in catalog.missing}
    final = {name: broken_root / "runs" / name / "final" for name in why}
    for name, reason in (("garbage-run-json", f"{final['garbage-run-json'] / 'run.json'} cannot be read"),
                         ("lacks-a-field", "lacks the preset fields ['resolution']"),
                         ("refused-value", "values today's rules refuse: batch_size=0: a whole number ≥ 1"),
                         ("truncated-weights", "pytorch_lora_weights.safetensors does not match its checksum"),
                         ("empty-final", f"{final['empty-final']} has no run.json"),
                         ("other-method", "crossattn_weights.safetensors is missing (its run.json says a "
                                          "'crossattn' run on sd15)")):
        assert why[name].startswith("not drawable: ") and reason in why[name], (name, why[name])
        assert str(final[name]) in why[name], why[name]  # the folder, named


@pytest.mark.slow  # loads both families' pipelines twice (≈ 5 s)
def test_a_run_that_does_not_load_never_takes_its_base_model_down(broken_root, root):
    """A run whose files do not fit its run.json (an SD1.5 LoRA labelled SDXL) made "SDXL base" and every SDXL run
    undrawable; now it alone is refused, with its folder, and the base draws as if it were not there."""
    engine = Engine(Catalog.scan("tiny", broken_root), scorer=None, device="cpu")
    request = Request("a photo of a cat", ("SDXL base",), steps=2, size=64)
    with pytest.warns(UserWarning, match="other-family is left out: .*other-family/final does not load into the "
                                         "sdxl pipeline"):
        drawn = engine.generate(request).images[0].image
    clean = Engine(Catalog.scan("tiny", root), scorer=None, device="cpu").generate(request).images[0].image
    assert np.array_equal(_array(drawn), _array(clean))  # nothing of the failed load stayed in the pipeline
    with pytest.raises(RequestError, match="other-family cannot be drawn: .*size mismatch"):
        engine.generate(dataclasses.replace(request, models=("other-family",)))
    both = engine.generate(Request("a photo of a cat", ("SD1.5 base", LORA), steps=2, size=64))
    assert [d.model for d in both.images] == ["SD1.5 base", LORA]


# ---------------------------------------------------------------- an image-conditioned run (notebook 04)

@pytest.fixture(scope="module")
def conditioned_root(tmp_path_factory):
    """A finished tiny image-conditioned run in runs/ and nothing that turns a prompt into its embedding yet."""
    root = tmp_path_factory.mktemp("storage04")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(root))
        run = train_tiny_ip_adapter_run(root)
    return root, run


def test_an_image_conditioned_run_draws_from_a_prompt_once_a_prior_of_its_clip_exists(conditioned_root):
    from helpers.data.embeddings import embedding_set
    from helpers.prior.priors import load_prior, train_prior
    root, run = conditioned_root
    catalog = Catalog.scan("tiny", root)
    assert run.name == "prior_sd15-ip_adapter-tiny" and not catalog.runs()
    assert "not drawable from a prompt until a prior on tiny/clip" in {m.name: m.why for m in catalog.missing}[run.name]
    # a finished prior (the tiny MLP preset, ≈ 2 s) in priors/, and one of another CLIP's space (its run.json says so)
    preset = presets.get_preset("prior_mlp_cifar10", "tiny")
    es = embedding_set(preset, root=root, device="cpu")
    _, trainer = train_prior(preset, es, root / "priors" / paths.run_name(preset), device="cpu")
    prior = trainer.run_dir
    other = root / "priors" / "prior_mlp_l14-mlp_prior-tiny" / "final"
    other.mkdir(parents=True)
    runs.write_run_info(other, dataclasses.replace(preset, name="prior_mlp_l14", clip_model=presets.CLIP_L14))
    catalog = Catalog.scan("tiny", root)
    name = f"{run.name} + {prior.name}"
    assert [e.name for e in catalog.runs()] == [name]  # paired with the prior of its CLIP only
    entry = catalog.get(name)
    assert (entry.kind, entry.folder, entry.source, entry.label) == (
        "ip_adapter", run, prior, "ip adapter + mlp prior")
    assert not {run.name, prior.name, other.parent.name} & {m.name for m in catalog.missing}  # priors draw nothing

    engine = Engine(catalog, scorer=None, device="cpu")
    seen = []
    prompt = "a photo of a cat"
    result = engine.generate(Request(prompt, (name, "SD1.5 base"), seed=3, steps=3, count=2),
                             progress=lambda fraction, text: seen.append(fraction))
    assert [(d.model, d.seed) for d in result.images] == [(name, 3), (name, 4), ("SD1.5 base", 3), ("SD1.5 base", 4)]
    assert seen[-1] == pytest.approx(1.0)  # the MLP gives both seeds one embedding: one call, counted as one
    # the images are the run drawn directly with the prior's prediction from the prompt's CLIP text embedding
    expected = load_prior(prior).predict(es.encode_text([prompt]))
    torch.testing.assert_close(engine.variant(name).image_embeds([prompt], [0]), expected)
    pipe, board = engine._runset(entry)
    board.use(run.name)
    direct = sampling.generate(pipe, [prompt] * 2, [3, 4], steps=3, image_embeds=expected.expand(2, -1))
    zeros = sampling.generate(pipe, [prompt] * 2, [3, 4], steps=3, image_embeds=torch.zeros(2, es.dim))
    for drawn, ref, caption_only in zip(result.images, direct, zeros):
        assert np.abs(_array(drawn.image) - _array(ref)).max() <= 2
        assert np.abs(_array(drawn.image) - _array(caption_only)).mean() > 1.0  # the embedding is used
