"""Decoding one image file into the RGB picture the model trains on, and saying what that took.

Every path that turns bytes into pixels (validation, the training Dataset, the latent cache, the preview grid) goes
through `open_rgb`, so an image is rotated, scaled and flattened the same way whether it is checked, cached or
trained on. What it did comes back as notes for the validation report; what it cannot do honestly (a float image
of unknown scale) it refuses with `ImageRefused` instead of guessing.
"""
from __future__ import annotations

import io
import textwrap

import numpy as np
from PIL import ExifTags, Image, ImageDraw, ImageFile, ImageFont, ImageOps

Note = tuple[str, str, str, str]  # (severity, code, reason shared by every file of the kind, detail of this file)
TRANSPARENT_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageRefused(ValueError):
    """The file decodes, but not into pixels we can train on without guessing; `code` names the kind."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def _decode(data: bytes) -> tuple[Image.Image, list[Note]]:
    """The first frame, fully decoded: a truncated file raises instead of coming back half grey."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
        frames = getattr(img, "n_frames", 1)  # GIF/TIFF/WebP count by seeking: before load, then back to frame 0
        img.seek(0)
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    if frames > 1:
        return img, [("warning", "frames_dropped", "animated or multi-page file: only the first frame is trained on",
                      f"{img.format}, {frames} frames")]
    return img, []


def _upright(img: Image.Image) -> tuple[Image.Image, list[Note]]:
    """Rotate/mirror as the EXIF Orientation tag says: phone photos store pixels sideways and set the tag, and
    SDXL's size conditioning must see the (h, w) a person sees, not the sensor's."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation not in range(2, 9):  # 1 = stored upright; anything else is not a valid tag
        return img, []
    stored = img.size
    img = ImageOps.exif_transpose(img)
    return img, [("info", "exif_orientation", "turned upright as its EXIF Orientation tag says",
                  f"Orientation={orientation}: stored {stored[0]}×{stored[1]}, used {img.width}×{img.height}")]


def _to_8bit(img: Image.Image) -> tuple[Image.Image, list[Note]]:
    """16-bit and float grayscale scaled to 0–255: `convert("L")` clips them instead (a 16-bit gradient comes out
    almost white, a float image in 0–1 black)."""
    mode = img.mode
    values = np.asarray(img).astype(np.float64)
    if mode in SIXTEEN_BIT_MODES:
        scaled, what = values / 257.0, "0–65535"  # 65535 / 255 = 257: full scale maps to full scale
    elif mode == "F":
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not np.isfinite(values).all() or lo < 0.0 or hi > 1.0:
            raise ImageRefused("float_range", f"32-bit float image with values from {lo:g} to {hi:g}: only 0–1 has "
                                              f"a known scale; save it as an 8- or 16-bit PNG")
        scaled, what = values * 255.0, "0–1"
    else:  # "I": 32-bit integers could mean 0–255, 0–65535 or anything else
        raise ImageRefused("int32_image", f"32-bit integer image (mode {mode}): its value range cannot be told; "
                                          f"save it as an 8- or 16-bit PNG")
    gray = Image.fromarray(np.clip(np.round(scaled), 0, 255).astype(np.uint8), "L")
    return gray, [("info", "high_bit_depth", "16-bit or float grayscale scaled to 8 bits",
                   f"mode {mode}, {what} → 0–255")]


def open_rgb(data: bytes) -> tuple[Image.Image, list[Note]]:
    """Decode image bytes into the RGB image the model sees, with notes on what that took.

    First frame only, EXIF orientation applied, 16-bit/float grayscale scaled (not clipped) to 8 bits, transparent
    pixels composited on white (converting RGBA straight to RGB keeps whatever colour hides under alpha = 0, often
    black or garbage), any other mode converted. Raises ImageRefused for pixels it cannot convert honestly, and
    PIL's own errors for files that do not decode.
    """
    img, notes = _decode(data)
    img, turned = _upright(img)
    notes += turned
    if img.mode in SIXTEEN_BIT_MODES + ("I", "F"):
        img, scaled = _to_8bit(img)
        notes += scaled
    mode = img.mode
    if mode == "RGB":
        return img, notes
    if mode in TRANSPARENT_MODES or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        notes.append(("warning", "transparency", "transparent pixels composited on white", f"mode {mode}"))
        return Image.alpha_composite(white, rgba).convert("RGB"), notes
    try:
        rgb = img.convert("RGB")
    except ValueError as e:  # e.g. LAB, HSV: PIL has no conversion to RGB for them
        raise ImageRefused("unsupported_mode", f"mode {mode} cannot be converted to RGB: {e}") from e
    if not any(code == "high_bit_depth" for _, code, _, _ in notes):  # said already for scaled grayscale
        notes.append(("info", "mode_converted", "converted to RGB", f"mode {mode}"))
    return rgb, notes


# ---------------------------------------------------------------- looking at a dataset

def preview_grid(records: list, n: int = 16, columns: int = 4, tile: int = 128, path=None) -> Image.Image:
    """The first `n` usable images of `records` (helpers.data.validation.Record: centre square crops, as trained) with
    their captions underneath, as one PIL image."""
    import matplotlib  # its DejaVu Sans has the accents Pillow's built-in font draws as boxes ("na�ve caf�")
    font = ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/DejaVuSans.ttf", 10)
    chars, lines_per = max(8, tile // 6), 3
    shown = []
    for r in records:
        if len(shown) == n:
            break
        try:
            img = r.image()
        except Exception:  # preview what can be shown; validate() reports the rest
            continue
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        lines = textwrap.wrap(r.caption or "(no caption)", chars)
        if len(lines) > lines_per:
            lines = lines[:lines_per - 1] + [lines[lines_per - 1][: chars - 1] + "…"]
        shown.append((img.crop((left, top, left + side, top + side)).resize((tile, tile)), lines))
    rows = max(1, -(-len(shown) // columns))
    text_h = 12 * lines_per + 4
    grid = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (img, lines) in enumerate(shown):
        x, y = (k % columns) * tile, (k // columns) * (tile + text_h)
        grid.paste(img, (x, y))
        draw.multiline_text((x + 2, y + tile + 2), "\n".join(lines), fill="black", font=font, spacing=2)
    if path is not None:
        grid.save(path)
    return grid
