"""Classification metrics on predicted probabilities, and seeded bootstrap intervals (numpy only).

One implementation of each metric serves the per-epoch validation metrics of a trial
(:mod:`tlsweep.head`), the winner's test score (:mod:`tlsweep.winner`) and the fine-tuning
stage's choice (fine-tuning); whether a metric is better higher or lower is read
from the one table of directions, :data:`tlsweep.config.METRIC_DIRECTIONS`. Every function
takes ``proba`` as ``[n, n_classes]`` class probabilities and ``y`` as integer labels ``[n]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlsweep.config import METRIC_DIRECTIONS

EPS = 1e-7  # probabilities are clipped to [EPS, 1] before the log, as Keras does

# name -> whether it needs exactly two classes
SCORES = {
    "accuracy": False,
    "balanced_accuracy": False,
    "macro_f1": False,
    "roc_auc": True,
    "log_loss": False,
}


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def balanced_accuracy(cm: np.ndarray) -> float:
    """The mean recall over the classes present in ``y`` (scikit-learn's definition)."""
    support = cm.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def macro_f1(cm: np.ndarray) -> float:
    """The unweighted mean of the per-class F1 scores over the classes seen in the labels or
    the predictions (scikit-learn's ``f1_score(average="macro", labels=present)``): a class
    neither seen nor predicted has no F1 score, not a score of 0."""
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # 2 tp + fp + fn
    present = denom > 0
    if not present.any():
        return 0.0
    return float(np.mean(2 * tp[present] / denom[present]))


def roc_auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the positive class 1 (ties count half)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = avg_rank[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(proba: np.ndarray, y: np.ndarray, smoothing: float = 0.0) -> float:
    """Mean cross-entropy; with ``smoothing``, against Keras's smoothed targets
    ``onehot * (1 - smoothing) + smoothing / k`` (0: the plain log loss of the true class)."""
    if len(y) == 0:
        return 0.0
    if not smoothing:  # the logs in the probabilities' precision, their mean in float64
        p = np.clip(proba[np.arange(len(y)), y], EPS, 1.0)
        return float(-np.mean(np.log(p).astype(np.float64)))
    k = proba.shape[1]
    target = np.eye(k, dtype=np.float64)[y] * (1.0 - smoothing) + smoothing / k
    return float(-np.sum(target * np.log(np.clip(proba, EPS, 1.0)), axis=1).mean())


def better(metric: str, a: float, b: float) -> bool:
    """Whether objective value ``a`` beats ``b`` for ``metric`` (e.g. ``val_macro_f1``)."""
    return a > b if METRIC_DIRECTIONS[metric] == "maximize" else a < b


def objective_value(metric: str, proba: np.ndarray, y: np.ndarray, smoothing: float) -> float:
    """The objective ``metric`` (``val_...``) of predictions ``proba`` as a trial scores it:
    ``val_loss`` with the head's label smoothing, the others from :func:`scores`."""
    name = metric.removeprefix("val_")
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if name == "loss":
        return log_loss(proba, y, smoothing)
    return float(scores(proba, y, [name])[name])


def evaluation(proba: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Loss, accuracy, per-class precision and recall and the confusion matrix (a test report)."""
    proba = np.asarray(proba)
    y = np.asarray(y, dtype=np.int64)
    k = proba.shape[1]
    cm = confusion(y, proba.argmax(axis=1), k)
    cols, rows = cm.sum(axis=0), cm.sum(axis=1)
    return {
        "loss": log_loss(proba, y),
        "accuracy": float(np.trace(cm) / len(y)) if len(y) else 0.0,
        "precision": [float(cm[c, c] / cols[c]) if cols[c] else 0.0 for c in range(k)],
        "recall": [float(cm[c, c] / rows[c]) if rows[c] else 0.0 for c in range(k)],
        "confusion_matrix": cm.tolist(),
        "n": int(len(y)),
    }


def scores(
    proba: np.ndarray, y: np.ndarray, names: Sequence[str] = tuple(SCORES)
) -> dict[str, float]:
    """The metrics in ``names`` (see :data:`SCORES`); ``roc_auc`` only for two classes."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    k = proba.shape[1]
    pred = proba.argmax(axis=1)
    cm = confusion(y, pred, k)
    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(np.trace(cm) / max(len(y), 1))
        elif name == "balanced_accuracy":
            out[name] = balanced_accuracy(cm)
        elif name == "macro_f1":
            out[name] = macro_f1(cm)
        elif name == "roc_auc":
            if k == 2:
                out[name] = roc_auc(proba[:, 1], y)
        elif name == "log_loss":
            out[name] = log_loss(proba, y)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(SCORES)}")
    return out


def bootstrap_intervals(
    proba: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    *,
    samples: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over the images: resample rows with replacement.

    The same ``seed`` gives the same intervals. A metric undefined on some resample (ROC AUC
    on a resample with one class) is computed on the others.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = len(y)
    if n == 0:
        return {}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(samples):
        idx = rng.integers(0, n, n)
        for name, v in scores(proba[idx], y[idx], names).items():
            if np.isfinite(v):
                draws[name].append(v)
    alpha = (1.0 - level) / 2.0
    out = {}
    for name, vals in draws.items():
        if vals:
            lo, hi = np.quantile(np.asarray(vals), [alpha, 1.0 - alpha])
            out[name] = (float(lo), float(hi))
    return out
