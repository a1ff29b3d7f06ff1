"""helpers.validation / .report / .folders: every choice the folder scan makes is a report line, and the report a
person reads is grouped by reason (errors first, a few files named each), with every file in the CSV beside it."""
import csv
import json
import os

import pytest
from dataset_cases import animated_gif, every_case, excel_csv, jsonl, multipage_tiff, picture
from transformers import CLIPTokenizer

from helpers.data import sources
from helpers.data.report import EXAMPLES, SEVERITIES
from helpers.data.validation import validate
from helpers.tiny import world as tiny


def by_file(report, root) -> dict[str, set[tuple[str, str]]]:
    found = {}
    for i in report.issues:
        found.setdefault(os.path.relpath(i.key, root), set()).add((i.code, i.severity))
    return found


def captions(report, root) -> dict[str, str]:
    return {os.path.relpath(r.key, root): r.caption for r in report.records}


# ---------------------------------------------------------------- silent choices become report lines

def test_repeated_rows_and_two_metadata_files_are_reported(tmp_path):
    picture(tmp_path / "d1.png", "red", None)
    jsonl(tmp_path / "metadata.jsonl", [{"file_name": "d1.png", "text": "first"},
                                        {"file_name": "./d1.png", "text": "second"}])
    excel_csv(tmp_path / "metadata.csv", ["file_name", "text"], [["d1.png", "from the csv"]])
    report = validate(sources.load_source("folder", str(tmp_path)), 32)
    assert captions(report, tmp_path) == {"d1.png": "first"}  # the first row of the jsonl, not the csv
    assert by_file(report, tmp_path) == {"d1.png": {("duplicate_row", "warning")},
                                         "metadata.csv": {("two_metadata_files", "warning")}}
    repeated = next(i for i in report.issues if i.code == "duplicate_row")
    assert repeated.detail == "metadata.jsonl line 2 ignored, metadata.jsonl line 1 used"


def test_symlinked_folders_are_followed_once_and_loops_are_not(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    picture(root / "a.png", "red", "in the folder")
    picture(outside / "o.png", "green", "behind a symlink")
    os.symlink(outside, root / "linked")
    os.symlink(outside, root / "linked_again")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "loop")
    report = validate(sources.load_source("folder", str(root)), 32)
    assert captions(report, root) == {"a.png": "in the folder", os.path.join("linked", "o.png"): "behind a symlink"}
    assert by_file(report, root) == {"linked": {("symlink_followed", "info")},
                                     "linked_again": {("symlink_again", "info")},
                                     os.path.join("sub", "loop"): {("symlink_loop", "info")}}


def test_frames_and_a_missing_text_column_are_reported(tmp_path):
    animated_gif(tmp_path / "a.gif")
    multipage_tiff(tmp_path / "m.tif")
    picture(tmp_path / "n.png", "blue", None)
    excel_csv(tmp_path / "metadata.csv", ["file_name", "description", "label"],
              [["a.gif", "x", "1"], ["m.tif", "y", "2"], ["n.png", "z", "3"]])
    for name in ("a.gif", "m.tif"):
        (tmp_path / name).with_suffix(".txt").write_text(f"caption of {name}")
    report = validate(sources.load_source("folder", str(tmp_path)), 32)
    found = by_file(report, tmp_path)
    assert ("frames_dropped", "warning") in found["a.gif"] and ("frames_dropped", "warning") in found["m.tif"]
    assert found["metadata.csv"] == {("no_text_column", "error")} and found["n.png"] == {("missing_caption", "error")}
    details = {os.path.basename(i.key): i.detail for i in report.issues if i.severity == "error"}
    assert details["metadata.csv"] == "columns found: file_name, description, label"
    assert details["n.png"] == "no n.txt; metadata.csv line 4 has no text"


# ---------------------------------------------------------------- the report a person reads

@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.from_pretrained(tiny.TOKENIZER_DIR)


def blocks(summary: str) -> list[tuple[str, list[str]]]:
    """(group heading, lines under it) of a text report."""
    out = []
    for line in summary.splitlines():
        if line.split(" ", 1)[0].lower() in SEVERITIES:
            out.append((line, []))
        elif out and line.strip():
            out[-1][1].append(line.strip())
    return out


def test_every_case_report_is_grouped_errors_first_and_names_its_files(tmp_path, tokenizer):
    root = tmp_path / "every"
    expected = every_case(root, tmp_path / "outside")
    report = validate(sources.load_source("folder", str(root)), 64, tokenizer)
    text = report.summary()
    print(text)  # pytest -s: what a person sees
    groups = report.groups()
    shown = blocks(text)
    assert [h.split()[0].lower() for h, _ in shown] == [g.severity for g in groups]
    ranks = [SEVERITIES.index(g.severity) for g in groups]
    assert ranks == sorted(ranks) and ranks[0] == 0  # errors first, then warnings, then info
    for name, (code, severity) in expected.items():
        heading, lines = next(b for b, g in zip(shown, groups) if (g.code, g.severity) == (code, severity))
        assert any(line.split(":")[0] == name for line in lines), (name, heading, lines)
    for (heading, lines), g in zip(shown, groups):  # a count and at most EXAMPLES + 1 files per group
        assert f" {len(g.issues)} × {g.reason}" in heading and len(lines) <= EXAMPLES + 1
        assert len(g.issues) <= EXAMPLES + 1 or lines[-1] == f"… and {len(g.issues) - EXAMPLES} more"
    assert len(text.splitlines()) <= 3 + len(groups) * (EXAMPLES + 2)
    assert report._repr_html_().count("<tr") == len(groups) + 1  # the notebook's table: one row per reason
    csv_path, json_path = report.save(tmp_path / "run")
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["key"], r["code"], r["detail"]) for r in rows] == [(i.key, i.code, i.detail) for i in report.issues]
    assert {(os.path.relpath(r["key"], root), r["code"]) for r in rows} >= {(n, c) for n, (c, _) in expected.items()}
    assert sum(g["count"] for g in json.loads(json_path.read_text(encoding="utf-8"))["groups"]) == len(rows)


def test_240_identical_warnings_are_one_line(tokenizer):
    report = validate(sources.load_source("cifar10", "tiny/cifar10"), 64, tokenizer)
    assert len(report.issues) == 240 and len(report.groups()) == 1
    assert len(report.summary().splitlines()) == 3 + EXAMPLES + 2
    assert "240 × short side under 64 px: upscaled" in report.summary() and "… and 237 more" in report.summary()
    assert report._repr_html_().count("<tr") == 2
