"""The registry of ``keras.applications`` backbones: sizes, preprocessing, weights, building.

Every ``keras.applications`` class is available by its class name. Each entry carries typed
metadata (the module whose ``preprocess_input`` it uses, default and minimum input size, the
channels of its last feature map at default arguments), so listing the registry and validating a
sweep file never import TensorFlow.

A backbone's ``preprocess_input`` is, for every model Keras ships, a per-channel affine map
(optionally with an RGB->BGR swap). :func:`build_extractor` measures that map from the real
function and expresses it as one frozen ``Dense(3)`` layer, so the feature extractor and the
exported model compute exactly the same thing with only built-in, safe-mode-loadable layers.
"""

from __future__ import annotations

import logging
from typing import Any

from tlsweep.config import BackboneConfig
from tlsweep.errors import BackboneError
from tlsweep.registry import REGISTRY, BackboneSpec, get_spec, list_backbones

__all__ = [
    "REGISTRY",
    "BackboneSpec",
    "build_base",
    "build_extractor",
    "get_spec",
    "output_shape",
    "list_backbones",
    "preprocess_layer",
]

log = logging.getLogger(__name__)

# Seed for the random initialisation of `weights: none`, so its features are reproducible.
RANDOM_WEIGHTS_SEED = 0


def preprocessing_name(bb: BackboneConfig) -> str:
    """The identity of the backbone's preprocessing (its ``preprocess_input``), for cache keys."""
    return f"keras.applications.{get_spec(bb.name).module}.preprocess_input"


# --- building (imports Keras) ------------------------------------------------------------------
def preprocess_affine(bb: BackboneConfig) -> tuple[Any, Any]:
    """The backbone's ``preprocess_input`` as ``x @ kernel + bias`` on RGB values 0..255."""
    import importlib

    import numpy as np

    module = importlib.import_module(f"keras.applications.{get_spec(bb.name).module}")
    fn = module.preprocess_input

    def f(x: np.ndarray) -> np.ndarray:
        return np.asarray(fn(x.astype("float32").copy()), dtype="float64")

    bias = f(np.zeros((1, 1, 1, 3)))[0, 0, 0]
    kernel = np.stack([f(np.eye(3)[i].reshape(1, 1, 1, 3))[0, 0, 0] - bias for i in range(3)])
    probe = np.random.default_rng(0).uniform(0, 255, size=(2, 4, 4, 3))
    if not np.allclose(probe @ kernel + bias, f(probe), atol=1e-3):
        raise BackboneError(f"{bb.name}: its preprocess_input is not an affine map per pixel")
    return kernel.astype("float32"), bias.astype("float32")


def _constructor(spec: BackboneSpec) -> Any:
    """The class (or function) that builds the backbone: ``keras.applications`` or ours."""
    import keras

    return tiny_convnet if spec.source == "tlsweep" else getattr(keras.applications, spec.name)


def build_base(bb: BackboneConfig) -> Any:
    """The ``keras.applications`` model without its top, loaded with the configured weights."""
    import keras

    spec = get_spec(bb.name)
    cls = _constructor(spec)
    size = bb.input_size or spec.default_size
    weights: str | None = None if bb.weights == "none" else bb.weights
    if weights is None:
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
    kwargs = dict(bb.args)
    try:
        return cls(include_top=False, weights=weights, input_shape=(size, size, 3), **kwargs)
    except TypeError as e:
        raise BackboneError(
            f"backbone {bb.label}: args: {e}; fix this backbone's args: in the sweep file"
        ) from None
    except ValueError as e:
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        fix = "args: and weights:" if weights not in (None, "imagenet") else "args:"
        raise BackboneError(
            f"backbone {bb.label}: Keras refused {bb.name}(args {dict(bb.args)}, weights "
            f"{bb.weights}, input size {size}): {msg}; check this backbone's {fix} in the "
            "sweep file (a weights file must come from the same class and args, no top)"
        ) from None
    except Exception as e:  # download failures come as URLError, HTTPError or plain Exception
        if weights == "imagenet":
            raise BackboneError(
                f"{bb.name}: cannot load ImageNet weights ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); offline, put the file in "
                "$KERAS_HOME/models or set weights: to a weights file path"
            ) from None
        raise BackboneError(
            f"{bb.name}: cannot load weights from {weights} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}); give a .h5/.weights.h5 file "
            f"saved from {bb.name} with include_top=False and the same args"
        ) from None


def output_shape(bb: BackboneConfig) -> tuple[int, ...]:
    """The per-image feature shape of ``bb`` (with its pooling), from the built Keras model.

    Built with ``weights=None`` inside a stateless scope, so no weights are allocated or loaded:
    only the layer graph, whose output shape is the truth a formula can get wrong.
    """
    import keras

    spec = get_spec(bb.name)
    size = bb.input_size or spec.default_size
    with keras.StatelessScope():
        try:
            base = _constructor(spec)(
                include_top=False, weights=None, input_shape=(size, size, 3), **dict(bb.args)
            )
        except (TypeError, ValueError) as e:
            raise BackboneError(f"backbone {bb.label}: Keras refused it: {e}") from None
        _, h, w, c = base.output_shape
    return (int(c),) if bb.pooling in ("avg", "max") else (int(h) * int(w) * int(c),)


def tiny_convnet(
    include_top: bool = False,
    weights: str | None = None,
    input_shape: tuple[int, int, int] = (64, 64, 3),
    width: int = 8,
) -> Any:
    """The ``TinyConvNet`` stand-in: three strided ReLU convolutions (stride 32 in all, like the
    real backbones; ``4 * width`` channels), seeded random weights, built in milliseconds.

    Called like a ``keras.applications`` class, so it goes through the same build, extraction and
    export code; built-in layers only, so an exported model loads in safe mode.
    """
    import keras

    if include_top:
        raise ValueError("TinyConvNet has no top")
    if weights == "imagenet":
        raise ValueError("TinyConvNet has no ImageNet weights")
    inputs = keras.Input(input_shape, name="image")
    x = inputs
    for i, (mult, stride) in enumerate(((1, 4), (2, 4), (4, 2))):
        x = keras.layers.Conv2D(
            mult * width,
            3,
            strides=stride,
            padding="same",
            activation="relu",
            kernel_initializer=keras.initializers.HeNormal(seed=RANDOM_WEIGHTS_SEED + i),
            name=f"conv{i}",
        )(x)
    model = keras.Model(inputs, x, name="TinyConvNet")
    if weights is not None:
        model.load_weights(weights)
    return model


def pooling_layer(pooling: str, name: str = "pool") -> Any:
    import keras

    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)
    return keras.layers.Flatten(name=name)


def preprocess_layer(bb: BackboneConfig, name: str = "preprocess") -> Any:
    """The backbone's preprocessing as a frozen ``Dense(3)`` layer (safe to serialise)."""
    import keras

    kernel, bias = preprocess_affine(bb)
    layer = keras.layers.Dense(3, name=name, trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([kernel, bias])
    return layer


def build_extractor(bb: BackboneConfig) -> Any:
    """A Keras model: resized RGB images (float 0..255) -> pooled features (float32)."""
    import keras

    base = build_base(bb)
    size = bb.input_size or get_spec(bb.name).default_size
    inputs = keras.Input((size, size, 3), name="image")
    x = preprocess_layer(bb)(inputs)
    x = base(x, training=False)
    x = pooling_layer(bb.pooling)(x)
    return keras.Model(inputs, x, name=f"{bb.name}_features")
