"""ROUGE-1, ROUGE-2 and ROUGE-L (Lin 2004), computed the way Google's `rouge-score` package does.

ROUGE is recall-oriented: how much of the reference (target) the prediction recovers.

    ROUGE-N:  overlap = Σ_g min(count_target(g), count_prediction(g))  over n-grams g
              P = overlap / #n-grams(prediction)      R = overlap / #n-grams(target)
    ROUGE-L:  the same with overlap = |LCS(target, prediction)|, the longest common subsequence
              (words in the same order, gaps allowed), P over the prediction's length, R over the target's
    F = 2·P·R / (P + R)     (0 when P + R = 0)

Tokenization (rouge-score's, after Lin's original script): lowercase, every run of characters other
than a-z and 0-9 becomes a space, split. With `stem=True` words longer than 3 characters are Porter-
stemmed ("cats" and "cat" then match). The stemmer is NLTK's `PorterStemmer` — the very class
rouge-score uses — imported here rather than rewritten: its ~800 lines of suffix rules (Porter 1980
plus NLTK's extensions) are not what this file teaches, and only an identical stemmer gives
identical scores. So `stem=True` needs `pip install nltk`; everything else is plain Python.

    >>> rouge_scores("the cat sat on the mat", "the cat is on the mat")["rougeL"].fmeasure
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_NON_ALPHANUM = re.compile(r"[^a-z0-9]+")
_VALID = re.compile(r"^[a-z0-9]+$")


@dataclass
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def _porter():
    try:
        from nltk.stem import porter
    except ImportError as e:
        raise ImportError("ROUGE with stem=True uses NLTK's Porter stemmer (as rouge-score does): "
                          f"pip install nltk. Import failed with: {e}") from e
    return porter.PorterStemmer()


def rouge_tokenize(text: str, stem: bool = False, stemmer=None) -> list[str]:
    """Lowercased alphanumeric tokens; with `stem`, words of 4+ characters Porter-stemmed."""
    tokens = _NON_ALPHANUM.sub(" ", text.lower()).split()
    if stem:
        stemmer = stemmer or _porter()
        tokens = [stemmer.stem(w) if len(w) > 3 else w for w in tokens]
    return [w for w in tokens if _VALID.match(w)]  # a stemmer could in principle return odd strings


def _f(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_n(target: list[str], prediction: list[str], n: int) -> RougeScore:
    """ROUGE-N from token lists: clipped n-gram overlap over each side's n-gram count."""
    t = Counter(tuple(target[i:i + n]) for i in range(len(target) - n + 1))
    p = Counter(tuple(prediction[i:i + n]) for i in range(len(prediction) - n + 1))
    overlap = sum(min(c, p[g]) for g, c in t.items())
    # max(·, 1): a side with no n-grams gives 0, not a division by zero (as rouge-score)
    precision = overlap / max(sum(p.values()), 1)
    recall = overlap / max(sum(t.values()), 1)
    return RougeScore(precision, recall, _f(precision, recall))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming: L[i][j] = LCS of a[:i] and b[:j],
        L[i][j] = L[i-1][j-1] + 1            if a[i-1] == b[j-1]
                = max(L[i-1][j], L[i][j-1])  otherwise.
    Only the previous row is kept: O(|b|) memory."""
    prev = [0] * (len(b) + 1)
    for i in range(1, len(a) + 1):
        cur = [0] * (len(b) + 1)
        for j in range(1, len(b) + 1):
            cur[j] = prev[j - 1] + 1 if a[i - 1] == b[j - 1] else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l(target: list[str], prediction: list[str]) -> RougeScore:
    """ROUGE-L (sentence level, no summary splitting) from token lists."""
    if not target or not prediction:
        return RougeScore(0.0, 0.0, 0.0)
    lcs = lcs_length(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return RougeScore(precision, recall, _f(precision, recall))


def rouge_scores(target: str, prediction: str, stem: bool = False,
                 types: tuple[str, ...] = ("rouge1", "rouge2", "rougeL")) -> dict[str, RougeScore]:
    """{"rouge1": RougeScore, "rouge2": ..., "rougeL": ...} for one (target, prediction) pair — the
    argument order of rouge-score's RougeScorer.score(target, prediction)."""
    stemmer = _porter() if stem else None
    t, p = rouge_tokenize(target, stem, stemmer), rouge_tokenize(prediction, stem, stemmer)
    out = {}
    for name in types:
        if name == "rougeL":
            out[name] = rouge_l(t, p)
        elif re.fullmatch(r"rouge[1-9]", name):
            out[name] = rouge_n(t, p, int(name[5:]))
        else:
            raise ValueError(f"unknown ROUGE type {name!r}; choose rouge1..rouge9 or rougeL")
    return out
