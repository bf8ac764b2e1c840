"""The dense head trained on real cached features: accuracy, determinism, export, options."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tlsweep.head import _graph as head_graph
from tlsweep.head import _train as H
from tlsweep.head._train import HeadParams, evaluate_head, train_head

BASE = HeadParams(units=32, dropout=0.3, learning_rate=1e-3, batch_size=16, epochs=15, l2=1e-3)


@pytest.fixture(scope="module")
def cd(cd_features):  # noqa: ANN001, ANN201 - (x_train, y_train, x_val, y_val) of cats vs dogs
    xt, yt = cd_features.split("train")
    xv, yv = cd_features.split("validation")
    return np.asarray(xt), yt, np.asarray(xv), yv


@pytest.fixture(scope="module")
def flowers(flowers_features):  # noqa: ANN001, ANN201
    xt, yt = flowers_features.split("train")
    xv, yv = flowers_features.split("validation")
    return np.asarray(xt), yt, np.asarray(xv), yv, len(flowers_features.class_names)


def _train(data, params: HeadParams = BASE, **kw):  # noqa: ANN001, ANN202
    xt, yt, xv, yv = data[:4]
    return train_head(xt, yt, xv, yv, 2, params, **kw)


def test_learns_cats_vs_dogs(cd) -> None:  # noqa: ANN001
    xt, yt, xv, yv = cd
    assert xt.shape[1] == 1280 and set(yt.tolist()) == {0, 1}
    finals = []
    for seed in (0, 1, 2):
        h = _train(cd, replace(BASE, seed=seed))
        assert [m.epoch for m in h.history] == list(range(BASE.epochs))
        assert h.history[-1].loss < h.history[0].loss
        assert h.history[-1].accuracy >= 0.95  # it fits the training features
        finals.append(h.history[-1].val_accuracy)
        # the per-epoch validation metrics are what evaluating the final weights gives
        ev = evaluate_head(h, xv, yv)
        assert ev["accuracy"] == pytest.approx(h.history[-1].val_accuracy, abs=1e-6)
        assert ev["loss"] == pytest.approx(h.history[-1].val_loss, rel=1e-3, abs=1e-4)
        assert h.seconds > 0 and (h.n_features, h.n_classes) == (1280, 2)
    assert np.mean(finals) >= 0.8, finals  # chance is 0.5


def test_same_seed_same_history_other_seed_differs(cd) -> None:  # noqa: ANN001
    a, b = _train(cd), _train(cd)
    assert [m.as_dict() for m in a.history] == [m.as_dict() for m in b.history]
    for wa, wb in zip(a.weights, b.weights, strict=True):
        assert np.array_equal(wa, wb)
    c = _train(cd, replace(BASE, seed=BASE.seed + 1))
    assert [m.loss for m in c.history] != [m.loss for m in a.history]
    assert not np.array_equal(c.weights[0], a.weights[0])


def test_to_keras_predicts_like_the_head(cd) -> None:  # noqa: ANN001
    h = _train(cd, replace(BASE, hidden_layers=2, epochs=5))
    model = h.to_keras()
    xv = cd[2]
    proba = h.predict_proba(xv)
    assert proba.shape == (len(xv), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    keras_out = model.predict(xv, verbose=0)
    assert keras_out.shape == (len(xv), 1)
    np.testing.assert_allclose(keras_out[:, 0], proba[:, 1], atol=1e-5)
    assert len(model.layers) == 2 * 2 + 1  # (Dense, Dropout) x 2 + output


def test_five_class_softmax_head_on_layout_b(flowers) -> None:  # noqa: ANN001
    xt, yt, xv, yv, k = flowers
    assert k == 5 and set(yt.tolist()) == set(range(5)) and set(yv.tolist()) == set(range(5))
    h = train_head(xt, yt, xv, yv, k, replace(BASE, units=64))
    assert h.n_classes == 5 and h.weights[-1].shape == (5,)
    assert h.history[-1].val_accuracy >= 0.45  # chance is 0.2
    proba = h.predict_proba(xv)
    assert proba.shape == (len(xv), 5)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(h.to_keras().predict(xv, verbose=0), proba, atol=1e-5)
    ev = evaluate_head(h, xv, yv)
    cm = np.array(ev["confusion_matrix"])
    assert cm.shape == (5, 5) and cm.sum() == len(yv) == ev["n"]
    assert cm.sum(axis=1).tolist() == np.bincount(yv, minlength=5).tolist()
    assert ev["accuracy"] == pytest.approx(np.trace(cm) / len(yv))
    assert ev["accuracy"] == pytest.approx(h.history[-1].val_accuracy, abs=1e-6)
    pred = proba.argmax(axis=1)
    for c in range(5):
        if (pred == c).any():
            assert ev["precision"][c] == pytest.approx(np.mean(yv[pred == c] == c))
        assert ev["recall"][c] == pytest.approx(np.mean(pred[yv == c] == c))


class Stop(Exception):
    pass


def test_epoch_callback_exception_propagates(cd) -> None:  # noqa: ANN001
    seen: list[int] = []

    def on_epoch(m: H.EpochMetrics) -> None:
        seen.append(m.epoch)
        assert 0.0 <= m.val_accuracy <= 1.0 and m.val_loss > 0
        if m.epoch == 2:
            raise Stop("pruned")

    with pytest.raises(Stop, match="pruned"):
        _train(cd, on_epoch=on_epoch)
    assert seen == [0, 1, 2]


def test_callback_sees_every_epoch_of_a_full_run(cd) -> None:  # noqa: ANN001
    seen: list[H.EpochMetrics] = []
    h = _train(cd, replace(BASE, epochs=4), on_epoch=seen.append)
    assert [m.epoch for m in seen] == [0, 1, 2, 3]
    assert [m.as_dict() for m in seen] == [m.as_dict() for m in h.history]
    assert set(seen[0].as_dict()) == {"loss", "accuracy", "val_loss", "val_accuracy"}


VARIANTS = {
    "label_smoothing": dict(label_smoothing=0.2),
    "l2": dict(l2=1e-2),
    "sgd": dict(optimizer="sgd", learning_rate=1e-2),
    "rmsprop": dict(optimizer="rmsprop"),
    "hidden_layers=0": dict(hidden_layers=0),
    "hidden_layers=2": dict(hidden_layers=2),
}


@pytest.fixture(scope="module")
def baseline(cd):  # noqa: ANN001, ANN201
    return _train(cd, replace(BASE, l2=0.0, epochs=10))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_options_train_and_matter(cd, baseline, variant: str) -> None:  # noqa: ANN001
    params = replace(baseline.params, **VARIANTS[variant])
    h = _train(cd, params)
    assert len(h.history) == params.epochs
    losses = [m.loss for m in h.history]
    assert np.isfinite(losses).all() and np.isfinite([m.val_loss for m in h.history]).all()
    assert losses[-1] < losses[0]
    assert h.history[-1].accuracy >= 0.8  # every variant learns the training features
    assert len(h.weights) == 2 * (params.hidden_layers + 1)
    assert [w.shape for w in h.to_keras().get_weights()] == [w.shape for w in h.weights]
    assert losses != [m.loss for m in baseline.history]  # the option changed the training


def test_label_smoothing_keeps_the_loss_away_from_zero(cd, baseline) -> None:  # noqa: ANN001
    smooth = _train(cd, replace(baseline.params, label_smoothing=0.2))
    # the best possible smoothed binary loss is the entropy of (0.9, 0.1), about 0.325
    assert smooth.history[-1].loss > 0.3 > baseline.history[-1].loss


def test_l2_shrinks_the_weights(cd, baseline) -> None:  # noqa: ANN001
    reg = _train(cd, replace(baseline.params, l2=1e-2))
    norm = lambda h: sum(float(np.sum(w**2)) for w in h.weights[::2])  # noqa: E731
    assert norm(reg) < 0.85 * norm(baseline)  # measured: about 0.74


def test_needs_two_classes(cd) -> None:  # noqa: ANN001
    xt, yt, xv, yv = cd
    with pytest.raises(ValueError):
        train_head(xt, yt, xv, yv, 1, BASE)


def test_many_trials_do_not_retrace(cd) -> None:  # noqa: ANN001
    """Thirty heads of different sizes reuse the same compiled functions: memory stays flat."""
    _train(cd, replace(BASE, units=8, epochs=1)).predict_proba(cd[2][:5])
    keys = set(head_graph._FUNCS)
    traces = {k: f.experimental_get_tracing_count() for k, f in head_graph._FUNCS.items()}
    for i in range(30):
        p = replace(
            BASE,
            units=8 + 7 * i,
            dropout=0.01 * i,
            learning_rate=1e-4 * (i + 1),
            epochs=1 + i % 2,
            seed=i,
        )
        h = _train(cd, p)
        h.predict_proba(cd[2][:5])
    assert set(head_graph._FUNCS) == keys
    for k, f in head_graph._FUNCS.items():
        assert f.experimental_get_tracing_count() <= max(1, traces.get(k, 0)), k


# --- one optimizer step against Keras -----------------------------------------------------------
def _keras_step(init, x, y, xv, yv, n_classes, p: HeadParams):  # noqa: ANN001, ANN202
    """Keras's Model.fit, one epoch of one batch from the weights ``init``: (weights, history)."""
    import keras

    reg = keras.regularizers.L2(p.l2)
    layers = [keras.Input((x.shape[1],))]
    for _ in range(p.hidden_layers):
        layers.append(keras.layers.Dense(p.units, activation="relu", kernel_regularizer=reg))
        layers.append(keras.layers.Dropout(p.dropout))
    if n_classes == 2:
        layers.append(keras.layers.Dense(1, activation="sigmoid", kernel_regularizer=reg))
        loss = keras.losses.BinaryCrossentropy(label_smoothing=p.label_smoothing)
        y, yv = y.astype("float32"), yv.astype("float32")
    else:
        layers.append(keras.layers.Dense(n_classes, activation="softmax", kernel_regularizer=reg))
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=p.label_smoothing)
        y, yv = np.eye(n_classes)[y], np.eye(n_classes)[yv]
    model = keras.Sequential(layers)
    model.set_weights(init)
    optimizer = {
        "adam": lambda: keras.optimizers.Adam(p.learning_rate),
        "sgd": lambda: keras.optimizers.SGD(p.learning_rate, momentum=0.9),
        "rmsprop": lambda: keras.optimizers.RMSprop(p.learning_rate),
    }[p.optimizer]()
    model.compile(optimizer=optimizer, loss=loss)
    hist = model.fit(
        x, y, batch_size=len(x), epochs=1, shuffle=False, validation_data=(xv, yv), verbose=0
    )
    return model.get_weights(), {k: v[-1] for k, v in hist.history.items()}


# every optimizer, and both heads (sigmoid, softmax): the update rule does not see the head
@pytest.mark.parametrize(("optimizer", "n_classes"), [("adam", 2), ("sgd", 3), ("rmsprop", 2)])
def test_one_step_equals_keras(optimizer: str, n_classes: int) -> None:
    """One step of tlsweep's fused kernels gives Keras's weights, and Keras's loss (with L2)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(24, 10)).astype("float32")
    y = rng.integers(0, n_classes, 24)
    xv = rng.normal(size=(12, 10)).astype("float32")
    yv = rng.integers(0, n_classes, 12)
    p = HeadParams(
        units=8,
        dropout=0.0,
        learning_rate=0.05,  # big enough that a wrong update rule shows
        batch_size=len(x),  # one batch: one step per epoch
        epochs=1,
        l2=0.01,
        label_smoothing=0.1,
        optimizer=optimizer,
        seed=3,
    )
    init = train_head(x, y, xv, yv, n_classes, replace(p, epochs=0)).weights
    ours = train_head(x, y, xv, yv, n_classes, p)
    theirs, hist = _keras_step(init, x, y, xv, yv, n_classes, p)
    for w0, a, b in zip(init, ours.weights, theirs, strict=True):
        assert not np.allclose(a, w0)  # the step moved every weight
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    m = ours.history[0]
    assert m.loss == pytest.approx(hist["loss"], rel=1e-5)  # the L2 penalty included, as Keras
    # val_loss is the data loss alone (README: why); Keras adds the penalty at the new weights
    penalty = p.l2 * sum(float(np.sum(np.square(k))) for k in theirs[::2])
    assert penalty > 1e-3
    assert m.val_loss == pytest.approx(hist["val_loss"] - penalty, rel=1e-5)
