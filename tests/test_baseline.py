"""The bag-of-words baseline (minillm/finetune/baseline.py): fits what words decide, not what order decides."""

import random

import pytest
import torch

from minillm.finetune.baseline import BagOfWords, bag_of_words_baseline, words

FILLER = "the a of and to in is it that was for on are with as".split()
CUES = (["awful", "terrible", "boring"], ["fine", "okay", "average"], ["great", "superb", "wonderful"])


def cue_task(n: int, seed: int) -> list[tuple[str, int]]:
    """Three classes; the label is whichever class's cue word the text contains (plus filler words)."""
    rng = random.Random(seed)
    data = []
    for i in range(n):
        y = i % 3
        toks = rng.choices(FILLER, k=rng.randint(3, 8)) + [rng.choice(CUES[y])]
        rng.shuffle(toks)
        data.append((" ".join(toks), y))
    return data


def order_task(n_words: int = 6) -> list[tuple[str, int]]:
    """Every ordered pair of distinct words "x y"; label 0 if x sorts before y, else 1. So "x y" and
    "y x" are both present with opposite labels: the label is the order and nothing else."""
    vocab = [f"w{i}" for i in range(n_words)]
    return [(f"{a} {b}", int(a > b)) for a in vocab for b in vocab if a != b]


def accuracy(clf, data) -> float:
    pred = clf.predict([t for t, _ in data])
    return sum(p == y for p, (_, y) in zip(pred, data)) / len(data)


def test_words_lowercases_and_adds_bigrams():
    assert words("Good, GOOD movie!") == ["good", "good", "movie"]
    assert words("A b c", bigrams=True) == ["a", "b", "c", "a b", "b c"]


@pytest.mark.parametrize("options", [dict(), dict(features="binary"), dict(optimizer="adam", steps=300),
                                     dict(bigrams=True, min_count=2)])
def test_a_separable_task_is_fit_perfectly(options):
    train, dev = cue_task(60, seed=0), cue_task(30, seed=1)
    clf = BagOfWords(**options).fit([t for t, _ in train], [y for _, y in train], n_labels=3)
    assert accuracy(clf, train) == 1.0
    assert accuracy(clf, dev) >= 0.9  # the cue words generalise; the filler is shared by all classes


def test_the_fit_is_deterministic():
    train = cue_task(60, seed=0)
    fits = [BagOfWords().fit([t for t, _ in train], [y for _, y in train], 3) for _ in range(2)]
    assert fits[0].vocab == fits[1].vocab
    assert torch.equal(fits[0].W, fits[1].W) and torch.equal(fits[0].b, fits[1].b)


def test_word_order_is_invisible_to_a_bag_of_words_but_not_to_bigrams():
    train = order_task()
    texts, labels = [t for t, _ in train], [y for _, y in train]
    clf = BagOfWords().fit(texts, labels, 2)
    # "x y" and "y x" get the same features, hence the same prediction: exactly one of each pair is right
    assert torch.equal(clf.transform(["w1 w2"]), clf.transform(["w2 w1"]))
    assert accuracy(clf, train) == 0.5
    # bigrams see local order: the same data becomes separable on the training set
    assert accuracy(BagOfWords(bigrams=True).fit(texts, labels, 2), train) == 1.0


def test_unseen_words_are_ignored_at_predict_time():
    train = cue_task(60, seed=0)
    clf = BagOfWords().fit([t for t, _ in train], [y for _, y in train], 3)
    assert torch.equal(clf.transform(["the superb zzyzx qwerty"]), clf.transform(["the superb"]))
    assert clf.predict(["zzyzx superb qwerty", "awful neverseen"]) == [2, 0]
    assert clf.transform(["only unseen words"]).abs().sum() == 0  # no features at all: predicts the prior


def test_baseline_report():
    labels = ["neg", "mid", "pos"]
    r = bag_of_words_baseline(cue_task(60, seed=0), cue_task(30, seed=1), labels)
    assert r["accuracy"] == 1.0 and r["labels"] == labels and r["n"] == 30
    assert r["n_features"] == len(set(FILLER) | {w for ws in CUES for w in ws})  # every word seen in train
    assert r["fit_seconds"] > 0


@pytest.mark.parametrize("call, message", [
    (lambda: BagOfWords().fit([], [], 2), "empty training set"),
    (lambda: bag_of_words_baseline([], [("a", 0)], ["x", "y"]), "empty training set"),
    (lambda: BagOfWords().fit(["a", "b"], [0], 2), "got 2 texts but 1 labels"),
    (lambda: BagOfWords().fit(["a"], [2], 2), "label 2 is outside 0..1"),
    (lambda: BagOfWords().predict(["a"]), "not fitted"),
    (lambda: BagOfWords(features="counts"), "unknown features 'counts'"),
    (lambda: BagOfWords(min_count=5).fit(["a b"], [0], 1), "no token occurs min_count=5 times"),
])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError, match=message) as e:
        call()
    assert "\n" not in str(e.value)
