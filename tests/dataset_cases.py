"""Awkward dataset files, written from scratch with PIL/numpy: each writer makes one case the folder scan, the
decoder or the caption reader must handle, and `every_case` puts them all in one folder for the report test."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag phones set instead of rotating the pixels


def picture(path: Path, color="red", caption: str | bytes | None = "a plain square", size=(80, 60)) -> Path:
    """A plain image (format by suffix) and, unless caption is None, its same-name .txt (bytes written as they are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    if caption is not None:
        txt = path.with_suffix(".txt")
        txt.write_bytes(caption) if isinstance(caption, bytes) else txt.write_text(caption, encoding="utf-8")
    return path


def exif_rotated_jpeg(path: Path) -> np.ndarray:
    """A 60×40 (w×h) JPEG stored sideways with Orientation=6 ("rotate 90° clockwise to show"): the left third is
    red, the rest blue. Returns the stored pixels."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    return stored


def gradient16_png(path: Path) -> np.ndarray:
    """A 16-bit grayscale PNG (mode I;16): a horizontal gradient over the full 0–65535 range."""
    values = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (16, 1))
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    return values


def float_tiff(path: Path, top: float = 1.0) -> np.ndarray:
    """A 32-bit float TIFF (mode F): a horizontal gradient from 0 to `top`."""
    values = np.tile(np.linspace(0, top, 256, dtype=np.float32), (16, 1))
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "F"
    return values


def animated_gif(path: Path, colors=("red", "lime", "blue")) -> None:
    frames = [Image.new("RGB", (70, 70), c) for c in colors]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


def multipage_tiff(path: Path, pages: int = 3) -> None:
    frames = [Image.new("RGB", (70, 70), (80 * k, 0, 0)) for k in range(pages)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


def excel_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """metadata.csv as Excel's "CSV UTF-8" writes it: a UTF-8 byte-order mark and CRLF line ends."""
    text = io.StringIO()
    csv.writer(text, lineterminator="\r\n").writerows([header, *rows])
    path.write_bytes(b"\xef\xbb\xbf" + text.getvalue().encode("utf-8"))


def jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ---------------------------------------------------------------- one folder holding every case

def every_case(root: Path, outside: Path) -> dict[str, tuple[str, str]]:
    """Every case in `root` (a symlinked folder points at `outside`); returns file (relative to root) →
    (code, severity) of the finding the report must show for it."""
    colors = iter(f"hsv({hue}, 80%, 90%)" for hue in range(0, 360, 20))  # distinct images: no duplicates here
    for name in ("good1.png", "good2.png"):
        picture(root / name, next(colors), f"a clean {name}")
    exif_rotated_jpeg(root / "phone.jpg")
    gradient16_png(root / "gradient16.png")
    float_tiff(root / "float01.tif")
    float_tiff(root / "float255.tif", top=255.0)
    animated_gif(root / "animated.gif")
    multipage_tiff(root / "pages.tif")
    for name in ("phone.jpg", "gradient16.png", "float01.tif", "float255.tif", "animated.gif", "pages.tif"):
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    picture(root / "latin1.png", next(colors), "café au lait".encode("latin-1"))
    picture(root / "utf16.png", next(colors), "crème brûlée".encode("utf-16"))  # with its byte-order mark
    picture(root / "PHOTO.JPG", next(colors), None)
    (root / "PHOTO.TXT").write_text("an upper-case caption file")
    picture(root / "invisible.png", next(colors), "\u200b\ufeff\u200d\n")
    picture(root / "excel" / "e1.png", next(colors), None)
    excel_csv(root / "excel" / "metadata.csv", ["file_name", "text"], [["e1.png", "naïve café"]])
    picture(root / "dup_rows" / "d1.png", next(colors), None)
    jsonl(root / "dup_rows" / "metadata.jsonl", [{"file_name": "d1.png", "text": "first"},
                                                {"file_name": "d1.png", "text": "second"}])
    picture(root / "both" / "b1.png", next(colors), None)
    jsonl(root / "both" / "metadata.jsonl", [{"file_name": "b1.png", "text": "from the jsonl"}])
    excel_csv(root / "both" / "metadata.csv", ["file_name", "text"], [["b1.png", "from the csv"]])
    picture(root / "notext" / "n1.png", next(colors), None)
    excel_csv(root / "notext" / "metadata.csv", ["file_name", "description"], [["n1.png", "a square"]])
    picture(outside / "o1.png", next(colors), "an image behind a symlink")
    os.symlink(outside, root / "linked")
    (root / "loopy").mkdir()
    os.symlink("..", root / "loopy" / "back")
    return {
        "phone.jpg": ("exif_orientation", "info"), "gradient16.png": ("high_bit_depth", "info"),
        "float01.tif": ("high_bit_depth", "info"), "float255.tif": ("float_range", "error"),
        "animated.gif": ("frames_dropped", "warning"), "pages.tif": ("frames_dropped", "warning"),
        "latin1.png": ("text_encoding", "error"), "invisible.png": ("empty_caption", "error"),
        "dup_rows/d1.png": ("duplicate_row", "warning"), "both/metadata.csv": ("two_metadata_files", "warning"),
        "notext/metadata.csv": ("no_text_column", "error"), "notext/n1.png": ("missing_caption", "error"),
        "linked": ("symlink_followed", "info"), "loopy/back": ("symlink_loop", "info"),
    }
