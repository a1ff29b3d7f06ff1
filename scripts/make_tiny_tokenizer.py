"""Write the tiny CLIP tokenizer committed under helpers/tiny/assets/tiny_clip_tokenizer/.

The real CLIP tokenizer is byte-level BPE with 49,408 tokens. The tiny one keeps the same algorithm and the
first MERGES merges of the real merge list (shipped inside open_clip, so nothing is downloaded): common words stay
whole, rare ones split into pieces, and the vocabulary is small enough for a 32-wide embedding.
Run once; the output is committed.  python scripts/make_tiny_tokenizer.py
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import open_clip.tokenizer as oct

MERGES = 1500  # vocab = 256 bytes + 256 word-final bytes + 1500 merges + 2 specials = 2014 tokens
OUT = Path(__file__).resolve().parents[1] / "helpers" / "tiny" / "assets" / "tiny_clip_tokenizer"


def main() -> None:
    lines = gzip.open(oct.default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + MERGES]]
    base = list(oct.bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (OUT / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {**special, "content": "<|startoftext|>"}, "eos_token": special,
        "pad_token": special, "unk_token": special}, indent=2))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False}, indent=2))
    print(f"wrote {len(vocab)} tokens to {OUT}")


if __name__ == "__main__":
    main()
