"""helpers.explorer driven through its widgets, as a person would (set values, click, read what is shown), on a
tiny finished run. CI runs this file twice: with the project's ipywidgets (8.x) and with Colab's 7.7.1."""
from __future__ import annotations

import io

import ipywidgets
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny_runs import storage_with_run

from helpers.studio.catalog import Catalog
from helpers.studio.engine import Engine
from helpers.studio.explorer import EVALUATED, Explorer, StudyPanel

LORA = "sd15_xattn_cifar10-lora-tiny"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return storage_with_run(tmp_path_factory, "lora")


@pytest.fixture(scope="module")
def engine(root):
    return Engine(Catalog.scan("tiny", root), device="cpu")


def shown(image_widget) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_widget.value)).convert("RGB")).astype(np.int16)


def test_widgets_are_the_builtin_ones_of_this_ipywidgets(engine):
    print("ipywidgets", ipywidgets.__version__)
    ui = Explorer(engine)
    assert set(ui.checkboxes) == {"SD1.5 base", "SDXL base", LORA}
    assert ui.checkboxes["SD1.5 base"].value and ui.checkboxes[LORA].value and not ui.checkboxes["SDXL base"].value
    assert "lab-generate" in ui.generate._dom_classes and "lab-model" in ui.checkboxes[LORA]._dom_classes
    assert ui.save.disabled and not ui.gallery.children


def test_generate_shows_one_card_per_ticked_model_with_its_clip_score(engine):
    ui = Explorer(engine)
    ui.prompt.value, ui.seed.value, ui.steps.value = "a photo of a frog", 4, 3
    ui.checkboxes["SDXL base"].value = True
    ui.generate.click()
    assert ui.error == "" and ui.progress.value == 1.0 and ui.progress.bar_style == "success"
    cards = ui.gallery.children
    assert len(cards) == 3 and [d.model for d in ui.result.images] == ["SD1.5 base", LORA, "SDXL base"]
    for card, drawn, px in zip(cards, ui.result.images, (192, 192, 192)):
        image, caption = card.children
        assert shown(image).shape == (px, px, 3)  # 64 px (both tiny bases' own size) ×3 on screen (NEAREST)
        assert f"CLIP {drawn.clip_score:.1f}" in caption.value and f"seed 4" in caption.value
    small = np.asarray(ui.result.images[0].image).astype(np.int16)
    assert np.array_equal(shown(cards[0].children[0])[::3, ::3], small)  # the pixels drawn, not a re-render
    assert "3 image(s)" in ui.status.value and not ui.save.disabled


def test_the_lora_slider_reaches_the_pipeline(engine):
    ui = Explorer(engine)
    ui.prompt.value, ui.steps.value = "a photo of a ship", 3
    ui.scale.value = 0.0
    ui.generate.click()
    base, lora_at_zero = (np.asarray(d.image).astype(np.int16) for d in ui.result.images)
    assert np.abs(base - lora_at_zero).max() <= 2  # LoRA at 0 = the base model
    ui.scale.value = 2.0
    ui.generate.click()
    assert ui.result.request.scale == 2.0
    assert np.abs(np.asarray(ui.result.images[1].image).astype(np.int16) - base).mean() > 1.0


@pytest.mark.parametrize("setup, message", [
    (dict(prompt=""), "Type a prompt first"),
    (dict(size=100), "image size 100 is not allowed for sd15: use a multiple of 64 px"),
    (dict(untick=True), "Tick at least one model"),
    (dict(seed=-1), "seed -1 is out of range"),
])
def test_bad_input_is_a_sentence_in_the_ui_not_a_traceback(engine, setup, message):
    ui = Explorer(engine)
    ui.prompt.value = setup.get("prompt", "a photo of a cat")
    ui.size.value = setup.get("size", 0)
    ui.seed.value = setup.get("seed", 0)
    if setup.get("untick"):
        for box in ui.checkboxes.values():
            box.value = False
    ui.generate.click()  # must not raise
    assert message in ui.error and message.split(":")[0] in ui.message.value
    assert ui.progress.bar_style == "danger" and not ui.gallery.children and not ui.generate.disabled


def test_save_writes_the_sheet_and_settings_into_the_run_folder(engine, root):
    ui = Explorer(engine)
    ui.save.click()
    assert "Generate first" in ui.error
    ui.prompt.value, ui.steps.value = "a photo of a horse", 2
    ui.generate.click()
    ui.save.click()
    sheet, settings = ui.saved
    assert sheet.parent == root / "runs" / LORA / "explorer" and sheet.is_file() and settings.is_file()
    assert "saved" in ui.message.value


def test_without_runs_the_explorer_says_so_and_offers_the_bases(tmp_path):
    ui = Explorer(Engine(Catalog.scan("tiny", tmp_path), device="cpu"))
    assert "No finished runs" in ui.widget.children[0].value
    assert [n for n, b in ui.checkboxes.items() if b.value] == ["SD1.5 base"]


def test_the_study_through_its_widgets(engine, root):
    panel = StudyPanel(engine, seed=3)
    assert (panel.a.value, panel.b.value) == ("SD1.5 base", LORA)
    assert panel.rater.continuous_update is False  # the name (and two images back) on Enter, not per keystroke
    panel.prompt_set.value, panel.prompts.value, panel.seeds.value = "cifar train", 2, 2
    panel.start.click()
    assert "Type your name" in panel.message.value and panel.study is None
    panel.rater.value = "ada"
    panel.start.click()
    assert panel.study is not None and "0 of 4" in panel.counter.value
    assert not panel.buttons["left"].disabled
    seen = []
    for choice in ("left", "right", "tie"):
        current = panel.shown
        assert shown(panel.left_image).shape == (192, 192, 3)
        left_file = np.asarray(Image.open(current.pair.images[current.left]).convert("RGB")).astype(np.int16)
        assert np.array_equal(shown(panel.left_image)[::3, ::3], left_file)  # the left image IS that variant's
        seen.append((current.pair.key, current.left, current.right, choice))
        panel.buttons[choice].click()
    assert "3 of 4" in panel.counter.value
    saved = pd.read_csv(panel.study.csv_path)
    assert panel.study.csv_path.parent == root / "runs" / LORA / "study"
    assert list(zip(saved["pair"], saved["left"], saved["right"], saved["choice"])) == seen
    expected = [left if c == "left" else right if c == "right" else "tie" for _, left, right, c in seen]
    assert list(saved["winner"]) == expected and set(saved["rater"]) == {"ada"}
    # another rater, then ada again: ada continues at her fourth pair
    panel.rater.value = "bob"
    assert "0 of 4" in panel.counter.value
    panel.rater.value = "ada"
    panel.buttons["left"].click()
    assert "4 of 4" in panel.counter.value and panel.buttons["left"].disabled
    assert "win rate" in panel.results.value and "SD1.5 base wins" in panel.results.value


def test_the_study_reuses_evaluation_images_and_the_demo_keeps_its_own_csv(engine, root, tmp_path):
    images = {}
    for variant, colour in (("SD1.5 base", 40), (LORA, 200)):
        for seed in (0, 1):
            path = tmp_path / f"{variant}-{seed}.png"
            Image.new("RGB", (64, 64), (colour, seed * 50, 0)).save(path)
            images[variant, seed] = path
    scores = pd.DataFrame([dict(image_path=str(images[v, s]), prompt_set="generic", split="generic",
                                prompt="a red house", seed=s, variant=v, clip_model="clip", score=10.0 + s + (v == LORA))
                           for v in ("SD1.5 base", LORA) for s in (0, 1)])
    panel = StudyPanel(engine, scores=scores)
    assert panel.prompt_set.options[:2] == (EVALUATED, "generic")
    panel.scripted_demo(count=2, seed=0)
    assert panel.study.csv_path.name.endswith("-scripted-demo.csv") and len(panel.study.pairs) == 2
    saved = pd.read_csv(panel.study.csv_path)
    assert len(saved) == 2 and saved["rater"].str.contains("not a person").all()
    assert "win rate" in panel.results.value


def test_a_broken_answers_file_is_a_sentence_in_the_study_panel_not_an_exception(engine, root, tmp_path):
    """Issue 27, item 6: an answers file of another layout, or with garbage lines, made Start raise out of the
    widget (the study could not start); now the panel names the file and line, and keeps the good answers."""
    from helpers.studio.study import study_csv
    images = {}
    for variant, colour in (("SD1.5 base", 40), (LORA, 200)):
        for seed in (0, 1):
            images[variant, seed] = tmp_path / f"{variant}-{seed}.png"
            Image.new("RGB", (64, 64), (colour, seed * 50, 0)).save(images[variant, seed])
    scores = pd.DataFrame([dict(image_path=str(images[v, s]), prompt_set="generic", split="generic",
                                prompt="a red house", seed=s, variant=v, clip_model="clip", score=10.0 + s)
                           for v in ("SD1.5 base", LORA) for s in (0, 1)])
    path = study_csv(engine, "SD1.5 base", LORA)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage")
        panel = StudyPanel(engine, scores=scores)
        panel.rater.value = "ada"
        panel.start.click()  # raised before: the exception escaped the widget
        assert f"{path}, line 1: the header is not the A/B study" in panel.message.value.replace("&#x27;", "'")
        assert panel.shown is None and panel.buttons["left"].disabled
        path.unlink()
        panel.start.click()
        panel.buttons["left"].click()
        with open(path, "ab") as f:
            f.write(b"\x00\xff garbage line\r\n")
        with pytest.warns(UserWarning, match="line 3: it holds bytes that are not text"):
            panel.buttons["right"].click()
        assert "line 3: it holds bytes that are not text" in panel.message.value
        assert "2 of 2" in panel.counter.value and list(panel.study.answers()["choice"]) == ["left", "right"]
    finally:
        path.unlink(missing_ok=True)
