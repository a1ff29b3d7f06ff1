"""helpers.study without models: seeded blind order, answers with the true variant behind each side, a resumable
CSV, and statistics checked against hand computations."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from helpers.evaluation.stats import wilson
from helpers.studio.answers import ANSWER_COLUMNS, AnswersFileError
from helpers.studio.study import Pair, Study, pairs_from_scores, scripted_answers
from helpers.studio.study_results import study_results


def make_pairs(n=12, sets=("train", "generic")):
    return [Pair(sets[k % len(sets)], f"prompt {k}", k % 3, {"A": f"/a/{k}.png", "B": f"/b/{k}.png"},
                 {"A": float(k), "B": float(k) + (1 if k % 2 else -1)}) for k in range(n)]


def test_order_is_seeded_per_rater_and_both_sides_occur(tmp_path):
    study = Study(make_pairs(40), "A", "B", tmp_path / "s.csv", seed=7)
    first, again = study.order("ada"), study.order(" ada ")
    assert [(p.key, left) for p, left in first] == [(p.key, left) for p, left in again]  # reproducible
    assert [p.key for p, _ in first] != sorted(p.key for p, _ in first)  # shuffled, not in storage order
    assert [(p.key, l) for p, l in study.order("bob")] != [(p.key, l) for p, l in first]  # another rater, another order
    assert [(p.key, l) for p, l in Study(make_pairs(40), "A", "B", tmp_path / "s.csv", seed=8).order("ada")] != \
        [(p.key, l) for p, l in first]  # another seed, another order
    lefts = [left for _, left in first]
    assert 10 <= lefts.count("A") <= 30  # both sides occur (40 fair coin flips)


def test_answers_record_the_true_variant_behind_each_side_and_resume(tmp_path):
    path = tmp_path / "study" / "ab.csv"
    study = Study(make_pairs(6), "A", "B", path, seed=1)
    shown = study.next("ada")
    assert (shown.index, shown.total) == (1, 6) and {shown.left, shown.right} == {"A", "B"}
    row = study.record("ada", shown, "right")
    assert row["winner"] == shown.right and row["clip_right"] == shown.pair.clip[shown.right]
    second = study.next("ada")
    study.record("ada", second, "tie")
    # a new Study object on the same CSV (a restart) continues where the rater stopped
    again = Study(make_pairs(6), "A", "B", path, seed=1)
    assert again.next("ada").index == 3 and again.progress("ada") == "2 of 6 answered by ada"
    assert again.next("bob").index == 1  # another rater starts at the beginning of their own order
    saved = pd.read_csv(path)
    assert list(saved.columns) == list(ANSWER_COLUMNS) and list(saved["winner"]) == [shown.right, "tie"]
    assert (saved["left"] != saved["right"]).all()
    with open(path, "a") as f:  # a line cut short by a disconnect is skipped (and named), not fatal
        f.write("2024-01-01T00:00:00,A vs B,ada,train|prompt 5|2,train,prompt 5,2,A,B,le")
    with pytest.warns(UserWarning, match="line 4: it has 10 cells"):
        assert len(again.answers()) == 2
    with pytest.raises(ValueError, match="Type your name"):
        study.next("  ")
    with pytest.raises(ValueError, match="choice must be one of"):
        study.record("ada", second, "both")


def answer_all(study, rater, choices):
    for choice in choices:
        study.record(rater, study.next(rater), choice)


def test_an_answer_after_a_line_cut_by_a_crash_is_kept_and_the_cut_line_named(tmp_path):
    """Issue 27, item 6: the next answer was appended to the cut line (no newline ended it) and lost with it."""
    path = tmp_path / "ab.csv"
    study = Study(make_pairs(6), "A", "B", path, seed=1)
    answer_all(study, "ada", ["left", "right"])
    with open(path, "a") as f:  # the crash: a line without its end
        f.write('2024-01-01T00:00:00,A vs B,ada,"train|prompt 5|2",train,"prompt 5, cut')
    with pytest.warns(UserWarning) as caught:  # reading the file to find ada's next pair names the cut line once
        answer_all(study, "ada", ["tie"])
        answers = study.answers()
    assert list(answers["choice"]) == ["left", "right", "tie"] and study.progress("ada") == "3 of 6 answered by ada"
    assert [str(w.message) for w in caught] == study.notes and len(study.notes) == 1
    assert study.notes[0].startswith(f"{path}, line 4: it has 6 cells where the header has 13 (cut short")
    answer_all(study, "ada", ["left"])  # the next answers follow on lines of their own
    assert len(study.answers()) == 4 and len(study.notes) == 1


def test_an_answers_file_of_another_layout_is_refused_by_name_never_ignored_or_appended_to(tmp_path):
    path = tmp_path / "ab.csv"
    path.write_text("time,rater,choice\n2024-01-01T00:00:00,ada,left\n")
    study = Study(make_pairs(4), "A", "B", path)
    message = rf"{path}, line 1: the header is not the A/B study's \(it lacks study, pair, .*clip_right\)"
    with pytest.raises(AnswersFileError, match=message):
        study.answers()
    with pytest.raises(AnswersFileError, match=message):
        study.record("ada", Study(make_pairs(4), "A", "B", tmp_path / "other.csv").next("ada"), "left")
    assert path.read_text() == "time,rater,choice\n2024-01-01T00:00:00,ada,left\n"  # nothing appended
    # the same columns in another order, with a column of the rater's own and a BOM (a spreadsheet's save): read
    # by name, and new answers appended in the file's own order
    reordered = tmp_path / "reordered.csv"
    Study(make_pairs(4), "A", "B", reordered).record("ada", Study(make_pairs(4), "A", "B", reordered).next("ada"),
                                                      "left")
    frame = pd.read_csv(reordered)
    frame["note"] = "x"
    columns = ["note"] + list(reversed(ANSWER_COLUMNS))
    reordered.write_text("\ufeff" + frame[columns].to_csv(index=False), encoding="utf-8")
    study = Study(make_pairs(4), "A", "B", reordered)
    answer_all(study, "ada", ["tie"])
    assert list(study.answers()["choice"]) == ["left", "tie"] and study.notes == []
    assert list(pd.read_csv(reordered, encoding="utf-8-sig").columns) == columns


def test_bad_cells_and_binary_garbage_are_left_out_with_file_and_line(tmp_path):
    path = tmp_path / "ab.csv"
    study = Study(make_pairs(8), "A", "B", path, seed=2)
    answer_all(study, "ada", ["left", "right", "tie", "left"])
    lines = path.read_bytes().split(b"\r\n")
    lines[2] = lines[2].replace(b",ada,", b",ada,", 1).rsplit(b",", 1)[0] + b",abc"  # clip_right "abc"
    cells = lines[3].split(b",")
    cells[6] = b"two"  # seed
    lines[3] = b",".join(cells)
    lines.insert(4, b"\x00\x00\xff\xfe garbage \x89PNG\x00")
    path.write_bytes(b"\r\n".join(lines))
    with pytest.warns(UserWarning):
        answers = study.answers()
    assert len(answers) == 2  # lines 2 and 6 (the first and the fourth answer) are whole
    assert study.notes == [
        f"{path}, line 3: its clip_right 'abc' is not a number; this line is left out of the results (the other "
        "lines' answers are kept).",
        f"{path}, line 4: its seed 'two' is not a whole number; this line is left out of the results (the other "
        "lines' answers are kept).",
        f"{path}, line 5: it holds bytes that are not text (binary garbage); this line is left out of the results "
        "(the other lines' answers are kept)."]
    # another study's lines in the same file are not this study's answers: skipped without a word
    other = Study(make_pairs(8), "B", "A", path)
    other.record("bob", other.next("bob"), "left")
    study.answers()
    assert len(study.notes) == 3


def test_statistics_match_a_hand_computation():
    # 10 answers on one set: A wins 5, B wins 3, ties 2
    rows = []
    for k, (winner, left, clip_left, clip_right) in enumerate(
            [("A", "A", 30, 20)] * 3 + [("A", "B", 30, 20)] * 2 + [("B", "A", 30, 20)] * 3 + [("tie", "A", 1, 2)] * 2):
        choice = "tie" if winner == "tie" else "left" if winner == left else "right"
        rows.append(dict(prompt_set="train", choice=choice, winner=winner, left=left,
                         right="B" if left == "A" else "A", clip_left=clip_left, clip_right=clip_right, seed=k))
    result = study_results(pd.DataFrame(rows), "A", "B").rows[0]
    assert (result["n"], result["wins_a"], result["wins_b"], result["ties"]) == (10, 5, 3, 2)
    assert result["rate_a"] == pytest.approx(0.6) and result["rate_b"] == pytest.approx(0.4)  # ties count ½ each
    p, z = 0.6, 1.959963984540054  # Wilson by hand
    centre, half = (p + z * z / 20) / (1 + z * z / 10), z / (1 + z * z / 10) * math.sqrt(p * 0.4 / 10 + z * z / 400)
    assert (result["low_a"], result["high_a"]) == pytest.approx((centre - half, centre + half))
    assert result["p"] == pytest.approx(2 * sum(math.comb(8, i) for i in range(4)) / 2**8)  # 5 vs 3, ties out
    # agreement: the picked image has the higher CLIP score in the first 3 (left picked, left higher) and in none of
    # the next 5 (right picked while left is higher); ties are left out → 3 of 8
    assert (result["agreement"], result["agree_n"]) == (pytest.approx(3 / 8), 8)


def test_pooled_row_and_wilson_edges():
    assert wilson(0, 0)[0] != wilson(0, 0)[0]  # nan: no answers
    share, low, high = wilson(10, 10)
    assert share == 1.0 and high == pytest.approx(1.0) and 0.69 < low < 0.73  # the textbook 0.722
    frame = pd.DataFrame([dict(prompt_set=s, choice="left", winner="A", left="A", right="B", clip_left=1.0,
                               clip_right=0.0, seed=0) for s in ("x", "y", "y")])
    rows = study_results(frame, "A", "B").rows
    assert [r["prompt_set"] for r in rows] == ["x", "y", "all"] and rows[-1]["n"] == 3


def test_scripted_answers_are_seeded_and_blind_to_clip(tmp_path):
    pairs = make_pairs(12)
    one = scripted_answers(Study(pairs, "A", "B", tmp_path / "1.csv"), "demo", 12, seed=3, p_a=0.5)
    two = scripted_answers(Study(pairs, "A", "B", tmp_path / "2.csv"), "demo", 12, seed=3, p_a=0.5)
    assert [r["winner"] for r in one] == [r["winner"] for r in two]
    # the same answers when every CLIP score is changed: nothing is read from CLIP
    flipped = [Pair(p.prompt_set, p.prompt, p.seed, p.images, {"A": -p.clip["A"], "B": 99.0}) for p in pairs]
    three = scripted_answers(Study(flipped, "A", "B", tmp_path / "3.csv"), "demo", 12, seed=3, p_a=0.5)
    assert [r["winner"] for r in three] == [r["winner"] for r in one]
    assert len(scripted_answers(Study(pairs, "A", "B", tmp_path / "1.csv"), "demo", 5)) == 0  # all answered


def test_pairs_from_scores_match_prompt_and_seed():
    rows = [dict(image_path=f"/{v}/{p}{s}.png", prompt_set="set", split="train", prompt=p, seed=s, variant=v,
                 clip_model="clip", score=float(len(p) + s + (v == "B"))) for v in ("A", "B", "C")
            for p in ("x", "yy") for s in (0, 1)]
    pairs = pairs_from_scores(pd.DataFrame(rows), "A", "B")
    assert sorted(p.key for p in pairs) == ["set|x|0", "set|x|1", "set|yy|0", "set|yy|1"]
    pair = next(p for p in pairs if p.key == "set|yy|1")
    assert pair.images == {"A": "/A/yy1.png", "B": "/B/yy1.png"} and pair.clip == {"A": 3.0, "B": 4.0}
    with pytest.raises(ValueError, match="no images of 'D'"):
        pairs_from_scores(pd.DataFrame(rows), "A", "D")
    with pytest.raises(ValueError, match="two different"):
        Study(pairs, "A", "A", "/tmp/x.csv")
