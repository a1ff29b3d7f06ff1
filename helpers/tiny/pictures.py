"""The tiny world's generated pictures: three sets that are learnable, distinct from each other and drawn with
variation (position, scale, colour jitter, textured backgrounds), so a model must learn the concept, not a picture.

- general: shapes, colours and scenes with descriptive captions: what the tiny base models are pretrained on.
  It never shows a CIFAR class nor the Naruto-like style, so fine-tuning has something to add.
- cifar: the 10 CIFAR-10 classes, each a characteristic shape and colour (32 px, like CIFAR).
- naruto: one flat cel-shaded "anime" style with black outlines and BLIP-like captions (128 px).

Every draw takes a `random.Random`, so a set is fixed by its seed. The seeds the build and the data folders use are
below; HELD_OUT_SEED is used by none of them, so tests measure on pictures no model has seen.
"""
from __future__ import annotations

import functools
import random

from PIL import Image, ImageDraw, ImageFilter

CIFAR_FOLDER_SEED = 0  # the tiny/cifar10 folder notebooks fine-tune on
NARUTO_FOLDER_SEED = 1  # the tiny/naruto folder
NARUTO_FOLDER_COUNT = 120  # its pictures
BUILD_SEED = 10  # everything scripts/build_tiny_world.py draws (pretraining sets, CLIP's captioned images)
HELD_OUT_SEED = 987_654  # tests only: fresh pictures for PSNR, zero-shot accuracy and retrieval

COLORS = {"red": (220, 40, 40), "green": (50, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
          "purple": (140, 60, 180), "white": (245, 245, 245), "black": (20, 20, 20), "orange": (250, 140, 20),
          "pink": (250, 150, 190), "grey": (140, 140, 140), "brown": (130, 80, 40)}


def _jitter(rng: random.Random, rgb, amount: int = 25) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random, size: int, rgb, texture: str = "blobs") -> Image.Image:
    """A flat jittered colour with a faint random texture, so no two backgrounds are alike."""
    base = _jitter(rng, rgb, 20)
    img = Image.new("RGB", (size, size), base)
    d = ImageDraw.Draw(img)
    shade = lambda k: tuple(max(0, min(255, c + k)) for c in base)  # noqa: E731
    if texture == "blobs":
        for _ in range(rng.randint(2, 5)):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 16, size / 6)
            d.ellipse([x - r, y - r, x + r, y + r], fill=shade(rng.choice((-18, 18))))
    elif texture == "stripes":
        step = max(2, size // 8)
        for y in range(rng.randint(0, step), size, step):
            d.line([0, y, size, y], fill=shade(-25), width=max(1, size // 32))
    return img


# ---------------------------------------------------------------- general: shapes, colours, scenes

SHAPES = ("circle", "square", "triangle", "ring", "bar")
SHAPE_COLORS = ("red", "green", "blue", "yellow", "purple", "white", "black", "pink")
SCENES = {"a plain grey background": ((150, 150, 150), "none"), "a dark night": ((20, 20, 50), "blobs"),
          "a bright sky": ((140, 190, 250), "blobs"), "green grass": ((70, 150, 60), "stripes"),
          "a sandy beach": ((225, 200, 140), "blobs"), "deep water": ((20, 60, 120), "stripes")}


def _shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(r / 2.5)))
    elif shape == "bar":
        d.rectangle([cx - r * 1.3, cy - r / 3, cx + r * 1.3, cy + r / 3], fill=fill)


def draw_general(rng: random.Random, size: int = 64) -> tuple[Image.Image, str]:
    """One or two coloured shapes on a scene, with the caption that says what and where."""
    scene = rng.choice(sorted(SCENES))
    rgb, texture = SCENES[scene]
    img = _background(rng, size, rgb, texture)
    d = ImageDraw.Draw(img)
    n = 1 if rng.random() < 0.6 else 2
    parts = []
    for k in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(SHAPE_COLORS)
        r = size * rng.uniform(0.16, 0.28) / (1.25 if n == 2 else 1)
        lo, hi = (0.3, 0.7) if n == 1 else ((0.2, 0.4) if k == 0 else (0.6, 0.8))
        cx, cy = size * rng.uniform(lo, hi), size * rng.uniform(0.3, 0.7)
        _shape(d, shape, cx, cy, r, _jitter(rng, COLORS[color]))
        parts.append(f"a {color} {shape}")
    caption = f"{' and '.join(parts)} on {scene}"
    if n == 1 and rng.random() < 0.3:
        caption = f"a picture of {parts[0]}, {scene}"
    return img, caption


# ---------------------------------------------------------------- CIFAR-like classes

CIFAR_BACKGROUNDS = {"airplane": ((110, 160, 230), "blobs"), "automobile": ((120, 120, 120), "none"),
                     "bird": ((150, 200, 240), "blobs"), "cat": ((200, 180, 150), "none"),
                     "deer": ((60, 140, 60), "stripes"), "dog": ((220, 210, 170), "blobs"),
                     "frog": ((30, 90, 30), "blobs"), "horse": ((150, 190, 90), "stripes"),
                     "ship": ((30, 70, 160), "stripes"), "truck": ((90, 90, 100), "none")}


def draw_cifar(label: str, rng: random.Random, size: int = 32) -> Image.Image:
    """One 'photo' of a CIFAR-10 class: its own background, shape, colour and texture, jittered in position, scale
    and colour. Coordinates are in units of size/32, so any size draws the same picture."""
    bg, texture = CIFAR_BACKGROUNDS[label]
    img = _background(rng, size, bg, texture)
    d = ImageDraw.Draw(img)
    u = size / 32
    s = rng.uniform(0.8, 1.2) * u
    cx, cy = size / 2 + rng.uniform(-4, 4) * u, size / 2 + rng.uniform(-4, 4) * u
    j = lambda rgb: _jitter(rng, rgb)  # noqa: E731

    def box(w, h, dx=0.0, dy=0.0):
        return [cx + dx * s - w * s / 2, cy + dy * s - h * s / 2, cx + dx * s + w * s / 2, cy + dy * s + h * s / 2]

    def pt(dx, dy):
        return (cx + dx * s, cy + dy * s)

    width = lambda k: max(1, round(k * s))  # noqa: E731
    if label == "airplane":  # grey cross-shaped plane on sky
        d.rectangle(box(22, 5), fill=j((200, 200, 210)))
        d.rectangle(box(6, 18), fill=j((200, 200, 210)))
    elif label == "automobile":  # red body, black wheels
        d.rectangle(box(22, 9), fill=j((200, 30, 30)))
        for dx in (-7, 7):
            d.ellipse(box(6, 6, dx, 5), fill=(10, 10, 10))
    elif label == "bird":  # small brown oval with a yellow beak
        d.ellipse(box(12, 8), fill=j((120, 70, 30)))
        d.polygon([pt(6, 0), pt(10, 1), pt(6, 2)], fill=(240, 200, 0))
    elif label == "cat":  # orange round head with pointed ears
        fur = j((230, 140, 40))
        d.ellipse(box(16, 14), fill=fur)
        for dx in (-5, 5):
            d.polygon([pt(dx - 3, -4), pt(dx, -12), pt(dx + 3, -4)], fill=fur)
    elif label == "deer":  # brown body with thin legs and antlers on grass
        d.rectangle(box(16, 7), fill=j((150, 100, 50)))
        for dx in (-6, 6):
            d.line([*pt(dx, 3), *pt(dx, 11)], fill=(100, 60, 30), width=width(2))
        d.line([*pt(8, -3), *pt(12, -11)], fill=(90, 60, 30), width=width(1))
    elif label == "dog":  # black-and-white spotted blob
        d.ellipse(box(18, 12), fill=(240, 240, 240))
        for _ in range(4):
            x, y = pt(rng.uniform(-6, 6), rng.uniform(-4, 4))
            d.ellipse([x - 2 * u, y - 2 * u, x + 2 * u, y + 2 * u], fill=(20, 20, 20))
    elif label == "frog":  # bright green flat blob with two eyes
        d.ellipse(box(18, 10), fill=j((80, 220, 60)))
        for dx in (-4, 4):
            d.ellipse(box(3, 3, dx, -5), fill=(250, 250, 0))
    elif label == "horse":  # dark brown tall body with a mane stripe
        coat = j((90, 50, 20))
        d.rectangle(box(18, 9), fill=coat)
        d.rectangle(box(4, 12, 9, -6), fill=coat)
        d.line([*pt(7, -12), *pt(7, -2)], fill=(20, 10, 0), width=width(2))
    elif label == "ship":  # white hull with a red funnel on water
        d.polygon([pt(-12, 0), pt(12, 0), pt(8, 6), pt(-8, 6)], fill=j((245, 245, 245)))
        d.rectangle(box(6, 6, 0, -3), fill=j((200, 50, 50)))
    elif label == "truck":  # big yellow box with a blue cab
        d.rectangle(box(16, 12, -3, 0), fill=j((230, 200, 20)))
        d.rectangle(box(7, 9, 9, 1), fill=j((40, 60, 200)))
        for dx in (-8, 8):
            d.ellipse(box(5, 5, dx, 7), fill=(10, 10, 10))
    return img


# ---------------------------------------------------------------- Naruto-like style

NARUTO_HAIR = ("orange", "black", "pink", "white", "red", "blue")
NARUTO_OUTFIT = ("an orange jacket", "a green vest", "a blue shirt", "a black cloak", "a red robe")
NARUTO_BACKGROUND = {"a forest": (40, 110, 50), "a village": (200, 170, 120), "a blue sky": (120, 180, 250),
                     "a stone wall": (140, 140, 140), "a sunset": (250, 120, 80)}


def draw_naruto(rng: random.Random, size: int = 128) -> tuple[Image.Image, str]:
    """A flat cel-shaded 'anime' character: thick black outlines, flat colours, spiky hair, a headband, shifted
    and scaled at random; the caption describes what was drawn, in the BLIP style of the real set."""
    hair, outfit = rng.choice(NARUTO_HAIR), rng.choice(NARUTO_OUTFIT)
    bg = rng.choice(sorted(NARUTO_BACKGROUND))
    img = _background(rng, size, NARUTO_BACKGROUND[bg], "blobs")
    d = ImageDraw.Draw(img)
    s = size / 64 * rng.uniform(0.85, 1.1)
    ox, oy = size / 2 + rng.uniform(-6, 6) * size / 64, rng.uniform(-2, 6) * size / 64

    def p(x, y):  # drawing coordinates of a 64-unit character centred at x = 32
        return (ox + (x - 32) * s, oy + y * s)

    def rect(x0, y0, x1, y1):
        return [*p(x0, y0), *p(x1, y1)]

    w = max(1, round(2 * s))
    d.rectangle(rect(18, 38, 46, 70), fill=_jitter(rng, COLORS[outfit.split()[1]], 15), outline=(0, 0, 0), width=w)
    d.ellipse(rect(20, 12, 44, 40), fill=_jitter(rng, (250, 215, 170), 10), outline=(0, 0, 0), width=w)  # face
    spikes = [(18 + 4 * k, 18 - (6 if k % 2 else 0)) for k in range(8)]
    d.polygon([p(18, 22)] + [p(x, y) for x, y in spikes] + [p(46, 22)], fill=_jitter(rng, COLORS[hair], 15),
              outline=(0, 0, 0))  # spiky hair
    d.rectangle(rect(20, 20, 44, 24), fill=(60, 60, 200), outline=(0, 0, 0), width=w)  # headband
    for x in (27, 37):  # eyes
        d.ellipse(rect(x - 2, 27, x + 2, 31), fill=(20, 20, 80))
    caption = f"a cartoon of a ninja with {hair} hair wearing {outfit} in front of {bg}"
    if rng.random() < 0.3:
        caption = f"an anime character with {hair} hair and {outfit}"
    return img.filter(ImageFilter.SMOOTH), caption


@functools.cache  # the folder's 120 captions are drawn once per process
def held_out_naruto_captions(n: int = 16) -> tuple[str, ...]:
    """n distinct Naruto-like captions drawn with HELD_OUT_SEED, none of them a caption of the tiny/naruto folder:
    in-domain prompts in the words the tiny CLIP knows, in combinations the fine-tune never saw."""
    folder_rng = random.Random(NARUTO_FOLDER_SEED)
    seen = {draw_naruto(folder_rng)[1] for _ in range(NARUTO_FOLDER_COUNT)}
    rng, captions = random.Random(HELD_OUT_SEED + 7), []
    while len(captions) < n:
        caption = draw_naruto(rng)[1]
        if caption not in seen and caption not in captions:
            captions.append(caption)
    return tuple(captions)


# Wordings the tiny CLIP learns CIFAR classes under: the fine-tune's training templates, the held-out ones and a few
# more, as a real CLIP has seen every way of saying "cat" (the held-out split is held out from fine-tuning only).
CLIP_TEMPLATES = ("a photo of a {label}", "a blurry photo of a {label}", "a close-up photo of a {label}",
                  "a low resolution photo of a {label}", "a cropped photo of the {label}", "a bright photo of a {label}",
                  "a painting of a {label}", "a pixelated photo of the {label}", "a sketch of a {label}",
                  "a {label}", "an image of a {label}", "a drawing of the {label}", "a small {label}")


def cifar_clip_caption(label: str, rng: random.Random) -> str:
    template = rng.choice(CLIP_TEMPLATES)
    if label[:1] in "aeiou":
        template = template.replace("a {label}", "an {label}")
    return template.format(label=label)
