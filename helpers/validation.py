"""What one image-caption record is, and the check every dataset goes through before any training.

Training on a broken file fails hours in, or worse, silently learns from a black square. So every source
(helpers.sources) returns lazy `Record`s and `validate` opens each image for real, reads each caption, and writes a
per-file report: what is wrong, how bad it is, and what we did about it.

Severities: "error" = the record cannot be used (dropped with on_error="skip", raises with "stop");
"warning" = usable but changed (converted, upscaled, truncated) or dropped as a duplicate; "info" = harmless.
"""
from __future__ import annotations

import csv
import hashlib
import html
import io
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm.auto import tqdm

MAX_SIDE = 4096  # px; larger images decode slowly and are downscaled so far that detail is lost anyway
MAX_MEGAPIXELS = 40.0
SEVERITIES = ("error", "warning", "info")


class DatasetError(ValueError):
    """The dataset cannot be used as it is; the message lists every bad file and why."""


@dataclass
class Record:
    """One training example, not yet read: `load()` returns the image file's bytes."""
    key: str  # file path, or "<dataset>/<split>/<index>" for a Hub dataset
    load: Callable[[], bytes] | None  # None when the source found no image (e.g. a caption file alone)
    caption: str | None  # None = the source found no caption at all
    label: int | None = None  # class id (CIFAR-10), else None
    problem: str = ""  # what the source already found wrong while scanning (validate reports it as an error)
    problem_code: str = ""  # its category, e.g. "orphan_caption"
    content_hash: str | None = None  # sha256 of the image bytes, filled in by validate

    def image_bytes(self) -> bytes:
        if self.load is None:
            raise DatasetError(f"{self.key}: no image ({self.problem or 'nothing to load'})")
        return self.load()


@dataclass(frozen=True)
class Issue:
    key: str  # which file / record
    severity: str  # "error", "warning" or "info"
    reason: str  # human-readable, specific to this file
    code: str = ""  # short category for counting: "truncated", "long_caption", ...


# ---------------------------------------------------------------- images

def open_rgb(data: bytes) -> tuple[Image.Image, str]:
    """Decode image bytes fully (a truncated file raises instead of coming back half grey) and convert to RGB.

    Returns (image, what was done): "" for RGB input, otherwise a sentence for the report. Transparent pixels
    are composited on white: converting RGBA straight to RGB keeps whatever colour hides under alpha = 0,
    often black or garbage.
    """
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    mode = img.mode
    if mode == "RGB":
        return img, ""
    transparent = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if transparent:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"mode {mode} with transparency: composited on white"
    return img.convert("RGB"), f"mode {mode} converted to RGB"


# ---------------------------------------------------------------- captions

def caption_token_lengths(records: list[Record], tokenizer) -> list[int]:
    """CLIP tokens per caption including the start/end tokens (the text encoder sees at most 77)."""
    cache: dict[str, int] = {}
    for r in records:
        text = r.caption or ""
        if text not in cache:
            cache[text] = len(tokenizer(text, truncation=False, verbose=False).input_ids)
    return [cache[r.caption or ""] for r in records]


def _truncation(caption: str, tokenizer, cache: dict) -> tuple[int, str] | None:
    """(token count, the text that is cut off) when the caption exceeds the tokenizer's limit, else None."""
    if caption not in cache:
        ids = tokenizer(caption, truncation=False, verbose=False).input_ids
        limit = tokenizer.model_max_length
        # The pipelines keep ids[:limit-1] + [eos]: everything from position limit-1 up to our own eos is lost.
        cache[caption] = (len(ids), tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True)) \
            if len(ids) > limit else None
    return cache[caption]


# ---------------------------------------------------------------- the report

@dataclass
class ValidationReport:
    records: list[Record]  # usable records, in source order
    issues: list[Issue] = field(default_factory=list)
    checked: int = 0  # records looked at

    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def counts(self) -> list[tuple[str, str, int]]:
        """(severity, code, count), most severe first."""
        c = Counter((i.severity, i.code) for i in self.issues)
        return sorted(((s, code, n) for (s, code), n in c.items()), key=lambda t: (SEVERITIES.index(t[0]), t[1]))

    def summary(self) -> str:
        lines = [f"{self.checked} records checked, {len(self.records)} usable, "
                 f"{self.checked - len(self.records)} dropped, {len(self.issues)} issues"]
        if self.issues:
            lines.append(f"{'severity':<9} {'reason':<16} {'count':>5}")
            lines += [f"{s:<9} {code:<16} {n:>5}" for s, code, n in self.counts()]
        return "\n".join(lines)

    def to_markdown(self, max_rows: int = 100) -> str:
        rows = ["| file | severity | reason |", "|---|---|---|"]
        rows += [f"| {i.key} | {i.severity} | {i.reason.replace('|', '/')} |" for i in self.issues[:max_rows]]
        if len(self.issues) > max_rows:
            rows.append(f"| … {len(self.issues) - max_rows} more (see the saved CSV) | | |")
        return self.summary() + "\n\n" + "\n".join(rows)

    def _repr_html_(self, max_rows: int = 100) -> str:
        colors = {"error": "#fdd", "warning": "#ffd", "info": "#eef"}
        body = "".join(f"<tr style='background:{colors[i.severity]}'><td>{html.escape(i.key)}</td>"
                       f"<td>{i.severity}</td><td>{html.escape(i.reason)}</td></tr>" for i in self.issues[:max_rows])
        more = (f"<tr><td colspan=3>… {len(self.issues) - max_rows} more (see the saved CSV)</td></tr>"
                if len(self.issues) > max_rows else "")
        return (f"<pre>{html.escape(self.summary())}</pre><table><tr><th>file</th><th>severity</th>"
                f"<th>reason</th></tr>{body}{more}</table>")

    def save(self, folder: str | Path) -> tuple[Path, Path]:
        """Write validation_report.csv and validation_report.json (issues + counts) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        csv_path, json_path = folder / "validation_report.csv", folder / "validation_report.json"
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["key", "severity", "code", "reason"])
            writer.writeheader()
            writer.writerows(asdict(i) for i in self.issues)
        json_path.write_text(json.dumps({
            "checked": self.checked, "usable": len(self.records), "issues": [asdict(i) for i in self.issues],
            "counts": [{"severity": s, "code": c, "count": n} for s, c, n in self.counts()]}, indent=1))
        return csv_path, json_path


# ---------------------------------------------------------------- validate

def _check_image(record: Record, resolution: int) -> tuple[list[Issue], str | None]:
    """Issues of one record's image, and its content hash (None when the image is unusable)."""
    def issue(severity, code, reason):
        return Issue(record.key, severity, reason, code)

    if record.problem or record.load is None:
        return [issue("error", record.problem_code or "no_image", record.problem or "no image")], None
    try:
        data = record.load()
    except Exception as e:  # a missing/unreadable file or a broken dataset row: report it, never crash
        return [issue("error", "unreadable", f"cannot read: {type(e).__name__}: {e}")], None
    if not data:
        return [issue("error", "empty_file", "empty file (0 bytes)")], None
    try:
        img, converted = open_rgb(data)
    except UnidentifiedImageError:
        return [issue("error", "not_image", f"not an image file (starts with {data[:8]!r})")], None
    except Image.DecompressionBombError as e:
        return [issue("error", "too_large", f"too large to decode safely: {e}")], None
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError... for truncated or corrupt data
        return [issue("error", "truncated", f"truncated or corrupt image: {type(e).__name__}: {e}")], None
    issues = []
    if converted:
        issues.append(issue("warning" if "transparency" in converted else "info",
                            "transparency" if "transparency" in converted else "mode_converted", converted))
    w, h = img.size
    if min(w, h) < resolution:
        issues.append(issue("warning", "small", f"small image {w}×{h}: short side < {resolution}, upscaled"))
    if max(w, h) > MAX_SIDE or w * h > MAX_MEGAPIXELS * 1e6:
        issues.append(issue("warning", "large", f"very large image {w}×{h} ({w * h / 1e6:.0f} MP): slow to decode; "
                                                 f"consider downscaling it beforehand"))
    return issues, hashlib.sha256(data).hexdigest()


def _check_caption(record: Record, tokenizer, cache: dict) -> list[Issue]:
    if record.problem or record.load is None:  # already reported by _check_image
        return []
    if record.caption is None:
        stem = Path(record.key).stem
        return [Issue(record.key, "error", f"missing caption: no {stem}.txt and no metadata row", "missing_caption")]
    if not record.caption.strip():
        return [Issue(record.key, "error", "empty caption", "empty_caption")]
    cut = _truncation(record.caption, tokenizer, cache) if tokenizer is not None else None
    if cut:
        n, tail = cut
        limit = tokenizer.model_max_length
        shown = tail if len(tail) <= 60 else "…" + tail[-60:]
        return [Issue(record.key, "warning", f"caption has {n} tokens, truncated to {limit} tokens: "
                                             f"'{shown}' is cut off", "long_caption")]
    return []


def validate(records: list[Record], resolution: int, tokenizer=None, on_error: str = "skip") -> ValidationReport:
    """Open every image and read every caption; return the usable records and a per-file report.

    on_error="skip" drops records with errors and keeps going; "stop" checks everything, then raises a
    DatasetError listing every bad file. Duplicated images (same bytes) keep the first copy either way.
    `tokenizer` (CLIP, 77 tokens) finds captions that would be truncated; None skips that check.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    issues, usable, seen, cache = [], [], {}, {}
    for record in tqdm(records, desc="validating", unit="img", mininterval=1.0):
        try:
            found, digest = _check_image(record, resolution)
            found += _check_caption(record, tokenizer, cache)
        except Exception as e:  # whatever else goes wrong with one file must not stop the others
            found, digest = [Issue(record.key, "error", f"unexpected {type(e).__name__}: {e}", "unexpected")], None
        if digest is not None and digest in seen and not any(i.severity == "error" for i in found):
            found.append(Issue(record.key, "warning", f"duplicate of {seen[digest]}: dropped (first copy kept)",
                               "duplicate"))
        issues += found
        if any(i.severity == "error" for i in found) or any(i.code == "duplicate" for i in found):
            continue
        seen[digest] = record.key
        record.content_hash = digest
        usable.append(record)
    report = ValidationReport(usable, issues, checked=len(records))
    if on_error == "stop" and report.errors():
        lines = "\n".join(f"  {i.key}: {i.reason}" for i in report.errors())
        raise DatasetError(f"{len(report.errors())} bad files (fix or remove them, or use on_error='skip'):\n{lines}")
    return report


# ---------------------------------------------------------------- looking at a dataset

def preview_grid(records: list[Record], n: int = 16, columns: int = 4, tile: int = 128,
                 path: str | Path | None = None) -> Image.Image:
    """The first `n` usable images (centre square crops) with their captions underneath, as one PIL image."""
    import textwrap

    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default()
    chars, lines_per = max(8, tile // 6), 3
    shown = []
    for r in records:
        if len(shown) == n:
            break
        try:
            img, _ = open_rgb(r.image_bytes())
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


def caption_length_figure(lengths: list[int], limit: int = 77, path: str | Path | None = None):
    """Histogram of caption lengths in CLIP tokens with the text encoder's limit marked (matplotlib Figure)."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(lengths, bins=range(0, max([*lengths, limit]) + 3), color="tab:blue")
    ax.axvline(limit + 0.5, color="tab:red", linestyle="--", label=f"{limit}-token limit: the rest is cut off")
    over = sum(n > limit for n in lengths)
    ax.set(xlabel="tokens per caption (with start/end tokens)", ylabel="captions",
           title=f"{len(lengths)} captions, {over} over the limit")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


__all__ = ["Record", "Issue", "ValidationReport", "DatasetError", "validate", "open_rgb", "caption_token_lengths",
           "preview_grid", "caption_length_figure", "MAX_SIDE", "MAX_MEGAPIXELS"]
