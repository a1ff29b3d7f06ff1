"""The instrument that measures the T4 plan (scripts/gpu_proof.py, helpers.proof).

Without CUDA: the CPU smoke (the real configs with every width ÷ 8, in the T4-dtype mode) runs every t4 preset × phase
through the same functions as a GPU run and writes the same report, with the planner's numbers beside the measured ones.
With CUDA (`-m gpu`; skipped elsewhere): the GPU run's own checks, on full-size random-weight models under a T4's
memory cap, and the tiny world end to end with 8-bit AdamW.
"""
from __future__ import annotations

import json

import pytest
import torch

from helpers.core.presets import PRESETS, get_preset
import helpers.proof as proof
from helpers.plan.model import T4_USABLE_GIB
from helpers.plan.inference import evaluation_plan
from helpers.plan.model import CUDA_OVERHEAD_GIB, PRIOR_METHODS, prior_training_plan, training_plan
from helpers.plan.timing import training_estimate

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_proof.py)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The CPU smoke, once for the module: (its JSON report, its markdown, the seconds it took)."""
    import time
    out, work = tmp_path_factory.mktemp("proof-out"), tmp_path_factory.mktemp("proof-work")
    t0 = time.perf_counter()
    path = proof.run_proof(out, work, smoke=True)
    seconds = time.perf_counter() - t0
    return json.loads(path.read_text()), path.with_suffix(".md").read_text(), seconds


def planner_numbers(name: str) -> dict[str, float]:
    """The plan of each phase, asked of the planner directly (not through helpers.proof)."""
    p = get_preset(name, "t4")
    clip = next(ph for ph in evaluation_plan({}, {}, {}, {}, pickscore=False) if ph.name == "clip").gib
    if p.method in PRIOR_METHODS:
        plan = prior_training_plan(p)
        loading = plan["adapter_loaded_gib"] - plan["parts_gib"]["clip"]  # the CLIP loads while caching
    else:
        plan = training_plan(p)
        loading = plan["weights_gib"] - plan["parts_gib"]["clip"] + CUDA_OVERHEAD_GIB
    ph = plan["phases_gib"]
    return {"loading": loading, "caching": ph["caching"], "training": ph["training"], "checkpoint": ph["training"],
            "sampling": ph["sampling"], "scoring": clip, "checkpoint_mb": plan["checkpoint_mb"]}


def test_the_smoke_measures_every_t4_preset_and_phase_beside_the_plan(smoke):
    report, _, seconds = smoke
    assert report["kind"] == "cpu smoke" and report["device"] == "cpu"
    assert report["settings"]["divisor"] == proof.SMOKE_DIVISOR == 8
    rows = {(r["preset"], r["phase"]): r for r in report["rows"]}
    assert set(rows) == {(name, phase) for name in PRESETS for phase in proof.PHASES}
    assert [r["preset"] for r in report["rows"]][0] == proof.FIRST == "sdxl_lora_naruto_1024"  # measured first
    for key, r in rows.items():
        assert r["status"] == "measured", (key, r["status"])
        assert r["planned_gib"] > 0 and r["measured_gib"] > 0, key
        assert r["seconds"] >= 0 and r["what"], key
    print(f"CPU smoke: {seconds:.0f} s")


def test_the_planned_numbers_are_the_planners(smoke):
    report, _, _ = smoke
    rows = {(r["preset"], r["phase"]): r for r in report["rows"]}
    for name in PRESETS:
        plan = planner_numbers(name)
        for phase in proof.PHASES:
            assert rows[name, phase]["planned_gib"] == pytest.approx(plan[phase], rel=1e-9), (name, phase)
        assert rows[name, "checkpoint"]["planned_mb"] == pytest.approx(plan["checkpoint_mb"], rel=1e-9)
        assert rows[name, "checkpoint"]["measured_mb"] > 0
        if get_preset(name, "t4").method not in PRIOR_METHODS:
            per_step = training_estimate(get_preset(name, "t4"))["seconds_per_step"]
            assert rows[name, "training"]["planned_per_unit"] == pytest.approx(per_step, rel=1e-9)
        for phase in ("caching", "training", "sampling", "scoring"):
            r = rows[name, phase]
            assert r["unit"] and r["planned_per_unit"] > 0 and r["measured_per_unit"] is not None, (name, phase)


def test_the_smoke_report_reads_as_a_cpu_smoke_with_planned_beside_measured(smoke):
    report, md, _ = smoke
    assert md.startswith("# The T4 plan measured: CPU smoke") and "**CPU smoke**" in md
    table = [line for line in md.splitlines() if line.startswith("| ") and " | GiB" not in line]
    for r in report["rows"]:
        line = next(x for x in table if x.startswith(f"| {r['preset']} | {r['phase']} | {r['status']} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(r["planned_gib"], abs=0.006)
        assert float(cells[4]) == pytest.approx(r["measured_gib"], abs=0.006)


def test_the_smoke_shrinks_widths_not_depths():
    full, small = proof.proof_configs(), proof.proof_configs(8, proof.SMOKE_TOKENS, proof.SMOKE_CLIP_IMAGE)
    for family in full["unet"]:
        f, s = full["unet"][family], small["unet"][family]
        assert s["block_out_channels"] == tuple(w // 8 for w in f["block_out_channels"])
        assert s.get("transformer_layers_per_block") == f.get("transformer_layers_per_block")
        assert s["layers_per_block"] == f["layers_per_block"]
        assert s["cross_attention_dim"] * 8 == f["cross_attention_dim"]
    for tower in ("text", "text_2", "vision"):
        assert small[tower]["hidden_size"] * 8 == full[tower]["hidden_size"]
        assert small[tower]["num_hidden_layers"] == full[tower]["num_hidden_layers"]
    assert full["tokens"] == 77 and full["vision"]["image_size"] == 224  # a GPU run builds the real ones
    sdxl = small["unet"]["sdxl"]  # the pooled text + 6 time ids still add up after the division
    assert sdxl["projection_class_embeddings_input_dim"] == (small["text_2"]["projection_dim"]
                                                             + 6 * sdxl["addition_time_embed_dim"])
    assert sdxl["cross_attention_dim"] == small["text"]["hidden_size"] + small["text_2"]["hidden_size"]


def test_a_failed_phase_is_a_row_and_the_later_ones_say_not_reached(tmp_path):
    rows = []
    world = proof.World(torch.device("cpu"), tmp_path, smoke=True)
    p = proof.PresetProof(proof.FIRST, world, proof.Meter(world.device), rows.append,
                          plan={ph: {"gib": 1.0} for ph in proof.PHASES})

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    p.measure("loading", lambda: {"what": "ok"})
    p.measure("caching", out_of_memory)
    p.measure("training", lambda: pytest.fail("a phase after an out-of-memory one must not run"))
    assert [r["status"] for r in rows] == ["measured", "out of memory under the cap",
                                           "not reached (caching ran out of memory)"]
    assert rows[1]["measured_gib"] > 0 and rows[1]["planned_gib"] == 1.0


# ---------------------------------------------------------------- on a CUDA GPU (pytest -m gpu)

@pytest.mark.gpu
@needs_cuda
def test_gpu_first_preset_on_full_size_models_under_a_t4_cap(tmp_path):
    path = proof.run_proof(tmp_path / "out", tmp_path / "work", only=[proof.FIRST], tiny_world=False)
    report = json.loads(path.read_text())
    assert report["kind"] == "gpu" and report["settings"]["cap_gib"] < T4_USABLE_GIB
    rows = [r for r in report["rows"] if r["preset"] == proof.FIRST]
    assert [r["phase"] for r in rows] == list(proof.PHASES)
    for r in rows:  # measured, or out of memory under the cap, written as measured: never missing
        assert r["status"] == "measured" or r["status"].startswith(("out of memory", "not reached")), r
        if r["status"] == "measured":
            assert r["measured_gib"] <= report["settings"]["cap_gib"] + r["context_gib"] + 0.01


@pytest.mark.gpu
@needs_cuda
def test_gpu_tiny_world_end_to_end_in_fp16_with_8bit_adamw(tmp_path):
    pytest.importorskip("bitsandbytes")
    result = proof.tiny_world_proof(tmp_path, torch.device("cuda"))
    assert result["optimizer"].startswith("bitsandbytes") and result["fp16"] and result["grad_scaler"]
    assert result["resumed_from"] and result["resume_passed"], result
    assert result["scores_finite"], result


@pytest.mark.slow
def test_tiny_world_end_to_end_in_the_t4_dtype_mode_on_a_cpu(tmp_path, monkeypatch):
    """The GPU run's part 2 through the same function on a CPU (torch AdamW: 8-bit AdamW needs CUDA): a run killed
    after its checkpoint resumes to the uninterrupted run's weights, draws and scores."""
    monkeypatch.setenv("LAB_T4_DTYPES", "1")
    result = proof.tiny_world_proof(tmp_path, torch.device("cpu"))
    assert result["fp16"] and result["grad_scaler"] and result["unet_dtype"] == "torch.float16"
    assert result["resumed_from"] == "step-000003" and result["identical_weights"], result
    assert result["scores_finite"] and len(result["clip_scores"]) == 4
