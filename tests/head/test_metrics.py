"""Metrics on predicted probabilities against scikit-learn, and the seeded bootstrap."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from tlsweep.config._schema import METRIC_DIRECTIONS, METRICS
from tlsweep.head._metrics import better, bootstrap_intervals, objective_value, scores


def _proba(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]  # informative, not perfect
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


@pytest.mark.parametrize("k", [2, 5])
def test_scores_match_scikit_learn(k: int) -> None:
    proba, y = _proba(400, k, seed=k)
    y[:3] = 0  # make sure of some ties and of every class
    pred = proba.argmax(axis=1)
    got = scores(proba, y)
    assert got["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert got["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert got["log_loss"] == pytest.approx(skm.log_loss(y, proba, labels=list(range(k))))
    if k == 2:
        assert got["roc_auc"] == pytest.approx(skm.roc_auc_score(y, proba[:, 1]))
    else:
        assert "roc_auc" not in got  # two classes only


def test_roc_auc_counts_ties_half() -> None:
    score = np.array([0.5, 0.5, 0.5, 0.9])
    y = np.array([0, 1, 0, 1])
    proba = np.stack([1 - score, score], axis=1)
    assert scores(proba, y, ["roc_auc"])["roc_auc"] == pytest.approx(skm.roc_auc_score(y, score))


def test_balanced_accuracy_sees_what_accuracy_hides() -> None:
    y = np.array([0] * 90 + [1] * 10)
    proba = np.tile([0.9, 0.1], (100, 1))  # always the majority class
    s = scores(proba, y)
    assert s["accuracy"] == pytest.approx(0.9)
    assert s["balanced_accuracy"] == pytest.approx(0.5)


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    proba, y = _proba(500, 2, seed=3)
    a = bootstrap_intervals(proba, y, ["accuracy", "roc_auc"], samples=500, seed=7)
    b = bootstrap_intervals(proba, y, ["accuracy", "roc_auc"], samples=500, seed=7)
    c = bootstrap_intervals(proba, y, ["accuracy", "roc_auc"], samples=500, seed=8)
    assert a == b and a != c
    point = scores(proba, y, ["accuracy", "roc_auc"])
    for name, (lo, hi) in a.items():
        assert lo < point[name] < hi
    # the normal approximation of a proportion: about +-1.96 * sqrt(p (1 - p) / n)
    p = point["accuracy"]
    half = 1.96 * np.sqrt(p * (1 - p) / len(y))
    lo, hi = a["accuracy"]
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.2)


def test_bootstrap_covers_a_fresh_sample_of_the_same_population() -> None:
    # The interval is about the population: a second test set of the same size, drawn from the
    # same distribution, should land inside the 95% interval of the first most of the time.
    inside = 0
    for seed in range(40):
        proba, y = _proba(300, 2, seed=100 + seed)
        lo, hi = bootstrap_intervals(proba, y, ["accuracy"], samples=300, seed=seed)["accuracy"]
        fresh_p, fresh_y = _proba(20000, 2, seed=10_000 + seed)
        truth = scores(fresh_p, fresh_y, ["accuracy"])["accuracy"]
        inside += lo <= truth <= hi
    assert inside >= 34  # 95% nominal; 34/40 leaves room for the binomial spread


def test_macro_f1_leaves_out_classes_neither_seen_nor_predicted() -> None:
    """A class absent from the labels and the predictions has no F1 score (scikit-learn's
    ``labels=present``); one predicted but never seen scores 0, as in scikit-learn."""
    y = np.array([0, 0, 1, 1, 0, 1])
    pred = np.array([0, 2, 1, 1, 0, 0])  # class 2 predicted, never seen; class 3 neither
    proba = np.eye(4)[pred] * 0.7 + 0.075
    present = sorted(set(y) | set(pred))
    with np.errstate(all="ignore"):
        want = skm.f1_score(y, pred, average="macro", labels=present, zero_division=0)
    assert scores(proba, y, ["macro_f1"])["macro_f1"] == pytest.approx(want)
    # the same predictions seen through a wider model (more classes, none used) score the same
    wide = np.concatenate([proba, np.zeros((len(y), 3))], axis=1)
    assert scores(wide, y, ["macro_f1"])["macro_f1"] == pytest.approx(want)


def _sk_value(metric: str, proba: np.ndarray, y: np.ndarray) -> float:
    """``metric`` computed by scikit-learn (an implementation independent of tlsweep's)."""
    pred = proba.argmax(axis=1)
    return {
        "val_accuracy": lambda: skm.accuracy_score(y, pred),
        "val_balanced_accuracy": lambda: skm.balanced_accuracy_score(y, pred),
        "val_macro_f1": lambda: skm.f1_score(y, pred, average="macro"),
        "val_roc_auc": lambda: skm.roc_auc_score(y, proba[:, 1]),
        "val_loss": lambda: skm.log_loss(y, proba, labels=list(range(proba.shape[1]))),
        "val_log_loss": lambda: skm.log_loss(y, proba, labels=list(range(proba.shape[1]))),
    }[metric]()


@pytest.mark.parametrize("metric", METRICS)
def test_objective_value_is_the_metric_and_better_follows_its_direction(metric: str) -> None:
    """What the fine-tuning stage chooses on: the study's metric itself, and better is higher
    or lower as the one table of directions says."""
    assert set(METRICS) == {
        "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_roc_auc", "val_loss",
        "val_log_loss",
    }  # fmt: skip
    proba, y = _proba(300, 2, seed=11)
    value = objective_value(metric, proba, y, 0.0)
    assert value == pytest.approx(_sk_value(metric, proba, y))
    good = np.eye(2)[y] * 0.9 + 0.05  # right and confident
    best = objective_value(metric, good, y, 0.0)
    assert best != pytest.approx(value)
    assert better(metric, best, value) and not better(metric, value, best)
    higher = best > value
    assert higher == (METRIC_DIRECTIONS[metric] == "maximize")


def test_val_loss_has_the_label_smoothing_keras_trains_with() -> None:
    import keras

    proba, y = _proba(200, 3, seed=5)
    want = keras.losses.CategoricalCrossentropy(label_smoothing=0.2)(
        np.eye(3, dtype=np.float32)[y], proba.astype(np.float32)
    )
    assert objective_value("val_loss", proba, y, 0.2) == pytest.approx(float(want), rel=1e-5)
    plain = objective_value("val_log_loss", proba, y, 0.2)  # never smoothed
    assert plain == pytest.approx(skm.log_loss(y, proba, labels=[0, 1, 2]))
