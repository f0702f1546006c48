"""Byte-level BPE (GPT-2's tokenizer), trained from scratch.

Byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units") on UTF-8 bytes, as in GPT-2 (Radford et al. 2019): the vocabulary starts with the 256 byte
values, so *any* text encodes and decodes back exactly; training then repeatedly adds the most
frequent adjacent pair of ids as a new id (a "merge"). Text is first split into chunks by a regex
(GPT-2's by default: words, numbers, punctuation runs, whitespace; or GPT-4's cl100k one; or none)
so that merges never cross a word boundary.

    >>> tok = BPETokenizer.train(text, vocab_size=512, special_tokens=("<|endoftext|>",))
    >>> tok.decode(tok.encode("hello world")) == "hello world"
    True
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import regex

from minillm.data.tokenizer_base import SpecialTokens, as_id_list
from minillm.files import write_json

# GPT-2's pre-tokenizer (openai/gpt-2 encoder.py): contractions, optional-space + letters, numbers,
# other symbols, then whitespace. `\s+(?!\S)` keeps the last space of a run for the next word, so
# " world" is one chunk and merges learn "space + word" tokens.
GPT2_SPLIT_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# GPT-4's (tiktoken's cl100k_base, minbpe's GPT4_SPLIT_PATTERN): case-insensitive contractions, one
# leading symbol may join a word ("(foo", "_bar"), numbers in groups of at most 3 digits, and newlines
# join the punctuation before them (".\n").
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# The names `BPETokenizer.train(pattern=...)` and `minillm data --split_pattern` take. "none": no
# split, the text is one chunk and merges may cross words and lines (minbpe's BasicTokenizer).
SPLIT_PATTERNS = {"gpt2": GPT2_SPLIT_PATTERN, "gpt4": GPT4_SPLIT_PATTERN, "none": None}

# Where encode_stream may cut a text under GPT-2's or GPT-4's pattern: after a newline that follows a
# non-space and precedes a non-space ("x\n|A"), or between a letter and a symbol ("word|."). No
# alternative of either pattern matches across these points, and the match just before them ends the
# same way whether the text goes on or stops there. (?r) searches backwards: we want the last point.
_STREAM_CUT = regex.compile(r"(?r)(?<=\S\n)(?=\S)|(?<=\p{L})(?=[^\s\p{L}\p{N}])")
_MAX_ID = 1 << 20  # special-token ids chosen by the user stay below this (tiktoken's largest is ~200k)
_CACHE_MAX = 1 << 16  # BPE's chunk -> ids cache: bounded, so encoding a huge corpus stays in bounded memory


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


class BPETokenizer(SpecialTokens):
    """Byte-level BPE: ids 0..255 are bytes, 256.. are merges in the order learned, then specials.

    A worked example (Wikipedia's): in "aaabdaaabac" the most frequent adjacent pair is (a, a), so
    merge 1 makes Z = aa: "ZabdZabac". Then (a, b) -> Y: "ZYdZYac"; then (Z, Y) -> X: "XdXac".
    Here the symbols are UTF-8 bytes, so "é" starts as two ids (195, 169) and a merge can join them.
    Encoding new text replays the merges in the order they were learned.
    """

    def __init__(self, merges: Iterable[tuple[int, int]], special_tokens: Iterable[str] | dict[str, int] = (),
                 pattern: str | None = GPT2_SPLIT_PATTERN):
        """special_tokens: a list (ids follow the merges in order) or a dict {token: id} (any ids
        above the merges; ids left between them are unused). pattern: a regex, a name in
        SPLIT_PATTERNS ("gpt2", "gpt4", "none"), or None for no split."""
        # The merges list *is* the tokenizer: the vocabulary below is derived from it, which is
        # why the JSON stores only merges (as [a, b] pairs), the split pattern and the specials.
        self.pattern = SPLIT_PATTERNS.get(pattern, pattern) if isinstance(pattern, str) else pattern
        self._split = regex.compile(self.pattern) if self.pattern is not None else None
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
        n = len(self.vocab)  # bytes + merges: the first id free for specials
        if isinstance(special_tokens, dict):
            self.special_tokens = {s: special_tokens[s] for s in specials}
            ids = list(self.special_tokens.values())
            # Capped so that a typo (or a hostile file) cannot make us allocate a billion-id vocabulary.
            bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not n <= i < _MAX_ID]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"special token ids {self.special_tokens} must be distinct ints >= {n} and "
                                 f"< {_MAX_ID}: ids 0..{n - 1} are the 256 bytes and {n - 256} merges")
        else:
            self.special_tokens = {s: n + i for i, s in enumerate(specials)}
        # id -> bytes; None marks an id no token uses (a gap below a special token's chosen id).
        top = max(self.special_tokens.values(), default=n - 1)
        self.vocab: list[bytes | None] = self.vocab + [None] * (top + 1 - n)
        for s, i in self.special_tokens.items():
            self.vocab[i] = s.encode("utf-8")
        self._cache: dict[str, list[int]] = {}  # chunk -> ids: text repeats its words a lot

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- training ---------------------------------------------------------------------------------
    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Iterable[str] | dict[str, int] = (),
              verbose: bool = False, pattern: str | None = "gpt2") -> "BPETokenizer":
        """Learn `vocab_size - 256 - len(special_tokens)` merges from `text` (held in memory whole).

        pattern: how text is split before counting pairs, "gpt2" (default), "gpt4" (cl100k), "none"
        (merges may cross words) or a regex. special_tokens: a list, ids after the merges, or a
        dict {token: id} with ids >= 256 + merges (e.g. {"<|endoftext|>": 50256} at vocab_size=50257,
        as GPT-2); an id past vocab_size makes the vocabulary that large.

        The textbook loop recounts every pair of the whole corpus after each merge: O(n · merges).
        Here the corpus is first reduced to its distinct chunks with their frequencies, and after a
        merge only the chunks ("words") that contain the merged pair are recounted. A pair -> words
        index finds them, and a heap of (-count, pair) finds the most frequent pair; entries whose
        count has changed since they were pushed are stale and skipped when popped ("lazy deletion").
        Ties: among equally frequent pairs the smallest (a, b) wins (the heap orders (-count, pair)),
        so training is deterministic and does not depend on the order words were first seen.
        """
        specials = list(special_tokens)
        n_merges = vocab_size - 256 - len(specials)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs 256 byte ids "
                             f"+ {len(specials)} special tokens")
        if isinstance(special_tokens, dict):  # checked now, not after an hour of merges
            low = {s: i for s, i in special_tokens.items() if isinstance(i, int) and i < 256 + n_merges}
            if low:
                raise ValueError(f"special token ids {low} collide with the byte/merge ids "
                                 f"0..{255 + n_merges} of vocab_size={vocab_size}; use ids >= {256 + n_merges}")
            cls([], special_tokens)  # ints, distinct
        if pattern is not None and pattern in SPLIT_PATTERNS:
            pattern = SPLIT_PATTERNS[pattern]
        # 1. Distinct chunks and their counts. Special tokens are cut out first: no merge spans them.
        counts: Counter[str] = Counter()
        for _, piece, is_special in cls._split_special(text, specials):
            if not is_special:
                counts.update(regex.findall(pattern, piece) if pattern is not None else [piece])
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
        return cls(merges, special_tokens if isinstance(special_tokens, dict) else specials, pattern)

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
            for chunk in (self._split.findall(piece) if self._split is not None else [piece]):
                chunk_ids = cache.get(chunk)
                if chunk_ids is None:
                    chunk_ids = self._encode_chunk(chunk)
                    if len(cache) >= _CACHE_MAX:  # a huge corpus has ever more distinct chunks:
                        cache.clear()  # start over rather than grow without bound
                    if len(chunk) <= 256:  # a long chunk (a whitespace run, pattern "none") rarely repeats
                        cache[chunk] = chunk_ids
                ids.extend(chunk_ids)
        return ids

    def _cut_candidates(self, buf: str, lo: int, hi: int, specials: list[str]) -> Iterator[int]:
        """For encode_stream: where the split pattern cannot join (GPT-2's, GPT-4's), or after a
        special token (any pattern), last first."""
        after_special = self._special_ends(buf, lo, hi, specials)
        if self.pattern not in (GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN):
            return iter(after_special)  # "none" or a custom regex: we cannot tell where it joins
        by_pattern = (m.start() for m in _STREAM_CUT.finditer(buf, lo) if m.start() <= hi)
        return heapq.merge(by_pattern, after_special, reverse=True)

    def decode_bytes(self, ids) -> bytes:
        """The raw bytes: a prefix of a token stream may end inside a multi-byte character."""
        ids = as_id_list(ids)
        try:
            return b"".join([self.vocab[i] for i in ids])  # a gap's None fails the join: TypeError
        except (IndexError, TypeError):
            bad = next(i for i in ids if not (isinstance(i, int) and 0 <= i < self.vocab_size
                                              and self.vocab[i] is not None))
            gaps = " except unused ids" if None in self.vocab else ""
            raise ValueError(f"token id {bad!r} is outside this tokenizer's vocabulary "
                             f"(0..{self.vocab_size - 1}{gaps})") from None

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
        # Files from before split-pattern choice have GPT-2's pattern; a null pattern is "none".
        # Special ids are taken as written (files from before settable ids have them consecutive).
        return cls([tuple(m) for m in d["merges"]], dict(d.get("special_tokens", {})),
                   d.get("pattern", GPT2_SPLIT_PATTERN))

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=None, sort_keys=False)

    def to_hf_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json (the `tokenizers` library's byte-level BPE).

        The same ids: id i is spelled with GPT-2's byte table (the 256 byte ids first, "Ġ" for a
        space), each merge (a, b) becomes the pair of those spellings in the same order, and the split
        regex becomes a Split pre-tokenizer. Refused when the result could differ: unused ids
        (special tokens placed at chosen ids), or two ids that spell the same bytes (a vocabulary
        keyed by string can hold only one of them).
        """
        from minillm.data.tokenizer_gguf import bytes_to_unicode
        from minillm.data.tokenizer_hf import bpe_tokenizer_json

        if None in self.vocab:
            raise ValueError("this BPE tokenizer has unused ids below its special tokens; a tokenizer.json "
                             "vocabulary has no gaps")
        table = bytes_to_unicode()
        spell = ["".join(table[b] for b in token) for token in self.vocab[:256 + len(self.merges)]]
        vocab = {s: i for i, s in enumerate(spell)}
        if len(vocab) != len(spell):
            raise ValueError("two ids of this BPE tokenizer spell the same bytes (merged in different orders); "
                             "a tokenizer.json vocabulary is keyed by string and cannot hold both")
        vocab.update(self.special_tokens)
        merges = [(spell[a], spell[b]) for a, b in self.merges]
        return bpe_tokenizer_json(vocab, merges, self.special_tokens,
                                  [self.pattern] if self.pattern is not None else None)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={list(self.special_tokens)})")
