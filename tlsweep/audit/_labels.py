"""Likely label errors: every training and validation image's out-of-fold probability of its
given label, from K heads trained on the cached features (each never sees the images it
scores)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FOLDS = 5
# The head when no study has a winner yet: one hidden layer, as the README's recipe.
DEFAULT_HEAD = {"units": 256, "dropout": 0.3, "learning_rate": 1e-3, "batch_size": 32, "epochs": 20}


def default_params(seed: int) -> Any:
    """A sound head for scoring labels when the study has no winner yet."""
    from tlsweep.head import HeadParams

    return HeadParams(**DEFAULT_HEAD, seed=seed)


def out_of_fold_proba(x: np.ndarray, y: np.ndarray, n_classes: int, params: Any) -> np.ndarray:
    """[n, n_classes] class probabilities of every row from the head of the fold that left it
    out (stratified folds; fewer than :data:`FOLDS` when a class is that small)."""
    from sklearn.model_selection import StratifiedKFold

    from tlsweep.head import train_head

    k = min(FOLDS, int(np.bincount(y, minlength=n_classes).min()))
    if k < 2:
        raise ValueError(
            "every class needs two training or validation images to score labels out of fold"
        )
    folds = list(StratifiedKFold(k, shuffle=True, random_state=params.seed).split(x, y))
    log.info("scoring labels: %d heads, each on %d%% of the images", k, round(100 - 100 / k))
    proba = np.zeros((len(y), n_classes), np.float64)
    for tr, te in folds:  # one head at a time: one fold's copy of the features in memory
        head = train_head(x[tr], y[tr], x[te], y[te], n_classes, params)
        proba[te] = head.predict_proba(x[te])
    return proba


def label_issues(
    paths: Sequence[str], y: np.ndarray, proba: np.ndarray, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """The images the out-of-fold heads confidently put in another class, lowest probability
    of the given label first: ``{file, given, suggested, score, rank}`` each.

    Confidently, as confident learning (Northcutt et al., 2021) counts it: the probability of
    some other class ``j`` reaches ``t_j``, the mean probability of ``j`` over the images
    labelled ``j`` (how sure the heads are of the images of that class); ``suggested`` is the
    likeliest such class. A merely hard image (the heads unsure) is not flagged.
    """
    k = proba.shape[1]
    thresholds = np.array(
        [proba[y == j, j].mean() if np.any(y == j) else 1.0 for j in range(k)], np.float64
    )
    above = proba >= thresholds[None, :]
    above[np.arange(len(y)), y] = False
    candidates = np.where(above, proba, -1.0)
    suggested = candidates.argmax(axis=1)
    flagged = above.any(axis=1)
    score = proba[np.arange(len(y)), y]
    order = [i for i in np.argsort(score, kind="stable") if flagged[i]]
    return [
        {
            "file": paths[i],
            "given": class_names[y[i]],
            "suggested": class_names[suggested[i]],
            "score": round(float(score[i]), 4),
            "rank": r,
        }
        for r, i in enumerate(order, start=1)
    ]
