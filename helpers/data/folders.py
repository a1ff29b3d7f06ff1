"""A user's image folder as lazy `Record`s: images, their captions (same-name .txt files or metadata.jsonl /
metadata.csv rows) and a note for every choice the scan makes.

A folder is scanned here, not through `datasets`' imagefolder, so that nothing is decided silently: a stray
caption, a file named in the metadata but missing, two metadata files, a repeated row, a metadata file without a
text column, a symlinked sub-folder (followed once; a loop is not) each become a line in the validation report.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .captions import TextEncodingError, clean_caption, read_text
from .report import DatasetError, Issue
from .validation import Record

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass(eq=False)
class FileBytes:
    """Lazy handle: the bytes of one file (picklable, so DataLoader workers can use it)."""
    path: str

    def __call__(self) -> bytes:
        return Path(self.path).read_bytes()


def _note(key, severity: str, code: str, reason: str, detail: str = "") -> Record:
    """A record that only carries a finding about the dataset's files (not an example) for the report."""
    return Record(str(key), None, None, found=[Issue(str(key), severity, reason, code, detail)])


def _unreadable_text(key, error: Exception) -> Issue:
    if isinstance(error, TextEncodingError):
        return Issue(str(key), "error", "text is not UTF-8 (nor UTF-16 with a byte-order mark): not read",
                     "text_encoding", str(error))
    return Issue(str(key), "error", "text file cannot be read", "unreadable_text", f"{type(error).__name__}: {error}")


def _walk(root: Path) -> tuple[list[Path], list[Record]]:
    """Every file under `root` except hidden ones, with symlinked folders followed once each: each real folder is
    scanned before any link into it, and a link to a folder already scanned (a loop, or a second way in) is not
    followed but reported, so no image is silently missed or counted twice."""
    files, notes, scanned, tops = [], [], {}, [root]

    def unreadable(error: OSError) -> None:  # os.walk skips such folders silently by default
        notes.append(_note(error.filename, "error", "unreadable_folder", "folder cannot be read: its files are "
                                                                         "missing", str(error)))

    while tops:
        links = []
        for here, dirs, names in os.walk(tops.pop(0), onerror=unreadable):  # lists symlinked folders, never enters
            scanned[os.path.realpath(here)] = here
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            links += [Path(here, d) for d in dirs if os.path.islink(os.path.join(here, d))]
            files += [Path(here, n) for n in names if not n.startswith(".")]
        for link in links:
            target = os.path.realpath(link)
            if target not in scanned:
                notes.append(_note(link, "info", "symlink_followed", "symlinked folder: followed", f"→ {target}"))
                scanned[target] = link
                tops.append(link)
            elif os.path.commonpath([os.path.realpath(link.parent), target]) == target:  # it points up its own path
                notes.append(_note(link, "info", "symlink_loop", "symlink to a folder that contains it: not followed "
                                                                 "(it would loop forever)", f"→ {target}"))
            else:
                notes.append(_note(link, "info", "symlink_again", "symlink to a folder scanned already: not "
                                                                  "followed (its images would count twice)",
                                   f"same folder as {scanned[target]}"))
    return sorted(files), notes


def _read_metadata(meta: Path) -> tuple[list[tuple[Path, dict, str]], list[Record]]:
    """(image path, row, "metadata.csv line 4") of each row of metadata.jsonl / metadata.csv, and notes on what
    is wrong with the file: unreadable text, invalid lines, rows without file_name, no text column."""
    try:
        text = read_text(meta)
    except (OSError, TextEncodingError) as e:
        return [], [Record(str(meta), None, None, found=[_unreadable_text(meta, e)])]
    notes, parsed = [], []
    if meta.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            try:
                parsed += [(n, json.loads(line))] if line.strip() else []
            except json.JSONDecodeError as e:
                notes.append(_note(f"{meta}:{n}", "error", "bad_metadata", "metadata line is not valid JSON", str(e)))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        parsed = [(reader.line_num, row) for row in reader]
    rows, columns = [], {}
    for n, row in parsed:
        columns.update(dict.fromkeys(row) if isinstance(row, dict) else {})
        if not isinstance(row, dict) or not row.get("file_name"):
            notes.append(_note(f"{meta}:{n}", "error", "bad_metadata", "metadata row without file_name",
                               str(row)[:80]))
            continue
        rows.append((Path(os.path.normpath(meta.parent / row["file_name"])), row, f"{meta.name} line {n}"))
    if rows and not {"text", "caption"} & set(columns):
        notes.append(_note(meta, "error", "no_text_column", "metadata without a 'text' or 'caption' column: no "
                                                            "captions from it", f"columns found: {', '.join(columns)}"))
    return rows, notes


def _metadata(files: list[Path]) -> tuple[dict[Path, tuple[dict, str]], dict[Path, list[Issue]], list[Record]]:
    """The metadata row of each image path (the first, when rows repeat), the warnings per image path, and notes.
    Each folder may hold one metadata file; with both, metadata.jsonl is used (`datasets` refuses such a folder)."""
    rows, per_image, notes = {}, {}, []
    for meta in files:
        if meta.name == "metadata.csv" and meta.with_name("metadata.jsonl") in files:
            notes.append(_note(meta, "warning", "two_metadata_files", "metadata.csv beside a metadata.jsonl: "
                                                                      "ignored, metadata.jsonl is used"))
        elif meta.name in METADATA_NAMES:
            found, problems = _read_metadata(meta)
            notes += problems
            for path, row, where in found:
                if path in rows:
                    per_image.setdefault(path, []).append(Issue(
                        str(path), "warning", "named by two metadata rows: the first is used", "duplicate_row",
                        f"{where} ignored, {rows[path][1]} used"))
                else:
                    rows[path] = (row, where)
    return rows, per_image, notes


def _caption(image: Path, txt: Path | None, row: dict, where: str) -> tuple[str | None, str, list[Issue]]:
    """(caption, where it came from or was looked for, issues) of one image: its .txt file wins over its row."""
    if txt is not None:
        try:
            return clean_caption(read_text(txt)), txt.name, []
        except (OSError, TextEncodingError) as e:
            return None, txt.name, [_unreadable_text(image, e)]
    value = row.get("text", row.get("caption"))
    if value is not None:
        return clean_caption(str(value)), where, []
    return None, (f"no {image.stem}.txt; {where} has no text" if where else
                  f"no {image.stem}.txt and no metadata row"), []


def load_folder(ref: str, limit: int | None = None, seed: int = 0) -> list[Record]:
    """A folder of images with captions in same-name .txt files (any case: X.TXT beside X.JPG) or in
    metadata.jsonl / metadata.csv (columns file_name + text or caption; a .txt file wins). Scanned here, not
    through `datasets`, so that every stray caption, missing file and choice made becomes a line in the report."""
    # "~/pictures" and "$HOME/pictures" as a shell reads them
    root = Path(os.path.expandvars(os.path.expanduser(str(ref))))
    if not root.is_dir():
        raise DatasetError(f"image folder {ref!r} does not exist" + (f" (read as {str(root)!r})"
                                                                     if str(root) != str(ref) else ""))
    files, records = _walk(root)
    meta_rows, per_image, notes = _metadata(files)
    records += notes
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    stems, txts = {p.with_suffix("") for p in images}, {}
    for txt in (p for p in files if p.suffix.lower() == ".txt"):
        if txt.with_suffix("") in txts:
            records.append(_note(txt, "warning", "two_caption_files", "second caption file for one image: ignored",
                                 f"{txts[txt.with_suffix('')].name} is used"))
        elif txt.with_suffix("") not in stems:
            records.append(_note(txt, "error", "orphan_caption", "caption file with no image beside it",
                                 f"no {txt.stem}.png/.jpg/…"))
        txts.setdefault(txt.with_suffix(""), txt)
    scanned, top = set(images), os.path.realpath(root)
    for path, (_, where) in meta_rows.items():
        if path in scanned:
            continue
        if not path.is_file():
            records.append(_note(path, "error", "missing_file", "named in the metadata but does not exist", where))
        elif os.path.commonpath([os.path.realpath(path), top]) != top:
            records.append(_note(path, "error", "outside_folder", "named in the metadata but outside the image "
                                                                  f"folder {root}: not used", where))
        elif path.is_relative_to(root) and any(part.startswith(".") for part in path.relative_to(root).parts):
            records.append(_note(path, "error", "hidden", "named in the metadata but hidden (a name starting with "
                                                          "'.', skipped by the scan): not used", where))
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            records.append(_note(path, "error", "not_an_image", "named in the metadata but not an image file "
                                 f"({', '.join(sorted(IMAGE_EXTENSIONS))}): not used", where))
        else:
            records.append(_note(path, "error", "not_scanned", "named in the metadata but not among the scanned "
                                                               "images (an unreadable folder): "
                                                               "not used", where))
    found = []
    for path in images[:limit] if limit is not None else images:
        row, where = meta_rows.get(path, ({}, ""))
        caption, caption_source, issues = _caption(path, txts.get(path.with_suffix("")), row, where)
        label = row.get("label")
        found.append(Record(str(path), FileBytes(str(path)), caption,
                            int(label) if str(label).lstrip("-").isdigit() else None,
                            found=per_image.get(path, []) + issues, caption_source=caption_source))
    return found + records
