"""helpers.studio.app served on 127.0.0.1 with the tiny models and one finished tiny run, called through gradio_client
(and curl): txt2img and img2img equal to what the engine draws, every bad input answered with its sentence, the time
limit, progress, one GPU job at a time under a bounded load with the queue refusing cleanly, the memory plan, and
the server closed at the end."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image
from tiny_runs import train_tiny_run

from helpers.studio.app import LabApp, client_snippet, curl_example, memory_plan, memory_plan_text
from helpers.studio.catalog import Catalog
from helpers.studio.drawing import Request
from helpers.studio.engine import Engine

pytestmark = pytest.mark.slow

LORA = "sd15_xattn_cifar10-lora-tiny"
README = Path(__file__).resolve().parents[1] / "README.md"
QUEUE = 2  # small, so that 4 threads fill it


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage")
    train_tiny_run(root, "lora")
    app = LabApp(Engine(Catalog.scan("tiny", root), device="cpu"), queue_size=QUEUE)
    app.launch(share=False, port=_free_port())  # the other test worker may hold 7860
    try:
        yield app, Client(app.url, verbose=False)
    finally:
        app.close()


@pytest.fixture(scope="module")
def green(tmp_path_factory):
    path = tmp_path_factory.mktemp("uploads") / "green.png"
    Image.new("RGB", (80, 80), (20, 200, 40)).save(path)
    return path


def _array(image) -> np.ndarray:
    return np.asarray(Image.open(image) if isinstance(image, (str, Path)) else image).astype(np.int16)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) != 0


def test_it_serves_the_bases_and_the_finished_run_on_127_0_0_1_only(served):
    app, client = served
    assert app.url.startswith("http://127.0.0.1:") and app.share_url is None
    port = app.blocks.server_port
    assert not _refused("127.0.0.1", port) and _refused("127.0.1.1", port)  # bound to 127.0.0.1, not 0.0.0.0
    status = client.predict(api_name="/status")
    assert status["models"] == {"SD1.5 base": "sd15", "SDXL base": "sdxl", LORA: "sd15"}
    assert "sd15_xattn_cifar10-crossattn-tiny" in status["missing"]
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/txt2img", "/img2img", "/status"}
    assert [p["parameter_name"] for p in endpoints["/img2img"]["parameters"]] == [
        "model", "prompt", "image", "strength", "negative_prompt", "seed", "steps", "guidance", "size", "scale",
        "count"]


def test_txt2img_through_the_client_is_what_the_engine_draws(served):
    app, client = served
    gallery, settings = client.predict(model=LORA, prompt="a photo of a cat", seed=5, steps=3, count=2,
                                       api_name="/txt2img")
    assert [g["caption"].split(" · ")[:2] for g in gallery] == [["sd15 xattn cifar10 lora", "seed 5"],
                                                                ["sd15 xattn cifar10 lora", "seed 6"]]
    assert settings["request"]["models"] == [LORA] and settings["request"]["size"] is None
    direct = app.engine.generate(Request("a photo of a cat", (LORA,), seed=5, steps=3, count=2))
    for served_image, drawn in zip(gallery, direct.images):
        assert Image.open(served_image["image"]).size == (64, 64)
        assert np.abs(_array(served_image["image"]) - _array(drawn.image)).max() <= 2
        assert f"CLIP {drawn.clip_score:.1f}" in served_image["caption"]
    base, _ = client.predict(model="SD1.5 base", prompt="a photo of a cat", seed=5, steps=3, api_name="/txt2img")
    assert np.abs(_array(base[0]["image"]) - _array(gallery[0]["image"])).mean() > 1.0  # the run, not the base


def test_img2img_starts_from_the_upload_on_the_loaded_components(served, green):
    app, client = served
    kwargs = dict(model="SD1.5 base", prompt="a photo of a cat", image=handle_file(str(green)), seed=1, steps=5,
                  api_name="/img2img")
    light, settings = client.predict(strength=0.2, **kwargs)
    heavy, _ = client.predict(strength=1.0, **kwargs)
    target = _array(Image.open(green).resize((64, 64)))
    assert np.abs(_array(light[0]["image"]) - target).mean() < np.abs(_array(heavy[0]["image"]) - target).mean()
    assert settings["request"]["init_image"] == "given" and settings["request"]["strength"] == 0.2
    direct = app.engine.generate(Request("a photo of a cat", ("SD1.5 base",), seed=1, steps=5, strength=0.2,
                                         init_image=green))
    assert np.abs(_array(light[0]["image"]) - _array(direct.images[0].image)).max() <= 2
    pipe = app.engine.pipeline("SD1.5 base")
    img2img = [p for p in app.engine._img2img.values() if p.unet is pipe.unet]
    assert len(img2img) == 1 and all(getattr(img2img[0], m) is getattr(pipe, m)
                                     for m in ("vae", "text_encoder", "tokenizer"))  # no second copy of weights


BAD = [
    ("txt2img", dict(prompt="   "), "Type a prompt first: it is empty."),
    ("txt2img", dict(model="nope"), r"unknown model 'nope'; choose one of \['SD1.5 base', 'SDXL base', "),
    ("txt2img", dict(model=None), r"Choose a model: one of \['SD1.5 base'"),
    ("txt2img", dict(steps=0), r"steps 0 is out of range: use 1 to 150"),
    ("txt2img", dict(steps=151), r"steps 151 is out of range: use 1 to 150"),
    ("txt2img", dict(steps=2.5), r"steps must be a whole number, got 2.5"),
    ("txt2img", dict(size=100), r"image size 100 is not allowed for sd15: use a multiple of 64 px"),
    ("txt2img", dict(size=4096), r"image size 4096 is above 2048 px"),
    ("txt2img", dict(count=5), r"count 5 is out of range: use 1 to 4"),
    ("txt2img", dict(count=0), r"count 0 is out of range: use 1 to 4"),
    ("txt2img", dict(guidance=31), r"guidance 31 is out of range"),
    ("txt2img", dict(seed=-1), r"seed -1 is out of range"),
    ("txt2img", dict(scale=3), r"scale 3 is out of range: use 0.0 to 2.0"),
    ("img2img", dict(image=None), r"Upload an image to start from \(PNG or JPEG\)\."),
    ("img2img", dict(strength=0), r"strength 0 is out of range: use 0.05 to 1.0"),
    ("img2img", dict(image="unreadable"), r"cannot read the init image \(UnidentifiedImageError: .*\); upload a PNG"),
]


@pytest.mark.parametrize("endpoint, change, message", BAD, ids=[f"{e}-{list(c)[0]}" for e, c, _ in BAD])
def test_every_bad_input_gets_its_sentence(served, green, tmp_path, endpoint, change, message):
    app, client = served
    kwargs = dict(model="SD1.5 base", prompt="a photo of a cat", steps=2)
    if endpoint == "img2img":
        kwargs.update(image=handle_file(str(green)), strength=0.5)
    if change.get("image") == "unreadable":
        (tmp_path / "broken.png").write_bytes(b"this is not a PNG")
        change = dict(image=handle_file(str(tmp_path / "broken.png")))
    with pytest.raises(AppError, match=message):
        client.predict(**{**kwargs, **change}, api_name=f"/{endpoint}")
    assert app.jobs == 0


def _post(app, endpoint: str, data: list) -> str:
    """One request as curl makes it (the inputs as a bare list), and the server-sent events that answer it."""
    import json

    import requests
    base = app.url.rstrip("/") + f"/gradio_api/call/{endpoint}"
    event = requests.post(base, data=json.dumps({"data": data}), headers={"Content-Type": "application/json"},
                          timeout=30).json()["event_id"]
    return requests.get(f"{base}/{event}", timeout=120).text


def test_a_wrong_number_of_inputs_and_a_url_without_an_upload_get_their_sentence(served):
    """Issue 27, item 7: 3 inputs instead of 9 got `null`, 10 were drawn as if 9, and an img2img image given as a
    URL without an uploaded file was silently drawn as text to image."""
    app, _ = served
    names = "model, prompt, negative_prompt, seed, steps, guidance, size, scale, count"
    assert f"/txt2img takes 9 inputs ({names}), in this order; this request sent 3." in \
        _post(app, "txt2img", ["SD1.5 base", "a cat", ""])
    assert "/txt2img takes 9 inputs" in _post(app, "txt2img", ["SD1.5 base", "a cat", "", 0, 2, 7.5, 0, 1.0, 1, 5])
    for size in ("nan", "inf"):  # JSON's NaN / Infinity, as a script sends them (gradio_client cannot)
        assert f"image size {size} is not allowed for sd15: use a multiple of 64 px" in \
            _post(app, "txt2img", ["SD1.5 base", "a cat", "", 0, 2, 7.5, float(size), 1.0, 1])
    url_only = {"url": "http://127.0.0.1:9/cat.png", "meta": {"_type": "gradio.FileData"}}
    answer = _post(app, "img2img", ["SD1.5 base", "a cat", url_only, 0.5, "", 0, 2, 7.5, 0, 1.0, 1])
    assert "event: error" in answer and "The image to start from was not uploaded: the request names only the " \
        "URL 'http://127.0.0.1:9/cat.png', no uploaded file" in answer
    assert app.jobs == 0 and "event: complete" in _post(app, "txt2img", ["SD1.5 base", "a cat", "", 0, 2, 7.5, 0,
                                                                         1.0, 1])


def test_a_request_estimated_past_the_limit_on_this_machine_is_refused_at_once_and_a_normal_one_draws(served):
    """Issue 27, item 7: the limit was checked only between denoising steps, and a 2048 px tiny request held the only
    drawing slot for ~600 s against a 30 s limit. Now the engine estimates the request's time here first (steps ×
    seconds per step at its size + the VAE decode, from its measured speed) and refuses it with one sentence."""
    app, client = served
    gallery, _ = client.predict(model="SD1.5 base", prompt="a photo of a ship", steps=2, api_name="/txt2img")
    assert len(gallery) == 1  # a normal request draws (and the engine has measured this machine)
    limit, app.time_limit = app.time_limit, 10.0
    try:
        start = time.perf_counter()
        with pytest.raises(AppError, match=r"This request would take about \S+ (s|min|h) to draw on this machine "
                                           r"\(SD1.5 base: 1 image × 21 steps at 1024 px, .* s a step; measured here: "
                                           r".*\), more than the 10 s limit, so it was not started: it would fit at "
                                           r"\d+ px"):
            client.predict(model="SD1.5 base", prompt="a photo of a ship", steps=20, size=1024, api_name="/txt2img")
        refused = time.perf_counter() - start
        assert refused < 5.0, f"refused after {refused:.1f} s: it drew first"  # well under the limit
        estimate = app.engine.estimate(Request("a photo of a ship", ("SD1.5 base",), steps=20, size=1024))
        assert estimate > 10.0
        gallery, _ = client.predict(model="SD1.5 base", prompt="a photo of a ship", steps=2, api_name="/txt2img")
        assert len(gallery) == 1 and app.jobs == 0
    finally:
        app.time_limit = limit


def test_a_request_past_the_time_limit_is_stopped_between_steps_and_the_app_goes_on(served, monkeypatch):
    app, client = served
    monkeypatch.setattr(Engine, "_refuse_if_too_slow", lambda *args: None)  # a machine slower than its estimate
    limit, app.time_limit = app.time_limit, 0.05
    try:
        with pytest.raises(AppError, match=r"took longer than the 0.05 s limit and was stopped while drawing with "
                                           r"SD1.5 base \(after (\d+) of (\d+) steps\)") as caught:
            client.predict(model="SD1.5 base", prompt="a photo of a ship", steps=150, count=4, api_name="/txt2img")
    finally:
        app.time_limit = limit
    done, total = map(int, caught.value.args[0].split("(after ")[1].split(" steps")[0].split(" of "))
    assert done < total // 2  # stopped early, not after the whole drawing
    gallery, _ = client.predict(model="SD1.5 base", prompt="a photo of a ship", steps=2, api_name="/txt2img")
    assert len(gallery) == 1


def test_progress_reaches_the_client_step_by_step(served):
    _, client = served
    job = client.submit(model="SD1.5 base", prompt="a photo of a frog", steps=120, api_name="/txt2img")
    seen = []
    while not job.done():
        status = job.status()
        if status.progress_data:
            seen.append((status.progress_data[0].progress, status.progress_data[0].desc))
        time.sleep(0.01)
    assert len(job.result()[0]) == 1
    assert seen and all(text.startswith("SD1.5 base: step ") for _, text in seen)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] <= 1


def test_bounded_load_one_gpu_job_at_a_time_full_queue_refused_cleanly(served, green):
    app, _ = served
    threads, per_thread = 4, 6
    outcomes, lock = [], threading.Lock()

    def worker(k):
        client = Client(app.url, verbose=False)
        for i in range(per_thread):
            kind = "txt2img" if (k + i) % 2 == 0 else "img2img"
            extra = dict(image=handle_file(str(green)), strength=0.5) if kind == "img2img" else {}
            try:
                gallery, _ = client.predict(model="SD1.5 base", prompt=f"a photo of a cat {k}-{i}", seed=i, steps=3,
                                            api_name=f"/{kind}", **extra)
                outcome = "completed" if len(gallery) == 1 else "wrong"
            except QueueError as e:
                outcome = "refused" if "Queue is full" in str(e) else f"other: {e}"
            except Exception as e:  # anything else is a defect of the app under load
                outcome = f"other: {type(e).__name__}: {e}"
            with lock:
                outcomes.append(outcome)

    app.peak_jobs = 0
    start = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    seconds = time.perf_counter() - start
    completed, refused = outcomes.count("completed"), outcomes.count("refused")
    print(f"load: {threads} threads × {per_thread} = {len(outcomes)} requests in {seconds:.1f} s: {completed} "
          f"completed, {refused} refused (queue of {QUEUE} full)")
    assert len(outcomes) == threads * per_thread and completed + refused == len(outcomes), outcomes
    assert completed >= threads and refused >= 1  # four senders overfill a queue of two
    assert app.peak_jobs == 1  # txt2img and img2img never drew at the same time
    status = Client(app.url, verbose=False).predict(api_name="/status")
    assert status["jobs"] == 0 and status["peak_jobs"] == 1
    gallery, _ = Client(app.url, verbose=False).predict(model=LORA, prompt="a ship", steps=2, api_name="/txt2img")
    assert len(gallery) == 1  # healthy after the load


def _readme_block(language: str, containing: str, url: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if containing in b).replace("http://127.0.0.1:7860/", url)


def test_the_documented_client_snippet_and_curl_example_work(served, tmp_path, monkeypatch):
    app, _ = served
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "cat.png")
    monkeypatch.chdir(tmp_path)
    for snippet in (client_snippet(app.url), _readme_block("python", "/txt2img", app.url)):
        scope = {}
        exec(snippet, scope)  # the notebook's and the README's Python examples, as printed
        assert len(scope["images"]) == 1 and Path(scope["images"][0]["image"]).is_file()
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    for example in (curl_example(app.url, steps=2), _readme_block("bash", "gradio_api/call/txt2img", app.url)):
        run = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 and "event: complete" in run.stdout and "image.png" in run.stdout, run.stdout
    bad = subprocess.run(["bash", "-c", curl_example(app.url, prompt="")], capture_output=True, text=True, timeout=60)
    assert "event: error" in bad.stdout and "Type a prompt first" in bad.stdout, bad.stdout


def test_close_frees_the_port(served):
    app = LabApp(served[0].engine)
    app.launch(share=False, port=_free_port())  # the other test worker may hold 7860
    port = app.blocks.server_port
    assert Client(app.url, verbose=False).predict(api_name="/status")["served"] == 0
    app.close()
    assert _refused("127.0.0.1", port)


def test_the_t4_memory_plan_says_sdxl_4_images_need_slicing_and_one_at_a_time():
    rows = {(r["family"], r["way"].split(" (")[0].split(",")[0] + ("/sliced" if "slicing" in r["way"] else "")):
            r for r in memory_plan()}
    assert not rows[("sdxl", "4 per call")]["fits"]  # whole-batch decode of 4 × 1024 px
    assert rows[("sdxl", "1 per call/sliced")]["fits"]  # what the app does at 1024 px
    assert rows[("sdxl", "1 per call/sliced")]["gib"] < rows[("sdxl", "4 per call/sliced")]["gib"] \
        < rows[("sdxl", "4 per call")]["gib"]
    assert all(r["fits"] for r in memory_plan() if r["family"] == "sd15" and "this app" in r["way"])
    assert "DOES NOT FIT" in memory_plan_text(memory_plan())
    # SD1.5's safety checker (0.57 GiB) is counted: both families with the scorer do not fit, the engine frees one
    both = next(r for r in memory_plan() if r["family"] == "sd15+sdxl")
    assert not both["fits"] and "frees one" in both["way"] and both["gib"] == pytest.approx(11.2, abs=0.05)
    assert "sd15 3.6 GiB, sdxl 6.8 GiB" in memory_plan_text(memory_plan())
