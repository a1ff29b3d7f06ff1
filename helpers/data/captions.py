"""Reading caption and metadata text exactly, and measuring captions in the tokens the text encoder sees.

Text is decoded strictly: a latin-1 or BOM-less UTF-16 caption read with `errors="replace"` reaches training as
'caf� au lait' or 'a\\x00 \\x00c\\x00a\\x00t', and nobody notices. So `read_text` accepts what editors write when
asked for Unicode (UTF-8 with or without a byte-order mark, UTF-16 with one: Excel's "CSV UTF-8" and Notepad's
"Unicode") and refuses anything else with the file and the bytes that fail.
"""
from __future__ import annotations

import codecs
import re
from pathlib import Path

BYTE_ORDER_MARKS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
# Characters that print as nothing: a caption made only of these (often a stray BOM) is empty, not "﻿".
INVISIBLE = "\u200b\u200c\u200d\u2060\ufeff\u00ad"
_EDGES = re.compile(f"^[\\s{INVISIBLE}]+|[\\s{INVISIBLE}]+$")


class TextEncodingError(ValueError):
    """A text file that is not UTF-8 or BOM-marked UTF-16; the message names the file and the failing bytes."""


def read_text(path: str | Path) -> str:
    """The text of a caption or metadata file (BOM removed), or TextEncodingError saying why not."""
    path = Path(path)
    data = path.read_bytes()
    encoding = next((name for bom, name in BYTE_ORDER_MARKS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        context = data[max(0, e.start - 12):e.end + 12]
        raise TextEncodingError(f"{path.name}: bytes {data[e.start:e.end]!r} at offset {e.start} are not "
                                f"{encoding.removesuffix('-sig').upper()} (in {context!r}); save it as UTF-8") from e
    if "\x00" in text:  # valid UTF-8, but NUL characters: UTF-16 (or UTF-32) saved without its byte-order mark
        at = text.index("\x00")
        raise TextEncodingError(f"{path.name}: NUL character at offset {at} (in {data[:24]!r}): UTF-16 without a "
                                f"byte-order mark? save it as UTF-8")
    return text


def clean_caption(text: str) -> str:
    """A caption without surrounding white space or invisible characters, and without stray BOMs inside (left
    where files were concatenated); what remains is what the tokenizer should see."""
    return _EDGES.sub("", text.replace("\ufeff", ""))


# ---------------------------------------------------------------- tokens

def caption_token_lengths(records: list, tokenizer) -> list[int]:
    """CLIP tokens per caption including the start/end tokens (the text encoder sees at most 77)."""
    cache: dict[str, int] = {}
    for r in records:
        text = r.caption or ""
        if text not in cache:
            cache[text] = len(tokenizer(text, truncation=False, verbose=False).input_ids)
    return [cache[r.caption or ""] for r in records]


def truncation(caption: str, tokenizer, cache: dict) -> tuple[int, str] | None:
    """(token count, the text that is cut off) when the caption exceeds the tokenizer's limit, else None."""
    if caption not in cache:
        ids = tokenizer(caption, truncation=False, verbose=False).input_ids
        limit = tokenizer.model_max_length
        # The pipelines keep ids[:limit-1] + [eos]: everything from position limit-1 up to our own eos is lost.
        cache[caption] = (len(ids), tokenizer.decode(ids[limit - 1:-1], skip_special_tokens=True)) \
            if len(ids) > limit else None
    return cache[caption]


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
