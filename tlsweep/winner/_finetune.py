"""The optional fine-tuning stage of the winner: train it end to end on the raw images.

The Keras transfer-learning guide's second stage. The model is the winner's exported model
(``Resizing -> preprocessing -> backbone -> pooling -> head``, one branch per member for a fused
backbone), starting from the winning head's trained weights (never a fresh head). The top
``unfreeze`` layers of each backbone become trainable, BatchNorm layers stay frozen and the
backbone runs in inference mode (``training=False``), as the guide does. Training uses a small
learning rate, the configured augmentation (Keras preprocessing layers), and early stopping on
the validation split with the best weights restored. What it trains on (images decoded once,
batches, augmentation) comes from :mod:`tlsweep.winner._finetune_data`.

Resume: after every epoch the model (with its optimizer state), and at a new best its weights,
are saved under new names, then a small JSON state naming them is replaced atomically; a rerun
after ``kill -9`` continues from the last finished epoch. The child MLflow run is found again
(by the stage's key, even if the kill came before the state named it), and its per-epoch curve
goes on with each epoch once: the run itself says which epochs it has.

Training uses the winner's ``label_smoothing`` and the study's ``class_weight``, as its trials did.

Choice: epoch 0 is the frozen winner itself, scored the same way on the same validation images,
on the study's own metric (:func:`tlsweep.head._metrics.objective_value`, the function the trials
use; its direction from :data:`tlsweep.config.METRIC_DIRECTIONS`). The fine-tuned model is kept
only if its best validation score beats that; the test split is
scored once for the fine-tuned candidate (the frozen one is scored by :mod:`tlsweep.winner`) and
never used to choose. This module reports progress through a callback; it does not print.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tlsweep.config import FINETUNE_SHUFFLE_STRIDE, FinetuneConfig, SweepConfig
from tlsweep.errors import TlsweepError
from tlsweep.files import held_lock
from tlsweep.head import better, evaluation, objective_value

if TYPE_CHECKING:
    from tlsweep.tracking import Tracker

    from ._rebuild import Winner

from ._finetune_data import augmentation, dataset, image_cache, image_size
from ._finetune_files import (
    FINAL,
    LOCK,
    STATE,
    add_seconds,
    load_weights,
    read_state,
    save_best,
    tidy,
    write_state,
)

log = logging.getLogger(__name__)

# (epoch, epochs, images done in this epoch, images per epoch)
FinetuneProgress = Callable[[int, int, int, int], None]


@dataclass
class FinetuneResult:
    """How the stage ended; ``accepted``: the fine-tuned model replaces the frozen winner."""

    metric: str
    baseline: float  # the frozen winner's validation score, on the same images
    best: float  # the best fine-tuned validation score
    best_epoch: int
    epochs_run: int
    accepted: bool
    test: dict[str, Any] | None
    seconds: float
    run_id: str | None
    folder: str

    @property
    def model_path(self) -> Path:
        return Path(self.folder) / FINAL

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the model -----------------------------------------------------------------------------------
def _bases(model: Any) -> list[Any]:
    """The backbones inside an exported model (nested Keras models other than the head)."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.name == "head":
                continue
            if layer.name == "tlsweep_features":  # not nested in build_export_model, but be safe
                out += _bases(layer)
            else:
                out.append(layer)
    return out


def set_trainable(model: Any, unfreeze: int | None) -> int:
    """Unfreeze the top ``unfreeze`` layers of each backbone (None: all); BatchNorm stays frozen.

    Returns the number of trainable weights tensors of the whole model.
    """
    import keras

    for base in _bases(model):
        base.trainable = True
        layers = base.layers
        cut = 0 if unfreeze is None else max(0, len(layers) - unfreeze)
        for i, layer in enumerate(layers):
            layer.trainable = i >= cut and not isinstance(layer, keras.layers.BatchNormalization)
    return len(model.trainable_weights)


def _optimizer(ft: FinetuneConfig) -> Any:
    import keras

    if ft.optimizer == "sgd":
        return keras.optimizers.SGD(ft.learning_rate, momentum=0.9)
    if ft.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(ft.learning_rate)
    return keras.optimizers.Adam(ft.learning_rate)


def compile_model(model: Any, ft: FinetuneConfig, smoothing: float = 0.0) -> None:
    """Compile for training; with label smoothing the training labels are one-hot
    (:func:`tlsweep.winner._finetune_data.dataset`'s ``onehot``), as Keras's smoothed loss needs."""
    import keras

    if smoothing:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=smoothing)
        acc = keras.metrics.CategoricalAccuracy(name="accuracy")
    else:
        loss = keras.losses.SparseCategoricalCrossentropy()
        acc = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    model.compile(optimizer=_optimizer(ft), loss=loss, metrics=[acc])


# --- the stage -----------------------------------------------------------------------------------
def stage_key(cfg: SweepConfig, w: Winner) -> str:
    """What the fine-tuning depends on: the winner, its features, the settings and the seed."""
    payload = {
        "study": cfg.study,
        "trial": w.number,
        "params": w.params,
        "backbone": w.backbone.label,
        "entry": w.entry.key,
        "finetune": asdict(cfg.finetune) if cfg.finetune else None,
        "seed": cfg.search.seed,
        "metric": cfg.search.metric,
    }
    # Only when they change what the stage does, so a stage that chose on validation accuracy
    # without smoothing or class weights (what it did right before them) keeps its key.
    if cfg.search.class_weight != "none":
        payload["class_weight"] = cfg.search.class_weight
    if cfg.search.metric != "val_accuracy" or w.params.get("label_smoothing"):
        payload["choice"] = "the study's metric, with the trial's smoothing and class weights"
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def run_finetune(
    cfg: SweepConfig,
    w: Winner,
    tracker: Tracker | None = None,
    progress: FinetuneProgress | None = None,
) -> FinetuneResult:
    """Fine-tune the winner ``w`` (a :class:`tlsweep.winner._rebuild.Winner`), or resume, or return
    the finished result; choose it over the frozen winner only on validation.

    One process at a time works in the stage's folder (a ``flock``, released by the OS if its
    holder dies): another one (``tlsweep best`` beside ``run``, a second machine on the same
    cache) waits, then resumes or reads back what the first left.
    """
    if cfg.finetune is None:
        raise TlsweepError(f"{cfg.path}: finetune: no such section; add one to fine-tune")
    key = stage_key(cfg, w)
    folder = cfg.cache_dir / "finetune" / f"{cfg.study}-trial{w.number}-{key[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    with held_lock(folder / LOCK, f"fine-tuning {folder.name}"):
        return _finetune(cfg, w, tracker, progress, key, folder)


def _finetune(
    cfg: SweepConfig,
    w: Winner,
    tracker: Tracker | None,
    progress: FinetuneProgress | None,
    key: str,
    folder: Path,
) -> FinetuneResult:
    """:func:`run_finetune`'s work, under the stage's lock."""
    import keras

    from tlsweep.head import class_weight_vector

    from ._export import build_export_model

    ft = cfg.finetune
    assert ft is not None  # run_finetune checked
    metric = cfg.search.metric
    state = read_state(folder, key)
    if state.get("complete"):
        return FinetuneResult(**state["result"])

    t0 = time.perf_counter()
    size = image_size(w.backbone)
    images, files = image_cache(cfg.cache_dir, w.entry, size)
    labels = np.array([f["label"] for f in files], dtype=np.int64)
    rows = {
        s: np.array([i for i, f in enumerate(files) if f["split"] == s], np.int64)
        for s in ("train", "validation", "test")
    }
    n_train = len(rows["train"])
    smoothing = float(w.head.params.label_smoothing)
    names = list(w.entry.class_names)
    weights = class_weight_vector(cfg.search.class_weight, labels[rows["train"]], names)
    class_weight = None if weights is None else {i: float(v) for i, v in enumerate(weights)}

    def validate(model: Any) -> tuple[float, dict[str, float]]:
        """The study's metric on the validation images, and the epoch's validation numbers
        (``val_loss`` with the label smoothing, as the trials and the training loss have it)."""
        proba = _proba(model, images, labels, rows["validation"], max(ft.batch_size, 64))
        y = labels[rows["validation"]]
        numbers = {m: objective_value(m, proba, y, smoothing) for m in ("val_loss", "val_accuracy")}
        numbers[metric] = objective_value(metric, proba, y, smoothing)
        return numbers[metric], numbers

    params = {
        **{f"finetune.{k}": v for k, v in asdict(ft).items()},
        "winner_trial": w.number,
        "backbone": w.backbone.label,
        "image_size": size,
        "train_size": n_train,
        "validation_size": len(rows["validation"]),
        "metric": metric,
    }
    run_id = None
    status = "FAILED"
    try:
        if tracker is not None and tracker.parent_run_id:
            # found by ``key`` too: a kill before state.json named the run must not start another
            run_id = tracker.start_stage("finetune", params, state.get("run_id"), key)
        epoch = int(state.get("epochs_done", 0))
        if epoch == 0:
            state = {"key": key, "run_id": run_id, "epochs_done": 0, "history": []}
            model = build_export_model(w)  # the winning head on the winning backbone
            set_trainable(model, ft.unfreeze)
            compile_model(model, ft, smoothing)
            baseline, numbers = validate(model)
            state.update(baseline=baseline, best=baseline, best_epoch=0, since_best=0)
            state["history"].append({"epoch": 0, **numbers})
            state["best_file"] = save_best(model, folder, 0)
            model.save(folder / "epoch-0.keras")
            state["checkpoint"] = "epoch-0.keras"
            write_state(folder, state)
        else:
            model = keras.models.load_model(folder / state["checkpoint"], safe_mode=True)
            log.info("fine-tuning resumes after epoch %d of %d", epoch, ft.epochs)
        state["run_id"] = run_id
        aug = augmentation(ft, cfg.search.seed)
        _log_pending(tracker, run_id, state)
        while epoch < ft.epochs and state["since_best"] < ft.patience:
            epoch += 1
            e0 = time.perf_counter()
            train_ds = dataset(
                images,
                labels,
                rows["train"],
                ft.batch_size,
                shuffle_seed=cfg.search.seed * FINETUNE_SHUFFLE_STRIDE + epoch,
                augment=aug,
                onehot=len(names) if smoothing else None,
            )
            cb = _progress_callback(progress, epoch, ft.epochs, n_train, ft.batch_size)
            h = model.fit(
                train_ds,
                epochs=1,
                verbose=0,
                callbacks=[cb],
                shuffle=False,
                class_weight=class_weight,
            )
            train_s = time.perf_counter() - e0
            value, numbers = validate(model)
            point = {
                "epoch": epoch,
                "loss": float(h.history["loss"][-1]),
                "accuracy": float(h.history["accuracy"][-1]),
                **numbers,
                "epoch_seconds": time.perf_counter() - e0,
                "images_per_s": n_train / max(train_s, 1e-9),
            }
            # Every file an epoch writes has a new name, and state.json, replaced last, says
            # which are current: after a kill the files of the unfinished epoch are not used.
            old = [state["checkpoint"], state["best_file"]]
            if better(metric, value, state["best"]):
                state.update(best=value, best_epoch=epoch, since_best=0)
                state["best_file"] = save_best(model, folder, epoch)
            else:
                state["since_best"] += 1
            name = f"epoch-{epoch}.keras"
            model.save(folder / name)
            state.update(epochs_done=epoch, checkpoint=name)
            state["history"].append(point)
            write_state(folder, state)
            for stale in set(old) - {name, state["best_file"]}:
                with contextlib.suppress(OSError):
                    (folder / stale).unlink()
            _log_pending(tracker, run_id, state)
        # early stopping's "restore best weights"; epoch 0 is the frozen winner itself
        load_weights(model, folder / state["best_file"])
        accepted = better(metric, state["best"], state["baseline"])
        test = None
        if len(rows["test"]):
            test = _score(model, images, labels, rows["test"], w.entry.class_names)
        model.save(folder / FINAL)
        result = FinetuneResult(
            metric=metric,
            baseline=float(state["baseline"]),
            best=float(state["best"]),
            best_epoch=int(state["best_epoch"]),
            epochs_run=int(state["epochs_done"]),
            accepted=bool(accepted),
            test=test,
            seconds=float(state.get("seconds", 0.0)) + time.perf_counter() - t0,
            run_id=run_id,
            folder=str(folder),
        )
        if tracker is not None and run_id:
            final = {
                f"baseline_{metric}": result.baseline,
                f"best_{metric}": result.best,
                "best_epoch": result.best_epoch,
                "finetune_seconds": result.seconds,
            }
            if test is not None:
                final.update(test_accuracy=test["accuracy"], test_loss=test["loss"])
            tracker.log_metrics(run_id, final, once=True)  # once: see Tracker.log_metrics
            tracker.set_tags(run_id, {"tlsweep.accepted": str(accepted).lower()})
        state.update(complete=True, result=result.as_dict())
        write_state(folder, state)
        status = "FINISHED"  # from here a rerun returns the result without reopening the run
        tidy(folder, {STATE, FINAL, LOCK, state["checkpoint"], state["best_file"]})
        return result
    except (KeyboardInterrupt, SystemExit):
        if status == "FINISHED":  # only the tidying was cut short
            raise
        status = "KILLED"  # the checkpoints stay: the next run resumes
        with contextlib.suppress(Exception):
            add_seconds(folder, key, time.perf_counter() - t0)
        raise
    finally:
        if tracker is not None and run_id:
            with contextlib.suppress(Exception):
                tracker.end_stage(run_id, status)


def _log_pending(tracker: Tracker | None, run_id: str | None, state: dict[str, Any]) -> None:
    """Log the epochs finished but not yet on the MLflow run (each exactly once).

    The run itself says which epochs it has: a counter kept in ``state.json`` would be stale
    after a kill between MLflow's write and the state file's, and the epoch would show twice.
    Every epoch's metrics go in one batch (one transaction in MLflow's SQL stores), so an epoch
    is on the run whole or not at all.
    """
    if tracker is None or not run_id:
        return
    on_run = tracker.metric_steps(run_id, "val_accuracy")
    for point in state["history"]:
        if int(point["epoch"]) not in on_run:
            metrics = {k: v for k, v in point.items() if k != "epoch"}
            tracker.log_metrics(run_id, metrics, step=int(point["epoch"]))


def _progress_callback(
    progress: FinetuneProgress | None, epoch: int, epochs: int, n: int, batch_size: int
) -> Any:
    """A Keras callback that reports the images done after every batch."""
    import keras

    class ReportImages(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if progress:
                progress(epoch, epochs, min(n, (batch + 1) * batch_size), n)

    return ReportImages()


def _proba(
    model: Any, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch: int = 64
) -> np.ndarray:
    """The model's class probabilities on ``rows`` (inference mode), in row order."""
    ds = dataset(images, labels, rows, batch)
    k = int(model.output_shape[-1])
    out = [np.asarray(model(x, training=False)) for x, _ in ds]
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


def _score(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    class_names: list[str],
) -> dict[str, Any]:
    """The model's accuracy, loss, per-class precision/recall and confusion matrix on ``rows``."""
    test = evaluation(_proba(model, images, labels, rows), labels[rows])
    test["class_names"] = class_names
    return test
