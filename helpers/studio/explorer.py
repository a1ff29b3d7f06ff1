"""The prompt explorer and the blind A/B study, as ipywidgets: built-in widgets only, so they run on Colab's
ipywidgets 7.7 and on 8.x. Widgets only: what can draw is helpers.studio.catalog; drawing, CLIP scores and saving are
helpers.studio.engine; the study's order, answers and statistics are helpers.studio.study.

    explorer = Explorer(engine)                  # display(explorer.widget)
    panel = StudyPanel(engine, scores=board.scores)   # display(panel.widget); reuses notebook 05's images

Every control is an attribute (explorer.prompt, .negative, .seed, .steps, .guidance, .size, .scale, .checkboxes,
.generate, .save, .progress, .status, .message, .gallery; panel.a, .b, .prompt_set, .prompts, .seeds, .rater,
.start, .buttons["left"|"tie"|"right"], .counter, .left_image, .right_image, .results) and carries the CSS class
"lab-<name>", so a browser test finds it. Mistakes are shown in `.message` as one sentence, never as a traceback.
"""
from __future__ import annotations

import io
import random
from html import escape

import ipywidgets as widgets
from PIL import Image

from ..evaluation.prompts import STANDARD, get_prompt_set, spread
from .drawing import LIMITS, Request, RequestError
from .engine import Engine
from .study import Study, generate_pairs, pairs_from_scores, scripted_choice, study_csv

EVALUATED = "every prompt set of the evaluation"  # the study's choice that reuses all of notebook 05's images
SHOW_PX = 192  # small images (64 px tiny samples) are enlarged to at least this on screen, pixels kept sharp


def png_bytes(image: Image.Image, at_least: int = SHOW_PX) -> bytes:
    if min(image.size) < at_least:
        factor = -(-at_least // min(image.size))
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _tag(widget, name: str):
    widget.add_class(f"lab-{name}")
    return widget


def _error(text: str) -> str:
    return f"<span style='color:#b00020'>⚠ {escape(text)}</span>"


def _note(text: str) -> str:
    return f"<span style='color:#1b5e20'>{escape(text)}</span>"


WIDE = {"description_width": "110px"}


class Explorer:
    """Prompt, negative prompt, seed, steps, guidance, size, LoRA scale, a checkbox per model (bases and every
    finished run, by family), Generate → images side by side with their CLIP scores, Save → a PNG sheet and the
    settings as JSON (helpers.studio.drawing.Result.save)."""

    def __init__(self, engine: Engine, prompt: str = "a photo of a cat", steps: int | None = None):
        self.engine, self.result, self.error = engine, None, ""  # error: the last message as plain text
        catalog = engine.catalog
        default_steps = steps or (25 if catalog.profile == "t4" else 4)
        self.prompt = _tag(widgets.Textarea(value=prompt, description="prompt", rows=2, style=WIDE,
                                            layout=widgets.Layout(width="560px")), "prompt")
        self.negative = _tag(widgets.Text(value="", description="negative", style=WIDE,
                                          layout=widgets.Layout(width="560px")), "negative")
        self.seed = _tag(widgets.IntText(value=0, description="seed", style=WIDE), "seed")
        self.steps = _tag(widgets.IntSlider(value=default_steps, min=LIMITS["steps"][0], max=60, description="steps",
                                            style=WIDE), "steps")
        self.guidance = _tag(widgets.FloatSlider(value=7.5, min=0.0, max=15.0, step=0.5, description="guidance",
                                                 style=WIDE), "guidance")
        self.size = _tag(widgets.IntText(value=0, description="size (px)", style=WIDE), "size")
        self.scale = _tag(widgets.FloatSlider(value=1.0, min=LIMITS["scale"][0], max=LIMITS["scale"][1], step=0.05,
                                              description="LoRA scale", style=WIDE), "scale")
        self.checkboxes: dict[str, widgets.Checkbox] = {}
        families = []
        default = self._default_models()
        for family, entries in catalog.by_family().items():
            boxes = []
            for entry in entries:
                box = widgets.Checkbox(value=entry.name in default, description=entry.name, indent=False,
                                       layout=widgets.Layout(width="auto"))
                self.checkboxes[entry.name] = _tag(box, "model")
                boxes.append(box)
            families.append(widgets.VBox([widgets.HTML(f"<b>{escape(family.upper())}</b>")] + boxes,
                                         layout=widgets.Layout(margin="0 24px 0 0")))
        self.generate = _tag(widgets.Button(description="Generate", button_style="primary", icon="play"), "generate")
        self.save = _tag(widgets.Button(description="Save", icon="save", disabled=True), "save")
        self.progress = _tag(widgets.FloatProgress(value=0.0, min=0.0, max=1.0, description="",
                                                   layout=widgets.Layout(width="300px")), "progress")
        self.status = _tag(widgets.HTML(""), "status")
        self.message = _tag(widgets.HTML(""), "message")
        self.gallery = _tag(widgets.HBox([], layout=widgets.Layout(flex_flow="row wrap")), "gallery")
        self.generate.on_click(self._on_generate)
        self.save.on_click(self._on_save)
        header = widgets.HTML(f"<b>Prompt explorer</b> · {escape(catalog.note())} <i>size 0 = each model's own "
                              f"({', '.join(f'{e.name}: {e.default_size}' for e in catalog.entries if not e.is_run)}"
                              f" px; a run: its training size, and a base ticked beside it draws there too); "
                              f"CLIP score = 100 · cos(image, prompt).</i>")
        self.widget = _tag(widgets.VBox([
            header, self.prompt, self.negative,
            widgets.HBox([widgets.VBox([self.seed, self.size]), widgets.VBox([self.steps, self.guidance, self.scale])]),
            widgets.HBox(families), widgets.HBox([self.generate, self.save, self.progress, self.status]),
            self.message, self.gallery]), "explorer")

    def _default_models(self) -> set[str]:
        """The first family that has runs: its base and its runs; without runs, the SD1.5 base."""
        for family, entries in self.engine.catalog.by_family().items():
            if any(e.is_run for e in entries):
                return {e.name for e in entries}
        return {self.engine.catalog.entries[0].name}

    def request(self) -> Request:
        return Request(prompt=self.prompt.value, models=tuple(n for n, b in self.checkboxes.items() if b.value),
                       negative_prompt=self.negative.value, seed=self.seed.value, steps=self.steps.value,
                       guidance=self.guidance.value, size=self.size.value or None, scale=self.scale.value)

    def _on_progress(self, fraction: float, text: str) -> None:
        self.progress.value = fraction
        self.status.value = escape(text)

    def _fail(self, text: str) -> None:
        self.error, self.message.value, self.progress.bar_style = text, _error(text), "danger"
        self.status.value = ""

    def _on_generate(self, _button=None) -> None:
        self.error, self.message.value, self.progress.value, self.progress.bar_style = "", "", 0.0, ""
        self.generate.disabled = True
        self.status.value = "loading models…" if not self.engine.loaded() else "drawing…"
        try:
            self.result = self.engine.generate(self.request(), progress=self._on_progress)
        except RequestError as e:
            return self._fail(str(e))
        except Exception as e:  # anything else still reaches the person as a sentence, not a traceback
            return self._fail(f"{type(e).__name__}: {e}")
        finally:
            self.generate.disabled = False
        self.progress.value, self.progress.bar_style = 1.0, "success"
        self.status.value = f"{len(self.result.images)} image(s) in {self.result.seconds:.1f} s"
        if self.result.note:  # how size 0 was resolved: a base beside a run draws at the run's training size
            self.message.value = _note(self.result.note)
        self.gallery.children = [self._card(d) for d in self.result.images]
        self.save.disabled = False

    def _card(self, drawn) -> widgets.VBox:
        label = self.result.labels.get(drawn.model, drawn.model)
        score = drawn.score_text
        image = _tag(widgets.Image(value=png_bytes(drawn.image), format="png",
                                   layout=widgets.Layout(width=f"{max(SHOW_PX, min(drawn.size, 320))}px")), "image")
        caption = _tag(widgets.HTML(f"<div title='{escape(drawn.model)}' style='max-width:{max(SHOW_PX, 200)}px'>"
                                    f"<b>{escape(label)}</b><br>seed {drawn.seed} · {drawn.size} px · "
                                    f"<span class='lab-clip'>{score}</span></div>"), "caption")
        return widgets.VBox([image, caption], layout=widgets.Layout(margin="4px 10px 4px 0"))

    def _on_save(self, _button=None) -> None:
        if self.result is None:
            return self._fail("Generate first: there is nothing to save yet.")
        try:
            sheet, settings = self.result.save(self.engine.save_folder(self.result.request))
        except OSError as e:
            return self._fail(f"could not save: {e}")
        self.message.value = _note(f"saved {sheet} and {settings.name}")
        self.saved = (sheet, settings)


class StudyPanel:
    """The blind A/B study: two variants of one family, a prompt set, a rater name; Start shows pairs with the sides
    randomised and the names hidden; Left / Tie / Right record an answer; "n of N" and the results table follow."""

    def __init__(self, engine: Engine, scores=None, seed: int = 0):
        self.engine, self.scores, self.seed = engine, scores, seed
        self.study, self.shown = None, None
        names = engine.catalog.names()
        runs = [e.name for e in engine.catalog.runs()]
        first_run = engine.catalog.get(runs[0]) if runs else None
        base = next((e.name for e in engine.catalog.entries if first_run is not None and not e.is_run
                     and e.base_key == first_run.base_key), names[0])
        self.a = _tag(widgets.Dropdown(options=names, value=base, description="variant A", style=WIDE), "a")
        self.b = _tag(widgets.Dropdown(options=names, value=runs[0] if runs else names[-1], description="variant B",
                                       style=WIDE), "b")
        evaluated = list(dict.fromkeys(scores["prompt_set"])) if scores is not None else []
        sets = ([EVALUATED] if evaluated else []) + evaluated + [s for s in STANDARD if s not in evaluated]
        self.prompt_set = _tag(widgets.Dropdown(options=sets, value=sets[0], description="prompt set", style=WIDE),
                               "prompt-set")
        self.prompts = _tag(widgets.IntText(value=3, description="prompts", style=WIDE), "prompts")
        self.seeds = _tag(widgets.IntText(value=2, description="seeds", style=WIDE), "seeds")
        # continuous_update=False: the name reaches the kernel on Enter (or leaving the field), not per keystroke;
        # each new name shows that rater's next pair, two full images over Colab's comm channel
        self.rater = _tag(widgets.Text(value="", placeholder="your name, then Enter", description="rater", style=WIDE,
                                       continuous_update=False), "rater")
        self.start = _tag(widgets.Button(description="Start", button_style="primary"), "start")
        self.buttons = {c: _tag(widgets.Button(description=d, disabled=True), f"answer-{c}") for c, d in
                        (("left", "◀ Left is better"), ("tie", "Tie"), ("right", "Right is better ▶"))}
        self.counter = _tag(widgets.HTML(""), "counter")
        self.message = _tag(widgets.HTML(""), "study-message")
        self.prompt_text = _tag(widgets.HTML(""), "study-prompt")
        self.left_image = _tag(widgets.Image(format="png", layout=widgets.Layout(width=f"{SHOW_PX}px")), "left")
        self.right_image = _tag(widgets.Image(format="png", layout=widgets.Layout(width=f"{SHOW_PX}px")), "right")
        self.results = _tag(widgets.HTML(""), "results")
        self.start.on_click(self._on_start)
        for choice, button in self.buttons.items():
            button.on_click(lambda _b, choice=choice: self.answer(choice))
        self.rater.observe(lambda change: self._show_next() if self.study is not None else None, names="value")
        self.widget = _tag(widgets.VBox([
            widgets.HTML("<b>Blind A/B study</b> · which image fits the prompt better? Names are hidden and the "
                         "sides are shuffled; answers go to a CSV in the run's folder."),
            widgets.HBox([widgets.VBox([self.a, self.b, self.prompt_set]),
                          widgets.VBox([self.prompts, self.seeds, self.rater])]),
            widgets.HBox([self.start, self.counter]), self.message, self.prompt_text,
            widgets.HBox([widgets.VBox([widgets.HTML("<b>left</b>"), self.left_image]),
                          widgets.VBox([widgets.HTML("<b>right</b>"), self.right_image])]),
            widgets.HBox(list(self.buttons.values())), self.results]), "study")

    def _pairs(self):
        a, b, name = self.a.value, self.b.value, self.prompt_set.value
        if self.scores is not None and (name == EVALUATED or name in set(self.scores["prompt_set"])):
            part = self.scores if name == EVALUATED else self.scores[self.scores["prompt_set"] == name]
            if {a, b} <= set(part["variant"]):
                return pairs_from_scores(part, a, b)
            if name == EVALUATED:
                raise ValueError(f"the evaluation drew no images of both {a} and {b}; pick two variants of one "
                                 "family, or a prompt set below to draw them now")
        prompts, seeds = int(self.prompts.value), int(self.seeds.value)
        if not 1 <= prompts <= 50 or not 1 <= seeds <= 10:
            raise ValueError("prompts must be 1 to 50 and seeds 1 to 10")
        chosen = spread(get_prompt_set(name), prompts)
        csv_path = study_csv(self.engine, a, b)
        return generate_pairs(self.engine, a, b, chosen, list(range(seeds)), csv_path.parent / "images")

    def _on_start(self, _button=None, demo: bool = False) -> None:
        self.message.value = ""
        try:
            Study._rater(self.rater.value)
            self.message.value = "preparing pairs…"
            pairs = self._pairs()
            csv_path = study_csv(self.engine, self.a.value, self.b.value)
            if demo:  # scripted answers never share a file with people's
                csv_path = csv_path.with_name(csv_path.stem + "-scripted-demo.csv")
            self.study = Study(pairs, self.a.value, self.b.value, csv_path, self.seed)
        except (ValueError, RequestError) as e:
            self.message.value = _error(str(e))
            return
        except Exception as e:  # a sentence, not a traceback
            self.message.value = _error(f"{type(e).__name__}: {e}")
            return
        left_out = (f" ({self.study.left_out} left out: the SD1.5 safety checker withheld a side)"
                    if self.study.left_out else "")
        self.message.value = _note(f"{len(self.study.pairs)} pairs{left_out}; answers go to {self.study.csv_path}")
        self._show_next()

    def _show_next(self) -> None:
        try:
            rater = Study._rater(self.rater.value)
        except ValueError as e:
            self.message.value = _error(str(e))
            self._enable(False)
            return
        try:  # the answers file is read here: whatever is wrong with it reaches the person as a sentence
            self.shown = self.study.next(rater)
            done = len(self.study.answered(rater))
        except Exception as e:
            self.shown = None
            self._enable(False)
            self.message.value = _error(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
            return
        if self.study.notes:  # lines of the answers file left out, each named
            self.message.value = "<br>".join(_error(note) for note in self.study.notes)
        self.counter.value = f"<span class='lab-n-of-n'>{done} of {len(self.study.pairs)}</span> answered by " \
                             f"{escape(rater)}"
        if self.shown is None:
            self._enable(False)
            self.prompt_text.value = "<b>All pairs answered: thank you.</b> Another rater can type a name and go on."
            self.left_image.value = self.right_image.value = b""
            self.show_results()
            return
        self.prompt_text.value = (f"pair {self.shown.index} of {self.shown.total} · prompt: "
                                  f"<b>{escape(self.shown.pair.prompt)}</b>")
        self.left_image.value = png_bytes(Image.open(self.shown.pair.images[self.shown.left]))
        self.right_image.value = png_bytes(Image.open(self.shown.pair.images[self.shown.right]))
        self._enable(True)  # only now: an answer always belongs to the pair on screen

    def _enable(self, on: bool) -> None:
        for button in self.buttons.values():
            button.disabled = not on

    def answer(self, choice: str) -> None:
        if self.study is None or self.shown is None:
            self.message.value = _error("Press Start first.")
            return
        try:
            self.study.record(self.rater.value, self.shown, choice)
        except Exception as e:  # a file of another layout, a full disk: the answer was not written, say so
            self.message.value = _error(f"this answer was not saved: {e}" if isinstance(e, (ValueError, OSError))
                                        else f"this answer was not saved: {type(e).__name__}: {e}")
            return
        self._show_next()

    def show_results(self) -> None:
        try:
            answers = self.study.answers()
        except Exception as e:
            self.message.value = _error(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}")
            return
        self.results.value = "" if answers.empty else self.study.results()._repr_html_()

    def scripted_demo(self, count: int, seed: int = 0, p_a: float = 0.6, p_tie: float = 0.1) -> None:
        """A DEMO for unattended runs: `count` answers clicked by a seeded random generator (helpers.studio.study.
        scripted_choice), never derived from CLIP, recorded under a rater named as a demo in a CSV of their own
        (`…-scripted-demo.csv`), so they never mix with people's answers."""
        self.rater.value = f"scripted demo (seed {seed}, not a person)"
        self._on_start(demo=True)
        rng = random.Random(seed)
        for _ in range(count):
            if self.shown is None:
                break
            self.buttons[scripted_choice(rng, self.shown, self.study.a, p_a, p_tie)].click()
        self.show_results()
