"""Corpus BLEU (Papineni et al. 2002), computed the way sacreBLEU (Post 2018) computes it.

BLEU compares a system's output with one or more human references, over the whole test set at once:

    p_n  = Σ_sentences Σ_ngrams min(count_hyp(g), max_refs count_ref(g))  /  Σ_sentences #n-grams in hyp
    BP   = 1                    if c > r         c = total hypothesis length (tokens)
         = exp(1 - r/c)         otherwise        r = Σ over sentences of the reference length closest to
                                                     the hypothesis' (ties: the shorter reference)
    BLEU = 100 · BP · exp( (1/4) Σ_{n=1..4} log p_n )

Clipping ("min(count_hyp, count_ref)") stops "the the the the" from scoring on a reference with one
"the"; the brevity penalty stops a system from emitting only the words it is sure of (precision alone
would reward that). Scores differ a lot with tokenization, which is why papers quote sacreBLEU: it
fixes the tokenizer to WMT's mteval-v13a ("13a", `tokenize_13a` below) applied to detokenized text.

Smoothing decides what happens when some p_n has no match (common for short sentences):
    "exp"   (default; mteval's NIST smoothing, Chen & Cherry 2014 method 3): the k-th order with zero
            matches gets precision 1 / (2^k · total_n)
    "floor" (method 1): a zero count becomes `smooth_value` (default 0.1)
    "add-k" (method 2): add `smooth_value` (default 1) to matches and totals for n ≥ 2
    "none":  a zero precision makes BLEU 0
And, as in sacreBLEU, BLEU is 0 when nothing matches at all or when the corpus has no n-grams of
some order (all hypotheses shorter than n words).

    >>> corpus_bleu(["the cat sat on the mat"], [["the cat is on the mat"]]).score
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

MAX_ORDER = 4  # BLEU-4, the one everybody reports
SMOOTH_DEFAULTS = {"exp": None, "none": None, "floor": 0.1, "add-k": 1.0}

# mteval-v13a's rules, in order (sacreBLEU's TokenizerRegexp):
_RULES_13A = [
    # split off punctuation and symbols: { | } ~ [ \ ] ^ _ ` space ! " # $ % & ( ) * + : ; < = > ? @ /
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma, unless after a digit ...
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... or before one: "3.14" and "1,000" stay whole
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # a dash after a digit: "2021-03" -> "2021 - 03"
]


def tokenize_13a(line: str) -> str:
    """mteval-v13a tokenization: unescape a few HTML entities, split off punctuation; tokens joined by ' '."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, repl in _RULES_13A:
        line = pattern.sub(repl, line)
    return " ".join(line.split())  # one space between tokens, none at the ends


def ngrams(tokens: list[str], max_order: int = MAX_ORDER) -> Counter:
    """Counts of every n-gram, 1 ≤ n ≤ max_order, as tuples of tokens."""
    return Counter(tuple(tokens[i:i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


@dataclass
class BLEUResult:
    score: float  # 0..100
    precisions: list[float]  # p_1..p_4 in percent, after smoothing
    bp: float  # brevity penalty
    sys_len: int  # c
    ref_len: int  # r
    correct: list[int]  # clipped matches per order (before smoothing)
    total: list[int]  # hypothesis n-grams per order


def _closest_ref_len(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length nearest the hypothesis' (ties go to the shorter reference)."""
    return min(ref_lens, key=lambda r: (abs(hyp_len - r), r))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], smooth: str = "exp",
                smooth_value: float | None = None, lowercase: bool = False, tokenize: bool = True) -> BLEUResult:
    """BLEU of `hypotheses` (one string per sentence) against `references`, given as sacreBLEU takes
    them: a list of reference *streams*, each with one string per sentence (several streams = several
    references per sentence). `tokenize=False` splits on whitespace only (text already tokenized)."""
    if smooth not in SMOOTH_DEFAULTS:
        raise ValueError(f"unknown BLEU smoothing {smooth!r}; choose one of {list(SMOOTH_DEFAULTS)}")
    for stream in references:
        if len(stream) != len(hypotheses):
            raise ValueError(f"{len(hypotheses)} hypotheses but a reference stream of {len(stream)} sentences")
    value = SMOOTH_DEFAULTS[smooth] if smooth_value is None else smooth_value

    def prep(s: str) -> list[str]:
        s = s.lower() if lowercase else s
        s = s.rstrip()
        return (tokenize_13a(s) if tokenize else s).split()

    correct, total = [0] * MAX_ORDER, [0] * MAX_ORDER
    sys_len = ref_len = 0
    for i, hyp in enumerate(hypotheses):
        hyp_tokens = prep(hyp)
        refs = [prep(stream[i]) for stream in references]
        # clip by the most times any single reference uses the n-gram
        max_ref = Counter()
        for ref in refs:
            for g, c in ngrams(ref).items():
                max_ref[g] = max(max_ref[g], c)
        for g, c in ngrams(hyp_tokens).items():
            total[len(g) - 1] += c
            correct[len(g) - 1] += min(c, max_ref[g])
        sys_len += len(hyp_tokens)
        ref_len += _closest_ref_len(len(hyp_tokens), [len(r) for r in refs])
    return bleu_from_counts(correct, total, sys_len, ref_len, smooth, value)


def bleu_from_counts(correct: list[int], total: list[int], sys_len: int, ref_len: int, smooth: str = "exp",
                     smooth_value: float | None = None) -> BLEUResult:
    """BLEU from its sufficient statistics (summed over the corpus)."""
    bp = 1.0 if sys_len >= ref_len else (math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0)
    precisions = [0.0] * MAX_ORDER
    if not any(correct):  # no match at all: 0, whatever the smoothing
        return BLEUResult(0.0, precisions, bp, sys_len, ref_len, list(correct), list(total))
    exp_factor = 1.0  # "exp": doubles at each order with zero matches
    for n in range(MAX_ORDER):
        m, t = correct[n], total[n]
        if smooth == "add-k" and n >= 1:  # orders 2..4 only (unigrams stay unsmoothed)
            m, t = m + smooth_value, t + smooth_value
        if t == 0:  # no n-grams of this order in the whole corpus: this and higher p_n stay 0
            break
        if m == 0:
            if smooth == "exp":
                exp_factor *= 2
                precisions[n] = 100.0 / (exp_factor * t)
            elif smooth == "floor":
                precisions[n] = 100.0 * smooth_value / t
        else:
            precisions[n] = 100.0 * m / t
    if min(precisions) <= 0.0:  # log 0: the geometric mean is 0
        score = 0.0
    else:
        # geometric mean of the precisions (already in percent, so the score is too)
        score = bp * math.exp(sum(math.log(p) for p in precisions) / MAX_ORDER)
    return BLEUResult(score, precisions, bp, sys_len, ref_len, list(correct), list(total))
