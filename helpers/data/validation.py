"""What one image-caption record is, and the check every dataset goes through before any training.

Training on a broken file fails hours in, or worse, silently learns from a black square. So every source
(helpers.data.sources) returns lazy `Record`s and `validate` opens each image for real (helpers.data.images), reads each
caption, and returns a report (helpers.data.report): what is wrong, how bad it is, and what we did about it. A record
remembers the hash of the bytes that were checked, so training refuses a file that changed since.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .captions import clean_caption, truncation
from .images import ImageRefused, open_rgb
from .report import DatasetError, Issue, ValidationReport

MAX_SIDE = 4096  # px; larger images decode slowly and are downscaled so far that detail is lost anyway
MAX_MEGAPIXELS = 40.0


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Record:
    """One training example, not yet read: `load()` returns the image file's bytes, `image()` the checked image.

    A record without an image only carries `found` for the report: a caption file alone, a note about the dataset's
    files (a metadata file without a text column, a symlink loop)."""
    key: str  # file path, or "<dataset>/<split>/<index>" for a Hub dataset
    load: Callable[[], bytes] | None  # None when the source found no image (e.g. a caption file alone)
    caption: str | None  # None = the source found no caption at all
    label: int | None = None  # class id (CIFAR-10), else None
    found: list[Issue] = field(default_factory=list)  # what the source found while scanning; an error drops it
    caption_source: str = ""  # where the caption was read (or looked for, when missing): "cat.txt", "metadata.csv"
    content_hash: str | None = None  # sha256 of the image bytes, filled in by validate

    def image_bytes(self) -> bytes:
        if self.load is None:
            why = next((i.text for i in self.found), "nothing to load")
            raise DatasetError(f"{self.key}: no image ({why})")
        return self.load()

    def image(self) -> Image.Image:
        """The RGB image as validated. Raises DatasetError naming the file when it has gone, changed since `validate`
        hashed it, or no longer decodes: never PIL's bare "image file is truncated" hours into training."""
        try:
            data = self.image_bytes()
        except OSError as e:
            raise DatasetError(f"{self.key}: cannot be read any more ({type(e).__name__}: {e}); it was removed or "
                               f"moved after validation: restore it, or validate the dataset again") from e
        if self.content_hash is not None and content_hash(data) != self.content_hash:
            raise DatasetError(f"{self.key}: changed since validation (its bytes differ from the checked ones): "
                               f"validate the dataset again, so the report and the caches describe these files")
        try:
            return open_rgb(data)[0]
        except Exception as e:  # PIL raises OSError/SyntaxError/ValueError for truncated or corrupt data
            raise DatasetError(f"{self.key}: cannot be decoded: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- checks of one record

def _check_image(record: Record, resolution: int) -> tuple[list[Issue], str | None]:
    """Issues of one record's image, and its content hash (None when the image is unusable)."""
    def issue(severity, code, reason, detail=""):
        return Issue(record.key, severity, reason, code, detail)

    try:
        data = record.load()
    except Exception as e:  # a missing/unreadable file or a broken dataset row: report it, never crash
        return [issue("error", "unreadable", "cannot be read", f"{type(e).__name__}: {e}")], None
    if not data:
        return [issue("error", "empty_file", "empty file (0 bytes)")], None
    try:
        img, notes = open_rgb(data)
    except UnidentifiedImageError:
        return [issue("error", "not_image", "not an image file", f"starts with {data[:8]!r}")], None
    except Image.DecompressionBombError as e:
        return [issue("error", "too_large", "too large to decode safely", str(e))], None
    except ImageRefused as e:
        return [issue("error", e.code, "refused: its pixels cannot be converted to 8-bit RGB faithfully",
                      str(e))], None
    except Exception as e:  # PIL raises OSError/SyntaxError/ValueError... for truncated or corrupt data
        return [issue("error", "truncated", "truncated or corrupt image", f"{type(e).__name__}: {e}")], None
    issues = [issue(severity, code, reason, detail) for severity, code, reason, detail in notes]
    w, h = img.size
    if min(w, h) < resolution:
        issues.append(issue("warning", "small", f"short side under {resolution} px: upscaled", f"{w}×{h}"))
    if max(w, h) > MAX_SIDE or w * h > MAX_MEGAPIXELS * 1e6:
        issues.append(issue("warning", "large", "very large image: slow to decode; consider downscaling it "
                                                "beforehand", f"{w}×{h} ({w * h / 1e6:.0f} MP)"))
    return issues, content_hash(data)


def _check_caption(record: Record, tokenizer, cache: dict) -> list[Issue]:
    where = record.caption_source
    if record.caption is None:
        return [Issue(record.key, "error", "no caption", "missing_caption", where)]
    if not clean_caption(record.caption):
        return [Issue(record.key, "error", "empty caption (blank, or only invisible characters)", "empty_caption",
                      where)]
    cut = truncation(record.caption, tokenizer, cache) if tokenizer is not None else None
    if cut:
        n, tail = cut
        shown = tail if len(tail) <= 60 else "…" + tail[-60:]
        return [Issue(record.key, "warning", f"caption longer than {tokenizer.model_max_length} tokens: the rest is "
                                             f"cut off", "long_caption", f"{n} tokens, '{shown}' is lost")]
    return []


# ---------------------------------------------------------------- validate

def validate(records: list[Record], resolution: int, tokenizer=None, on_error: str = "skip") -> ValidationReport:
    """Open every image and read every caption; return the usable records and the report.

    on_error="skip" drops records with errors and keeps going; "stop" checks everything, then raises a
    DatasetError naming every bad file (`report.raise_errors`). Duplicated images (same bytes) keep the first
    copy either way. `tokenizer` (CLIP, 77 tokens) finds captions that would be truncated; None skips that check.
    """
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', not {on_error!r}")
    issues, usable, seen, cache = [], [], {}, {}
    for record in tqdm(records, desc="validating", unit="img", mininterval=1.0):
        found, digest = list(record.found), None
        try:
            if record.load is not None:
                image_issues, digest = _check_image(record, resolution)
                said = any(i.severity == "error" for i in found)  # e.g. an unreadable caption file: said already
                found = image_issues + found + ([] if said else _check_caption(record, tokenizer, cache))
            elif not found:
                found.append(Issue(record.key, "error", "no image", "no_image"))
        except Exception as e:  # whatever else goes wrong with one file must not stop the others
            found, digest = [Issue(record.key, "error", "unexpected failure", "unexpected",
                                   f"{type(e).__name__}: {e}")], None
        if digest is not None and digest in seen and not any(i.severity == "error" for i in found):
            found.append(Issue(record.key, "warning", "duplicate of an earlier image: dropped (first copy kept)",
                               "duplicate", f"same bytes as {seen[digest]}"))
        issues += found
        if record.load is None or any(i.severity == "error" or i.code == "duplicate" for i in found):
            continue
        seen[digest] = record.key
        record.content_hash = digest
        usable.append(record)
    report = ValidationReport(usable, issues, checked=sum(r.load is not None for r in records))
    if on_error == "stop":
        report.raise_errors()
    return report
