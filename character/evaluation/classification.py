"""Multi-class scores of a classifier's verdicts, computed here (the paper's macro-F1 and its parts):
per-class precision, recall, F1 and support, their macro average, and the confusion matrix.

Conventions as scikit-learn's with `zero_division=0`: a class never predicted has precision 0, a class
with no true examples recall 0, and F1 0 when precision and recall are both 0. The macro average is over
the classes given, so a class that no model was ever trained for still counts against it.
"""

from __future__ import annotations

from typing import Sequence


def confusion_matrix(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> list[list[int]]:
    """rows: the true class, columns: the predicted one, both in `labels` order; other labels are skipped."""
    if len(true) != len(predicted):
        raise ValueError(f"{len(true)} true labels but {len(predicted)} predictions")
    index = {lb: k for k, lb in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(true, predicted):
        if t in index and p in index:
            matrix[index[t]][index[p]] += 1
    return matrix


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def class_scores(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict[str, dict]:
    """label -> {precision, recall, f1, support} over the answers whose true label is one of `labels`."""
    matrix = confusion_matrix(true, predicted, labels)
    out = {}
    for k, lb in enumerate(labels):
        hit = matrix[k][k]
        called = sum(row[k] for row in matrix)  # predicted as lb
        support = sum(matrix[k])  # truly lb
        p, r = _ratio(hit, called), _ratio(hit, support)
        out[lb] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
    return out


def macro_f1(scores: dict[str, dict]) -> float | None:
    """The unweighted mean of the classes' F1 (None for no classes)."""
    return sum(s["f1"] for s in scores.values()) / len(scores) if scores else None


def classification_report(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
    """Everything a reader of one set of verdicts needs: per-class scores, macro-F1, accuracy, the
    confusion matrix (rows true, columns predicted, in `labels` order), n."""
    scores = class_scores(true, predicted, labels)
    n = len(true)
    return {
        "labels": list(labels),
        "per_class": scores,
        "macro_f1": macro_f1(scores),
        "accuracy": _ratio(sum(t == p for t, p in zip(true, predicted)), n) if n else None,
        "confusion": confusion_matrix(true, predicted, labels),
        "n": n,
    }


def share_of(predicted: Sequence[str], label: str) -> tuple[float | None, int]:
    """(share of verdicts that are `label`, n); (None, 0) for none."""
    if not predicted:
        return None, 0
    return sum(p == label for p in predicted) / len(predicted), len(predicted)
