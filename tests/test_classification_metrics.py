"""Classification metrics (minillm/evaluate/classification.py): hand-computed cases, edges, and scikit-learn."""

import random

import pytest

from minillm.evaluate.classification import classification_report, confusion_matrix, format_report


def test_confusion_matrix_rows_are_true_columns_predicted():
    assert confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3) == [[1, 1, 0],
                                                                        [0, 1, 0],
                                                                        [1, 0, 2]]


def test_a_hand_computed_report():
    # true  : a a a b b c      predicted: a a b b c c
    # a: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 0.8;  b: TP 1, FP 1, FN 1 -> P R F1 = 1/2
    # c: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3;  accuracy 4/6
    r = classification_report([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(4 / 6) and r["n"] == 6
    assert r["per_class"]["a"] == pytest.approx(dict(precision=1.0, recall=2 / 3, f1=0.8, support=3))
    assert r["per_class"]["b"] == pytest.approx(dict(precision=0.5, recall=0.5, f1=0.5, support=2))
    assert r["per_class"]["c"] == pytest.approx(dict(precision=0.5, recall=1.0, f1=2 / 3, support=1))
    assert r["macro"] == pytest.approx(dict(precision=2 / 3, recall=(2 / 3 + 0.5 + 1) / 3,
                                            f1=(0.8 + 0.5 + 2 / 3) / 3, support=6))
    assert r["weighted"] == pytest.approx(dict(precision=(3 * 1 + 2 * 0.5 + 0.5) / 6, recall=4 / 6,
                                               f1=(3 * 0.8 + 2 * 0.5 + 2 / 3) / 6, support=6))
    assert r["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_a_class_never_predicted_and_one_never_present_score_zero():
    # class 1 is never predicted (precision 0/0 -> 0), class 2 never occurs (recall 0/0 -> 0)
    r = classification_report([0, 0, 1, 1], [0, 2, 0, 0], ["x", "y", "z"])
    assert r["per_class"]["y"] == dict(precision=0.0, recall=0.0, f1=0.0, support=2)
    assert r["per_class"]["z"] == dict(precision=0.0, recall=0.0, f1=0.0, support=0)
    assert r["per_class"]["x"] == pytest.approx(dict(precision=1 / 3, recall=0.5, f1=0.4, support=2))
    assert r["macro"]["precision"] == pytest.approx(1 / 9)  # the absent class still counts in the mean
    assert r["accuracy"] == 0.25


def test_a_single_class():
    r = classification_report([0, 0, 0], [0, 0, 0], ["only"])
    assert r["accuracy"] == 1.0
    assert r["per_class"]["only"] == dict(precision=1.0, recall=1.0, f1=1.0, support=3)
    assert r["macro"] == r["weighted"] == dict(precision=1.0, recall=1.0, f1=1.0, support=3)


def test_format_report_shows_every_class_the_averages_and_the_matrix():
    text = format_report(classification_report([0, 1, 1], [0, 1, 0], ["neg", "pos"]))
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1", "support"]
    assert lines[1].split() == ["neg", "0.500", "1.000", "0.667", "1"]
    assert lines[2].split() == ["pos", "1.000", "0.500", "0.667", "2"]
    assert "accuracy" in text and "macro avg" in text and "weighted avg" in text
    assert lines[-2].split() == ["neg", "1", "0"] and lines[-1].split() == ["pos", "1", "1"]


@pytest.mark.parametrize("args, message", [
    (([0, 1], [0], ["a", "b"]), "y_true has 2 labels but y_pred has 1"),
    (([0, 2], [0, 1], ["a", "b"]), "label id 2 is outside 0..1"),
    (([], [], ["a", "b"]), "no examples to score"),
    (([0], [0], ["a", "a"]), "label names must be distinct"),
])
def test_bad_input_is_a_one_line_error(args, message):
    with pytest.raises(ValueError, match=message) as e:
        classification_report(*args)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_scikit_learn_on_random_cases(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(seed)
    K = rng.randint(2, 6)
    n = rng.randint(1, 60)
    y_true = [rng.randrange(K) for _ in range(n)]
    y_pred = [rng.randrange(K) for _ in range(n)]
    labels = [f"c{i}" for i in range(K)]
    ours = classification_report(y_true, y_pred, labels)
    theirs = metrics.classification_report(y_true, y_pred, labels=list(range(K)), target_names=labels,
                                           output_dict=True, zero_division=0)
    assert ours["accuracy"] == pytest.approx(metrics.accuracy_score(y_true, y_pred))
    for name in labels:
        t = theirs[name]
        assert ours["per_class"][name] == pytest.approx(
            dict(precision=t["precision"], recall=t["recall"], f1=t["f1-score"], support=t["support"]))
    for ours_key, their_key in (("macro", "macro avg"), ("weighted", "weighted avg")):
        t = theirs[their_key]
        assert ours[ours_key] == pytest.approx(
            dict(precision=t["precision"], recall=t["recall"], f1=t["f1-score"], support=t["support"]))
    assert ours["confusion_matrix"] == metrics.confusion_matrix(y_true, y_pred, labels=list(range(K))).tolist()
