"""The Gradio app and its HTTP API: text to image and image to image with the base SD1.5 / SDXL models and every
finished run, drawn by the ONE generation path of helpers.studio.engine (validation, one pipeline per family with the runs
switched inside it, img2img pipelines built from the loaded components, CLIP scores, out-of-memory advice, stops
between denoising steps). This module adds only the web face and the serving rules.

    app = LabApp(Engine(Catalog.scan(profile)))
    app.launch()                  # Colab: share=True prints a public link; elsewhere 127.0.0.1 only
    client = gradio_client.Client(app.url)
    client.predict(model="SD1.5 base", prompt="a photo of a cat", api_name="/txt2img")
    app.close()

or from a shell: `python -m helpers.studio.app --profile tiny` (Ctrl+C stops it).

Rules this module owns:
- ONE GPU job at a time across every endpoint: Gradio limits concurrency per event listener, so /txt2img and
  /img2img share one concurrency id (GPU_JOBS) with a limit of 1; /status runs beside them and touches no model.
- A bounded queue: at most `queue_size` requests wait; the next one is refused at once (HTTP 503; gradio_client
  raises QueueError "Queue is full! Please try again.").
- A time limit per request (Gradio has none of its own): Engine.generate(time_limit=) stops the pipeline between
  denoising steps (callback_on_step_end) and the caller gets one sentence saying so.
- Validation: the inputs reach the engine unprocessed (preprocess=False), so every mistake (empty prompt, unknown
  model, steps / size / count out of range by the engine's one size rule, an unreadable upload) is Engine.check's
  sentence, raised as gr.Error: the web page shows it, gradio_client raises AppError with it, curl reads it.
- The T4 memory plan is stated in the app: at SDXL's 1024 px, 4 images in one call with a whole-batch VAE decode do
  not fit a T4; helpers.generate.sampling draws one image per call from 768 px up with VAE slicing and tiling.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import threading
import traceback

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home (version check, telemetry): offline-safe

import gradio as gr  # noqa: E402

from ..core.runtime import choose_profile, detect  # noqa: E402
from ..generate.grids import image_grid  # noqa: E402
from ..generate.sampling import images_per_call  # noqa: E402
from ..plan.calibration import error_band  # noqa: E402
from ..plan.inference import explorer_fits, explorer_gib, pipeline_gib, pipeline_ram_gib  # noqa: E402
from ..plan.meta import weights_gib  # noqa: E402
from ..plan.model import COLAB_RAM_GIB, CUDA_OVERHEAD_GIB, MARGIN_GIB, T4_USABLE_GIB, inference_peak_gib  # noqa: E402
from ..plan.timing import generation_seconds, setup_seconds, span  # noqa: E402
from .catalog import Catalog  # noqa: E402
from .drawing import LIMITS, Request, RequestError, TimeLimit  # noqa: E402
from .engine import Engine  # noqa: E402

GPU_JOBS = "gpu"  # the concurrency id shared by every endpoint that draws
QUEUE_SIZE = 8  # waiting requests: at a few SDXL images each, several minutes of waiting (time_plan_text)
TIME_LIMIT = {"t4": 300.0, "tiny": 60.0}  # seconds per request, loading included: room for the largest request
#                                           (4 SDXL 1024 px images) at the estimate, not at its slow end
STEPS = {"t4": 25, "tiny": 20}  # default denoising steps (tiny: 20, as every tiny preset samples; 4 draws smudges)
MAX_UPLOAD = "20mb"
HOST = "127.0.0.1"  # never 0.0.0.0: off Colab the app is for this machine; on Colab the share link is the way in
PLAN_SIZES = {"sd15": 512, "sdxl": 1024}  # the T4 sizes the memory plan is stated for
PLAN_IMAGES = 4  # images per request at most (LIMITS["count"])


# ---------------------------------------------------------------- the T4 memory plan

def memory_plan(families=("sd15", "sdxl"), images: int = PLAN_IMAGES) -> list[dict]:
    """Per family at its native size: planned GPU peak (GiB, fp16 weights of the pipeline as the engine loads it,
    SD1.5 with its safety checker, + the ViT-L-14 scorer + sampling room + CUDA overhead) of `images` images drawn
    three ways; `fits` = within a T4 with the error band and 1 GiB to spare (helpers.plan.memory). The last way is what
    helpers.generate.sampling does."""
    rows = []
    for family in families:
        size = PLAN_SIZES[family]
        per_call, tiled = min(images, images_per_call(size, size)), size >= 768
        ways = [(f"{images} per call, whole-batch VAE decode", images, False, False),
                (f"{images} per call, VAE slicing (one image decoded at a time)", images, True, False)]
        if per_call == images and not tiled:
            ways[1] = (ways[1][0] + " (this app)", images, True, False)
        else:
            ways.append((f"{per_call} per call, VAE slicing" + (" + tiling" if tiled else "") + " (this app)",
                         per_call, True, True))
        for way, per, sliced, tiled in ways:
            gib = (pipeline_gib(family) + weights_gib("clip") + CUDA_OVERHEAD_GIB
                   + inference_peak_gib(family, size, per, False, sliced, tiled))
            rows.append(dict(family=family, size=size, way=way, gib=round(gib, 2),
                             fits=gib * (1 + error_band()) + MARGIN_GIB <= T4_USABLE_GIB))
    if len(families) > 1:  # the engine keeps both families loaded only when this fits (else frees one first)
        fits = explorer_fits(families)
        rows.append(dict(family="+".join(families), size=max(PLAN_SIZES[f] for f in families),
                         way="both pipelines loaded, the larger drawing as this app does"
                             + ("" if fits else " (so the engine frees one before the other loads)"),
                         gib=round(explorer_gib(families), 2), fits=fits))
    return rows


def time_plan_text(steps: int = STEPS["t4"]) -> str:
    """How long a fresh Colab VM takes to serve (installs and downloads) and a request takes to draw, on a T4, from
    helpers.plan.timing (estimates with their ranges), beside the time limit."""
    setup, what = setup_seconds(["sd15", "safety_checker", "sdxl", "clip"])
    lines = [f"Time on a T4 (helpers.plan.timing, estimates): a fresh VM's {what}: {span(setup, 'download')}"]
    for family, images in (("sd15", 1), ("sdxl", 1), ("sdxl", PLAN_IMAGES)):
        size = PLAN_SIZES[family]
        lines.append(f"  {images} {family} image(s) at {size} px, {steps} steps: "
                     f"{span(generation_seconds(family, size, steps, images))}")
    lines.append(f"  a request past {TIME_LIMIT['t4']:g} s is stopped between denoising steps (--time-limit)")
    return "\n".join(lines)


def host_ram_text(families=("sd15", "sdxl")) -> str:
    """Peak host RAM while the engine loads each family's pipeline, one component at a time (helpers.plan.memory)."""
    parts = [f"{family} {pipeline_ram_gib(family):.1f} GiB" for family in families]
    return f"Host RAM while loading, one component at a time: {', '.join(parts)} of Colab's {COLAB_RAM_GIB} GiB"


def memory_plan_text(rows: list[dict]) -> str:
    lines = [f"T4 memory plan for {PLAN_IMAGES} images per request ({T4_USABLE_GIB} GiB usable; a way fits with its "
             f"±{100 * error_band():.0f}% band and {MARGIN_GIB:.0f} GiB to spare):"]
    lines += [f"  {r['family']} at {r['size']} px, {r['way']}: {r['gib']:.1f} GiB → "
              f"{'fits' if r['fits'] else 'DOES NOT FIT'}" for r in rows]
    lines.append("SD1.5 loads with its safety checker (0.57 GiB, counted above): a public link is not an evaluation "
                 f"table. {host_ram_text(tuple(dict.fromkeys(f for r in rows for f in r['family'].split('+'))))}.")
    return "\n".join(lines)


# ---------------------------------------------------------------- the app

class LabApp:
    """The Blocks app on one Engine; `launch()` serves it, `close()` stops it. Counters (`served`, `failed`,
    `peak_jobs`: the most jobs ever drawing at once) are what /status reports."""

    def __init__(self, engine: Engine, time_limit: float | None = None, queue_size: int = QUEUE_SIZE,
                 plan: str | None = None, steps: int | None = None):
        profile = engine.catalog.profile
        self.engine = engine
        self.time_limit = TIME_LIMIT.get(profile, 60.0) if time_limit is None else float(time_limit)
        self.queue_size = int(queue_size)
        self.plan = plan  # the memory plan's text (memory_plan_text), shown on the page and by /status
        self.steps = steps or STEPS.get(profile, 25)
        self._count = threading.Lock()
        self.jobs = self.peak_jobs = self.served = self.failed = 0
        self.url: str | None = None
        self.share_url: str | None = None
        self.blocks = self._build()

    # ---- the one GPU job
    def draw(self, request: Request, progress=None) -> list:
        """Draw `request` (checked by the engine) within the time limit; gallery items and the settings, or a
        gr.Error with the engine's sentence."""
        with self._count:
            self.jobs += 1
            self.peak_jobs = max(self.peak_jobs, self.jobs)
        try:
            report = (lambda fraction, text: progress(fraction, desc=text)) if progress is not None else None
            result = self.engine.generate(request, progress=report, time_limit=self.time_limit)
        except RequestError as e:
            self._tally(False)
            raise gr.Error(str(e), title="Time limit" if isinstance(e, TimeLimit) else "Cannot draw this",
                           print_exception=False) from None
        except Exception as e:  # a bug, not the request: said in one line, traceback on the server's console
            self._tally(False)
            traceback.print_exc()
            raise gr.Error(f"drawing failed ({type(e).__name__}: {e}); the app is still running",
                           title="Error") from None
        finally:
            with self._count:
                self.jobs -= 1
        self._tally(True)
        gallery = [(d.image, f"{result.labels.get(d.model, d.model)} · seed {d.seed}"
                    + (f" · {d.score_text}" if d.score_text else "")) for d in result.images]
        return [gallery, result.settings()]

    def _tally(self, ok: bool) -> None:
        with self._count:
            if ok:
                self.served += 1
            else:
                self.failed += 1

    def _request(self, model, prompt, negative_prompt, seed, steps, guidance, size, scale, count, **img2img):
        if model in (None, "", []):
            raise gr.Error(f"Choose a model: one of {self.engine.catalog.names()}", title="Cannot draw this",
                           print_exception=False)
        size = None if size == 0 else size  # 0 = the model's own: a base's native size, a run's training size
        return Request(prompt, (model,) if isinstance(model, str) else model, negative_prompt, seed, steps,
                       guidance, size, scale, count, **img2img)

    def txt2img(self, model, prompt, negative_prompt, seed, steps, guidance, size, scale, count,
                progress=gr.Progress()):
        """Text to image: `count` images of `prompt` by `model`, seeds seed, seed+1, …"""
        return self.draw(self._request(model, prompt, negative_prompt, seed, steps, guidance, size, scale, count),
                         progress)

    def img2img(self, model, prompt, image, strength, negative_prompt, seed, steps, guidance, size, scale, count,
                progress=gr.Progress()):
        """Image to image: `image` resized to `size`, re-noised by `strength` (1 = all of it), then drawn."""
        if not image:
            raise gr.Error("Upload an image to start from (PNG or JPEG).", title="Cannot draw this",
                           print_exception=False)
        path = image.get("path") if isinstance(image, dict) else image
        if not isinstance(path, str) or not path:  # never drawn as text to image instead: that is another request
            raise gr.Error("The image to start from was not uploaded: the request names "
                           f"{_described(image)}, and this app draws only from a file uploaded to it "
                           "(gradio_client: image=handle_file(path_or_url); curl: POST the file to /gradio_api/upload "
                           "first and pass {\"path\": …}).", title="Cannot draw this", print_exception=False)
        return self.draw(self._request(model, prompt, negative_prompt, seed, steps, guidance, size, scale, count,
                                       init_image=path, strength=strength), progress)

    def status(self) -> dict:
        """What the app serves and how it is doing: models, runs not ready, loaded pipelines, counters, limits."""
        catalog = self.engine.catalog
        try:
            loaded = self.engine.loaded()
        except RuntimeError:  # a job is loading a pipeline this very moment
            loaded = None
        with self._count:
            counters = dict(jobs=self.jobs, peak_jobs=self.peak_jobs, served=self.served, failed=self.failed)
        return dict(profile=catalog.profile, models={e.name: e.family for e in catalog.entries},
                    missing={m.name: m.why for m in catalog.missing}, loaded=loaded, **counters,
                    time_limit_s=self.time_limit, queue_size=self.queue_size, limits=LIMITS, plan=self.plan)

    # ---- the page
    def _build(self) -> gr.Blocks:
        catalog = self.engine.catalog
        choices = [(e.name if not e.is_run else f"{e.name} ({e.kind}, {e.family})", e.name) for e in catalog.entries]
        first = catalog.entries[0]
        with gr.Blocks(title="T4 Diffusion Lab", analytics_enabled=False) as blocks:
            gr.Markdown(f"# T4 Diffusion Lab\n{catalog.note()}  One image request at a time; at most "
                        f"{self.queue_size} wait, {self.time_limit:g} s each.")
            with gr.Row():
                with gr.Column(scale=2):
                    model = gr.Dropdown(choices, value=first.name, label="model")
                    prompt = gr.Textbox(label="prompt", lines=2, value="a photo of a cat")
                    negative = gr.Textbox(label="negative prompt", value="")
                    with gr.Row():
                        seed = gr.Number(value=0, precision=0, label="seed (image k uses seed + k)")
                        count = gr.Slider(*LIMITS["count"], value=1, step=1, label="images")
                    with gr.Row():
                        steps = gr.Slider(LIMITS["steps"][0], 60, value=self.steps, step=1, label="steps")
                        guidance = gr.Slider(*LIMITS["guidance"], value=7.5, step=0.5, label="guidance")
                    with gr.Row():
                        size = gr.Number(value=0, precision=0, label="size in px (0 = the model's own)")
                        scale = gr.Slider(*LIMITS["scale"], value=1.0, step=0.05, label="LoRA / run scale")
                    with gr.Tabs():
                        with gr.Tab("Text to image"):
                            go = gr.Button("Generate", variant="primary")
                        with gr.Tab("Image to image"):
                            image = gr.Image(type="filepath", label="start from this image", sources=["upload"])
                            strength = gr.Slider(*LIMITS["strength"], value=0.6, step=0.05,
                                                 label="strength (1 = ignore the image's content)")
                            go_image = gr.Button("Generate from the image", variant="primary")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="images", columns=2, format="png", height="auto")
                    with gr.Accordion("settings of these images", open=False):
                        info = gr.JSON(label="settings")
            with gr.Accordion("HTTP API", open=False):
                gr.Markdown(api_help())
            if self.plan:
                with gr.Accordion("T4 memory plan", open=False):
                    gr.Markdown(f"```\n{self.plan}\n```")
            shared = [negative, seed, steps, guidance, size, scale, count]
            gpu = dict(concurrency_id=GPU_JOBS, concurrency_limit=1, preprocess=False)
            go.click(self.txt2img, [model, prompt, *shared], [gallery, info], api_name="txt2img", **gpu)
            go_image.click(self.img2img, [model, prompt, image, strength, *shared], [gallery, info],
                           api_name="img2img", **gpu)
            gr.api(self.status, api_name="status", concurrency_limit=None)
        blocks.validate_inputs = self._validate_inputs  # one sentence for a wrong number of inputs, never `null`
        return blocks

    def _validate_inputs(self, block_fn, inputs: list) -> None:
        """Gradio's own check answers too few inputs with an error it does not show (`null`) and ignores extra
        ones; here either is refused with the endpoint's inputs named."""
        wanted = len(block_fn.inputs)
        if len(inputs) != wanted:
            endpoint = block_fn.api_name or block_fn.name
            names = [n for n in inspect.signature(getattr(self, endpoint)).parameters if n != "progress"] \
                if endpoint in ("txt2img", "img2img") else []
            raise gr.Error(f"/{endpoint} takes {wanted} inputs" + (f" ({', '.join(names)})" if names else "")
                           + f", in this order; this request sent {len(inputs)}.", title="Cannot draw this",
                           print_exception=False)

    # ---- serving
    def launch(self, share: bool | None = None, port: int | None = None, inline: bool | None = None) -> str:
        """Serve on 127.0.0.1 (a free port from 7860 unless `port`), without blocking. `share`: None = a public
        gradio.live link on Colab only. Returns the URL to call (the share link when there is one)."""
        share = detect().is_colab if share is None else share
        self.blocks.queue(max_size=self.queue_size, default_concurrency_limit=1)
        _, self.url, self.share_url = self.blocks.launch(server_name=HOST, server_port=port, share=share,
                                                         inline=inline, prevent_thread_lock=True,
                                                         max_file_size=MAX_UPLOAD, show_error=False)
        return self.share_url or self.url

    def close(self) -> None:
        """Stop the server (the port is free again); the engine keeps its pipelines."""
        self.blocks.close()

    def __enter__(self) -> "LabApp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- how to call it

def _described(value) -> str:
    """An upload that is not one, for a sentence: its URL, or what it is."""
    if isinstance(value, dict) and value.get("url"):
        return f"only the URL {str(value['url'])[:200]!r}, no uploaded file"
    return f"no uploaded file ({type(value).__name__} {str(value)[:80]!r})"


def gallery_picture(gallery: list, title: str | None = None, at_least: int = 192, at_most: int = 512):
    """What an API call returned (`[{"image": path, "caption": text}, …]`) as one picture with the captions under
    the images, each shown between `at_least` and `at_most` px wide (small tiny-model images enlarged, sharp)."""
    from PIL import Image

    images = [Image.open(item["image"]).convert("RGB") for item in gallery]
    width = min(max(images[0].width, at_least), at_most)
    resample = Image.Resampling.NEAREST if width > images[0].width else Image.Resampling.LANCZOS
    images = [im.resize((width, width * im.height // im.width), resample) for im in images]
    return image_grid(images, 1, len(images), [item["caption"] for item in gallery], title)


def client_snippet(url: str = "http://127.0.0.1:7860/", model: str = "SD1.5 base") -> str:
    return f'''from gradio_client import Client, handle_file

client = Client("{url}")
images, settings = client.predict(model="{model}", prompt="a photo of a cat", steps=25, count=2,
                                  api_name="/txt2img")            # [{{"image": local PNG path, "caption": ...}}, …]
images, settings = client.predict(model="{model}", prompt="a watercolor cat",
                                  image=handle_file("cat.png"), strength=0.6, api_name="/img2img")
client.predict(api_name="/status")                                   # models, loaded pipelines, limits'''


def curl_example(url: str = "http://127.0.0.1:7860/", model: str = "SD1.5 base", prompt: str = "a photo of a cat",
                 steps: int = 25) -> str:
    """Two requests, as Gradio's HTTP API takes them: POST the inputs in endpoint order (model, prompt, negative
    prompt, seed, steps, guidance, size, scale, count), get an event id, then read its result as server-sent events
    (`event: complete` with the images' URLs, or `event: error` with the sentence)."""
    data = json.dumps({"data": [model, prompt, "", 0, steps, 7.5, 0, 1.0, 1]})
    base = url.rstrip("/") + "/gradio_api/call/txt2img"
    return (f"EVENT_ID=$(curl -s -X POST {base} -H 'Content-Type: application/json' -d '{data}' "
            "| python3 -c 'import json,sys; print(json.load(sys.stdin)[\"event_id\"])')\n"
            f"curl -s -N {base}/$EVENT_ID")


def api_help(url: str = "http://127.0.0.1:7860/") -> str:
    return (f"Endpoints (the page's footer link *Use via API* lists them with their types):\n"
            f"- `/txt2img(model, prompt, negative_prompt, seed, steps, guidance, size, scale, count)` → "
            f"(gallery, settings)\n"
            f"- `/img2img(model, prompt, image, strength, negative_prompt, seed, steps, guidance, size, scale, "
            f"count)` → (gallery, settings)\n- `/status()` → models, loaded pipelines, counters, limits\n\n"
            f"size 0 = the model's own size (a base model's native size, a run's training size). Replace the address with this app's (on Colab: its share link). "
            f"Python:\n```python\n{client_snippet(url)}\n```\n"
            f"curl:\n```bash\n{curl_example(url)}\n```")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the base models and every finished run (Gradio + API).")
    parser.add_argument("--profile", default="auto", help="auto (t4 on a GPU, tiny otherwise), t4 or tiny")
    parser.add_argument("--port", type=int, default=None, help="default: the first free port from 7860")
    parser.add_argument("--share", action="store_true", help="also a public gradio.live link (default on Colab)")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds per request")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE, help="requests that may wait")
    args = parser.parse_args(argv)
    profile = choose_profile(args.profile)
    app = LabApp(Engine(Catalog.scan(profile)), args.time_limit, args.queue_size,
                 plan=memory_plan_text(memory_plan()) + "\n" + time_plan_text() if profile == "t4" else None)
    print(app.launch(share=args.share or None, port=args.port, inline=False))
    try:
        app.blocks.block_thread()  # until Ctrl+C
    finally:
        app.close()


if __name__ == "__main__":
    main()
