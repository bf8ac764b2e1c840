"""The fine-tuning stage of the winner: what is trainable, kill -9 and resume, and that a stage
which does not beat the frozen winner on validation leaves the export unchanged."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import TINY, run_cli, write_sweep

SEARCH = {
    "n_trials": 2,
    "sampler": "random",
    "pruner": "none",
    "space": {"units": 32, "dropout": 0.1, "learning_rate": 3e-3, "batch_size": 32, "epochs": 5},
}


def test_trainable_layers(cd_features: Any) -> None:
    """The top `unfreeze` layers of the backbone train; BatchNorm and preprocessing never do."""
    import keras

    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.winner._export import build_export_model
    from tlsweep.winner._finetune import _bases, set_trainable
    from tlsweep.winner._rebuild import Winner

    xt, yt = cd_features.split("train")
    xv, yv = cd_features.split("validation")
    head = train_head(
        xt,
        yt,
        xv,
        yv,
        2,
        HeadParams(units=16, dropout=0.0, learning_rate=1e-3, batch_size=32, epochs=1),
    )
    m = cd_features.manifest["backbone"]
    from tlsweep.config._schema import BackboneConfig

    bb = BackboneConfig(m["name"], m["weights"], m["input_size"], m["pooling"], m["args"])
    model = build_export_model(Winner(0, 0.0, {}, bb, cd_features, head, None))
    set_trainable(model, 12)
    (base,) = _bases(model)
    trainable = [i for i, layer in enumerate(base.layers) if layer.trainable]
    assert trainable and min(trainable) >= len(base.layers) - 12
    assert not any(
        layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert not model.get_layer("preprocess").trainable
    assert model.get_layer("head").trainable
    set_trainable(model, 0)
    assert not any(layer.trainable for layer in base.layers)


def _finetune_sweep(path: Path, data: Path, cache: Path, study: str, **finetune: Any) -> Path:
    return write_sweep(path, data, study=study, cache_dir=cache, search=SEARCH, finetune=finetune)


def _runs(tracking_uri: str, study: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(study)
    return client, client.search_runs([exp.experiment_id])


def test_epochs_already_on_the_run_are_not_logged_again(tmp_path: Path) -> None:
    """A kill after MLflow took an epoch but before state.json was replaced: the resumed stage
    asks the run which epochs it has, so the curve has each epoch once (CI once saw 0, 1, 1, 2)."""
    from tlsweep.tracking import Tracker
    from tlsweep.winner._finetune import _log_pending

    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft_log")
    t.create_parent({"n": 1}, "study: ft_log\n", "sweep.yaml")
    run_id = t.start_stage("finetune", {"unfreeze": 1})
    point = {"loss": 1.0, "accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}
    on_disk = {"history": [{"epoch": 0, **point}, {"epoch": 1, **point}]}
    _log_pending(t, run_id, copy.deepcopy(on_disk))  # epochs 0 and 1 logged, then killed
    resumed = copy.deepcopy(on_disk)  # state.json as the kill left it
    resumed["history"].append({"epoch": 2, **point})  # the resumed stage finished epoch 2
    _log_pending(t, run_id, resumed)
    for key in point:
        steps = [m.step for m in t.client.get_metric_history(run_id, key)]
        assert sorted(steps) == [0, 1, 2], (key, steps)


def test_a_rerun_after_a_kill_logs_nothing_twice_and_makes_no_second_stage_run(
    tmp_path: Path,
) -> None:
    """The stage's run is found by its key when state.json never named it (killed during the
    baseline); its final numbers, and a rescored winner's on the parent, are logged once."""
    from tlsweep.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "ft")
    t.create_parent({"n": 1}, "study: ft\n", "sweep.yaml")
    first = t.start_stage("finetune", {"unfreeze": 1}, None, "a" * 64)
    t.end_stage(first, "KILLED")
    again = Tracker(uri, "ft", t.parent_run_id)
    assert again.start_stage("finetune", {"unfreeze": 1}, None, "a" * 64) == first
    assert again.client.get_run(first).info.status == "RUNNING"
    other = again.start_stage("finetune", {"unfreeze": 2}, None, "b" * 64)  # other settings
    assert other != first
    again.end_stage(other, "FINISHED")  # a stage done before whose state.json was then lost
    assert again.start_stage("finetune", {"unfreeze": 2}, None, "b" * 64) not in (first, other)
    for seconds in (10.0, 12.5):  # killed after logging, before state.json said "complete"
        again.log_metrics(first, {"best_epoch": 3, "finetune_seconds": seconds}, once=True)
    for key in ("best_epoch", "finetune_seconds"):
        assert len(again.client.get_metric_history(first, key)) == 1
    for acc in (0.9, 0.9, 0.95):  # the same winner scored again, then a better one
        again.log_parent_metrics({"test_accuracy": acc})
    history = again.client.get_metric_history(t.parent_run_id, "test_accuracy")
    assert [m.value for m in history] == [0.9, 0.95]


def test_a_second_process_waits_for_the_stage_then_reads_back_its_result(tmp_path: Path) -> None:
    """One process at a time works in a stage's folder: another (``best`` beside ``run``, a
    second machine on the cache) waits for the lock, then finds the stage complete."""
    import threading
    from types import SimpleNamespace

    import keras  # noqa: F401 - imported now, so that run_finetune reaches the lock at once

    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.files import held_lock
    from tlsweep.winner._finetune import run_finetune, stage_key
    from tlsweep.winner._finetune_files import LOCK, write_state

    sweep = _finetune_sweep(tmp_path / "s.yaml", tmp_path / "no_data", tmp_path, "ft_lock")
    cfg = load_sweep(sweep, check_data_dir=False)
    w = SimpleNamespace(
        number=0, params={}, backbone=cfg.backbones[0], entry=SimpleNamespace(key="k")
    )
    key = stage_key(cfg, w)
    folder = tmp_path / "finetune" / f"ft_lock-trial0-{key[:16]}"
    folder.mkdir(parents=True)
    holding, events = threading.Event(), []
    result = {"metric": "val_accuracy", "baseline": 0.8, "best": 0.9, "best_epoch": 2,
              "epochs_run": 3, "accepted": True, "test": None, "seconds": 9.0, "run_id": None,
              "folder": str(folder)}  # fmt: skip

    def first() -> None:  # the process working in the folder: it completes the stage
        with held_lock(folder / LOCK, "fine-tuning"):
            holding.set()
            time.sleep(1.0)
            write_state(folder, {"key": key, "complete": True, "result": result})
            events.append("complete")

    t = threading.Thread(target=first)
    t.start()
    holding.wait(10)
    got = run_finetune(cfg, w)  # would fine-tune (and fail: no images) without waiting
    events.append("read back")
    t.join()
    assert events == ["complete", "read back"] and got.best == 0.9


@pytest.mark.slow
def test_kill_9_mid_finetune_resumes_from_the_last_epoch(
    cats_dogs_small: Path, shared_cache: Path, tmp_path: Path
) -> None:
    sweep = _finetune_sweep(
        tmp_path / "sweep.yaml",
        cats_dogs_small,
        shared_cache,
        "ft_kill",
        epochs=8,
        patience=8,
        learning_rate=1e-4,
        unfreeze=10,
        batch_size=16,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tlsweep", "run", str(sweep), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    state_glob = "finetune/ft_kill-*/state.json"
    deadline = time.time() + 900
    state: dict = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            for p in shared_cache.glob(state_glob):
                try:
                    state = json.loads(p.read_text())
                except ValueError:
                    continue
            if state.get("epochs_done", 0) >= 1:
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before it could be killed mid fine-tuning"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    (state_path,) = shared_cache.glob(state_glob)
    killed = json.loads(state_path.read_text())
    assert not killed.get("complete") and 1 <= killed["epochs_done"] < 8
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning:" in r.stdout
    done = json.loads(state_path.read_text())
    assert done["complete"]
    kept = {p.name for p in state_path.parent.iterdir()}
    current = {done["checkpoint"], done["best_file"]}
    assert kept == {"state.json", "lock", "final.keras", *current}, kept
    # it went on from the last finished epoch: the epochs before the kill were not redone
    assert done["history"][: killed["epochs_done"] + 1] == killed["history"]
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft_kill")
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    (ft,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "finetune"]
    assert ft.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(ft.info.run_id, "val_accuracy")]
    assert sorted(steps) == list(range(done["epochs_done"] + 1)), steps  # no restart, no repeat


@pytest.mark.slow
def test_a_finetune_that_does_not_beat_the_frozen_winner_leaves_export_unchanged(
    cats_dogs_small: Path, shared_cache: Path, tmp_path: Path
) -> None:
    import keras
    import tensorflow as tf

    sweep = write_sweep(
        tmp_path / "sweep.yaml",
        cats_dogs_small,
        study="ft_keep",
        cache_dir=shared_cache,
        search=SEARCH,
    )
    r = run_cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("export", str(sweep), "-o", str(tmp_path / "frozen.keras"))
    assert r.returncode == 0, r.stderr[-3000:]
    # the same study with a fine-tuning stage that cannot move validation (a learning rate of
    # 1e-9 changes no prediction): the frozen winner stays
    doc = yaml.safe_load(sweep.read_text())
    doc["finetune"] = {"epochs": 1, "patience": 1, "learning_rate": 1e-9, "augment": None}
    sweep.write_text(yaml.safe_dump(doc))
    r = run_cli("export", str(sweep), "-o", str(tmp_path / "after.keras"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "not kept: the frozen winner stays" in r.stdout
    meta = json.loads(zipfile.ZipFile(tmp_path / "after.keras").read("tlsweep.json"))
    assert meta["model"] == "frozen" and meta["finetune"]["accepted"] is False
    files = sorted((cats_dogs_small / "test" / "cats").iterdir())[:4]
    x = [tf.io.decode_image(tf.io.read_file(str(f)), channels=3) for f in files]
    x = np.stack([tf.image.resize(i, [120, 120]).numpy() for i in x])
    a = keras.models.load_model(tmp_path / "frozen.keras").predict(x, verbose=0)
    b = keras.models.load_model(tmp_path / "after.keras").predict(x, verbose=0)
    assert np.array_equal(a, b)
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft_keep")
    (ft,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "finetune"]
    assert ft.data.tags["tlsweep.accepted"] == "false" and ft.info.status == "FINISHED"
    (parent,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    assert parent.data.tags["winner_model"] == "frozen"
    assert "finetune_test_accuracy" in parent.data.metrics  # scored once, logged, not used
    # `status` shows the stage's outcome, recorded with the study; with other settings it
    # would be stale (the next run fine-tunes again), so it is not shown
    r = run_cli("status", str(sweep))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning: 1 epoch(s)" in r.stdout and "not kept" in r.stdout, r.stdout
    doc["finetune"]["epochs"] = 2
    sweep.write_text(yaml.safe_dump(doc))
    r = run_cli("status", str(sweep))
    assert r.returncode == 0 and "fine-tuning:" not in r.stdout, r.stdout


@pytest.fixture(scope="module")
def tiny_winner(cats_dogs_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A frozen winner on TinyConvNet (its features extracted once), and its cache folder."""
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.features._cache import extract_all
    from tlsweep.head._train import HeadParams, train_head
    from tlsweep.winner._rebuild import Winner

    cache = tmp_path_factory.mktemp("ft_tiny")
    sweep = write_sweep(cache / "s.yaml", cats_dogs_small, backbones=TINY, cache_dir=cache)
    ((bb, entry, _),) = extract_all(load_sweep(sweep))

    def winner(**params: Any) -> Any:
        xt, yt = entry.split("train")
        xv, yv = entry.split("validation")
        p = {"units": 16, "dropout": 0.0, "learning_rate": 3e-3, "batch_size": 32, "epochs": 3}
        hp = HeadParams(**{**p, **params})
        head = train_head(xt, yt, xv, yv, 2, hp)
        return Winner(0, 0.0, {"backbone": bb.label, **p, **params}, bb, entry, head, None)

    return cache, winner


def _sk_metric(metric: str, proba: np.ndarray, y: np.ndarray, smoothing: float) -> float:
    """The objective metric by scikit-learn (Keras for a smoothed loss), not by tlsweep."""
    from sklearn import metrics as skm

    pred = proba.argmax(axis=1)
    if metric == "val_loss" and smoothing:
        import keras

        onehot = np.eye(proba.shape[1], dtype=np.float32)[y]
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        return float(loss(onehot, proba.astype(np.float32)))
    return {
        "val_accuracy": lambda: skm.accuracy_score(y, pred),
        "val_balanced_accuracy": lambda: skm.balanced_accuracy_score(y, pred),
        "val_macro_f1": lambda: skm.f1_score(y, pred, average="macro"),
        "val_roc_auc": lambda: skm.roc_auc_score(y, proba[:, 1]),
        "val_loss": lambda: skm.log_loss(y, proba, labels=[0, 1]),
        "val_log_loss": lambda: skm.log_loss(y, proba, labels=[0, 1]),
    }[metric]()


@pytest.mark.parametrize(
    ("metric", "smoothing", "class_weight"),
    [
        ("val_accuracy", 0.0, "none"),
        ("val_balanced_accuracy", 0.0, "none"),
        ("val_macro_f1", 0.0, "none"),
        ("val_roc_auc", 0.0, "none"),
        ("val_log_loss", 0.0, "none"),
        ("val_loss", 0.2, {"dogs": 3.0}),
    ],
)
def test_the_stage_chooses_on_the_study_metric(
    tiny_winner: Any,
    cats_dogs_small: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    metric: str,
    smoothing: float,
    class_weight: Any,
) -> None:
    """Epoch 0 (the frozen winner) and the best epoch are scored on the study's own metric,
    the choice follows that metric's direction, and the stage trains with the winner's label
    smoothing and the study's class weights (it once chose on the loss for every metric but
    accuracy, and trained without either)."""
    import keras

    from tlsweep.config._schema import METRIC_DIRECTIONS
    from tlsweep.config._sweepfile import load_sweep
    from tlsweep.winner._export import build_export_model
    from tlsweep.winner._finetune import run_finetune
    from tlsweep.winner._finetune_data import image_cache

    cache, make_winner = tiny_winner
    search = {**SEARCH, "metric": metric, "direction": METRIC_DIRECTIONS[metric]}
    search["class_weight"] = class_weight
    sweep = write_sweep(
        tmp_path / "s.yaml",
        cats_dogs_small,
        backbones=TINY,
        cache_dir=cache,
        search=search,
        finetune={"epochs": 1, "patience": 1, "learning_rate": 1e-3, "augment": None},
    )
    cfg = load_sweep(sweep, check_data_dir=False)
    w = make_winner(label_smoothing=smoothing)
    fits: list[Any] = []
    fit = keras.Model.fit

    def spy(self: Any, *a: Any, **kw: Any) -> Any:
        fits.append((kw.get("class_weight"), self.loss.get_config().get("label_smoothing", 0.0)))
        return fit(self, *a, **kw)

    monkeypatch.setattr(keras.Model, "fit", spy)
    got = run_finetune(cfg, w)
    images, files = image_cache(cache, w.entry, w.backbone.input_size)
    rows = [i for i, f in enumerate(files) if f["split"] == "validation"]
    y = np.array([files[i]["label"] for i in rows])
    x = np.asarray(images[rows], np.float32)
    frozen = build_export_model(w).predict(x, verbose=0)
    assert got.baseline == pytest.approx(_sk_metric(metric, frozen, y, smoothing), rel=1e-4)
    final = keras.models.load_model(got.model_path, compile=False).predict(x, verbose=0)
    assert got.best == pytest.approx(_sk_metric(metric, final, y, smoothing), rel=1e-4)
    maximize = METRIC_DIRECTIONS[metric] == "maximize"
    assert got.accepted == (got.best > got.baseline if maximize else got.best < got.baseline)
    want_weight = None if class_weight == "none" else {0: 1.0, 1: 3.0}
    assert fits == [(want_weight, pytest.approx(smoothing))]


def test_a_balanced_accuracy_study_logs_and_registers_balanced_accuracy(
    cats_dogs_small: Path, tmp_path: Path, cli: Any
) -> None:
    """``metric: val_balanced_accuracy`` with ``finetune:``: the stage's numbers on MLflow are
    balanced accuracies in [0, 1] (not a loss under their name), and the registry's version is
    ranked on that metric."""

    from tlsweep.tracking._models import METRIC_TAG, SCORE_TAG

    search = {**SEARCH, "metric": "val_balanced_accuracy", "direction": "maximize"}
    sweep = write_sweep(
        tmp_path / "s.yaml",
        cats_dogs_small,
        study="ft_bacc",
        backbones=TINY,
        search=search,
        finetune={"epochs": 2, "patience": 2, "learning_rate": 1e-3, "augment": None},
    )
    r = cli("run", str(sweep), "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "m.keras"
    r = cli("export", str(sweep), "-o", str(out), "--register", "ft_bacc_model")
    assert r.returncode == 0, r.stderr[-3000:]
    (state_path,) = (tmp_path / "cache").glob("finetune/ft_bacc-*/state.json")
    state = json.loads(state_path.read_text())
    for point in state["history"]:  # every epoch: the metric itself, beside loss and accuracy
        assert 0.0 <= point["val_balanced_accuracy"] <= 1.0
    assert state["baseline"] == state["history"][0]["val_balanced_accuracy"]
    assert state["best"] == state["history"][state["best_epoch"]]["val_balanced_accuracy"]
    client, runs = _runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "ft_bacc")
    (parent,) = [r for r in runs if r.data.tags.get("tlsweep.role") == "study"]
    logged = parent.data.metrics
    assert logged["finetune_baseline_val_balanced_accuracy"] == pytest.approx(state["baseline"])
    assert logged["finetune_best_val_balanced_accuracy"] == pytest.approx(state["best"])
    meta = json.loads(zipfile.ZipFile(out).read("tlsweep.json"))
    (version,) = client.search_model_versions("name='ft_bacc_model'")
    assert version.tags[METRIC_TAG] == "val_balanced_accuracy"
    score = float(version.tags[SCORE_TAG])
    assert score == pytest.approx(meta["validation_val_balanced_accuracy"])
    if meta["model"] == "finetuned":
        assert score == pytest.approx(state["best"])
    else:  # the frozen winner: its trial's balanced accuracy
        assert score == pytest.approx(parent.data.metrics["best_val_balanced_accuracy"])
    assert 0.0 <= score <= 1.0


def test_the_image_cache_is_made_by_one_process_and_keyed_on_tensorflow(
    tiny_winner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that finds another one decoding the same images waits for it and uses its
    folder (it once deleted it and renamed its own in); another TensorFlow decodes anew."""
    import threading

    import tensorflow as tf

    from tlsweep.files import held_lock
    from tlsweep.winner._finetune_data import image_cache

    _, make_winner = tiny_winner
    entry = make_winner().entry
    made, _ = image_cache(tmp_path, entry, 32)
    (folder,) = [p for p in (tmp_path / "images").iterdir() if p.is_dir()]
    good = tmp_path / "good"
    folder.rename(good)
    holding, events = threading.Event(), []

    def other() -> None:  # another process decoding the same images: it publishes them
        with held_lock(folder.with_name(folder.name + ".lock"), "decoding"):
            holding.set()
            time.sleep(1.0)
            good.rename(folder)
            events.append("published")

    t = threading.Thread(target=other)
    t.start()
    holding.wait(10)
    got, _ = image_cache(tmp_path, entry, 32)
    events.append("read back")
    t.join()
    assert events == ["published", "read back"]
    assert os.path.samefile(got.filename, folder / "images.npy")
    assert np.array_equal(got, made)
    assert sorted(p.name for p in folder.parent.iterdir()) == sorted(
        [folder.name, folder.name + ".lock"]
    )  # no temporary folder left
    monkeypatch.setattr(tf, "__version__", "0.0.0-other")
    again, _ = image_cache(tmp_path, entry, 32)
    assert not os.path.samefile(again.filename, folder / "images.npy")
    assert np.array_equal(again, made) and folder.is_dir()
