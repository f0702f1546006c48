"""Classification metrics written out: confusion matrix, precision, recall, F1, macro/weighted averages.

Everything follows from the confusion matrix M, M[i][j] = how many examples of true class i were
predicted as class j. For class c:

    TP = M[c][c]    FP = Σ_i M[i][c] − TP  (predicted c, wrongly)    FN = Σ_j M[c][j] − TP  (missed c)
    precision = TP / (TP + FP)      recall = TP / (TP + FN)      support = TP + FN
    F1 = 2·P·R / (P + R) = 2·TP / (2·TP + FP + FN)     (the harmonic mean of P and R)

A ratio with a zero denominator (a class never predicted has no precision; a class absent from the
test set has no recall) counts as 0, as scikit-learn's `zero_division=0` does. Averages over classes:
macro = the plain mean (every class counts the same, so rare classes matter), weighted = the mean
weighted by support (dominated by frequent classes; for single-label data weighted recall equals
accuracy). tests/test_classification_metrics.py holds these equal to scikit-learn's.

    >>> report = classification_report([0, 1, 1], [0, 1, 0], labels=["neg", "pos"])
    >>> report["accuracy"], report["per_class"]["pos"]["recall"]
    (0.6666666666666666, 0.5)
    >>> print(format_report(report))
"""

from __future__ import annotations


def _check(y_true, y_pred, n_labels: int) -> tuple[list[int], list[int]]:
    y_true, y_pred = [int(y) for y in y_true], [int(y) for y in y_pred]
    if n_labels < 1:
        raise ValueError(f"need at least one label, got n_labels={n_labels}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    bad = [y for y in y_true + y_pred if not 0 <= y < n_labels]
    if bad:
        raise ValueError(f"label id {bad[0]} is outside 0..{n_labels - 1}")
    return y_true, y_pred


def confusion_matrix(y_true, y_pred, n_labels: int) -> list[list[int]]:
    """M[i][j] = number of examples with true label i predicted as j (rows = true, columns = predicted)."""
    y_true, y_pred = _check(y_true, y_pred, n_labels)
    M = [[0] * n_labels for _ in range(n_labels)]
    for t, p in zip(y_true, y_pred):
        M[t][p] += 1
    return M


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0  # sklearn's zero_division=0


def classification_report(y_true, y_pred, labels: list[str]) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro and weighted averages, confusion matrix.

    y_true, y_pred: label ids 0..len(labels)-1; labels: the class names, in id order. Returns
        {"accuracy": float, "n": int, "labels": [...],
         "per_class": {name: {"precision", "recall", "f1", "support"}},
         "macro": {...}, "weighted": {...}, "confusion_matrix": [[int]]}
    """
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"label names must be distinct, got {labels}")
    M = confusion_matrix(y_true, y_pred, len(labels))
    n = sum(map(sum, M))
    if n == 0:
        raise ValueError("no examples to score: y_true is empty")
    per_class = {}
    for c, name in enumerate(labels):
        tp = M[c][c]
        predicted = sum(M[i][c] for i in range(len(labels)))  # TP + FP: the column sum
        support = sum(M[c])  # TP + FN: the row sum
        per_class[name] = dict(precision=_ratio(tp, predicted), recall=_ratio(tp, support),
                               f1=_ratio(2 * tp, predicted + support),  # 2TP / (2TP + FP + FN)
                               support=support)
    keys = ("precision", "recall", "f1")
    rows = per_class.values()
    macro = {k: sum(r[k] for r in rows) / len(labels) for k in keys}
    weighted = {k: sum(r[k] * r["support"] for r in rows) / n for k in keys}
    return dict(accuracy=sum(M[c][c] for c in range(len(labels))) / n, n=n, labels=labels, per_class=per_class,
                macro={**macro, "support": n}, weighted={**weighted, "support": n}, confusion_matrix=M,
                collapsed_to=collapsed_class(M, labels))


def collapsed_class(M: list[list[int]], labels: list[str]) -> str | None:
    """The one class every example was predicted as, when the true labels hold more than one; else None.

    A classifier that has collapsed (a head that learned only the majority class, a fine-tune whose
    learning rate was too high) scores the share of that class as its accuracy, which can look like a
    weak but working model (48.6% on a balanced binary task). Its confusion matrix gives it away: a
    single non-zero column."""
    predicted = [c for c in range(len(labels)) if any(row[c] for row in M)]
    true_classes = sum(1 for row in M if sum(row))
    return labels[predicted[0]] if len(predicted) == 1 and true_classes > 1 else None


def format_report(report: dict) -> str:
    """The report as a small table, like sklearn's, followed by the confusion matrix."""
    labels = report["labels"]
    w = max(12, *(len(s) for s in labels))  # the first column fits the longest class name
    lines = [f"{'':<{w}} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>9}"]
    for name, r in report["per_class"].items():
        lines.append(f"{name:<{w}} {r['precision']:>9.3f} {r['recall']:>9.3f} {r['f1']:>9.3f} {r['support']:>9d}")
    lines.append("")
    lines.append(f"{'accuracy':<{w}} {'':>9} {'':>9} {report['accuracy']:>9.3f} {report['n']:>9d}")
    for key, title in (("macro", "macro avg"), ("weighted", "weighted avg")):
        r = report[key]
        lines.append(f"{title:<{w}} {r['precision']:>9.3f} {r['recall']:>9.3f} {r['f1']:>9.3f} {r['support']:>9d}")
    cw = max(6, *(len(s) for s in labels))  # confusion-matrix column width
    lines += ["", "confusion matrix (rows = true, columns = predicted)",
              f"{'':<{w}} " + " ".join(f"{s:>{cw}}" for s in labels)]
    for name, row in zip(labels, report["confusion_matrix"]):
        lines.append(f"{name:<{w}} " + " ".join(f"{v:>{cw}d}" for v in row))
    if report.get("collapsed_to") is not None:
        lines += ["", f"warning: every one of the {report['n']} examples is predicted {report['collapsed_to']!r}: the "
                  f"model collapsed to one class, and its accuracy ({report['accuracy']:.1%}) is only that class's "
                  "share. Try a lower --learning_rate, more --max_iters, or --pooling=mean"]
    return "\n".join(lines)
