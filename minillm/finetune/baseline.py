"""A bag-of-words baseline for text classification: the number a fine-tuned Transformer has to beat.

Before fine-tuning a language model on a classification task, fit the classic linear baseline
(as in the "baselines and bigrams" tradition, Wang & Manning 2012): if it already scores 90%, the
Transformer's 91% means little; if the task needs word order, the baseline shows that too.

    features:  lowercase words (optionally also bigrams "w1 w2") counted per text, over a vocabulary
               of the training set (tokens seen ≥ min_count times, the max_features most frequent);
               "tfidf":  x_t = count(t, doc) · idf(t),  idf(t) = ln((1 + N) / (1 + df(t))) + 1,
                         then x / ‖x‖₂   (scikit-learn's TfidfVectorizer with smooth_idf)
               "binary": x_t = 1 if t occurs in the doc
    model:     multinomial logistic regression, p(y | x) = softmax(x W + b), W: (V, K), b: (K,)
    training:  full batch, minimise  mean_i −log p(y_i | x_i) + (λ/2)·‖W‖²  (the bias is not
               penalised) with L-BFGS (default) or Adam. The loss is convex, so starting from W = 0
               reaches the same optimum every time: the fit is deterministic, with nothing to seed.

Words the training set never saw have no feature, so at predict time they are simply ignored. The
teaching point: "a b" and "b a" have the same bag of words, so without bigrams no setting of W can
tell them apart (tests/test_baseline.py checks that it stays at chance).

    >>> clf = BagOfWords(bigrams=True).fit(texts, labels, n_labels=2)
    >>> clf.predict(["a new review"])
    >>> bag_of_words_baseline(train, dev, labels=["neg", "pos"])["accuracy"]

Features are a dense (N, V) float tensor: fine for the tens of thousands of examples of a typical
fine-tuning set with max_features ≤ ~20k; a sparse matrix is what scales beyond that.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import torch
import torch.nn.functional as F

from minillm.evaluate.classification import classification_report

FEATURES = ("tfidf", "binary")
OPTIMIZERS = ("lbfgs", "adam")


def words(text: str, bigrams: bool = False) -> list[str]:
    """Lowercase word tokens (runs of letters, digits, _), plus "w1 w2" for adjacent pairs if asked."""
    toks = re.findall(r"\w+", text.lower())
    if bigrams:
        toks = toks + [f"{a} {b}" for a, b in zip(toks, toks[1:])]
    return toks


class BagOfWords:
    """tf-idf (or binary) word features → softmax regression, trained in plain torch."""

    def __init__(self, *, bigrams: bool = False, features: str = "tfidf", min_count: int = 1,
                 max_features: int | None = 20000, l2: float = 1e-4, optimizer: str = "lbfgs",
                 steps: int = 200, lr: float = 0.1):
        if features not in FEATURES:
            raise ValueError(f"unknown features {features!r}; choose from {', '.join(FEATURES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if min_count < 1 or (max_features is not None and max_features < 1) or steps < 1 or l2 < 0:
            raise ValueError("min_count, max_features and steps must be >= 1 and l2 >= 0")
        self.bigrams, self.features, self.min_count, self.max_features = bigrams, features, min_count, max_features
        self.l2, self.optimizer, self.steps, self.lr = l2, optimizer, steps, lr
        self.vocab: dict[str, int] | None = None  # token -> feature column, set by fit

    # --- features -----------------------------------------------------------------------------

    def _build_vocab(self, docs: list[list[str]]) -> None:
        counts = Counter(t for doc in docs for t in doc)
        kept = [t for t, c in counts.items() if c >= self.min_count]
        kept.sort(key=lambda t: (-counts[t], t))  # most frequent first; ties alphabetical → deterministic
        kept = kept[: self.max_features]
        if not kept:
            raise ValueError(f"no token occurs min_count={self.min_count} times in the training texts")
        self.vocab = {t: i for i, t in enumerate(kept)}
        # document frequency df(t): in how many training texts t occurs
        df = torch.zeros(len(kept))
        for doc in docs:
            for t in set(doc):
                if t in self.vocab:
                    df[self.vocab[t]] += 1
        self.idf = torch.log((1 + len(docs)) / (1 + df)) + 1  # (V,) rare words weigh more

    def transform(self, texts: list[str]) -> torch.Tensor:
        """(N, V) feature matrix; tokens outside the training vocabulary are dropped."""
        if self.vocab is None:
            raise ValueError("BagOfWords is not fitted: call fit(texts, labels, n_labels) first")
        X = torch.zeros(len(texts), len(self.vocab))
        for i, text in enumerate(texts):
            for t in words(text, self.bigrams):
                j = self.vocab.get(t)  # None for unseen words: no column, so ignored
                if j is not None:
                    X[i, j] += 1.0  # raw count tf(t, doc)
        if self.features == "binary":
            return (X > 0).float()
        X = X * self.idf  # (N, V) * (V,): tf · idf
        return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)  # unit rows; an all-unseen text stays 0

    # --- the classifier -------------------------------------------------------------------------

    def _loss(self, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = X @ self.W + self.b  # (N, V) @ (V, K) + (K,) -> (N, K)
        return F.cross_entropy(logits, y) + 0.5 * self.l2 * (self.W ** 2).sum()

    def fit(self, texts: list[str], labels: list[int], n_labels: int) -> "BagOfWords":
        if len(texts) == 0:
            raise ValueError("cannot fit a bag-of-words model on an empty training set")
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
        if n_labels < 1:
            raise ValueError(f"n_labels must be >= 1, got {n_labels}")
        bad = [y for y in labels if not 0 <= int(y) < n_labels]
        if bad:
            raise ValueError(f"label {bad[0]} is outside 0..{n_labels - 1}")
        self.n_labels = n_labels
        self._build_vocab([words(t, self.bigrams) for t in texts])
        X, y = self.transform(texts), torch.tensor([int(v) for v in labels])
        # W = 0, b = 0: every class equally likely before training (and a deterministic start)
        self.W = torch.zeros(X.shape[1], n_labels, requires_grad=True)
        self.b = torch.zeros(n_labels, requires_grad=True)
        if self.optimizer == "lbfgs":
            # L-BFGS (Liu & Nocedal 1989) builds a curvature estimate from recent gradients: on a
            # smooth convex full-batch loss it converges in tens of steps where SGD needs thousands.
            opt = torch.optim.LBFGS([self.W, self.b], lr=1.0, max_iter=self.steps, history_size=20,
                                    tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = self._loss(X, y)
                loss.backward()
                return loss

            opt.step(closure)  # one call runs up to `steps` iterations
        else:
            opt = torch.optim.Adam([self.W, self.b], lr=self.lr)
            for _ in range(self.steps):
                opt.zero_grad()
                self._loss(X, y).backward()
                opt.step()
        self.W.requires_grad_(False)
        self.b.requires_grad_(False)
        return self

    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """(N, K) class probabilities softmax(x W + b)."""
        return torch.softmax(self.transform(texts) @ self.W + self.b, dim=-1)

    def predict(self, texts: list[str]) -> list[int]:
        return self.predict_proba(texts).argmax(dim=-1).tolist()


def bag_of_words_baseline(train: list[tuple[str, int]], dev: list[tuple[str, int]], labels: list[str],
                          **options) -> dict:
    """Fit BagOfWords(**options) on `train`, score it on `dev`: the classification_report dict on dev
    (minillm/evaluate/classification.py) plus "n_features" and "fit_seconds"."""
    if not dev:
        raise ValueError("the dev set is empty: nothing to score the baseline on")
    t0 = time.perf_counter()
    clf = BagOfWords(**options).fit([t for t, _ in train], [y for _, y in train], len(labels))
    fit_seconds = time.perf_counter() - t0
    report = classification_report([y for _, y in dev], clf.predict([t for t, _ in dev]), labels)
    return {**report, "n_features": len(clf.vocab), "fit_seconds": fit_seconds}
