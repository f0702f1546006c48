"""Tokenizers: text -> a list of integer ids -> text, and `load_tokenizer` for any saved one.

Three kinds, one interface (`encode`, `decode`, `vocab_size`, `special_tokens`, `to_dict`/`save`),
each in its own file, read in this order:
    tokenizer_base.py   what they share: special tokens matched whole, streaming a corpus larger
                        than memory (`encode_iterable` gives the ids of `encode(whole text)`)
    tokenizer_char.py   CharTokenizer: one id per character, nanoGPT's shakespeare-char
    tokenizer_bpe.py    BPETokenizer: byte-level BPE as in GPT-2, trained from scratch
    tokenizer_hf.py     HFTokenizer: a Hugging Face model folder's tokenizer.json
    tokenizer_gguf.py   GGUFTokenizer: a GGUF file's byte-level BPE, written out
Every name is importable from here (`from minillm.data.tokenizer import BPETokenizer`).

    >>> tok = BPETokenizer.train(text, vocab_size=512, special_tokens=("<|endoftext|>",))
    >>> tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
"""

from __future__ import annotations

import json
from pathlib import Path

from minillm.data.tokenizer_bpe import GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN, SPLIT_PATTERNS, BPETokenizer
from minillm.data.tokenizer_char import CharTokenizer
from minillm.data.tokenizer_gguf import GGUFTokenizer
from minillm.data.tokenizer_hf import HFTokenizer, load_hf_tokenizer

__all__ = ["GPT2_SPLIT_PATTERN", "GPT4_SPLIT_PATTERN", "SPLIT_PATTERNS", "TOKENIZERS", "BPETokenizer",
           "CharTokenizer", "GGUFTokenizer", "HFTokenizer", "load_hf_tokenizer", "load_tokenizer", "tokenizer_from_dict"]

TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer, "gguf": GGUFTokenizer}


def tokenizer_from_dict(d: dict):
    """A tokenizer from its to_dict() form; the "type" key says which kind."""
    kind = d.get("type")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {', '.join(TOKENIZERS)}")
    return TOKENIZERS[kind].from_dict(d)


def load_tokenizer(path: str | Path):
    """Load a tokenizer from its JSON file, or from a folder holding tokenizer.json (a checkpoint)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}")
    return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
