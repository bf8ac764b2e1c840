"""Cross-validated and repeated trials: folds, heads in lock-step, what Optuna and MLflow see."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_sweep

from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError
from tlsweep.head._train import HeadParams, train_head, train_heads
from tlsweep.study._objective import stratified_folds

BASE = HeadParams(units=16, dropout=0.2, learning_rate=1e-3, batch_size=16, epochs=4)


def test_stratified_folds_partition_every_class_evenly() -> None:
    y = np.array([0] * 23 + [1] * 7 + [2] * 11)
    folds = stratified_folds(y, 5, seed=3)
    joined = np.sort(np.concatenate(folds))
    assert np.array_equal(joined, np.arange(len(y)))  # disjoint and complete
    for c in range(3):
        per_fold = [int((y[f] == c).sum()) for f in folds]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)
    sizes = [len(f) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    again = stratified_folds(y, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))
    other = stratified_folds(y, 5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other, strict=True))


def test_heads_in_lock_step_equal_heads_trained_alone(cd_features) -> None:  # noqa: ANN001
    xt, yt = cd_features.split("train")
    xv, yv = cd_features.split("validation")
    xt, xv = np.asarray(xt), np.asarray(xv)
    tasks = [(xt[:60], yt[:60], xv, yv), (xt[20:], yt[20:], xv, yv)]
    params = [BASE, replace(BASE, seed=5)]
    seen = []
    heads = train_heads(tasks, 2, params, lambda mean, each: seen.append((mean, each)))
    assert [mean.epoch for mean, _ in seen] == list(range(BASE.epochs))
    for i, (task, p) in enumerate(zip(tasks, params, strict=True)):
        alone = train_head(*task, 2, p)
        assert [m.as_dict() for m in alone.history] == [m.as_dict() for m in heads[i].history]
        for a, b in zip(alone.weights, heads[i].weights, strict=True):
            assert np.array_equal(a, b)
    # what the callback (and so the pruner) sees each epoch is the mean of the heads
    for e, (mean, each) in enumerate(seen):
        for k in ("loss", "accuracy", "val_loss", "val_accuracy"):
            want = np.mean([getattr(h.history[e], k) for h in heads])
            assert getattr(mean, k) == pytest.approx(want)
            assert [getattr(m, k) for m in each] == [getattr(h.history[e], k) for h in heads]


def test_class_weight_multiplies_the_loss_and_divides_by_the_batch_like_keras(
    cd_features,  # noqa: ANN001
) -> None:
    xt, yt = cd_features.split("train")
    xv, yv = cd_features.split("validation")
    p = replace(BASE, learning_rate=1e-9, epochs=1, dropout=0.0)  # weights barely move
    plain = train_head(xt, yt, xv, yv, 2, p).history[0]
    doubled = train_head(xt, yt, xv, yv, 2, p, class_weights=[2.0, 2.0]).history[0]
    # Keras's sum_over_batch_size: sum(w * loss) / batch size, so uniform weights scale the loss
    # (a mean weighted by the sum of the weights would leave it unchanged)
    assert doubled.loss == pytest.approx(2 * plain.loss, rel=1e-4)
    assert doubled.val_loss == pytest.approx(plain.val_loss, rel=1e-4)  # validation: unweighted
    cats_only = train_head(xt, yt, xv, yv, 2, p, class_weights=[1.0, 0.0]).history[0]
    dogs_only = train_head(xt, yt, xv, yv, 2, p, class_weights=[0.0, 1.0]).history[0]
    assert cats_only.loss + dogs_only.loss == pytest.approx(plain.loss, rel=1e-4)


def _doc(path: Path, data: Path, cache: Path, **search: object) -> Path:
    sweep = write_sweep(path / "sweep.yaml", data, cache_dir=cache)
    doc = yaml.safe_load(sweep.read_text())
    doc["search"].update(search)
    doc["search"]["space"]["epochs"] = 4
    sweep.write_text(yaml.safe_dump(doc))
    return sweep


def test_cv_and_repeats_keys(tmp_path: Path, cats_dogs_small: Path) -> None:
    cache = tmp_path / "c"
    for off in (None, 0, 1):
        cfg = load_sweep(_doc(tmp_path, cats_dogs_small, cache, cv_folds=off))
        assert cfg.search.cv_folds is None
    cfg = load_sweep(_doc(tmp_path, cats_dogs_small, cache, cv_folds=5, repeats=3))
    assert (cfg.search.cv_folds, cfg.search.repeats) == (5, 3)
    plain = load_sweep(_doc(tmp_path, cats_dogs_small, cache))
    assert (plain.search.cv_folds, plain.search.repeats) == (None, 1)
    assert cfg.space_fingerprint() != plain.space_fingerprint()  # no resuming across the change
    for key, bad in (("cv_folds", 21), ("cv_folds", 2.5), ("cv_folds", "five"), ("repeats", 0)):
        with pytest.raises(ConfigError, match=rf"search\.{key}: got .*{bad}"):
            load_sweep(_doc(tmp_path, cats_dogs_small, cache, **{key: bad}))


def test_a_cross_validated_sweep_logs_folds_and_reports_their_mean(
    tmp_path: Path, cats_dogs_small: Path, shared_cache: Path
) -> None:
    import optuna
    from mlflow import MlflowClient

    from tlsweep.sweep import run_sweep

    sweep = _doc(tmp_path, cats_dogs_small, shared_cache, cv_folds=3, repeats=2, n_trials=2)
    cfg = load_sweep(sweep)
    summary = run_sweep(cfg, evaluate_winner=False)
    assert summary.finished == 2
    study = optuna.load_study(study_name="test", storage=cfg.storage)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        m = run.data.metrics
        folds = [m[f"val_accuracy_fold_{f}"] for f in range(3)]
        assert m["val_accuracy_mean"] == pytest.approx(np.mean(folds))
        assert m["val_accuracy_std"] == pytest.approx(np.std(folds, ddof=1))
        assert run.data.params["cv_folds"] == "3" and run.data.params["repeats"] == "2"
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        # Optuna got the folds' mean after every epoch: what the pruner compares
        assert sorted(trial.intermediate_values) == [0, 1, 2, 3]
        assert trial.value == pytest.approx(m["val_accuracy_mean"])
        assert trial.intermediate_values[3] == pytest.approx(trial.value)
        curve = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [p.step for p in sorted(curve, key=lambda p: p.step)] == [0, 1, 2, 3]
