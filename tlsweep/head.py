"""The dense head: built and trained on feature arrays as compiled TensorFlow code.

The head is ``[Dense(units, relu) -> Dropout(dropout)] * hidden_layers -> Dense(classes)``
with a sigmoid output for two classes and softmax for more, exactly what the classic recipe
builds with Keras. Training does not go through ``Model.fit``: one ``tf.function`` runs a whole
epoch (shuffle, every mini-batch's forward pass, gradients and optimizer update) in a single
graph call, so Python overhead is paid once per epoch instead of once per step. Each trial's
weights and optimizer slots are variables of that trial, updated in place by TensorFlow's fused
optimizer kernels; the function takes their handles with shape-generic signatures, so it is
traced once per process (per batch size) and reused by every trial: memory does not grow from
trial to trial.

The same parameters and seed give the same result (stateless random ops everywhere).
The trained weights load into an equivalent Keras model (:meth:`TrainedHead.to_keras`).

This module knows nothing about Optuna or MLflow.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, make_dataclass
from typing import Any

import numpy as np

from tlsweep.config import DEFAULT_SEED
from tlsweep.params import HEAD_PARAMETERS, HeadParam

log = logging.getLogger(__name__)

# Keras's defaults, so results match Model.fit with the same optimizer.
ADAM_BETA1, ADAM_BETA2, EPSILON = 0.9, 0.999, 1e-7
SGD_MOMENTUM = 0.9
VIEW_SEED = 1 << 20  # offsets the per-epoch view choice's seed from the epoch's dropout seed
RMSPROP_RHO = 0.9


def _head_params_class(declared: tuple[HeadParam, ...] = HEAD_PARAMETERS) -> type:
    """``HeadParams``: one field per declared head parameter, plus the training seed.

    Built from :data:`tlsweep.params.HEAD_PARAMETERS`, so a new parameter is declared there and
    only used here. A parameter whose default is a fixed value keeps it as the field default; one
    searched over a range by default has no sensible single value and must be given.
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

        fn = _forward_fn(len(self.weights) // 2)
        ws = tuple(tf.constant(w) for w in self.weights)
        outs = []
        for i in range(0, len(x), batch):
            logits = fn(ws, tf.constant(np.asarray(x[i : i + batch], np.float32))).numpy()
            outs.append(logits)
        logits = np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)
        return _proba(logits, self.n_classes)


# --- compiled functions, one per structure, shared by every trial of the process -----------------
_FUNCS: dict[tuple, Any] = {}


def _forward(ws: tuple, x: Any, dropout: Any = None, seed: Any = None) -> Any:
    """Logits of the head; dropout (inverted, stateless) when ``dropout`` is given."""
    import tensorflow as tf

    h = x
    n = len(ws) // 2
    for i in range(n - 1):
        h = tf.nn.relu(tf.matmul(h, ws[2 * i]) + ws[2 * i + 1])
        if dropout is not None:
            keep = 1.0 - dropout
            u = tf.random.stateless_uniform(tf.shape(h), seed=seed + tf.constant([0, 7919]) * i)
            h = tf.where(u < keep, h / keep, tf.zeros_like(h))
    return tf.matmul(h, ws[-2]) + ws[-1]


def _loss_and_correct(logits: Any, y: Any, binary: bool, smoothing: Any) -> tuple[Any, Any]:
    """Per-example loss (with label smoothing, as Keras defines it) and correctness."""
    import tensorflow as tf

    if binary:
        z = logits[:, 0]
        yf = tf.cast(y, tf.float32)
        ys = yf * (1.0 - smoothing) + 0.5 * smoothing
        loss = tf.nn.sigmoid_cross_entropy_with_logits(labels=ys, logits=z)
        correct = tf.cast(tf.equal(tf.cast(z > 0, tf.int64), y), tf.float32)
    else:
        k = tf.shape(logits)[1]
        onehot = tf.one_hot(y, k)
        ys = onehot * (1.0 - smoothing) + smoothing / tf.cast(k, tf.float32)
        loss = tf.nn.softmax_cross_entropy_with_logits(labels=ys, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=1), y), tf.float32)
    return loss, correct


def _forward_fn(n_dense: int) -> Any:
    import tensorflow as tf

    key = ("forward", n_dense)
    if key not in _FUNCS:
        sig = tuple(
            tf.TensorSpec([None, None] if j % 2 == 0 else [None], tf.float32)
            for j in range(2 * n_dense)
        )
        _FUNCS[key] = tf.function(
            lambda ws, x: _forward(ws, x),
            input_signature=[sig, tf.TensorSpec([None, None], tf.float32)],
        )
    return _FUNCS[key]


def _eval_fn(n_dense: int, binary: bool) -> Any:
    import tensorflow as tf

    key = ("eval", n_dense, binary)
    if key not in _FUNCS:
        sig = tuple(
            tf.TensorSpec([None, None] if j % 2 == 0 else [None], tf.float32)
            for j in range(2 * n_dense)
        )

        def evaluate(ws: tuple, x: Any, y: Any, smoothing: Any) -> tuple[Any, Any]:
            n = tf.shape(x)[0]
            chunk = 2048
            total_loss = tf.constant(0.0)
            total_correct = tf.constant(0.0)
            for s in tf.range(0, n, chunk):
                e = tf.minimum(s + chunk, n)
                logits = _forward(ws, x[s:e])
                loss, correct = _loss_and_correct(logits, y[s:e], binary, smoothing)
                total_loss += tf.reduce_sum(loss)
                total_correct += tf.reduce_sum(correct)
            nf = tf.cast(n, tf.float32)
            return total_loss / nf, total_correct / nf

        _FUNCS[key] = tf.function(
            evaluate,
            input_signature=[
                sig,
                tf.TensorSpec([None, None], tf.float32),
                tf.TensorSpec([None], tf.int64),
                tf.TensorSpec([], tf.float32),
            ],
        )
    return _FUNCS[key]


# Optimizer state per weight, as variables updated in place by TensorFlow's fused kernels.
SLOTS = {"adam": 2, "sgd": 1, "rmsprop": 2}


def _epoch_fn(n_dense: int, binary: bool, optimizer: str, batch_size: int) -> Any:
    """One epoch as one graph call, on weights and optimizer slots held in resource variables.

    The weights and slots are passed as resource handles with shape-generic signatures, so one
    trace serves every layer width and feature count. Each update is a single fused kernel
    (``ResourceApplyAdam``, ``ResourceApplyKerasMomentum``, ``ResourceApplyRMSProp``) that
    updates the weights and slots in place: one pass over memory and no new buffers per step,
    where composing the update from elementwise ops makes a dozen weight-sized temporaries.
    The formulas are exactly Keras's (Adam, SGD with momentum, RMSprop without momentum).
    """
    import tensorflow as tf

    key = ("epoch", n_dense, binary, optimizer, batch_size)
    if key in _FUNCS:
        return _FUNCS[key]
    handle = tf.TensorSpec([], tf.resource)
    wspec = tuple(handle for _ in range(2 * n_dense))
    sspec = tuple(wspec for _ in range(SLOTS[optimizer]))

    def run_epoch(wvars, slots, step, x, y, seed, lr, dropout, l2, smoothing, cw):  # noqa: ANN001
        # Every batch has the static size `batch_size`; the last one wraps around and masks
        # the extra rows, so the loss equals Keras's smaller last batch and the graph sees one
        # batch shape.
        n = tf.shape(x)[0]
        perm = tf.random.experimental.stateless_shuffle(tf.range(n), seed=seed)
        n_batches = (n + batch_size - 1) // batch_size
        loss_sum = tf.constant(0.0)
        correct_sum = tf.constant(0.0)
        offsets = tf.range(batch_size)
        use_l2 = l2 > 0.0
        for b in tf.range(n_batches):
            pos = b * batch_size + offsets
            mask = tf.cast(pos < n, tf.float32)
            idx = tf.gather(perm, pos % n)
            xb = tf.gather(x, idx)
            yb = tf.gather(y, idx)
            count = tf.reduce_sum(mask)
            ws = tuple(tf.raw_ops.ReadVariableOp(resource=h, dtype=tf.float32) for h in wvars)
            with tf.GradientTape() as tape:
                tape.watch(ws)
                logits = _forward(ws, xb, dropout, seed + tf.stack([b + 1, 0]))
                loss, correct = _loss_and_correct(logits, yb, binary, smoothing)
                # Keras's class_weight: each example's loss times its class's weight, and the
                # sum divided by the batch size (not by the sum of the weights).
                loss = loss * tf.gather(cw, yb)
                mean_loss = tf.reduce_sum(loss * mask) / count
            grads = list(tape.gradient(mean_loss, ws))
            # The reported loss includes the penalty at the step's weights, as Keras's fit does.
            penalty = tf.cond(
                use_l2,
                lambda ws=ws: l2 * tf.add_n([tf.reduce_sum(tf.square(k)) for k in ws[::2]]),
                lambda: tf.constant(0.0),
            )
            # The L2 penalty l2 * sum(kernel**2) adds 2 * l2 * kernel to each kernel's gradient;
            # skipped at run time when l2 is 0 (two weight-sized passes saved per kernel).
            for j in range(0, len(ws), 2):
                g, w = grads[j], ws[j]
                grads[j] = tf.cond(use_l2, lambda g=g, w=w: g + (2.0 * l2) * w, lambda g=g: g)
            step = step + 1.0
            for j, g in enumerate(grads):
                if optimizer == "adam":
                    tf.raw_ops.ResourceApplyAdam(
                        var=wvars[j],
                        m=slots[0][j],
                        v=slots[1][j],
                        beta1_power=tf.pow(ADAM_BETA1, step),
                        beta2_power=tf.pow(ADAM_BETA2, step),
                        lr=lr,
                        beta1=ADAM_BETA1,
                        beta2=ADAM_BETA2,
                        epsilon=EPSILON,
                        grad=g,
                    )
                elif optimizer == "sgd":
                    tf.raw_ops.ResourceApplyKerasMomentum(
                        var=wvars[j], accum=slots[0][j], lr=lr, grad=g, momentum=SGD_MOMENTUM
                    )
                else:  # rmsprop: w -= lr * g / sqrt(ms + epsilon), as Keras
                    tf.raw_ops.ResourceApplyRMSProp(
                        var=wvars[j],
                        ms=slots[0][j],
                        mom=slots[1][j],
                        lr=lr,
                        rho=RMSPROP_RHO,
                        momentum=0.0,
                        epsilon=EPSILON,
                        grad=g,
                    )
            loss_sum += (mean_loss + penalty) * count
            correct_sum += tf.reduce_sum(correct * mask)
        nf = tf.cast(n, tf.float32)
        return step, loss_sum / nf, correct_sum / nf

    fn = tf.function(
        run_epoch,
        input_signature=[
            wspec,
            sspec,
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([None, None], tf.float32),
            tf.TensorSpec([None], tf.int64),
            tf.TensorSpec([2], tf.int32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([], tf.float32),
            tf.TensorSpec([None], tf.float32),
        ],
    )
    _FUNCS[key] = fn
    return fn


def _glorot(shape: tuple[int, int], seed: tuple[int, int]) -> Any:
    import tensorflow as tf

    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return tf.random.stateless_uniform(shape, seed=seed, minval=-limit, maxval=limit)


def as_tensor(x: np.ndarray) -> Any:
    """Features as a float32 tensor, made once and shared by every trial.

    A writable float32 memory map (``Entry.split``'s copy-on-write slice of a cache entry)
    becomes a tensor over the mapped pages themselves, through DLPack: no copy, so the
    features live once in the page cache for every process on the machine instead of once
    per process (``tf.convert_to_tensor`` would copy them). Anything else is copied.
    """
    import tensorflow as tf

    if (
        isinstance(x, np.memmap)
        and x.dtype == np.float32
        and x.size > 0
        and x.flags.c_contiguous
        and x.flags.writeable
        and x.ctypes.data % 64 == 0  # TensorFlow's alignment for CPU buffers
    ):
        try:
            return tf.experimental.dlpack.from_dlpack(x.__dlpack__())
        except (BufferError, TypeError, ValueError, tf.errors.OpError) as e:
            log.debug("features copied, not mapped (%s)", e)
    return tf.convert_to_tensor(np.asarray(x, dtype=np.float32))


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
            init.append(_glorot((sizes[i], sizes[i + 1]), (params.seed, 1000 + i)))
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
        self.epoch_fn = _epoch_fn(n_dense, binary, params.optimizer, bs)
        self.evaluate = _eval_fn(n_dense, binary)
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
                [n], seed=[self.params.seed, VIEW_SEED + e], minval=0, maxval=k, dtype=tf.int32
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
            fwd = _forward_fn(len(ws) // 2)
            proba = np.mean(
                [
                    _proba(fwd(ws, self.xv[v]).numpy(), self.n_classes)
                    for v in range(self.xv.shape[0])
                ],
                axis=0,
            )
            val_loss, val_acc = _proba_loss_acc(proba, self.yv_np, self.params.label_smoothing)
        else:
            val_loss, val_acc = self.evaluate(ws, self.xv, self.yv, self.smoothing)
        if self.extra_metrics:  # only when asked for: the default path stays in the graph
            from tlsweep.metrics import scores

            if proba is None:
                logits = _forward_fn(len(ws) // 2)(ws, self.xv).numpy()
                proba = _proba(logits, self.n_classes)
            got = scores(proba, self.yv_np, self.extra_metrics)
            extra = {f"val_{k}": v for k, v in got.items()}
        return EpochMetrics(e, float(loss), float(acc), float(val_loss), float(val_acc), extra)


def _proba_loss_acc(proba: np.ndarray, y: np.ndarray, smoothing: float) -> tuple[float, float]:
    """Cross-entropy (label smoothing as Keras's) and accuracy of class probabilities."""
    k = proba.shape[1]
    target = np.eye(k, dtype=np.float64)[y] * (1.0 - smoothing) + smoothing / k
    loss = -np.sum(target * np.log(np.clip(proba, 1e-7, 1.0)), axis=1).mean()
    return float(loss), float((proba.argmax(axis=1) == y).mean())


def _proba(logits: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities [n, n_classes] from the head's logits (two columns when binary)."""
    if n_classes == 2:
        p1 = 0.5 * (1.0 + np.tanh(0.5 * logits[:, 0]))  # the sigmoid, without overflow
        return np.stack([1.0 - p1, p1], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


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
    ``extra_metrics``: names from :data:`tlsweep.metrics.SCORES` also computed on the
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
    y = np.asarray(y, np.int64)
    proba = head.predict_proba(np.asarray(x, np.float32))
    pred = proba.argmax(axis=1)
    k = head.n_classes
    eps = 1e-7
    loss = (
        float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], eps, 1.0)))) if len(y) else 0.0
    )
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    precision = [float(cm[c, c] / cm[:, c].sum()) if cm[:, c].sum() else 0.0 for c in range(k)]
    recall = [float(cm[c, c] / cm[c, :].sum()) if cm[c, :].sum() else 0.0 for c in range(k)]
    return {
        "loss": loss,
        "accuracy": float((pred == y).mean()) if len(y) else 0.0,
        "precision": precision,
        "recall": recall,
        "confusion_matrix": cm.tolist(),
        "n": int(len(y)),
    }
