"""The character tokenizer of nanoGPT's shakespeare-char: one id per distinct character.

Ids are the characters in sorted order, exactly as `data/shakespeare_char/prepare.py` numbers them
(`chars = sorted(list(set(data)))`), so ids match its checkpoints; special tokens come after them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from minillm.data.tokenizer_base import SpecialTokens, as_id_list
from minillm.files import write_json


class CharTokenizer(SpecialTokens):
    """One id per character: ids 0..n-1 are `sorted(set(text))`, then the special tokens."""

    def __init__(self, chars: Iterable[str], special_tokens: Iterable[str] = ()):
        self.chars = list(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        specials = self._check_specials(special_tokens)
        self.special_tokens = {s: len(self.chars) + i for i, s in enumerate(specials)}
        self.itos = self.chars + specials  # id -> string, specials included

    @classmethod
    def from_text(cls, text: str, special_tokens: Iterable[str] = ()) -> "CharTokenizer":
        if not text:
            raise ValueError("CharTokenizer.from_text needs non-empty text")
        return cls(sorted(set(text)), special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        ids: list[int] = []
        for offset, piece, is_special in self._split_special(text, self._allowed(allowed_special)):
            if is_special:
                ids.append(self.special_tokens[piece])
                continue
            try:
                ids.extend([self.stoi[c] for c in piece])  # the fast path: one dict look-up per char
            except KeyError as e:
                ch = e.args[0]
                pos = offset + piece.index(ch)
                raise ValueError(
                    f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in this "
                    f"CharTokenizer's vocabulary of {len(self.chars)} characters; build it from text "
                    "that contains the character, or use the byte-level BPE tokenizer (encodes anything)"
                ) from None
        return ids

    def decode(self, ids) -> str:
        ids = as_id_list(ids)
        try:
            return "".join([self.itos[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size))
            raise ValueError(f"token id {bad!r} is outside this tokenizer's vocabulary "
                             f"(0..{self.vocab_size - 1})") from None

    def to_dict(self) -> dict:
        return {"type": "char", "chars": self.chars, "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        specials = sorted(d.get("special_tokens", {}).items(), key=lambda kv: kv[1])  # by id
        tok = cls(d["chars"], [s for s, _ in specials])
        if tok.special_tokens != dict(specials):
            raise ValueError("tokenizer JSON: special token ids must follow the characters in order")
        return tok

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json: a BPE model with the characters as its
        vocabulary and no merges (so every character is one token), a Fuse decoder that joins them
        back, and the special tokens as added tokens. The ids are the same. One difference: a
        character outside the vocabulary is dropped there, where encode() here refuses it."""
        from minillm.data.tokenizer_hf import bpe_tokenizer_json

        vocab = {c: i for i, c in enumerate(self.chars)}
        vocab.update(self.special_tokens)
        return bpe_tokenizer_json(vocab, [], self.special_tokens, None, byte_level=False)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"
