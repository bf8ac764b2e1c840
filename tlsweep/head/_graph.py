"""The dense head's compiled TensorFlow code, shared by every trial of a process.

Training does not go through ``Model.fit``: one ``tf.function`` runs a whole epoch (shuffle,
every mini-batch's forward pass, gradients and optimizer update) in a single graph call, so
Python overhead is paid once per epoch instead of once per step. Each trial's weights and
optimizer slots are variables of that trial, updated in place by TensorFlow's fused optimizer
kernels; the function takes their handles with shape-generic signatures, so it is traced once
per process (per batch size) and reused by every trial: memory does not grow from trial to
trial. The forward pass and the evaluation are compiled the same way, one per structure.

Also here: the features as the tensors these functions take (:func:`as_tensor`) and the class
probabilities their logits give (:func:`probabilities`). The head's parameters, the trainer
and the results are :mod:`tlsweep.head`. Nothing here knows about Optuna or MLflow.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from tlsweep.config import DROPOUT_SEED_STRIDE

log = logging.getLogger(__name__)

# Keras's defaults, so results match Model.fit with the same optimizer.
ADAM_BETA1, ADAM_BETA2, EPSILON = 0.9, 0.999, 1e-7
SGD_MOMENTUM = 0.9
RMSPROP_RHO = 0.9


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
            u = tf.random.stateless_uniform(
                tf.shape(h), seed=seed + tf.constant([0, DROPOUT_SEED_STRIDE]) * i
            )
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


def forward_fn(n_dense: int) -> Any:
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


def eval_fn(n_dense: int, binary: bool) -> Any:
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


def epoch_fn(n_dense: int, binary: bool, optimizer: str, batch_size: int) -> Any:
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


def glorot(shape: tuple[int, int], seed: tuple[int, int]) -> Any:
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


def proba_loss_acc(proba: np.ndarray, y: np.ndarray, smoothing: float) -> tuple[float, float]:
    """Cross-entropy (label smoothing as Keras's) and accuracy of class probabilities."""
    from ._metrics import log_loss

    return log_loss(proba, y, smoothing), float((proba.argmax(axis=1) == y).mean())


def probabilities(logits: np.ndarray, n_classes: int) -> np.ndarray:
    """Class probabilities [n, n_classes] from the head's logits (two columns when binary)."""
    if n_classes == 2:
        p1 = 0.5 * (1.0 + np.tanh(0.5 * logits[:, 0]))  # the sigmoid, without overflow
        return np.stack([1.0 - p1, p1], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
