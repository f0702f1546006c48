"""A GGUF file's tokenizer, written out: GPT-2-style byte-level BPE from a vocabulary and merge list.

A GGUF model carries its tokenizer as metadata (`tokenizer.ggml.*`): `model = "gpt2"` means
byte-level BPE, with the vocabulary (`tokens`, a string per id), the merges in priority order
(`merges`, "Ġ t" = merge "Ġ" and "t"), each token's type (1 normal, 3 control such as
<|im_start|>), and `pre`, the name of the pre-tokenizer the model was trained with.

Encoding "Hello 2024!" (SmolLM2, pre = "smollm"):
    1. control tokens are cut out whole ("<|im_end|>" is one id, never spelled out)
    2. pre-tokenize: each regex of the `pre` in turn splits the pieces of the one before, keeping
       both matches and gaps (llama.cpp's unicode_regex_split; Hugging Face's pre-tokenizer
       Sequence). smollm first isolates every digit, then applies GPT-2's split:
       ["Hello", " ", "2", "0", "2", "4", "!"]
    3. each piece's UTF-8 bytes become printable characters by GPT-2's byte table (space → "Ġ"),
       so every byte sequence is spelled with the vocabulary's characters
    4. BPE: start from single characters and repeatedly merge the adjacent pair that comes first
       in the merge list, until no pair of the piece is in it (GPT-2's encoder.py `bpe`)
    5. look up each resulting string's id
Decoding maps ids back to strings, strings back to bytes through the inverse table, and the bytes to
UTF-8 text (an incomplete character shows as U+FFFD until its other bytes arrive).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import regex

from minillm.data.tokenizer_base import as_id_list
from minillm.files import write_json

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# `tokenizer.ggml.pre` -> the regexes applied one after the other (as llama.cpp's llama-vocab.cpp
# lists them). smollm and the starcoder family split digits one by one before GPT-2's pattern.
PRE_TOKENIZERS: dict[str, list[str]] = {
    "gpt2": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],  # llama.cpp's name for GPT-2's split (what gguf_write.py writes)
    "default": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],
    "starcoder": [r"\p{N}", GPT2_SPLIT],
    "refact": [r"\p{N}", GPT2_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "llama3": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
}
CONTROL = 3  # llama.cpp's token type for special tokens (1 = normal, 4 = user-defined, 6 = byte)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → character table: printable Latin-1 bytes stand for themselves, the other 68
    (space, control characters, ...) get the characters from U+0100 on, so "Ġ" (U+0120) is space."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def _regex_split(pieces: list[str], pattern) -> list[str]:
    """Split each piece by `pattern`, keeping the matches and the text between them, in order."""
    out = []
    for piece in pieces:
        pos = 0
        for m in pattern.finditer(piece):
            if m.start() > pos:
                out.append(piece[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(piece):
            out.append(piece[pos:])
    return out


class GGUFTokenizer:
    """Byte-level BPE over a GGUF vocabulary; the interface of minillm's other tokenizers
    (encode, decode, vocab_size, special_tokens, to_dict/save). `encode` adds no BOS/EOS."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: list[int] | None = None,
                 pre: str = "gpt2", bos_id: int | None = None, eos_id: int | None = None,
                 chat_template: str | None = None):
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"GGUF pre-tokenizer {pre!r} is not one minillm reads; "
                             f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
        self.tokens, self.merges, self.pre = list(tokens), list(merges), pre
        self.token_types = list(token_types) if token_types is not None else [1] * len(tokens)
        self.bos_id, self.eos_id = bos_id, eos_id
        self.chat_template = chat_template  # the model's own Jinja chat template (chat_template.py)
        self.bos_token = self.tokens[bos_id] if bos_id is not None and 0 <= bos_id < len(self.tokens) else None
        self.eos_token = self.tokens[eos_id] if eos_id is not None and 0 <= eos_id < len(self.tokens) else None
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        # rank of each merge: lower = learned earlier = applied first
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(self.merges)}
        self.special_tokens = {t: i for i, (t, kind) in enumerate(zip(self.tokens, self.token_types))
                               if kind == CONTROL}
        self._patterns = [regex.compile(p) for p in PRE_TOKENIZERS[pre]]
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = (regex.compile("|".join(regex.escape(s) for s in longest_first))
                            if longest_first else None)
        self._byte_char = bytes_to_unicode()
        self._char_byte = {c: b for b, c in self._byte_char.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_metadata(cls, meta: dict) -> "GGUFTokenizer":
        """From a GGUF file's metadata (keys `tokenizer.ggml.*`)."""
        model = meta.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not one minillm reads (only byte-level "
                             f"BPE, 'gpt2')")
        return cls(meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.merges", []),
                   meta.get("tokenizer.ggml.token_type"), meta.get("tokenizer.ggml.pre", "gpt2"),
                   meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id"),
                   meta.get("tokenizer.chat_template"))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def _bpe(self, piece: str) -> list[int]:
        """The ids of one pre-tokenized piece (GPT-2's `bpe`: merge the best-ranked pair first)."""
        if piece in self._cache:
            return self._cache[piece]
        word = [self._byte_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
            rank, _ = min(pairs)
            if rank == float("inf"):
                break
            first, second = self.merges[rank].split(" ", 1)
            merged, i = [], 0
            while i < len(word):  # merge every occurrence, left to right
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = [self.ids[t] for t in word]
        if len(self._cache) < 1 << 16:
            self._cache[piece] = ids
        return ids

    def encode(self, text: str, allowed_special="all") -> list[int]:
        if allowed_special not in ("all", "none"):
            raise ValueError("GGUFTokenizer.encode takes allowed_special='all' or 'none'")
        out: list[int] = []
        pos = 0
        specials = self._special_re.finditer(text) if (self._special_re and allowed_special == "all") else ()
        for m in specials:  # control tokens whole, the text between them through BPE
            out += self._encode_ordinary(text[pos:m.start()])
            out.append(self.special_tokens[m.group()])
            pos = m.end()
        return out + self._encode_ordinary(text[pos:])

    def _encode_ordinary(self, text: str) -> list[int]:
        pieces = [text] if text else []
        for pattern in self._patterns:
            pieces = _regex_split(pieces, pattern)
        return [i for piece in pieces for i in self._bpe(piece)]

    def decode(self, ids) -> str:
        data = bytearray()
        for i in as_id_list(ids):
            token = self.tokens[i]
            if self.token_types[i] == CONTROL:
                data += token.encode("utf-8")
            else:
                data += bytes(self._char_byte.get(c, ord("?")) for c in token)
        return data.decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"type": "gguf", "tokens": self.tokens, "merges": self.merges, "token_types": self.token_types,
                "pre": self.pre, "bos_id": self.bos_id, "eos_id": self.eos_id, "chat_template": self.chat_template}

    @classmethod
    def from_dict(cls, d: dict) -> "GGUFTokenizer":
        return cls(d["tokens"], d["merges"], d.get("token_types"), d.get("pre", "gpt2"), d.get("bos_id"),
                   d.get("eos_id"), d.get("chat_template"))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json: the same vocabulary and merges (already
        spelled with GPT-2's byte table), each regex of the `pre` as a Split pre-tokenizer in turn,
        the control tokens as added special tokens. convert_hf_to_gguf.py goes the other way."""
        from minillm.data.tokenizer_hf import bpe_tokenizer_json

        if len(self.ids) != len(self.tokens):
            raise ValueError("two ids of this GGUF vocabulary are the same string; a tokenizer.json cannot hold both")
        merges = [tuple(m.split(" ", 1)) for m in self.merges]
        return bpe_tokenizer_json(dict(self.ids), merges, self.special_tokens, PRE_TOKENIZERS[self.pre])

    def __repr__(self) -> str:
        return f"GGUFTokenizer(vocab_size={self.vocab_size}, pre={self.pre!r}, specials={len(self.special_tokens)})"
