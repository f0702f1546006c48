"""Tokenizers: characters (nanoGPT's shakespeare-char) and byte-level BPE (GPT-2), trained from scratch.

A tokenizer turns text into a list of integer ids and back. Two kinds trained here, and a wrapper for
pretrained ones, all with the same interface (`encode`, `decode`, `vocab_size`, `special_tokens`,
`to_dict`/`save`):

- `CharTokenizer`: one id per distinct character, numbered in sorted order, exactly like nanoGPT's
  `data/shakespeare_char/prepare.py` (`chars = sorted(list(set(data)))`), so ids match its checkpoints.
- `BPETokenizer`: byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words
  with Subword Units") on UTF-8 bytes, as in GPT-2 (Radford et al. 2019). The vocabulary starts with
  the 256 byte values, so *any* text encodes and decodes back exactly; training then repeatedly adds
  the most frequent adjacent pair of ids as a new id ("merge"). Text is first split into chunks by
  GPT-2's regex (words, numbers, punctuation runs, whitespace) so merges never cross a word boundary.
- `HFTokenizer`: a Hugging Face model folder's tokenizer.json (SmolLM2, Llama, Qwen2), run by the
  `tokenizers` library, for models loaded with minillm.model.pretrained.

Special tokens ("[MASK]", "<|endoftext|>", ...) get ids after the ordinary vocabulary. When their
exact string appears in the text they are encoded as one id (pass `allowed_special="none"` to treat
them as plain text instead).

    >>> tok = BPETokenizer.train(text, vocab_size=512, special_tokens=("<|endoftext|>",))
    >>> tok.decode(tok.encode("hello world")) == "hello world"
    True
    >>> tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
"""

from __future__ import annotations

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex

from minillm.files import write_json

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py): contractions, optional-space + letters, numbers,
# other symbols, then whitespace. `\s+(?!\S)` keeps the last space of a run for the next word, so
# " world" is one chunk and merges learn "space + word" tokens.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def _as_id_list(ids) -> list[int]:
    """Accept a list, tuple, numpy array or torch tensor of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class _SpecialTokens:
    """What both tokenizers share: special tokens matched atomically inside the text."""

    special_tokens: dict[str, int]

    def _check_specials(self, special_tokens: Iterable[str]) -> list[str]:
        specials = list(special_tokens)
        for s in specials:
            if not isinstance(s, str) or not s:
                raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
        if len(set(specials)) != len(specials):
            raise ValueError(f"special tokens must be distinct, got {specials}")
        return specials

    def _allowed(self, allowed_special) -> list[str]:
        """'all' (default), 'none', or a collection of special-token strings."""
        if allowed_special == "all":
            return list(self.special_tokens)
        if allowed_special == "none" or not allowed_special:
            return []
        allowed = [allowed_special] if isinstance(allowed_special, str) else list(allowed_special)
        unknown = [s for s in allowed if s not in self.special_tokens]
        if unknown:
            raise ValueError(f"allowed_special names tokens this tokenizer does not have: {unknown}; "
                             f"it has {list(self.special_tokens)}")
        return allowed

    @staticmethod
    def _split_special(text: str, specials: list[str]):
        """Yield (offset, piece, is_special): the text cut around every occurrence of a special."""
        if not specials:
            yield 0, text, False
            return
        # Longest first, so "<|end|>" never wins over "<|endoftext|>" at the same position.
        alternatives = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
        offset = 0
        # With a capturing group, split returns [plain, special, plain, special, ..., plain].
        for i, piece in enumerate(regex.split(f"({alternatives})", text)):
            if piece:
                yield offset, piece, i % 2 == 1
            offset += len(piece)


# --- characters ---------------------------------------------------------------------------------

class CharTokenizer(_SpecialTokens):
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
        ids = _as_id_list(ids)
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

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)})"


# --- byte-level BPE -------------------------------------------------------------------------------

def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every non-overlapping occurrence of `pair`, left to right, by `new_id`."""
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


class BPETokenizer(_SpecialTokens):
    """Byte-level BPE: ids 0..255 are bytes, 256.. are merges in the order learned, then specials.

    A worked example (Wikipedia's): in "aaabdaaabac" the most frequent adjacent pair is (a, a), so
    merge 1 makes Z = aa: "ZabdZabac". Then (a, b) -> Y: "ZYdZYac"; then (Z, Y) -> X: "XdXac".
    Here the symbols are UTF-8 bytes, so "é" starts as two ids (195, 169) and a merge can join them.
    Encoding new text replays the merges in the order they were learned.
    """

    def __init__(self, merges: Iterable[tuple[int, int]], special_tokens: Iterable[str] = (),
                 pattern: str = GPT2_SPLIT_PATTERN):
        # The merges list *is* the tokenizer: the vocabulary below is derived from it, which is
        # why the JSON stores only merges (as [a, b] pairs), the split pattern and the specials.
        self.pattern = pattern
        self._split = regex.compile(pattern)
        # merges[(a, b)] = new id. The id is also the merge's rank: lower ids were learned earlier
        # (more frequent) and must be applied first when encoding.
        self.merges: dict[tuple[int, int], int] = {}
        self.vocab: list[bytes] = [bytes([i]) for i in range(256)]  # id -> the bytes it stands for
        for a, b in merges:
            new_id = len(self.vocab)
            if not (0 <= a < new_id and 0 <= b < new_id) or (a, b) in self.merges:
                raise ValueError(f"merge {len(self.merges)} ({a}, {b}) must join two earlier ids once")
            self.merges[(a, b)] = new_id
            self.vocab.append(self.vocab[a] + self.vocab[b])
        specials = self._check_specials(special_tokens)
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(specials)}
        self.vocab += [s.encode("utf-8") for s in specials]
        self._cache: dict[str, list[int]] = {}  # chunk -> ids: text repeats its words a lot

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] = (),
              verbose: bool = False) -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text`.

        The textbook loop recounts every pair of the whole corpus after each merge: O(n · merges).
        Here the corpus is first reduced to its distinct chunks with their frequencies, and after a
        merge only the chunks ("words") that contain the merged pair are recounted. A pair -> words
        index finds them, and a heap of (-count, pair) finds the most frequent pair; entries whose
        count has changed since they were pushed are stale and skipped when popped ("lazy deletion").
        Ties go to the smallest pair (a, b), so training is deterministic.
        """
        specials = list(special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte ids "
                             f"+ {len(specials)} special tokens")
        # 1. Distinct chunks and their counts. Special tokens are cut out first: no merge spans them.
        split = regex.compile(GPT2_SPLIT_PATTERN)
        counts: Counter[str] = Counter()
        for _, piece, is_special in cls._split_special(text, specials):
            if not is_special:
                counts.update(split.findall(piece))
        # Shakespeare's 1.1 MB is ~300k chunks but only ~15k distinct ones: working on distinct
        # chunks weighted by their count is the first big saving.
        words = [list(w.encode("utf-8")) for w in counts]  # word i as a list of ids, bytes at first
        freqs = list(counts.values())  # how often word i occurs in the text

        # 2. Pair counts (weighted by chunk frequency) and, for each pair, the words that contain it.
        stats: dict[tuple[int, int], int] = defaultdict(int)
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:]):
                stats[pair] += freqs[i]
                where[pair].add(i)
        heap = [(-c, pair) for pair, c in stats.items()]
        heapq.heapify(heap)

        merges: list[tuple[int, int]] = []
        progress = None
        if verbose:
            from tqdm.auto import tqdm
            progress = tqdm(total=n_merges, desc="BPE merges", unit="merge")
        while len(merges) < n_merges:
            # 3. Most frequent live pair; skip stale heap entries. The heap top is live iff its
            #    pushed count equals the current count, since every change pushes a fresh entry.
            while heap and (stats.get(heap[0][1], 0) != -heap[0][0]):
                heapq.heappop(heap)
            if not heap:
                break  # every chunk is a single token: nothing left to merge
            _, pair = heapq.heappop(heap)
            new_id = 256 + len(merges)  # ids follow the bytes in learned order
            merges.append(pair)
            # 4. Re-count only the words that contain the pair: subtract their old pairs, add new ones.
            touched: set[tuple[int, int]] = set()
            for i in where.pop(pair):
                old, f = words[i], freqs[i]
                new = _merge(old, pair, new_id)
                words[i] = new
                old_pairs, new_pairs = list(zip(old, old[1:])), list(zip(new, new[1:]))
                for p in old_pairs:
                    stats[p] -= f
                for p in new_pairs:
                    stats[p] += f
                for p in set(old_pairs) - set(new_pairs):
                    if p in where:
                        where[p].discard(i)
                for p in new_pairs:
                    where[p].add(i)
                touched.update(old_pairs)
                touched.update(new_pairs)
            for p in touched:
                c = stats[p]
                if c > 0:
                    heapq.heappush(heap, (-c, p))
                else:  # the pair no longer occurs anywhere
                    del stats[p]
                    where.pop(p, None)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        return cls(merges, specials)

    # -- encoding / decoding ----------------------------------------------------------------------
    def _encode_chunk(self, chunk: str) -> list[int]:
        ids = list(chunk.encode("utf-8"))  # start from bytes, as training did
        merges, never = self.merges, 1 << 62  # a pair that is no merge ranks after every merge
        while len(ids) >= 2:
            # Apply the earliest-learned merge present in the chunk (lowest id = lowest rank),
            # exactly the order training created them in.
            pair = min(zip(ids, ids[1:]), key=lambda p: merges.get(p, never))
            new_id = merges.get(pair)
            if new_id is None:
                break  # no adjacent pair is a merge: done
            ids = _merge(ids, pair, new_id)
        return ids

    def encode(self, text: str, allowed_special="all") -> list[int]:
        ids: list[int] = []
        for _, piece, is_special in self._split_special(text, self._allowed(allowed_special)):
            if is_special:
                ids.append(self.special_tokens[piece])
                continue
            # Most chunks (" the", " of", "\n") repeat many times: each distinct chunk is encoded
            # once and remembered. What remains is mostly the regex split itself.
            cache = self._cache
            for chunk in self._split.findall(piece):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = cache[chunk] = self._encode_chunk(chunk)
                ids.extend(chunk_ids)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes: a prefix of a token stream may end inside a multi-byte character."""
        ids = _as_id_list(ids)
        try:
            return b"".join([self.vocab[i] for i in ids])
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size))
            raise ValueError(f"token id {bad!r} is outside this tokenizer's vocabulary "
                             f"(0..{self.vocab_size - 1})") from None

    def decode(self, ids) -> str:
        # A model can emit byte sequences that are not valid UTF-8; show them as U+FFFD rather than fail.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- serialization ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"type": "bpe", "pattern": self.pattern,
                "merges": [list(p) for p in self.merges],  # in learned order; ids are 256 + index
                "special_tokens": dict(self.special_tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        specials = sorted(d.get("special_tokens", {}).items(), key=lambda kv: kv[1])
        tok = cls([tuple(m) for m in d["merges"]], [s for s, _ in specials],
                  d.get("pattern", GPT2_SPLIT_PATTERN))
        if tok.special_tokens != dict(specials):
            raise ValueError("tokenizer JSON: special token ids must follow the merges in order")
        return tok

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)})")


# --- pretrained vocabularies ----------------------------------------------------------------------

class HFTokenizer:
    """A Hugging Face model folder's tokenizer.json, run by the `tokenizers` library, behind the same
    interface (encode, decode, vocab_size, special_tokens, to_dict/save).

    A pretrained model only works with the exact vocabulary and pre-tokenizer it was trained with
    (SmolLM2 and Llama 3 use byte-level BPE like ours, with their own merges and split regex), so
    we run the original rather than re-implement each variant. `encode` adds no BOS/EOS: like the
    other tokenizers here it maps text to ids and nothing else.
    """

    def __init__(self, tokenizer_json: str):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError("a Hugging Face tokenizer.json needs the tokenizers package: "
                              "pip install tokenizers (it comes with transformers)") from None
        self._json = tokenizer_json
        self._tok = Tokenizer.from_str(tokenizer_json)
        added = json.loads(tokenizer_json).get("added_tokens", [])
        self.special_tokens = {t["content"]: t["id"] for t in added if t.get("special")}

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allowed_special="all") -> list[int]:
        if allowed_special not in ("all", "none"):
            raise ValueError("HFTokenizer.encode takes allowed_special='all' or 'none'")
        self._tok.encode_special_tokens = allowed_special == "none"  # True: "<|endoftext|>" as plain text
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # byte-level BPE: an incomplete UTF-8 character decodes to U+FFFD, as BPETokenizer.decode
        return self._tok.decode(_as_id_list(ids), skip_special_tokens=False)

    def to_dict(self) -> dict:
        return {"type": "hf", "tokenizer_json": self._json}

    @classmethod
    def from_dict(cls, d: dict) -> "HFTokenizer":
        return cls(d["tokenizer_json"])

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, special_tokens={list(self.special_tokens)[:8]})"


def load_hf_tokenizer(folder: str | Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face model folder (its tokenizer.json)."""
    path = Path(folder)
    path = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}: a Hugging Face model folder has one")
    return HFTokenizer(path.read_text(encoding="utf-8"))


# --- loading ------------------------------------------------------------------------------------

TOKENIZERS = {"char": CharTokenizer, "bpe": BPETokenizer, "hf": HFTokenizer}


def tokenizer_from_dict(d: dict):
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
