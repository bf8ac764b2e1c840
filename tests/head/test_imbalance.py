"""Class imbalance on real photos: 10 cats for every dog, class weights, balanced accuracy."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import CATS_DOGS, need_shared, write_sweep

from tlsweep.config._sweepfile import load_sweep
from tlsweep.errors import ConfigError, StudyError
from tlsweep.head._train import HeadParams, class_weight_vector, train_head

# A head that is not trained to the point of memorising the twenty dogs: where class weights
# matter. Four seeds, so one lucky head does not decide.
PARAMS = HeadParams(units=32, dropout=0.5, learning_rate=3e-4, batch_size=32, epochs=10)
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Layout A with 10:1 cats:dogs: 200:20 training and 100:10 validation photos."""
    need_shared()
    dst = tmp_path_factory.mktemp("imbalanced")
    for split, counts in {"train": (200, 20), "validation": (100, 10)}.items():
        for cls, n in zip(("cats", "dogs"), counts, strict=True):
            out = dst / split / cls
            out.mkdir(parents=True)
            for f in sorted((CATS_DOGS / split / cls).iterdir())[:n]:
                shutil.copy(f, out / f.name)
    return dst


@pytest.fixture(scope="module")
def entry(imbalanced: Path, shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tlsweep.features._cache import extract_all

    sweep = write_sweep(
        tmp_path_factory.mktemp("imb_sweep") / "s.yaml", imbalanced, cache_dir=shared_cache
    )
    ((_, e, _),) = extract_all(load_sweep(sweep))
    return e


def test_balanced_class_weights_beat_none_on_balanced_accuracy(entry: Any) -> None:
    xt, yt = entry.split("train")
    xv, yv = entry.split("validation")
    assert np.bincount(yt).tolist() == [200, 20] and np.bincount(yv).tolist() == [100, 10]
    weights = class_weight_vector("balanced", yt, entry.class_names)
    assert weights == pytest.approx([220 / (2 * 200), 220 / (2 * 20)])  # n / (k * count)
    got: dict[str, list[dict[str, float]]] = {"none": [], "balanced": []}
    for name in got:
        cw = class_weight_vector(name, yt, entry.class_names)
        for seed in SEEDS:
            h = train_head(
                xt,
                yt,
                xv,
                yv,
                2,
                replace(PARAMS, seed=seed),
                class_weights=cw,
                extra_metrics=("balanced_accuracy", "macro_f1"),
            )
            got[name].append(h.history[-1].as_dict())

    def mean(name: str, key: str) -> float:
        return float(np.mean([m[key] for m in got[name]]))

    # accuracy rewards calling (nearly) everything a cat; balanced accuracy does not
    assert mean("balanced", "val_balanced_accuracy") > mean("none", "val_balanced_accuracy") + 0.05
    assert mean("balanced", "val_macro_f1") > mean("none", "val_macro_f1")


def test_class_weight_by_name_and_its_errors(entry: Any, tmp_path: Path) -> None:
    _, yt = entry.split("train")
    assert class_weight_vector({"dogs": 10}, yt, entry.class_names).tolist() == [1.0, 10.0]
    assert class_weight_vector("none", yt, entry.class_names) is None
    with pytest.raises(ValueError, match="unknown class birds; the classes are cats, dogs"):
        class_weight_vector({"birds": 2.0}, yt, entry.class_names)


def _sweep(tmp_path: Path, data: Path, cache: Path, **search: object) -> Path:
    sweep = write_sweep(tmp_path / "s.yaml", data, cache_dir=cache)
    doc = yaml.safe_load(sweep.read_text())
    doc["search"].update(search)
    sweep.write_text(yaml.safe_dump(doc))
    return sweep


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        ("sometimes", "search.class_weight: got 'sometimes'; allowed: none | balanced"),
        ({"dogs": -1}, "search.class_weight.dogs: got -1; expected a weight > 0"),
        ([1, 2], "search.class_weight: got [1, 2]; allowed: none | balanced"),
    ],
)
def test_bad_class_weight_is_a_config_error(
    tmp_path: Path, imbalanced: Path, value: object, wanted: str
) -> None:
    with pytest.raises(ConfigError, match=wanted.replace("[", r"\[").replace("|", r"\|")):
        load_sweep(_sweep(tmp_path, imbalanced, tmp_path / "c", class_weight=value))


@pytest.mark.parametrize(
    ("metric", "direction", "ok"),
    [
        ("val_balanced_accuracy", "maximize", True),
        ("val_macro_f1", "maximize", True),
        ("val_roc_auc", "maximize", True),
        ("val_log_loss", "minimize", True),
        ("val_log_loss", "maximize", False),
        ("val_roc_auc", "minimize", False),
    ],
)
def test_metric_directions_are_checked(
    tmp_path: Path, imbalanced: Path, metric: str, direction: str, ok: bool
) -> None:
    sweep = _sweep(tmp_path, imbalanced, tmp_path / "c", metric=metric, direction=direction)
    if ok:
        assert load_sweep(sweep).search.metric == metric
    else:
        with pytest.raises(ConfigError, match=f"search.direction: got '{direction}'"):
            load_sweep(sweep)


def test_setup_refuses_unknown_classes_and_warns_about_tiny_folds(
    entry: Any, tmp_path: Path, imbalanced: Path, shared_cache: Path, caplog: Any
) -> None:
    from tlsweep.study._objective import check_setup
    from tlsweep.sweep import run_sweep

    pairs = [(None, entry)]
    with caplog.at_level(logging.WARNING, logger="tlsweep.study._objective"):
        check_setup(load_sweep(_sweep(tmp_path, imbalanced, shared_cache)), pairs)
    assert not caplog.records  # 10 validation dogs: enough
    with caplog.at_level(logging.WARNING, logger="tlsweep.study._objective"):
        check_setup(load_sweep(_sweep(tmp_path, imbalanced, shared_cache, cv_folds=5)), pairs)
    (rec,) = caplog.records  # 20 training dogs in 5 folds: 4 to score each fold on
    assert "fewer than 5 images of dogs (4) in the held-out fold" in rec.getMessage()

    cfg = load_sweep(_sweep(tmp_path, imbalanced, shared_cache, class_weight={"birds": 2}))
    with pytest.raises(StudyError, match="search.class_weight: unknown class birds"):
        run_sweep(cfg)
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_roc_auc_needs_two_classes(
    flowers_features: Any, flowers_small: Path, shared_cache: Path, tmp_path: Path
) -> None:
    from tlsweep.study._objective import check_setup

    cfg = load_sweep(_sweep(tmp_path, flowers_small, shared_cache, metric="val_roc_auc"))
    with pytest.raises(StudyError, match="search.metric: got 'val_roc_auc'; it needs two classes"):
        check_setup(cfg, [(None, flowers_features)])


def test_a_balanced_sweep_optimises_balanced_accuracy(
    entry: Any, tmp_path: Path, imbalanced: Path, shared_cache: Path
) -> None:
    import optuna
    from mlflow import MlflowClient

    from tlsweep.sweep import run_sweep

    cfg = load_sweep(
        _sweep(
            tmp_path,
            imbalanced,
            shared_cache,
            n_trials=2,
            class_weight="balanced",
            metric="val_balanced_accuracy",
        )
    )
    assert run_sweep(cfg).finished == 2
    study = optuna.load_study(study_name="test", storage=cfg.storage)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    exp = client.get_experiment_by_name("test")
    for run in client.search_runs([exp.experiment_id], "tags.`tlsweep.role` = 'trial'"):
        assert run.data.params["class_weight"] == "balanced"
        curve = client.get_metric_history(run.info.run_id, "val_balanced_accuracy")
        trial = study.trials[int(run.data.tags["optuna.trial_number"])]
        last = max(curve, key=lambda p: p.step)
        assert trial.value == pytest.approx(last.value)
        assert {"val_macro_f1", "val_roc_auc", "val_log_loss"} <= set(run.data.metrics)
