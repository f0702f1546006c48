"""What every tokenizer here shares: special tokens matched whole, and encoding a stream of text.

Special tokens ("[MASK]", "<|endoftext|>", ...) get ids after the ordinary vocabulary. Where their
exact string appears in the text it is encoded as that one id, unless `allowed_special="none"` says
to treat it as plain text.

`encode_iterable(texts)` (an open file works) yields the same ids as `encode("".join(texts))` while
holding only a line or so of text at a time: `encode_stream` cuts the text only where encoding the
two sides apart gives the ids of encoding them together. CharTokenizer (tokenizer_char.py) and
BPETokenizer (tokenizer_bpe.py) inherit both from `SpecialTokens`.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import regex


def as_id_list(ids) -> list[int]:
    """Accept a list, tuple, numpy array or torch tensor of ids."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


class SpecialTokens:
    """Special tokens matched atomically inside the text, and streaming; subclasses define `encode`."""

    special_tokens: dict[str, int]

    def _check_specials(self, special_tokens: Iterable[str]) -> list[str]:
        specials = list(special_tokens)  # a dict gives its keys
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

    # -- streaming: a corpus larger than memory ------------------------------------------------------
    def encode_iterable(self, texts: Iterable[str], allowed_special="all") -> Iterator[int]:
        """The ids of "".join(texts), one at a time: exactly `encode` of the joined text.

        `texts` can be an open file (its lines), a generator of file chunks, any iterable of str.
        Memory is bounded by the longest stretch of text without a safe cut (a line, for ordinary
        text; see encode_stream), not by the corpus size.
        """
        for ids in self.encode_stream(texts, allowed_special):
            yield from ids

    def encode_stream(self, texts: Iterable[str], allowed_special="all") -> Iterator[list[int]]:
        """Like encode_iterable, but one list of ids per encoded segment (what a dataset writes).

        The idea: keep a carry of text not yet encoded; after each new piece, find the last *safe
        cut* in it, encode the text up to the cut and keep the rest. A cut at i is safe when
        encoding the two sides apart gives the ids of encoding them together, whatever follows:
        - no occurrence of a special token straddles i (it would be cut in two), and
        - the tokenizer's own splitting never joins across i (`_cut_candidates`): anywhere for
          characters; for BPE where GPT-2's / GPT-4's regex cannot join, or after a special token.
          With split pattern "none" only the latter remain, so memory is bounded by the longest
          stretch between special tokens (e.g. one document between "<|endoftext|>"s).
        """
        allowed = self._allowed(allowed_special)
        longest = max((len(s) for s in allowed), default=1)
        carry = ""
        for text in texts:
            buf = carry + text
            # Points in the carry were all rejected before, except the last few that lacked the
            # characters after them: looking only from there keeps the search linear.
            lo = max(1, len(carry) - longest - 2)
            hi = len(buf) - max(1, longest - 1)  # a cut needs the characters after it to be known
            cut = next((i for i in self._cut_candidates(buf, lo, hi, allowed)
                        if not self._straddled(buf, i, allowed)), 0)
            if cut:
                yield self.encode(buf[:cut], allowed)
            carry = buf[cut:]
        if carry:
            yield self.encode(carry, allowed)

    def _cut_candidates(self, buf: str, lo: int, hi: int, specials: list[str]) -> Iterator[int]:
        """Positions in [lo, hi] where this tokenizer's own splitting is independent, last first."""
        return iter(range(hi, lo - 1, -1))  # characters: every position

    @staticmethod
    def _straddled(buf: str, i: int, specials: list[str]) -> bool:
        """True if an occurrence of a special token starts before position i and ends after it."""
        # An occurrence starting in [i-len+1, i-1] lies inside buf[i-len+1 : i+len-1], and only then.
        return any(buf.find(s, max(0, i - len(s) + 1), i + len(s) - 1) != -1 for s in specials)

    def _special_ends(self, buf: str, lo: int, hi: int, specials: list[str]) -> list[int]:
        """Ends i in [lo, hi] of special-token occurrences [a, i) that `_split_special` surely takes.

        The longest-first, left-to-right split takes [a, i) when no occurrence straddles a (an
        earlier match could swallow a) and none straddles i (a longer special at a would, too);
        encode_stream checks i, this checks a.
        """
        ends = set()
        for s in specials:
            a = buf.find(s, max(0, lo - len(s)))
            while a != -1 and a + len(s) <= hi:
                if not self._straddled(buf, a, specials):
                    ends.add(a + len(s))
                a = buf.find(s, a + 1)
        return sorted(ends, reverse=True)

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
