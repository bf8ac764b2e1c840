"""The optional fine-tuning stage of the winner: train it end to end on the raw images.

The Keras transfer-learning guide's second stage. The model is the winner's exported model
(``Resizing -> preprocessing -> backbone -> pooling -> head``, one branch per member for a fused
backbone), starting from the winning head's trained weights (never a fresh head). The top
``unfreeze`` layers of each backbone become trainable, BatchNorm layers stay frozen and the
backbone runs in inference mode (``training=False``), as the guide does. Training uses a small
learning rate, the configured augmentation (Keras preprocessing layers), and early stopping on
the validation split with the best weights restored.

Speed: every usable image is decoded and resized once, at the model's input size, into a
``uint8`` memory-mapped array in the cache folder (:func:`image_cache`); epochs read batches
from it and never decode a JPEG again.

Resume: after every epoch the model (with its optimizer state) is saved under a new name, then a
small JSON state is replaced atomically; a rerun after ``kill -9`` continues from the last
finished epoch, and the per-epoch curve on the child MLflow run goes on without a restart.

Choice: epoch 0 is the frozen winner itself, scored the same way on the same validation images.
The fine-tuned model is kept only if its best validation score beats that; the test split is
scored once for the fine-tuned candidate (the frozen one is scored by :mod:`tlsweep.winner`) and
never used to choose. This module reports progress through a callback; it does not print.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlsweep.config import FinetuneConfig, SweepConfig
from tlsweep.errors import TlsweepError

log = logging.getLogger(__name__)

STATE = "state.json"
FINAL = "final.keras"  # the best fine-tuned model, written when the stage is complete
BEST = "best-weights.npz"  # the model's weights at its best validation score so far
IMAGE_FORMAT = 1
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


# --- the decoded-image cache -------------------------------------------------------------------
def _image_size(bb: Any) -> int:
    return max(m.input_size for m in bb.members) if bb.members else bb.input_size


def _images_digest(entry: Any) -> str:
    members = getattr(entry, "members", None) or [entry]
    return members[0].manifest["key_parts"]["images"]


def image_cache(cache_dir: Path, entry: Any, size: int) -> tuple[np.ndarray, list[dict]]:
    """Every usable file of ``entry`` decoded and resized to ``size`` once, uint8, memory-mapped.

    Returns (images [files, size, size, 3], the entry's file records, in the same order).
    """
    from tlsweep.decode import image_batches

    files = entry.manifest["files"]
    root = Path(entry.manifest["data_dir"])
    parts = {
        "format": IMAGE_FORMAT,
        "images": _images_digest(entry),
        "files": [(f["path"], f["label"], f["split"]) for f in files],
        "size": size,
        "resize": "bilinear-squash",
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    folder = Path(cache_dir) / "images" / f"{size}px-{key[:16]}"
    done = folder / "manifest.json"
    if done.is_file():
        with contextlib.suppress(OSError, ValueError):
            if json.loads(done.read_text()).get("key") == key:
                arr = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
                if arr.shape == (len(files), size, size, 3):
                    return arr, files
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        paths = [str(root / f["path"]) for f in files]
        arr = np.lib.format.open_memmap(
            tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3)
        )
        got = np.zeros(len(files), dtype=bool)
        for idx, batch in image_batches(paths, size, 64):
            arr[idx] = np.clip(np.rint(batch.numpy()), 0, 255).astype(np.uint8)
            got[idx] = True
        if not got.all():
            bad = paths[int(np.flatnonzero(~got)[0])]
            raise TlsweepError(f"{bad}: no longer decodable; it was usable when features were made")
        arr.flush()
        del arr
        (tmp / "manifest.json").write_text(
            json.dumps(
                {"key": key, "size": size, "n": len(files), "seconds": time.perf_counter() - t0}
            )
        )
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("decoded %d images once at %d px into %s", len(files), size, folder)
    return np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False), files


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


def compile_model(model: Any, ft: FinetuneConfig) -> None:
    import keras

    model.compile(
        optimizer=_optimizer(ft),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def augmentation(ft: FinetuneConfig, seed: int) -> Any | None:
    """The configured Keras preprocessing layers, or None when there are none."""
    import keras

    a = ft.augment
    layers = []
    if a.flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if a.rotation:
        layers.append(keras.layers.RandomRotation(a.rotation, seed=seed + 1))
    if a.zoom:
        layers.append(keras.layers.RandomZoom(a.zoom, seed=seed + 2))
    if a.contrast:
        layers.append(keras.layers.RandomContrast(a.contrast, value_range=(0, 255), seed=seed + 3))
    return keras.Sequential(layers, name="augment") if layers else None


def _dataset(
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    batch_size: int,
    *,
    shuffle_seed: int | None = None,
    augment: Any | None = None,
) -> Any:
    """Batches read from the memory-mapped uint8 images (shuffled per epoch by a seed)."""
    import tensorflow as tf

    order = rows.copy()
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    starts = np.arange(0, len(order), batch_size, dtype=np.int64)
    size = images.shape[1]

    def gather(start: np.int64) -> tuple[np.ndarray, np.ndarray]:
        idx = order[int(start) : int(start) + batch_size]
        sort = np.argsort(idx)  # memory-map reads in file order, then back to batch order
        x = np.empty((len(idx), size, size, 3), np.uint8)
        x[sort] = images[idx[sort]]
        return x, labels[idx]

    ds = tf.data.Dataset.from_tensor_slices(starts)
    ds = ds.map(
        lambda s: tf.numpy_function(gather, [s], (tf.uint8, tf.int64)),
        num_parallel_calls=2,
        deterministic=True,
    )

    def cast(x: Any, y: Any) -> tuple[Any, Any]:
        x = tf.cast(tf.ensure_shape(x, [None, size, size, 3]), tf.float32)
        if augment is not None:
            x = augment(x, training=True)
        return x, tf.ensure_shape(y, [None])

    return ds.map(cast).prefetch(2)


# --- the stage -----------------------------------------------------------------------------------
def stage_key(cfg: SweepConfig, w: Any) -> str:
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
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _write_json(path: Path, d: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(d, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_weights(model: Any, path: Path) -> None:
    """The model's weights only (no optimizer state), atomically."""
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, *model.get_weights())
    os.replace(tmp, path)


def _load_weights(model: Any, path: Path) -> None:
    with np.load(path, allow_pickle=False) as z:
        model.set_weights([z[f"arr_{i}"] for i in range(len(z.files))])


def _better(metric: str, a: float, b: float) -> bool:
    return a > b if metric == "val_accuracy" else a < b


def run_finetune(
    cfg: SweepConfig,
    w: Any,
    tracker: Any | None = None,
    progress: FinetuneProgress | None = None,
) -> FinetuneResult:
    """Fine-tune the winner ``w`` (a :class:`tlsweep.winner.Winner`), or resume, or return the
    finished result; choose it over the frozen winner only on validation."""
    import keras

    from tlsweep.winner import build_export_model

    ft = cfg.finetune
    if ft is None:
        raise TlsweepError(f"{cfg.path}: finetune: no such section; add one to fine-tune")
    metric = cfg.search.metric
    key = stage_key(cfg, w)
    folder = cfg.cache_dir / "finetune" / f"{cfg.study}-trial{w.number}-{key[:16]}"
    folder.mkdir(parents=True, exist_ok=True)
    state_path = folder / STATE
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(state_path.read_text())
    if state.get("key") != key:
        state = {}
    if state.get("complete"):
        return FinetuneResult(**state["result"])

    t0 = time.perf_counter()
    size = _image_size(w.backbone)
    images, files = image_cache(cfg.cache_dir, w.entry, size)
    labels = np.array([f["label"] for f in files], dtype=np.int64)
    rows = {
        s: np.array([i for i, f in enumerate(files) if f["split"] == s], np.int64)
        for s in ("train", "validation", "test")
    }
    n_train = len(rows["train"])
    val_ds = _dataset(images, labels, rows["validation"], max(ft.batch_size, 64))
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
    if tracker is not None and tracker.parent_run_id:
        run_id = tracker.start_stage("finetune", params, state.get("run_id"))

    epoch = int(state.get("epochs_done", 0))
    if epoch == 0:
        state = {"key": key, "run_id": run_id, "epochs_done": 0, "history": [], "logged": 0}
        model = build_export_model(w)  # the winning head on the winning backbone
        set_trainable(model, ft.unfreeze)
        compile_model(model, ft)
        v_loss, v_acc = model.evaluate(val_ds, verbose=0)
        baseline = v_acc if metric == "val_accuracy" else v_loss
        state.update(baseline=baseline, best=baseline, best_epoch=0, since_best=0)
        state["history"].append({"epoch": 0, "val_loss": v_loss, "val_accuracy": v_acc})
        _save_weights(model, folder / BEST)
        model.save(folder / "epoch-0.keras")
        state["checkpoint"] = "epoch-0.keras"
        _write_json(state_path, state)
    else:
        model = keras.models.load_model(folder / state["checkpoint"], safe_mode=True)
        log.info("fine-tuning resumes after epoch %d of %d", epoch, ft.epochs)
    state["run_id"] = run_id
    aug = augmentation(ft, cfg.search.seed)
    status = "FAILED"
    try:
        _log_pending(tracker, run_id, state)
        while epoch < ft.epochs and state["since_best"] < ft.patience:
            epoch += 1
            e0 = time.perf_counter()
            train_ds = _dataset(
                images,
                labels,
                rows["train"],
                ft.batch_size,
                shuffle_seed=cfg.search.seed * 1000 + epoch,
                augment=aug,
            )
            cb = _progress_callback(progress, epoch, ft.epochs, n_train, ft.batch_size)
            h = model.fit(train_ds, epochs=1, verbose=0, callbacks=[cb], shuffle=False)
            train_s = time.perf_counter() - e0
            v_loss, v_acc = model.evaluate(val_ds, verbose=0)
            value = v_acc if metric == "val_accuracy" else v_loss
            point = {
                "epoch": epoch,
                "loss": float(h.history["loss"][-1]),
                "accuracy": float(h.history["accuracy"][-1]),
                "val_loss": float(v_loss),
                "val_accuracy": float(v_acc),
                "epoch_seconds": time.perf_counter() - e0,
                "images_per_s": n_train / max(train_s, 1e-9),
            }
            if _better(metric, value, state["best"]):
                state.update(best=value, best_epoch=epoch, since_best=0)
                _save_weights(model, folder / BEST)
            else:
                state["since_best"] += 1
            name = f"epoch-{epoch}.keras"
            model.save(folder / name)
            old = state.get("checkpoint")
            state.update(epochs_done=epoch, checkpoint=name)
            state["history"].append(point)
            _write_json(state_path, state)
            if old and old != name:
                with contextlib.suppress(OSError):
                    (folder / old).unlink()
            _log_pending(tracker, run_id, state)
            _write_json(state_path, state)  # remembers what is on the MLflow run
        # early stopping's "restore best weights"; epoch 0 is the frozen winner itself
        _load_weights(model, folder / BEST)
        accepted = _better(metric, state["best"], state["baseline"])
        test = None
        if len(rows["test"]):
            test = _score(model, images, labels, rows["test"], files, w.entry.class_names)
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
            tracker.log_metrics(run_id, final)
            tracker.set_tags(run_id, {"tlsweep.accepted": str(accepted).lower()})
        state.update(complete=True, result=result.as_dict())
        _write_json(state_path, state)
        status = "FINISHED"
        return result
    except (KeyboardInterrupt, SystemExit):
        status = "KILLED"  # the checkpoints stay: the next run resumes
        state["seconds"] = float(state.get("seconds", 0.0)) + time.perf_counter() - t0
        with contextlib.suppress(Exception):
            _write_json(state_path, state)
        raise
    finally:
        if tracker is not None and run_id:
            with contextlib.suppress(Exception):
                tracker.end_stage(run_id, status)


def _log_pending(tracker: Any | None, run_id: str | None, state: dict[str, Any]) -> None:
    """Log the epochs finished but not yet on the MLflow run (each exactly once)."""
    if tracker is None or not run_id:
        return
    for point in state["history"][state.get("logged", 0) :]:
        metrics = {k: v for k, v in point.items() if k != "epoch"}
        tracker.log_metrics(run_id, metrics, step=int(point["epoch"]))
        state["logged"] = state.get("logged", 0) + 1


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


def _score(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray,
    rows: np.ndarray,
    files: list[dict],
    class_names: list[str],
) -> dict[str, Any]:
    """The model's accuracy, loss, per-class precision/recall and confusion matrix on ``rows``."""
    ds = _dataset(images, labels, rows, 64)
    proba = np.concatenate([np.asarray(model(x, training=False)) for x, _ in ds])
    y = labels[rows]
    k = len(class_names)
    pred = proba.argmax(axis=1)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-7, 1.0))))
    precision = [float(cm[i, i] / cm[:, i].sum()) if cm[:, i].sum() else 0.0 for i in range(k)]
    recall = [float(cm[i, i] / cm[i, :].sum()) if cm[i, :].sum() else 0.0 for i in range(k)]
    return {
        "accuracy": float((pred == y).mean()),
        "loss": loss,
        "n": int(len(y)),
        "precision": precision,
        "recall": recall,
        "confusion_matrix": cm.tolist(),
        "class_names": class_names,
    }
