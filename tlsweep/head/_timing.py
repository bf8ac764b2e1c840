"""How long one trial's head takes to train on this machine (for the estimates ``tlsweep init``
prints), measured on random features of the real shape, a few epochs, scaled to the rest.
"""

from __future__ import annotations

import time

from ._train import HeadParams, train_head

TIMED_EPOCHS = 3
TIMED_ROWS = 2048  # a larger training set is timed on this many rows, scaled linearly


def trial_seconds(
    n_train: int, n_val: int, width: int, n_classes: int, epochs: int, seed: int = 0
) -> float:
    """Seconds one head of ``epochs`` epochs takes on ``n_train`` rows of ``width`` features."""
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = max(2, min(n_train, TIMED_ROWS))
    xt = rng.standard_normal((rows, width), dtype="float32")
    xv = rng.standard_normal((max(2, min(n_val, TIMED_ROWS)), width), dtype="float32")
    yt = rng.integers(0, n_classes, len(xt))
    yv = rng.integers(0, n_classes, len(xv))

    def params(n: int) -> HeadParams:
        return HeadParams(units=256, dropout=0.3, learning_rate=1e-3, batch_size=32, epochs=n)

    train_head(xt, yt, xv, yv, n_classes, params(1))  # traced once, as a study's first trial
    t0 = time.perf_counter()
    train_head(xt, yt, xv, yv, n_classes, params(TIMED_EPOCHS))
    seconds = time.perf_counter() - t0
    return seconds * epochs / TIMED_EPOCHS * max(1.0, n_train / rows)
