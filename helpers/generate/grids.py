"""Image grids a person can read: comparison sheets (rows = prompts × seeds, columns = variants) and plain tiles.

A comparison sheet has the variant names above its columns and each row's prompt wrapped in a label column on the
left, in a scalable font of at least 14 px. Tiles are scaled so that no sheet is longer than `max_side` pixels on
either side (2000 by default); rows that do not fit go to the next sheet. Small images (64 px tiny samples, 32 px
CIFAR) are enlarged by a whole factor with NEAREST, so their pixels stay sharp instead of turning to blur.
"""
from __future__ import annotations

import functools
import importlib.util
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

MAX_SIDE = 2000  # longest side of one sheet in pixels: readable on a laptop screen and in a notebook at 100 %
PAGE_PX = 1000  # the width a notebook page shows at 100 %: a sheet meant to be read inline is drawn this wide at most
#                 and shown at its own size, so its 14 px text stays 14 px (a 2000 px sheet shown 680 px wide has 5 px)
MIN_TILE = 128  # smaller images are enlarged (by a whole factor) to at least this many pixels
MAX_TILE = 512  # larger images are shrunk to this: more rows per sheet, the full images are in the run folder
LABEL_WIDTH = 260  # the prompt column: about 31 characters per line at FONT_PX (both grow with big tiles)
LABEL_LINES = 6  # a longer prompt ends with an ellipsis
FONT_PX, TITLE_PX = 14, 18
GAP = 6  # white space between tiles and around the sheet
MIN_READABLE_TILE = 32  # below this, a sheet with that many columns is refused rather than drawn unreadable


@functools.cache
def _font(size: int = FONT_PX, bold: bool = False):
    """DejaVu Sans from matplotlib (a requirement): it has ×, −, accents, which Pillow's built-in font lacks."""
    spec = importlib.util.find_spec("matplotlib")
    folder = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" if spec else None
    if folder is not None and (folder / "DejaVuSans.ttf").is_file():
        return ImageFont.truetype(str(folder / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    return font.getbbox("Ag")[3] + 3


_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _pieces(text: str, font, width: int) -> list[tuple[str, str]]:
    """(joiner, piece): words, and a word wider than `width` cut after its "-", "_" or "/" (a run folder's name
    such as sdxl_lora_naruto_1024-lora-tiny), so it wraps instead of running into the next column."""
    out = []
    for word in text.split():
        if _MEASURE.textlength(word, font=font) <= width:
            out.append((" ", word))
        else:
            out += [(" " if k == 0 else "", part) for k, part in enumerate(re.split(r"(?<=[-_/])", word)) if part]
    return out


def _wrap(text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """Greedy word wrap to `width` pixels; overlong text ends with an ellipsis."""
    lines, line = [], ""
    for joiner, word in _pieces(text, font, width):
        candidate = f"{line}{joiner}{word}" if line else word
        if _MEASURE.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".") + "…"
    return lines


def _text_strip(lines: list[str], width: int, font) -> Image.Image:
    line_height = _line_height(font)
    strip = Image.new("RGB", (width, line_height * len(lines) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for k, line in enumerate(lines):
        draw.text((width / 2, 2 + k * line_height), line, fill="black", font=font, anchor="ma")
    return strip


def _open(image) -> Image.Image:
    return image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


# ---------------------------------------------------------------- plain tiles (training samples, notebook figures)

def image_grid(images: list[Image.Image], rows: int, cols: int, labels: list[str] | None = None,
               title: str | None = None) -> Image.Image:
    """Tiles `images` row by row (all the size of the first) with an optional label under each and a title."""
    if not images or len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}×{cols} grid")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    w, h = images[0].size
    font = _font(12)
    strips = [_text_strip(_wrap(label, font, w - 4), w, font) for label in labels] if labels else []
    label_h = max((s.height for s in strips), default=0)
    head = _text_strip(_wrap(title, font, cols * w - 4), cols * w, font) if title else None
    top = head.height if head else 0
    grid = Image.new("RGB", (cols * w, top + rows * (h + label_h)), "white")
    if head:
        grid.paste(head, (0, 0))
    for k, image in enumerate(images):
        x, y = (k % cols) * w, top + (k // cols) * (h + label_h)
        grid.paste(image.convert("RGB").resize((w, h)) if image.size != (w, h) else image.convert("RGB"), (x, y))
        if strips:
            grid.paste(strips[k], (x, y + h))
    return grid


THUMB_PX = 256  # a tile of a thumbnail sheet: what a notebook shows inline; the full-size file stays on Drive


def thumbnail_sheet(images: list[Image.Image], labels: list[str] | None = None, title: str | None = None,
                    tile: int = THUMB_PX) -> Image.Image:
    """One row of `images` shrunk to at most `tile` px a side (smaller ones kept), labelled: what a notebook shows
    inline. Six 1024 px training samples would be a 6144 px PNG of several MB in the notebook file; this is 1536."""
    scale = min(1.0, tile / max(images[0].size))
    size = (max(1, round(images[0].width * scale)), max(1, round(images[0].height * scale)))
    small = [im.convert("RGB").resize(size, Image.Resampling.LANCZOS) if scale < 1 else im for im in images]
    return image_grid(small, 1, len(small), labels, title)

# ---------------------------------------------------------------- comparison sheets

@dataclass(frozen=True)
class SheetLayout:
    """Where everything goes on a comparison sheet; every sheet of one comparison shares it."""
    tile: tuple[int, int]  # (width, height) of one image on the sheet
    columns: int  # variants
    text_scale: float  # fonts and the label column grow with big tiles, to stay legible when a notebook shrinks them
    names_top: int  # y of the column names, below the title
    header: int  # height of the title and the column names
    row_height: int  # the taller of a tile and the longest row label, plus GAP
    rows_per_sheet: int  # as many rows as fit in max_side

    @property
    def label_width(self) -> int:
        return round(LABEL_WIDTH * self.text_scale)

    def fonts(self) -> tuple:
        """(regular, bold, title) fonts at this sheet's scale."""
        size, title = round(FONT_PX * self.text_scale), round(TITLE_PX * self.text_scale)
        return _font(size), _font(size, bold=True), _font(title, bold=True)

    @property
    def width(self) -> int:
        return self.label_width + self.columns * (self.tile[0] + GAP) + GAP

    def height(self, rows: int) -> int:
        return self.header + rows * self.row_height + GAP

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel of a tile, `row` counted on its own sheet."""
        return self.label_width + GAP + column * (self.tile[0] + GAP), self.header + row * self.row_height

    def label_lines(self, label: str) -> list[tuple[str, str]]:
        """(line, colour): the first paragraph (the prompt) in black, the rest (seed, notes) in grey."""
        lines = []
        for k, paragraph in enumerate(label.split("\n")):
            colour = "black" if k == 0 else "dimgray"
            lines += [(line, colour) for line in _wrap(paragraph, self.fonts()[0], self.label_width - GAP, LABEL_LINES)]
        return lines


def tile_scale(image_size: tuple[int, int], columns: int, max_side: int = MAX_SIDE) -> tuple[float, float]:
    """(image scale, text scale) for a sheet with `columns` variants. Images: a whole factor up to MIN_TILE, down
    to MAX_TILE, then down again until the columns fit the width (and one row the height) of `max_side`. Text: 1
    up to 320 px tiles, then growing with them (at most 1.75×: 24 px on a 512 px tile)."""
    w, h = image_size
    scale = math.ceil(MIN_TILE / min(w, h)) if min(w, h) < MIN_TILE else min(1.0, MAX_TILE / max(w, h))
    text_scale = min(1.75, max(1.0, max(w, h) * scale / 320))
    fit_width = (max_side - LABEL_WIDTH * text_scale - GAP) / columns - GAP
    fit_height = max_side - 6 * TITLE_PX * text_scale  # room for two lines of title and two of column names
    return min(scale, fit_width / w, fit_height / h), text_scale


def _sheet_caption(title: str, index: int, count: int) -> str:
    return f"{title} · sheet {index}/{count}" if count > 1 else title


def sheet_layout(image_size: tuple[int, int], row_labels: Sequence[str], column_names: Sequence[str],
                 title: str = "", max_side: int = MAX_SIDE, max_height: int | None = None) -> SheetLayout:
    scale, text_scale = tile_scale(image_size, len(column_names), max_side)
    tile = (math.floor(image_size[0] * scale + 1e-9), math.floor(image_size[1] * scale + 1e-9))  # down: must fit
    if min(tile) < MIN_READABLE_TILE:
        raise ValueError(f"{len(column_names)} variants do not fit a {max_side} px sheet readably "
                         f"(tiles of {tile[0]}×{tile[1]} px); compare fewer variants per grid")
    draft = SheetLayout(tile, len(column_names), text_scale, 0, 0, 0, 0)
    regular, bold, big = draft.fonts()
    title_lines = len(_wrap(_sheet_caption(title, 99, 99), big, draft.width - 2 * GAP, 2)) if title else 0
    names_top = GAP + title_lines * _line_height(big) + GAP
    name_lines = max(len(_wrap(name, bold, tile[0], 2)) for name in column_names)
    header = names_top + name_lines * _line_height(bold) + GAP
    label_lines = max(len(draft.label_lines(label)) for label in row_labels)
    row_height = max(tile[1], label_lines * _line_height(regular)) + GAP
    rows_per_sheet = ((max_height or max_side) - header - GAP) // row_height
    if rows_per_sheet < 1:
        raise ValueError(f"one row of {row_height} px does not fit a {max_side} px sheet; shorten the labels")
    return SheetLayout(tile, len(column_names), text_scale, names_top, header, row_height, rows_per_sheet)


def _draw_sheet(layout: SheetLayout, rows: Sequence[Sequence], row_labels: Sequence[str],
                column_names: Sequence[str], caption: str) -> Image.Image:
    regular, bold, big = layout.fonts()
    sheet = Image.new("RGB", (layout.width, layout.height(len(rows))), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(_wrap(caption, big, layout.width - 2 * GAP, 2) if caption else []):
        draw.text((GAP, GAP + k * _line_height(big)), line, fill="black", font=big)
    for column, name in enumerate(column_names):
        x = layout.tile_origin(0, column)[0] + layout.tile[0] / 2
        for k, line in enumerate(_wrap(name, bold, layout.tile[0], 2)):
            draw.text((x, layout.names_top + k * _line_height(bold)), line, fill="black", font=bold, anchor="ma")
    for row, (images, label) in enumerate(zip(rows, row_labels)):
        y = layout.tile_origin(row, 0)[1]
        if row:
            draw.line([(GAP, y - GAP // 2), (layout.width - GAP, y - GAP // 2)], fill="gainsboro")
        for k, (line, colour) in enumerate(layout.label_lines(label)):
            draw.text((GAP, y + k * _line_height(regular)), line, fill=colour, font=regular)
        for column, image in enumerate(images):
            image = _open(image)
            if image.size != layout.tile:  # NEAREST keeps small samples' pixels sharp; LANCZOS shrinks cleanly
                method = Image.NEAREST if layout.tile[0] > image.size[0] else Image.LANCZOS
                image = image.resize(layout.tile, method)
            sheet.paste(image, layout.tile_origin(row, column))
    return sheet


def comparison_sheets(rows: Sequence[Sequence], row_labels: Sequence[str], column_names: Sequence[str],
                      out_stem: str | Path, title: str = "", max_side: int = MAX_SIDE,
                      max_height: int | None = None) -> list[Path]:
    """Draw `rows` (each one image or image path per column, e.g. one prompt and seed across the variants) as
    sheets `{out_stem}_1.png`, `{out_stem}_2.png`, … of at most `max_side` px a side (`max_height`: a taller
    limit for the rows, e.g. a page-wide sheet of many rows); returns their paths.
    A row label may hold several paragraphs ("prompt\\nseed 3"): the first is drawn black, the others grey."""
    if not rows or len(rows) != len(row_labels):
        raise ValueError(f"need one label per row and at least one row (got {len(rows)} rows, "
                         f"{len(row_labels)} labels)")
    if not column_names or any(len(row) != len(column_names) for row in rows):
        raise ValueError(f"every row needs one image per column ({len(column_names)} columns)")
    layout = sheet_layout(_open(rows[0][0]).size, row_labels, column_names, title, max_side, max_height)
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    per_sheet = layout.rows_per_sheet
    count = -(-len(rows) // per_sheet)
    paths = []
    for index in range(count):
        part = slice(index * per_sheet, (index + 1) * per_sheet)
        sheet = _draw_sheet(layout, rows[part], row_labels[part], column_names, _sheet_caption(title, index + 1, count))
        paths.append(out_stem.with_name(f"{out_stem.name}_{index + 1}.png"))
        sheet.save(paths[-1])
    return paths
