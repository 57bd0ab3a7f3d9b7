"""Metrics: UAR is macro recall over the classes present; an empty set has no UAR (NaN), never 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import recall_score

from fedsd.metrics import classification_report, nanmean

LABELS = ["neutral", "happy", "angry", "sad"]


def test_uar_is_unweighted_mean_of_per_class_recall() -> None:
    y_true = [0, 0, 0, 0, 1, 1, 2, 3]
    y_pred = [0, 0, 0, 1, 1, 0, 2, 2]
    r = classification_report(y_true, y_pred, LABELS)
    assert r.per_class_recall == {"neutral": 0.75, "happy": 0.5, "angry": 1.0, "sad": 0.0}
    assert r.uar == pytest.approx((0.75 + 0.5 + 1.0 + 0.0) / 4)
    assert r.wa == pytest.approx(5 / 8)  # accuracy weights the big class: UAR does not
    assert r.uar == pytest.approx(recall_score(y_true, y_pred, average="macro"))
    assert r.confusion[0] == [3, 1, 0, 0] and r.n == 8


def test_absent_class_is_left_out_of_uar_but_its_predictions_still_count() -> None:
    """No 'sad' item: its recall is undefined (None) and UAR averages the three present classes."""
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 3, 1, 1, 2, 0]  # one item wrongly called 'sad'
    r = classification_report(y_true, y_pred, LABELS)
    assert r.per_class_recall["sad"] is None
    assert r.uar == pytest.approx((0.5 + 1.0 + 0.5) / 3)  # not /4 with a 0 (or 1) for 'sad'
    assert r.uar == pytest.approx(recall_score(y_true, y_pred, labels=[0, 1, 2], average="macro"))
    assert r.confusion[3] == [0, 0, 0, 0] and r.confusion[0][3] == 1  # 'sad' keeps its row and column


def test_empty_set_has_nan_metrics() -> None:
    r = classification_report(np.zeros(0, int), np.zeros(0, int), LABELS)
    assert math.isnan(r.uar) and math.isnan(r.wa) and math.isnan(r.macro_f1)
    assert r.n == 0 and all(v is None for v in r.per_class_recall.values())
    assert r.confusion == [[0] * 4 for _ in range(4)]


def test_nanmean_skips_undefined_uars() -> None:
    assert nanmean([0.5, float("nan"), 0.7, None]) == pytest.approx(0.6)
    assert math.isnan(nanmean([float("nan")])) and math.isnan(nanmean([]))


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_report([0, 1], [0], LABELS)


@pytest.mark.parametrize("seed", range(20))
def test_numpy_metrics_equal_sklearns(seed: int) -> None:
    """The confusion-matrix implementation gives sklearn's macro recall and macro F1 over the present
    classes (zero_division=0), its accuracy and its confusion matrix, absent classes included."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

    rng = np.random.default_rng(seed)
    n_cls = int(rng.integers(2, 7))
    n = int(rng.integers(1, 60))
    classes = rng.choice(n_cls, size=int(rng.integers(1, n_cls + 1)), replace=False)  # some absent
    y_true = rng.choice(classes, size=n)
    y_pred = rng.integers(0, n_cls, size=n)
    right = rng.random(n) < 0.5  # about half of them correct
    y_pred[right] = y_true[right]
    rep = classification_report(y_true, y_pred, [f"c{i}" for i in range(n_cls)])
    present = sorted(set(y_true.tolist()))
    assert rep.uar == pytest.approx(
        recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    )
    assert rep.macro_f1 == pytest.approx(
        f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    )
    assert rep.wa == pytest.approx(accuracy_score(y_true, y_pred))
    assert rep.confusion == confusion_matrix(y_true, y_pred, labels=list(range(n_cls))).tolist()


def test_labels_outside_the_names_are_an_error() -> None:
    with pytest.raises(ValueError, match="label 4 is outside range"):
        classification_report([0, 4], [0, 1], ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match="label -1 is outside range"):
        classification_report([0, 1], [0, -1], ["a", "b"])
