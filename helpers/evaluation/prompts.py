"""Evaluation prompt sets as data: named tuples of prompts with the split they probe. Seeds are chosen separately
(helpers.evaluation pairs every prompt with every seed).

The split says what a set tests: "train" uses the training captions' own wording, "held-out" wording or subjects
never trained on (did the model learn the concept or the sentence?), "in-domain" new prompts in the style of the
training data, "generic" the broad prompts the base model was made for (did fine-tuning make them worse?).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..core.presets import CIFAR10_CLASSES
from ..data.sources import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES, fill_template
from ..tiny.pictures import held_out_naruto_captions

# Written for the purpose in the wording of the Naruto BLIP captions ("a man with a sword in his hand"), not copied
# from them: in-domain prompts the LoRA should draw in the show's style.
NARUTO_STYLE = (
    "a ninja with spiky blond hair in an orange jacket, anime style",
    "a girl with pink hair and a red top, anime style",
    "a boy with black hair and a blue shirt standing in a forest",
    "a man with white hair wearing a mask over his face",
    "a cartoon of a ninja with a headband in front of a village",
    "an anime character with red hair holding a sword",
    "a woman with long blond hair in a ponytail, anime style",
    "a man in a green vest with a headband, anime style",
)
# Subjects that neither CIFAR-10's classes nor the Naruto captions show (the horse is a CIFAR class, but never ridden
# by an astronaut): does a fine-tune generalise, or forget them?
HELD_OUT_SUBJECTS = (
    "a lighthouse on a cliff",
    "an astronaut riding a horse",
    "a bowl of fruit on a wooden table",
    "a red umbrella in the rain",
    "a castle on a hill at sunset",
    "a teapot on a stove",
    "a sailboat on a calm sea",
    "a snowy cabin in the woods",
)
# Everyday prompts of the kind the base model was trained for: a forgetting check, not a test of the new skill.
GENERIC = (
    "a photograph of a city street at night",
    "a portrait of an old man with a beard",
    "a mountain lake at sunrise",
    "a plate of pasta with tomato sauce",
    "a child's drawing of a house and a tree",
    "a cup of coffee on a desk",
    "a kite flying over a field",
    "a bicycle leaning against a brick wall",
)


@dataclass(frozen=True)
class PromptSet:
    name: str  # shown in tables, grid titles and file names, e.g. "cifar train"
    prompts: tuple[str, ...]  # distinct, non-empty prompts (a list is turned into a tuple)
    split: str = "custom"  # what the set probes: "train", "held-out", "in-domain", "generic" or "custom"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a prompt set needs a non-empty name, got {self.name!r}")
        if not isinstance(self.split, str) or not self.split.strip():
            raise ValueError(f"prompt set {self.name!r} needs a non-empty split, got {self.split!r}")
        if isinstance(self.prompts, str):
            raise ValueError(f"prompt set {self.name!r}: pass a list of prompts, not one string")
        prompts = tuple(self.prompts)
        if not prompts:
            raise ValueError(f"prompt set {self.name!r} has no prompts")
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"prompt set {self.name!r}: prompts must be non-empty strings, got {bad[:3]!r}")
        prompts = tuple(p.strip() for p in prompts)
        repeated = sorted({p for p in prompts if prompts.count(p) > 1})
        if repeated:  # a (prompt, seed) pair must identify one image of a variant
            raise ValueError(f"prompt set {self.name!r} repeats {repeated[:3]!r}; use more seeds instead")
        object.__setattr__(self, "prompts", prompts)

    def __len__(self) -> int:
        return len(self.prompts)


def spread(prompt_set: PromptSet, n: int) -> PromptSet:
    """`n` prompts of the set spread over it with a stride of len // n + 1 (a CIFAR set lists every class per
    template, so a stride one past the even spacing changes class and template at each pick), same name and split."""
    if n < 1:
        raise ValueError(f"need at least one prompt, got {n}")
    n, size = min(n, len(prompt_set)), len(prompt_set)
    stride = size // n + 1
    indices = [k * stride for k in range(n)]
    if indices[-1] >= size:  # the stride would wrap around: plain even spacing
        indices = [k * size // n for k in range(n)]
    picks = tuple(prompt_set.prompts[i] for i in indices)
    return PromptSet(prompt_set.name, picks, prompt_set.split)


def cifar_prompts(split: str = "train", classes: Sequence[str] = CIFAR10_CLASSES,
                  n_templates: int | None = None) -> PromptSet:
    """Caption templates × CIFAR classes (template-major): the training templates for split="train", templates
    never trained on for "held-out"; `n_templates` keeps only the first few templates."""
    templates = {"train": TRAIN_TEMPLATES, "held-out": HELD_OUT_TEMPLATES}
    if split not in templates:
        raise ValueError(f"unknown CIFAR split {split!r}; choose one of {sorted(templates)}")
    chosen = templates[split][:n_templates]
    if not chosen:
        raise ValueError(f"n_templates must be >= 1, got {n_templates}")
    return PromptSet(f"cifar {split}", tuple(fill_template(t, c) for t in chosen for c in classes), split)


def naruto_prompts(profile: str = "t4") -> PromptSet:
    """In-domain prompts for a Naruto LoRA. In the tiny profile: held-out captions of the tiny Naruto-like set (the
    words the tiny CLIP knows, in combinations the fine-tune never saw); NARUTO_STYLE's "blond", "sword" or "mask"
    are words the tiny world never shows, so the tiny CLIP cannot judge them."""
    if profile == "tiny":
        return PromptSet("naruto style", held_out_naruto_captions(16), "in-domain")
    return PromptSet("naruto style", NARUTO_STYLE, "in-domain")


def held_out_subjects(style: str = "") -> PromptSet:
    """Subjects no training caption shows; with `style` (e.g. "anime style") also asks for the learned style."""
    suffix = f", {style.strip()}" if style.strip() else ""
    name = f"held-out subjects ({style.strip()})" if suffix else "held-out subjects"
    return PromptSet(name, tuple(p + suffix for p in HELD_OUT_SUBJECTS), "held-out")


def generic_prompts() -> PromptSet:
    return PromptSet("generic", GENERIC, "generic")


def user_prompts(prompts: Sequence[str], name: str = "user", split: str = "custom") -> PromptSet:
    """A user's own list, checked like every set (non-empty distinct strings)."""
    return PromptSet(name, prompts, split)


STANDARD: dict[str, Callable[[], PromptSet]] = {
    "cifar train": lambda: cifar_prompts("train"),
    "cifar held-out": lambda: cifar_prompts("held-out"),
    "naruto style": naruto_prompts,
    "held-out subjects": held_out_subjects,
    "generic": generic_prompts,
}


def get_prompt_set(name: str) -> PromptSet:
    """A standard set by name (for a notebook's dropdown)."""
    if name not in STANDARD:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {sorted(STANDARD)}")
    return STANDARD[name]()
