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

import difflib
import logging
from dataclasses import dataclass, replace
from typing import Any

from tlsweep.config import BackboneConfig
from tlsweep.errors import BackboneError

log = logging.getLogger(__name__)

# Seed for the random initialisation of `weights: none`, so its features are reproducible.
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class BackboneSpec:
    """What tlsweep knows about one ``keras.applications`` class."""

    name: str
    module: str  # keras.applications.<module>.preprocess_input
    default_size: int
    min_size: int
    channels: int  # channels of the last feature map at default constructor arguments
    fixed_size_with_imagenet: bool = False  # NASNet: ImageNet weights only at the default size

    def feature_shape(self, size: int, pooling: str, channels: int | None = None) -> tuple:
        """Feature shape per image for a pooling at an input size (stride-32 feature map)."""
        c = channels or self.channels
        if pooling in ("avg", "max"):
            return (c,)
        side = -(-size // 32)
        return (side * side * c,)


def _specs() -> dict[str, BackboneSpec]:
    rows = [
        # name, module, default size, min size, channels
        ("ConvNeXtTiny", "convnext", 224, 32, 768),
        ("ConvNeXtSmall", "convnext", 224, 32, 768),
        ("ConvNeXtBase", "convnext", 224, 32, 1024),
        ("ConvNeXtLarge", "convnext", 224, 32, 1536),
        ("ConvNeXtXLarge", "convnext", 224, 32, 2048),
        ("DenseNet121", "densenet", 224, 32, 1024),
        ("DenseNet169", "densenet", 224, 32, 1664),
        ("DenseNet201", "densenet", 224, 32, 1920),
        ("EfficientNetB0", "efficientnet", 224, 32, 1280),
        ("EfficientNetB1", "efficientnet", 240, 32, 1280),
        ("EfficientNetB2", "efficientnet", 260, 32, 1408),
        ("EfficientNetB3", "efficientnet", 300, 32, 1536),
        ("EfficientNetB4", "efficientnet", 380, 32, 1792),
        ("EfficientNetB5", "efficientnet", 456, 32, 2048),
        ("EfficientNetB6", "efficientnet", 528, 32, 2304),
        ("EfficientNetB7", "efficientnet", 600, 32, 2560),
        ("EfficientNetV2B0", "efficientnet_v2", 224, 32, 1280),
        ("EfficientNetV2B1", "efficientnet_v2", 240, 32, 1280),
        ("EfficientNetV2B2", "efficientnet_v2", 260, 32, 1408),
        ("EfficientNetV2B3", "efficientnet_v2", 300, 32, 1536),
        ("EfficientNetV2S", "efficientnet_v2", 384, 32, 1280),
        ("EfficientNetV2M", "efficientnet_v2", 480, 32, 1280),
        ("EfficientNetV2L", "efficientnet_v2", 480, 32, 1280),
        ("InceptionResNetV2", "inception_resnet_v2", 299, 75, 1536),
        ("InceptionV3", "inception_v3", 299, 75, 2048),
        ("MobileNet", "mobilenet", 224, 32, 1024),
        ("MobileNetV2", "mobilenet_v2", 224, 32, 1280),
        ("MobileNetV3Small", "mobilenet_v3", 224, 32, 576),
        ("MobileNetV3Large", "mobilenet_v3", 224, 32, 960),
        ("NASNetMobile", "nasnet", 224, 32, 1056),
        ("NASNetLarge", "nasnet", 331, 32, 4032),
        ("ResNet50", "resnet", 224, 32, 2048),
        ("ResNet101", "resnet", 224, 32, 2048),
        ("ResNet152", "resnet", 224, 32, 2048),
        ("ResNet50V2", "resnet_v2", 224, 32, 2048),
        ("ResNet101V2", "resnet_v2", 224, 32, 2048),
        ("ResNet152V2", "resnet_v2", 224, 32, 2048),
        ("VGG16", "vgg16", 224, 32, 512),
        ("VGG19", "vgg19", 224, 32, 512),
        ("Xception", "xception", 299, 71, 2048),
    ]
    return {r[0]: BackboneSpec(*r, fixed_size_with_imagenet=r[1] == "nasnet") for r in rows}


REGISTRY: dict[str, BackboneSpec] = _specs()


def list_backbones() -> list[BackboneSpec]:
    """Every registered backbone, sorted by name (feeds the CLI and parametrised tests)."""
    return [REGISTRY[n] for n in sorted(REGISTRY)]


def get_spec(name: str) -> BackboneSpec:
    """The spec of a backbone by class name; an unknown name lists close matches."""
    if name in REGISTRY:
        return REGISTRY[name]
    lower = {n.lower(): n for n in REGISTRY}
    if name.lower() in lower:
        raise BackboneError(f"unknown backbone '{name}'; did you mean '{lower[name.lower()]}'?")
    close = difflib.get_close_matches(name, list(REGISTRY), n=4, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise BackboneError(
        f"unknown backbone '{name}'; {hint}run 'tlsweep backbones' for the {len(REGISTRY)} known"
    )


def resolve(bb: BackboneConfig, where: str = "backbones") -> BackboneConfig:
    """Check a backbone config against the registry and fill in its input size."""
    try:
        spec = get_spec(bb.name)
    except BackboneError as e:
        raise BackboneError(f"{where}.name: {e}") from None
    size = bb.input_size or spec.default_size
    if size < spec.min_size:
        raise BackboneError(
            f"{where}.input_size: got {size}; {bb.name} needs at least {spec.min_size} px"
        )
    if spec.fixed_size_with_imagenet and bb.weights == "imagenet" and size != spec.default_size:
        raise BackboneError(
            f"{where}.input_size: got {size}; {bb.name} ImageNet weights need "
            f"{spec.default_size} px (or weights: none)"
        )
    return replace(bb, input_size=size)


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


def build_base(bb: BackboneConfig) -> Any:
    """The ``keras.applications`` model without its top, loaded with the configured weights."""
    import keras

    spec = get_spec(bb.name)
    cls = getattr(keras.applications, spec.name)
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
