"""The dense head: its parameters, its training on feature arrays, and the trained result.

The head is ``[Dense(units, relu) -> Dropout(dropout)] * hidden_layers -> Dense(classes)``
with a sigmoid output for two classes and softmax for more, exactly what the classic recipe
builds with Keras. It trains as compiled TensorFlow code, one graph call per epoch
(:mod:`tlsweep.head._graph`); :func:`train_head` and :func:`train_heads` drive it epoch by
epoch. The same parameters and seed give the same result (stateless random ops everywhere).
The trained weights load into an equivalent Keras model (:meth:`TrainedHead.to_keras`).

This module knows nothing about Optuna or MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

import numpy as np

from tlsweep.config import (
    DEFAULT_SEED,
    HEAD_PARAMETERS,
    INIT_SEED_OFFSET,
    VIEW_SEED_OFFSET,
    HeadParam,
)

from ._graph import (
    SLOTS,
    as_tensor,
    epoch_fn,
    eval_fn,
    forward_fn,
    glorot,
    proba_loss_acc,
    probabilities,
)


def _head_params_class(declared: tuple[HeadParam, ...] = HEAD_PARAMETERS) -> type:
    """``HeadParams``: one field per declared head parameter, plus the training seed.

    Built from :data:`tlsweep.config._params.HEAD_PARAMETERS`, so a new parameter is declared there
    and only used here. A parameter whose default is a fixed value keeps it as the field default;
    one searched over a range by default has no sensible single value and must be given.
    """
    fields: list[tuple[str, type, Any]] = []
    for p in declared:
        if isinstance(p.default, dict):
            fields.append((p.name, p.type, field(metadata={"help": p.help})))
        else:
            fields.append((p.name, p.type, field(default=p.default, metadata={"help": p.help})))
    fields.append(("seed", int, field(default=DEFAULT_SEED, metadata={"help": "training seed"})))

    def from_dict(cls: type, d: dict[str, Any]) -> Any:
        """The fields of ``d`` that are head parameters (other keys, e.g. backbone, ignored)."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    return make_dataclass(
        "HeadParams",
        fields,
        frozen=True,
        kw_only=True,
        namespace={"from_dict": classmethod(from_dict), "__module__": __name__},
    )


HeadParams = _head_params_class()
HeadParams.__doc__ = "Everything that defines one head and its training (keyword arguments)."


@dataclass
class EpochMetrics:
    epoch: int
    loss: float
    accuracy: float
    val_loss: float
    val_accuracy: float
    # Further validation metrics (``val_balanced_accuracy``, ...), only when asked for.
    extra: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        d = asdict(self)
        d.pop("epoch")
        d.update(d.pop("extra"))
        return d

    @classmethod
    def mean(cls, ms: list[EpochMetrics]) -> EpochMetrics:
        """The element-wise mean of several heads' metrics at the same epoch."""
        keys = ms[0].extra.keys()
        return cls(
            ms[0].epoch,
            *(float(np.mean([getattr(m, k) for m in ms])) for k in _BASE_METRICS),
            {k: float(np.mean([m.extra[k] for m in ms])) for k in keys},
        )


_BASE_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class TrainedHead:
    """The trained weights ([kernel, bias] per Dense layer) and the per-epoch history."""

    params: HeadParams
    n_features: int
    n_classes: int
    weights: list[np.ndarray]
    history: list[EpochMetrics] = field(default_factory=list)
    seconds: float = 0.0

    def to_keras(self, name: str = "head") -> Any:
        """An equivalent ``keras.Sequential`` head with these weights."""
        import keras

        p = self.params
        layers: list[Any] = [keras.Input((self.n_features,), name="features")]
        for i in range(p.hidden_layers):
            layers.append(keras.layers.Dense(p.units, activation="relu", name=f"dense_{i}"))
            layers.append(keras.layers.Dropout(p.dropout, name=f"dropout_{i}"))
        out_units = 1 if self.n_classes == 2 else self.n_classes
        activation = "sigmoid" if self.n_classes == 2 else "softmax"
        layers.append(keras.layers.Dense(out_units, activation=activation, name="probabilities"))
        model = keras.Sequential(layers, name=name)
        model.set_weights(self.weights)
        return model

    def predict_proba(self, x: np.ndarray, batch: int = 4096) -> np.ndarray:
        """Class probabilities [n, n_classes] (two columns for binary heads).

        ``x`` of shape ``[views, n, features]`` (augmented views of the same images): the mean
        of the views' probabilities (test-time augmentation).
        """
        import tensorflow as tf

        if np.ndim(x) == 3:
            return np.mean([self.predict_proba(v, batch) for v in x], axis=0)

        fn = forward_fn(len(self.weights) // 2)
        ws = tuple(tf.constant(w) for w in self.weights)
        outs = []
        for i in range(0, len(x), batch):
            logits = fn(ws, tf.constant(np.asarray(x[i : i + batch], np.float32))).numpy()
            outs.append(logits)
        logits = np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)
        return probabilities(logits, self.n_classes)


EpochCallback = Callable[[EpochMetrics], None]


class _Trainer:
    """One head in training: its weights, optimizer slots and data; one epoch per call."""

    def __init__(
        self,
        x_train: Any,
        y_train: Any,
        x_val: Any,
        y_val: Any,
        n_classes: int,
        params: HeadParams,
        class_weights: Sequence[float] | None = None,
        extra_metrics: Sequence[str] = (),
        train_views: str = "one",
    ) -> None:
        import tensorflow as tf

        if n_classes < 2:
            raise ValueError("a head needs at least two classes")
        if params.optimizer not in SLOTS:
            raise ValueError(f"unknown optimizer {params.optimizer!r}; use one of {sorted(SLOTS)}")
        self.params, self.n_classes = params, n_classes
        self.xt = x_train if tf.is_tensor(x_train) else as_tensor(x_train)
        self.xv = x_val if tf.is_tensor(x_val) else as_tensor(x_val)
        self.yt = (
            tf.convert_to_tensor(np.asarray(y_train, np.int64))
            if not tf.is_tensor(y_train)
            else y_train
        )
        self.yv = (
            tf.convert_to_tensor(np.asarray(y_val, np.int64)) if not tf.is_tensor(y_val) else y_val
        )
        # Augmented views ([views, n, features]): training sees one seeded view of each image
        # per epoch ("one") or every view ("all"); validation the mean of its views' probabilities.
        self.views = None
        if len(self.xt.shape) == 3:
            if train_views == "all":
                k = int(self.xt.shape[0])
                self.xt = tf.reshape(self.xt, [-1, int(self.xt.shape[2])])
                self.yt = tf.tile(self.yt, [k])
            else:
                self.views = self.xt
                self.xt = self.views[0]
        self.tta = len(self.xv.shape) == 3
        self.extra_metrics = tuple(extra_metrics)
        self.yv_np = np.asarray(self.yv) if self.extra_metrics or self.tta else None
        binary = n_classes == 2
        self.n_features = int(self.xt.shape[1])
        out_units = 1 if binary else n_classes
        sizes = [self.n_features] + [params.units] * params.hidden_layers + [out_units]
        init: list[Any] = []
        for i in range(len(sizes) - 1):
            init.append(glorot((sizes[i], sizes[i + 1]), (params.seed, INIT_SEED_OFFSET + i)))
            init.append(tf.zeros((sizes[i + 1],), tf.float32))

        # This head's weights and optimizer slots; freed with it (the graph holds no state).
        # Declared with an unknown shape: TensorFlow keys its cache of instantiated functions on
        # the shapes of resource arguments, so shaped variables would instantiate (and keep) a
        # new copy of the epoch function for every new layer width, about 1.5 MB per width.
        def variable(value: Any) -> Any:
            return tf.Variable(value, trainable=False, shape=tf.TensorShape(None))

        self.wvars = [variable(w) for w in init]
        self.slot_vars = [
            [variable(tf.zeros_like(w)) for w in init] for _ in range(SLOTS[params.optimizer])
        ]
        del init
        self.handles = tuple(v.handle for v in self.wvars)
        self.slot_handles = tuple(tuple(v.handle for v in s) for s in self.slot_vars)
        self.step = tf.constant(0.0)
        n_dense = len(self.wvars) // 2
        bs = min(params.batch_size, int(self.xt.shape[0]))
        self.epoch_fn = epoch_fn(n_dense, binary, params.optimizer, bs)
        self.evaluate = eval_fn(n_dense, binary)
        self.lr = tf.constant(params.learning_rate, tf.float32)
        self.dropout = tf.constant(params.dropout, tf.float32)
        self.l2 = tf.constant(params.l2, tf.float32)
        self.smoothing = tf.constant(params.label_smoothing, tf.float32)
        cw = np.ones(n_classes, np.float32) if class_weights is None else class_weights
        self.cw = tf.constant(np.asarray(cw, np.float32))

    def numpy_weights(self) -> list[np.ndarray]:
        return [v.numpy() for v in self.wvars]

    def run_epoch(self, e: int) -> EpochMetrics:
        import tensorflow as tf

        seed = tf.constant([self.params.seed, e], tf.int32)
        xt = self.xt
        if self.views is not None:  # this epoch's view of each image: a seeded choice
            k, n = int(self.views.shape[0]), int(self.views.shape[1])
            pick = tf.random.stateless_uniform(
                [n],
                seed=[self.params.seed, VIEW_SEED_OFFSET + e],
                minval=0,
                maxval=k,
                dtype=tf.int32,
            )
            xt = tf.gather_nd(self.views, tf.stack([pick, tf.range(n)], axis=1))
        self.step, loss, acc = self.epoch_fn(
            self.handles,
            self.slot_handles,
            self.step,
            xt,
            self.yt,
            seed,
            self.lr,
            self.dropout,
            self.l2,
            self.smoothing,
            self.cw,
        )
        ws = tuple(v.value() for v in self.wvars)
        extra: dict[str, float] = {}
        proba = None
        if self.tta:  # the mean of the views' probabilities
            fwd = forward_fn(len(ws) // 2)
            proba = np.mean(
                [
                    probabilities(fwd(ws, self.xv[v]).numpy(), self.n_classes)
                    for v in range(self.xv.shape[0])
                ],
                axis=0,
            )
            val_loss, val_acc = proba_loss_acc(proba, self.yv_np, self.params.label_smoothing)
        else:
            val_loss, val_acc = self.evaluate(ws, self.xv, self.yv, self.smoothing)
        if self.extra_metrics:  # only when asked for: the default path stays in the graph
            from ._metrics import scores

            if proba is None:
                logits = forward_fn(len(ws) // 2)(ws, self.xv).numpy()
                proba = probabilities(logits, self.n_classes)
            got = scores(proba, self.yv_np, self.extra_metrics)
            extra = {f"val_{k}": v for k, v in got.items()}
        return EpochMetrics(e, float(loss), float(acc), float(val_loss), float(val_acc), extra)


def class_weight_vector(
    spec: str | Mapping[str, float], y_train: Any, class_names: Sequence[str]
) -> np.ndarray | None:
    """Per-class loss weights: None for ``none``; ``balanced`` is n / (k * count), as Keras
    and scikit-learn compute it; a mapping gives the listed classes' weights (others 1.0)."""
    k = len(class_names)
    if isinstance(spec, str):
        if spec == "none":
            return None
        counts = np.bincount(np.asarray(y_train, np.int64), minlength=k).astype(np.float64)
        w = np.divide(counts.sum(), k * counts, out=np.ones(k), where=counts > 0)
        return w.astype(np.float32)
    unknown = sorted(set(spec) - set(class_names))
    if unknown:
        raise ValueError(
            f"search.class_weight: unknown class {', '.join(unknown)}; "
            f"the classes are {', '.join(class_names)}"
        )
    return np.asarray([spec.get(c, 1.0) for c in class_names], np.float32)


def train_head(
    x_train: Any,
    y_train: Any,
    x_val: Any,
    y_val: Any,
    n_classes: int,
    params: HeadParams,
    on_epoch: EpochCallback | None = None,
    *,
    class_weights: Sequence[float] | None = None,
    extra_metrics: Sequence[str] = (),
    train_views: str = "one",
) -> TrainedHead:
    """Train a head; ``on_epoch`` sees each epoch's metrics and may raise to stop (pruning).

    ``x_*`` may be numpy arrays or tensors from :func:`as_tensor` (preferred: no copy).
    ``class_weights``: one loss weight per class (see :func:`class_weight_vector`).
    ``extra_metrics``: names from :data:`tlsweep.head._metrics.SCORES` also computed on the
    validation data each epoch, as ``val_<name>`` in :attr:`EpochMetrics.extra`.
    Augmented views: ``x_train`` of shape ``[views, n, features]`` trains on one seeded view
    of each image per epoch (``train_views="one"``) or on all of them (``"all"``); ``x_val`` of
    that shape is scored on the mean of its views' probabilities.
    """
    t0 = time.perf_counter()
    t = _Trainer(
        x_train, y_train, x_val, y_val, n_classes, params, class_weights, extra_metrics, train_views
    )
    head = TrainedHead(params, t.n_features, n_classes, [])
    for e in range(params.epochs):
        metrics = t.run_epoch(e)
        head.history.append(metrics)
        if not all(math.isfinite(x) for x in (metrics.loss, metrics.val_loss)):
            head.weights = t.numpy_weights()
            head.seconds = time.perf_counter() - t0
            raise FloatingPointError(f"training diverged at epoch {e} (loss {metrics.loss})")
        if on_epoch is not None:
            head.weights = t.numpy_weights() if e == params.epochs - 1 else []
            on_epoch(metrics)
    head.weights = t.numpy_weights()
    head.seconds = time.perf_counter() - t0
    return head


Task = tuple[Any, Any, Any, Any]  # (x_train, y_train, x_val, y_val)


def train_heads(
    tasks: Sequence[Task],
    n_classes: int,
    params: Sequence[HeadParams],
    on_epoch: Callable[[EpochMetrics, list[EpochMetrics]], None] | None = None,
    *,
    class_weights: Sequence[Sequence[float] | None] | None = None,
    extra_metrics: Sequence[str] = (),
    train_views: str = "one",
) -> list[TrainedHead]:
    """Train several heads in lock-step (cross-validation folds, repeated seeds).

    Head ``i`` trains on ``tasks[i]`` with ``params[i]``; after every epoch of all of them,
    ``on_epoch(mean, each)`` sees their mean metrics and each head's, and may raise to stop
    them all (pruning on the mean). The heads share the compiled functions of one process.
    """
    if len(tasks) != len(params) or not tasks:
        raise ValueError("train_heads needs one HeadParams per task, and at least one task")
    epochs = {p.epochs for p in params}
    if len(epochs) != 1:
        raise ValueError("heads trained in lock-step need the same number of epochs")
    t0 = time.perf_counter()
    cws = class_weights or [None] * len(tasks)
    trainers = [
        _Trainer(*task, n_classes, p, cw, extra_metrics, train_views)
        for task, p, cw in zip(tasks, params, cws, strict=True)
    ]
    heads = [TrainedHead(t.params, t.n_features, n_classes, []) for t in trainers]
    for e in range(epochs.pop()):
        each = [t.run_epoch(e) for t in trainers]
        for h, m in zip(heads, each, strict=True):
            h.history.append(m)
            if not all(math.isfinite(x) for x in (m.loss, m.val_loss)):
                raise FloatingPointError(f"training diverged at epoch {e} (loss {m.loss})")
        if on_epoch is not None:
            on_epoch(EpochMetrics.mean(each), each)
    for h, t in zip(heads, trainers, strict=True):
        h.weights = t.numpy_weights()
        h.seconds = time.perf_counter() - t0
    return heads


def evaluate_head(head: TrainedHead, x: Any, y: Any) -> dict[str, Any]:
    """Loss, accuracy, per-class precision and recall and the confusion matrix on (x, y)."""
    from ._metrics import evaluation

    return evaluation(head.predict_proba(np.asarray(x, np.float32)), np.asarray(y, np.int64))
