"""helpers.captions and the folder source: captions and metadata reach training as the words that were written,
or are refused naming the file and the bytes that fail; invisible captions count as empty."""
import os

import pytest
from dataset_cases import excel_csv, picture

from helpers.data import sources
from helpers.data.captions import TextEncodingError, clean_caption, read_text
from helpers.data.validation import validate

WORDS = "crème brûlée, naïve café ☕"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be"])
def test_unicode_encodings_with_their_byte_order_mark_are_read_exactly(tmp_path, encoding):
    data = WORDS.encode(encoding)
    if encoding in ("utf-16-le", "utf-16-be"):  # these codecs write no mark: add the one an editor writes
        data = "\ufeff".encode(encoding) + data
    (tmp_path / "c.txt").write_bytes(data)
    assert read_text(tmp_path / "c.txt") == WORDS


def test_other_encodings_are_refused_with_the_file_and_the_failing_bytes(tmp_path):
    (tmp_path / "latin.txt").write_bytes("un café au lait".encode("latin-1"))
    with pytest.raises(TextEncodingError) as latin:
        read_text(tmp_path / "latin.txt")
    assert "latin.txt" in str(latin.value) and "b'\\xe9'" in str(latin.value) and "offset 6" in str(latin.value)
    (tmp_path / "nobom.txt").write_bytes("a cat".encode("utf-16-le"))  # valid UTF-8 bytes, but NULs
    with pytest.raises(TextEncodingError, match="nobom.txt.*NUL.*UTF-16 without a byte-order mark"):
        read_text(tmp_path / "nobom.txt")


def test_a_caption_of_invisible_characters_is_empty():
    assert clean_caption("\u200b\ufeff\u200d \n") == ""
    assert clean_caption("\ufeff a red\u200b cube \u2060") == "a red\u200b cube"  # inside words is kept


def test_folder_captions_in_every_encoding_and_case(tmp_path):
    picture(tmp_path / "latin1.png", "red", "café au lait".encode("latin-1"))
    picture(tmp_path / "utf16.png", "green", WORDS.encode("utf-16"))
    picture(tmp_path / "X.JPG", "blue", None)
    (tmp_path / "X.TXT").write_text("upper case", encoding="utf-8")
    picture(tmp_path / "blank.png", "white", "\ufeff\u200b\u200c")
    picture(tmp_path / "excel" / "e.png", "black", None)
    excel_csv(tmp_path / "excel" / "metadata.csv", ["file_name", "text"], [["e.png", WORDS]])
    report = validate(sources.load_source("folder", str(tmp_path)), 32)
    usable = {os.path.relpath(r.key, tmp_path): r.caption for r in report.records}
    assert usable == {"utf16.png": WORDS, "X.JPG": "upper case", os.path.join("excel", "e.png"): WORDS}
    found = {os.path.relpath(i.key, tmp_path): i for i in report.issues}
    assert found["latin1.png"].code == "text_encoding" and found["latin1.png"].severity == "error"
    assert "latin1.txt" in found["latin1.png"].detail and "b'\\xe9'" in found["latin1.png"].detail
    assert found["blank.png"].code == "empty_caption" and found["blank.png"].detail == "blank.txt"
    assert set(found) == {"latin1.png", "blank.png"}
