"""helpers.timing: every time a user reads comes from the estimator, with its anchors and ranges; a fresh VM's
installs and downloads are part of a notebook's time."""
import json
import re
from pathlib import Path

import pytest

from helpers.core import presets
from helpers.plan import timing

ROOT = Path(__file__).resolve().parents[1]
# a duration written by hand: "about 15 min", "≈ 6.8 h", "~1 min", "an hour"
HAND_WRITTEN = re.compile(r"(?:about|≈|~)\s*[\d.]+\s*(?:h|hours?|min|minutes)\b|\ban hour\b", re.IGNORECASE)


def test_no_notebook_text_or_preset_comment_states_a_time_of_its_own():
    found = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            text = "".join(cell["source"])
            if cell["cell_type"] == "code":  # comments and #@markdown help, not the printed estimates
                text = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
            found += [f"{path.name}: {m.group(0)}" for m in HAND_WRITTEN.finditer(text)]
    for path in (ROOT / "helpers" / "core" / "presets.py", ROOT / "helpers" / "studio" / "app.py"):
        found += [f"{path.name}: {m.group(0)}" for m in HAND_WRITTEN.finditer(path.read_text())]
    assert found == []


def test_the_anchor_setting_gives_the_published_speed_and_both_reports_agree():
    sdxl = presets.get_preset("sdxl_lora_naruto_1024", "t4")
    per_image = timing.training_estimate(sdxl)["seconds_per_step"] / sdxl.images_per_step
    assert per_image == pytest.approx(7.96 / 3)  # the HF notebook: 7.96 s per step of 3 images
    assert per_image == pytest.approx(90 * 60 / (500 * 4), rel=0.05)  # PR #4470: 500 steps × 4 images ≈ 1 h 30 min
    assert timing.training_kind(sdxl) == "anchor" and timing.RANGE["anchor"] == (0.5, 2.0)
    small = presets.get_preset("sd15_xattn_cifar10", "t4")
    assert timing.training_kind(small) == "extrapolated" and timing.RANGE["extrapolated"][1] > 2
    assert timing.span(3600, "anchor") == "≈ 60 min (30 min–2.0 h)"


def test_a_notebook_time_plan_includes_a_fresh_vms_installs_and_downloads():
    sd15 = presets.get_preset("sd15_xattn_cifar10", "t4")
    assert timing.model_download_mb("pickscore") == pytest.approx(3944, rel=0.01)  # PickScore's fp32 files
    assert timing.model_download_mb("sd15") == pytest.approx(2132, rel=0.01)  # SD1.5's fp16 variant files
    seconds, what = timing.setup_seconds(["sd15", "clip"], [sd15.data_ref])
    assert "SD1.5 2.1 GB" in what and "cifar10 0.1 GB" in what
    assert seconds == pytest.approx(timing.INSTALL_SECONDS + (2132 + 1710 + 144) / timing.DOWNLOAD_MB_S, rel=0.01)
    plan = timing.run_time_plan(sd15, drawn=160, steps=25)
    training = timing.training_estimate(sd15)["total_seconds"]
    assert "installs + downloads" in plan and "caches of 10,000 pictures" in plan
    assert f"training 400 steps × 16 images at 256 px: {timing.span(training)}" in plan
    assert "PR #4470" in plan and "±2×" in plan
