"""Classification metrics used everywhere: UAR (primary), WA, macro-F1, per-class recall, confusion.

UAR is the unweighted average of per-class recall (macro recall), the standard SER metric because
emotion corpora are imbalanced; WA is plain accuracy.

A class absent from ``y_true`` has no recall (0/0): its ``per_class_recall`` is None and it is left
out of UAR and macro-F1, which then average over the classes present (sklearn's macro recall with
``labels`` = the present classes). So on a set without class c, UAR means "UAR over the other
classes"; predictions *of* c still count, as errors of the classes they were wrongly given to, and c
still has its row and column in the confusion matrix. With no item at all every metric is undefined:
UAR, WA and macro-F1 are NaN (never 0.0, which would read as a model that is always wrong), and
whoever averages UARs over sets, devices or exits must skip NaN (``nanmean``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class ClassificationReport:
    uar: float
    wa: float
    macro_f1: float
    per_class_recall: dict[str, float | None]
    confusion: list[list[int]]
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def classification_report(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, label_names: Sequence[str]
) -> ClassificationReport:
    """Compute all metrics for integer labels in ``range(len(label_names))``."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has shape {y_true.shape} but y_pred has {y_pred.shape}")
    n_cls = len(label_names)
    if y_true.size == 0:
        nan = float("nan")
        return ClassificationReport(
            nan, nan, nan, {n: None for n in label_names}, [[0] * n_cls for _ in range(n_cls)], 0
        )
    every = np.concatenate([y_true, y_pred])  # true labels first: the first bad one named is a true one
    bad = every[(every < 0) | (every >= n_cls)]
    if bad.size:
        raise ValueError(f"label {int(bad[0])} is outside range({n_cls}) of the {n_cls} label names")
    # From the confusion matrix, in numpy: sklearn's metric functions validate their input on every call,
    # which made them the most expensive step of a simulated device's message (tests check equality).
    cm = np.bincount(y_true * n_cls + y_pred, minlength=n_cls * n_cls).reshape(n_cls, n_cls)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    uar = float(np.mean(tp[present] / support[present]))
    f1 = float(np.mean(2 * tp[present] / (support[present] + predicted[present])))  # 2tp / (2tp + fp + fn)
    wa = float((y_true == y_pred).mean())
    per_class = {
        name: float(tp[i] / support[i]) if present[i] else None for i, name in enumerate(label_names)
    }
    return ClassificationReport(uar, wa, f1, per_class, cm.tolist(), int(y_true.size))


def nanmean(values: Iterable[float | None]) -> float:
    """Mean of the finite values (UARs of sets that had items); NaN when there is none.

    Why: the UAR of an empty set is NaN, and averaging it in (or a 0.0 stand-in) would corrupt a mean.
    """
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else float("nan")
