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
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from tlsweep.errors import BackboneError, first_line

from ._registry import REGISTRY, BackboneSpec, get_spec, list_backbones

__all__ = [
    "REGISTRY",
    "BackboneSpec",
    "build_base",
    "build_extractor",
    "get_spec",
    "output_shape",
    "imagenet_weights_file",
    "imagenet_weights_path",
    "list_backbones",
    "preprocess_layer",
]

log = logging.getLogger(__name__)


class BackboneSettings(Protocol):
    """What building a backbone reads of its settings (``tlsweep.config.BackboneConfig`` is
    one): a Protocol, so this module sits below the config and never imports it."""

    @property
    def name(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def input_size(self) -> int | None: ...
    @property
    def pooling(self) -> str: ...
    @property
    def args(self) -> Mapping[str, Any]: ...
    @property
    def label(self) -> str: ...


# Seed for the random initialisation of `weights: none`, so its features are reproducible.
RANDOM_WEIGHTS_SEED = 0


def preprocessing_name(bb: BackboneSettings) -> str:
    """The identity of the backbone's preprocessing (its ``preprocess_input``), for cache keys."""
    return f"keras.applications.{get_spec(bb.name).module}.preprocess_input"


# --- which ImageNet file Keras loads (no TensorFlow) -------------------------------------------
# The file name each keras.applications class passes to keras.utils.get_file(cache_subdir=
# "models") for include_top=False, read from keras/src/applications/*.py (Keras 3.15).
# tests/backbones/test_backbones.py checks every registered class against what Keras really asks
# for.
_NOTOP_FILES = {
    **{
        f"DenseNet{n}": f"densenet{n}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        for n in (121, 169, 201)
    },
    **{
        f"ResNet{n}": f"resnet{n}_weights_tf_dim_ordering_tf_kernels_notop.h5"
        for n in (50, 101, 152)
    },
    **{
        f"ResNet{n}V2": f"resnet{n}v2_weights_tf_dim_ordering_tf_kernels_notop.h5"
        for n in (50, 101, 152)
    },
    "InceptionV3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "InceptionResNetV2": "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "NASNetMobile": "nasnet_mobile_no_top.h5",
    "NASNetLarge": "nasnet_large_no_top.h5",
    "VGG16": "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "VGG19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "Xception": "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def _model_name(name: str) -> str:
    """The default ``name=`` of a ConvNeXt/EfficientNet class (its weights file is named so)."""
    if name.startswith("ConvNeXt"):
        return "convnext_" + name[len("ConvNeXt") :].lower()
    if name.startswith("EfficientNetV2"):
        v = name[len("EfficientNetV2") :].lower()
        return f"efficientnetv2-{v}"
    return name.lower()  # EfficientNetB0 -> efficientnetb0


def imagenet_weights_file(bb: BackboneSettings) -> str:
    """The file name Keras looks for under ``$KERAS_HOME/models`` for ``weights: imagenet``."""
    name, args = bb.name, bb.args
    rows = bb.input_size or get_spec(name).default_size
    if name == "MobileNet":
        alpha = args.get("alpha", 1.0)
        text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0"}.get(alpha, "2_5")
        rows = rows if rows in (128, 160, 192, 224) else 224
        return f"mobilenet_{text}_{rows}_tf_no_top.h5"
    if name == "MobileNetV2":
        rows = rows if rows in (96, 128, 160, 192, 224) else 224
        return (
            f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(args.get('alpha', 1.0))}_"
            f"{rows}_no_top.h5"
        )
    if name.startswith("MobileNetV3"):
        kind = name[len("MobileNetV3") :].lower()
        mini = "_minimalistic" if args.get("minimalistic", False) else ""
        return f"weights_mobilenet_v3_{kind}{mini}_224_{args.get('alpha', 1.0)}_float_no_top_v2.h5"
    if name.startswith(("ConvNeXt", "EfficientNet")):
        return f"{args.get('name', _model_name(name))}_notop.h5"
    return _NOTOP_FILES[name]


def _keras_home() -> str:
    """Keras's cache folder, found as keras.src.backend.config and file_utils.get_file find it
    (KERAS_HOME, else ~/.keras, and /tmp/.keras when that is not writable), without importing
    Keras (which imports TensorFlow)."""
    if "KERAS_HOME" in os.environ:
        home = os.environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    home = os.path.expanduser(home)
    probe = home  # Keras creates KERAS_HOME when it is imported: judge by the nearest parent
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    return home if os.access(probe, os.W_OK) else os.path.join("/tmp", ".keras")


def imagenet_weights_path(bb: BackboneSettings) -> Path:
    """Where Keras keeps (or will download) the ImageNet weights file of ``bb``."""
    return Path(_keras_home()) / "models" / imagenet_weights_file(bb)


def fetch_imagenet_weights(bb: BackboneSettings) -> Path:
    """Make sure the ImageNet weights file of ``bb`` exists: Keras downloads it while it builds
    the model once (imports TensorFlow; only when the file is missing)."""
    path = imagenet_weights_path(bb)
    if not path.is_file():
        build_base(bb)
        if not path.is_file():
            raise BackboneError(
                f"{bb.name}: Keras loaded its ImageNet weights from a file other than {path}; "
                "tlsweep cannot key its features by those bytes (report this as a bug), or set "
                "weights: to the file's path"
            )
    return path


# --- building (imports Keras) ------------------------------------------------------------------
def preprocess_affine(bb: BackboneSettings) -> tuple[Any, Any]:
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


def build_base(bb: BackboneSettings) -> Any:
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
        msg = first_line(e, 300)
        fix = "args: and weights:" if weights not in (None, "imagenet") else "args:"
        raise BackboneError(
            f"backbone {bb.label}: Keras refused {bb.name}(args {dict(bb.args)}, weights "
            f"{bb.weights}, input size {size}): {msg}; check this backbone's {fix} in the "
            "sweep file (a weights file must come from the same class and args, no top)"
        ) from None
    except Exception as e:  # noqa: BLE001 - narrowed here; anything else is re-raised
        # keras.utils.get_file turns every download failure into a plain Exception; reading a
        # weights file fails with OSError (h5py's too) or KeyError (a layer it does not have)
        if not (type(e) is Exception or isinstance(e, (OSError, KeyError))):
            raise
        if weights == "imagenet":
            raise BackboneError(
                f"{bb.name}: cannot load ImageNet weights ({type(e).__name__}: "
                f"{first_line(str(e), 300)}); offline, put the file in "
                "$KERAS_HOME/models or set weights: to a weights file path"
            ) from None
        raise BackboneError(
            f"{bb.name}: cannot load weights from {weights} ({type(e).__name__}: "
            f"{first_line(str(e), 300)}); give a .h5/.weights.h5 file "
            f"saved from {bb.name} with include_top=False and the same args"
        ) from None


def output_shape(bb: BackboneSettings) -> tuple[int, ...]:
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


def preprocess_layer(bb: BackboneSettings, name: str = "preprocess") -> Any:
    """The backbone's preprocessing as a frozen ``Dense(3)`` layer (safe to serialise)."""
    import keras

    kernel, bias = preprocess_affine(bb)
    layer = keras.layers.Dense(3, name=name, trainable=False)
    layer.build((None, None, None, 3))
    layer.set_weights([kernel, bias])
    return layer


def build_extractor(bb: BackboneSettings) -> Any:
    """A Keras model: resized RGB images (float 0..255) -> pooled features (float32)."""
    import keras

    base = build_base(bb)
    size = bb.input_size or get_spec(bb.name).default_size
    inputs = keras.Input((size, size, 3), name="image")
    x = preprocess_layer(bb)(inputs)
    x = base(x, training=False)
    x = pooling_layer(bb.pooling)(x)
    return keras.Model(inputs, x, name=f"{bb.name}_features")
