"""Notebook 05's explorer and A/B study in a real browser: Voilà runs the notebook (explore-only, tiny profile) on
127.0.0.1 against a storage folder holding one tiny finished run made here; headless Chromium from Debian's packages,
driven by Selenium through the system chromedriver (nothing is downloaded), types a prompt, moves the LoRA slider,
ticks a model, clicks Generate, waits for the images, saves, then answers study pairs and checks the CSV.
Screenshots go to outputs/browser/. Skipped, with the reason, only where Chromium or its driver is missing."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from tiny_runs import train_tiny_run

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "05_evaluation.ipynb"
SHOTS = ROOT / "outputs" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
LORA = "sd15_xattn_cifar10-lora-tiny"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (Path(CHROMIUM).is_file() and Path(DRIVER).is_file()),
                                 reason="Chromium or chromedriver is missing: apt-get install chromium chromium-driver")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    env = dict(os.environ, LAB_STORAGE=str(storage), LAB_PROFILE="tiny", LAB_EXPLORE_ONLY="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_STORAGE", str(storage))
        train_tiny_run(storage, "lora", steps=8)  # enough steps for the LoRA image to differ visibly
    port = free_port()
    SHOTS.mkdir(parents=True, exist_ok=True)
    log = open(SHOTS / "voila.log", "w")  # kept beside the screenshots: what the server and kernel said
    server = subprocess.Popen([sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}",
                               "--Voila.ip=127.0.0.1", "--VoilaConfiguration.show_tracebacks=True"],
                              cwd=NOTEBOOK.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:  # any HTTP answer means the server listens (this path itself is refused)
                urllib.request.urlopen(url + "favicon.ico", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Voilà did not start: {Path(log.name).read_text()[-2000:]}")
                time.sleep(0.5)
        yield url, storage
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,2400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)  # no driver download
    try:
        yield driver
    finally:
        driver.quit()


def one(driver, css: str, timeout: float = 90):
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(ec.visibility_of_element_located(("css selector", css)))


def clickable(driver, css: str, timeout: float = 60):
    """Wait until the button is enabled: the kernel enables answer buttons just after it updates the counter."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(ec.element_to_be_clickable(("css selector", css)))


def wait_until(driver, check, timeout: float = 90, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: check(d), message=what)


def type_into(element, text: str) -> None:
    from selenium.webdriver.common.keys import Keys
    element.send_keys(Keys.CONTROL, "a")
    element.send_keys(Keys.DELETE)
    element.send_keys(text, Keys.TAB)  # TAB: blur, so number and text widgets send their value to the kernel


def test_explorer_and_study_in_headless_chromium(served, browser):
    try:
        drive(browser, *served)
    except Exception:
        browser.save_screenshot(str(SHOTS / "failure.png"))  # what the page showed when it failed
        raise


def drive(browser, url: str, storage: Path) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select
    start = time.monotonic()
    browser.get(url)
    generate = one(browser, "button.lab-generate", timeout=120)  # Voilà ran the notebook and rendered the widgets

    # the explorer: prompt, LoRA slider, a second family, Generate
    type_into(one(browser, ".lab-prompt textarea"), "a photo of a frog")
    handle = one(browser, ".lab-scale .noUi-handle")
    for _ in range(4):
        handle.send_keys(Keys.ARROW_LEFT)  # 1.00 → 0.80 in steps of 0.05
    wait_until(browser, lambda d: d.find_element("css selector", ".lab-scale .widget-readout").text.strip() in
               ("0.80", "0.8"), 20, "the LoRA readout did not move to 0.80")
    sdxl = next(box for box in browser.find_elements("css selector", ".lab-model")
                if box.text.strip() == "SDXL base")
    sdxl.find_element("css selector", "input").click()
    generate.click()
    wait_until(browser, lambda d: len(d.find_elements("css selector", ".lab-gallery .lab-image")) == 3 and all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) > 0
        for img in d.find_elements("css selector", ".lab-gallery .lab-image")), 90, "no images appeared")
    captions = [c.text for c in browser.find_elements("css selector", ".lab-gallery .lab-caption")]
    assert [c.splitlines()[0] for c in captions] == ["SD1.5 base", "sd15 xattn cifar10 lora", "SDXL base"]
    assert all("CLIP" in c for c in captions), captions
    # size 0: the run at its training size, the SD1.5 base beside it paired there, the SDXL base alone at its own
    # size (the tiny SDXL UNet's sample size × the VAE's scale); each enlarged to at least 192 px for the screen
    from helpers.studio.catalog import own_size
    from helpers.core.presets import get_preset
    sdxl = get_preset("sdxl_lora_naruto_256", "tiny")
    drawn = [int(re.search(r"· (\d+) px ·", c).group(1)) for c in captions]
    assert drawn == [64, 64, own_size(sdxl.model, sdxl.vae)], captions
    widths = [browser.execute_script("return arguments[0].naturalWidth", img)
              for img in browser.find_elements("css selector", ".lab-gallery .lab-image")]
    assert widths == [size * -(-192 // size) for size in drawn]
    clickable(browser, "button.lab-save").click()
    wait_until(browser, lambda d: "saved" in d.find_element("css selector", ".lab-message").text, 30, "no save")
    saved = list((storage / "runs" / LORA / "explorer").glob("*.json"))
    assert len(saved) == 1 and '"scale": 0.8' in saved[0].read_text()  # the slider's value reached the kernel
    explorer = browser.find_element("css selector", ".lab-explorer")
    browser.execute_script("arguments[0].scrollIntoView()", explorer)
    explorer.screenshot(str(SHOTS / "explorer.png"))

    # a bad size: a sentence under the buttons, no traceback
    type_into(one(browser, ".lab-size input"), "100")
    clickable(browser, "button.lab-generate").click()
    wait_until(browser, lambda d: "multiple of 64" in d.find_element("css selector", ".lab-message").text, 30,
               "no message for a bad size")
    assert "Traceback" not in browser.page_source

    # the blind A/B study: three pairs drawn now, two answered
    Select(one(browser, ".lab-prompt-set select")).select_by_visible_text("cifar train")
    type_into(one(browser, ".lab-prompts input"), "3")
    type_into(one(browser, ".lab-seeds input"), "1")
    type_into(one(browser, ".lab-rater input"), "browser test")
    clickable(browser, "button.lab-start").click()
    wait_until(browser, lambda d: "0 of 3" in d.find_element("css selector", ".lab-counter").text, 60,
               "the study did not start")
    for k, choice in enumerate(("left", "right"), 1):
        clickable(browser, f"button.lab-answer-{choice}").click()
        wait_until(browser, lambda d: f"{k} of 3" in d.find_element("css selector", ".lab-counter").text, 30,
                   f"answer {k} was not counted")
    # the rater's name reaches the kernel on Enter, not per keystroke (each new name sends that rater's two images)
    from selenium.webdriver.common.keys import Keys
    one(browser, ".lab-rater input").send_keys(" 2")
    time.sleep(3)
    assert one(browser, ".lab-counter").text.endswith("answered by browser test"), "a keystroke reached the kernel"
    one(browser, ".lab-rater input").send_keys(Keys.ENTER)
    wait_until(browser, lambda d: "0 of 3 answered by browser test 2" in d.find_element("css selector",
                                                                                       ".lab-counter").text, 30,
               "Enter did not switch the rater")
    study = browser.find_element("css selector", ".lab-study")
    browser.execute_script("arguments[0].scrollIntoView()", study)
    study.screenshot(str(SHOTS / "study.png"))
    browser.save_screenshot(str(SHOTS / "page.png"))
    answers = pd.read_csv(storage / "runs" / LORA / "study" / f"ab_SD1.5_base_vs_{LORA}.csv")
    assert list(answers["choice"]) == ["left", "right"] and set(answers["rater"]) == {"browser test"}
    assert answers.loc[0, "winner"] == answers.loc[0, "left"] and answers.loc[1, "winner"] == answers.loc[1, "right"]
    assert set(answers["left"]) | set(answers["right"]) <= {"SD1.5 base", LORA}
    assert answers["prompt_set"].eq("cifar train").all()
    print(f"browser part: {time.monotonic() - start:.1f} s")
