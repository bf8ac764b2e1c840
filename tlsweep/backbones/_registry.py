"""The registry of ``keras.applications`` backbones: typed metadata only, no TensorFlow.

Every ``keras.applications`` class is available by its class name, and one stand-in of
tlsweep's own, ``TinyConvNet`` (random weights only; for tests and smoke runs). Each entry
carries the module whose ``preprocess_input`` it uses, its default and minimum input size and
the channels of its last feature map at default arguments, so listing the registry and
validating a sweep file never import TensorFlow. Building a backbone is
:mod:`tlsweep.backbones`' job.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tlsweep.errors import BackboneError


@dataclass(frozen=True)
class BackboneSpec:
    """What tlsweep knows about one ``keras.applications`` class."""

    name: str
    module: str  # keras.applications.<module>.preprocess_input
    default_size: int
    min_size: int
    channels: int  # channels of the last feature map at default constructor arguments
    fixed_size_with_imagenet: bool = False  # NASNet: ImageNet weights only at the default size
    feature_side: int = 0  # side of the last feature map at default_size, from the built model
    source: str = "keras.applications"  # or "tlsweep": built by tlsweep.backbones (TinyConvNet)
    has_imagenet: bool = True  # whether `weights: imagenet` exists for it

    def feature_shape(self, size: int, pooling: str, channels: int | None = None) -> tuple:
        """Feature shape per image for a pooling; flatten only at the default input size.

        The flattened size comes from the built model's output shape at the default size
        (``feature_side``), never from a formula: Inception's valid paddings give 8x8 at 299 px
        where ``ceil(299 / 32)`` says 10. At another size, build the model
        (:func:`tlsweep.backbones._build.output_shape`).
        """
        c = channels or self.channels
        if pooling in ("avg", "max"):
            return (c,)
        if size != self.default_size:
            raise BackboneError(
                f"{self.name}: the flattened feature size at {size} px is known only from the "
                "built model (tlsweep.backbones._build.output_shape)"
            )
        return (self.feature_side * self.feature_side * c,)


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
    specs = {
        r[0]: BackboneSpec(
            *r, fixed_size_with_imagenet=r[1] == "nasnet", feature_side=_FEATURE_SIDE[r[0]]
        )
        for r in rows
    }
    # A stand-in for tests and smoke runs: three strided convolutions with seeded random weights
    # (weights: none), built in milliseconds; see tlsweep.backbones._build.tiny_convnet.
    specs["TinyConvNet"] = BackboneSpec(
        "TinyConvNet",
        "mobilenet_v2",
        64,
        32,
        32,
        feature_side=2,
        source="tlsweep",
        has_imagenet=False,
    )
    return specs


# The side of each backbone's last feature map at its default input size, read from the output
# shape of the built model (keras.applications.<name>(include_top=False, weights=None)), Keras
# 3.15. tests/backbones/test_backbones.py builds every backbone and checks these numbers and the
# channels.
_FEATURE_SIDE = {
    **dict.fromkeys(("ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase", "ConvNeXtLarge"), 7),
    **dict.fromkeys(("ConvNeXtXLarge", "DenseNet121", "DenseNet169", "DenseNet201"), 7),
    **dict.fromkeys(("MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large"), 7),
    **dict.fromkeys(("ResNet50", "ResNet101", "ResNet152", "ResNet50V2"), 7),
    **dict.fromkeys(("ResNet101V2", "ResNet152V2", "VGG16", "VGG19", "NASNetMobile"), 7),
    "EfficientNetB0": 7,
    "EfficientNetB1": 8,
    "EfficientNetB2": 9,
    "EfficientNetB3": 10,
    "EfficientNetB4": 12,
    "EfficientNetB5": 15,
    "EfficientNetB6": 17,
    "EfficientNetB7": 19,
    "EfficientNetV2B0": 7,
    "EfficientNetV2B1": 8,
    "EfficientNetV2B2": 9,
    "EfficientNetV2B3": 10,
    "EfficientNetV2S": 12,
    "EfficientNetV2M": 15,
    "EfficientNetV2L": 15,
    "InceptionResNetV2": 8,  # 299 px, valid paddings: not ceil(299 / 32) = 10
    "InceptionV3": 8,
    "NASNetLarge": 11,
    "Xception": 10,
}


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
