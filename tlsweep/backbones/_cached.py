"""The ImageNet backbones whose weights are already on this machine, in the Keras cache
(``$KERAS_HOME/models``, as Keras resolves it), for ``tlsweep init``: a sweep on them runs
offline. No TensorFlow: file names only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._build import imagenet_weights_path
from ._registry import list_backbones

# The alphas Keras ships ImageNet weights for, and the input sizes each file is named for.
ALPHAS: dict[str, tuple[float, ...]] = {
    "MobileNet": (0.25, 0.5, 0.75, 1.0),
    "MobileNetV2": (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
}
NAMED_SIZES: dict[str, tuple[int, ...]] = {
    "MobileNet": (128, 160, 192, 224),
    "MobileNetV2": (96, 128, 160, 192, 224),
}


@dataclass(frozen=True)
class _Probe:
    """The settings :func:`imagenet_weights_path` reads (a :class:`BackboneSettings`)."""

    name: str
    input_size: int | None
    args: Mapping[str, Any] = field(default_factory=dict)
    weights: str = "imagenet"
    pooling: str = "avg"

    @property
    def label(self) -> str:
        return self.name


@dataclass(frozen=True)
class CachedWeights:
    """An ImageNet backbone whose ``include_top=False`` weights file Keras already has."""

    name: str
    args: dict[str, Any]
    size: int | None  # the input size the file is named for (None: the backbone's default)
    path: Path

    def loads_by_name(self, input_size: int) -> bool:
        """Whether ``weights: imagenet`` at ``input_size`` makes Keras load this very file
        (otherwise the sweep file must name the file's path)."""
        probe = _Probe(self.name, input_size, self.args)
        return imagenet_weights_path(probe) == self.path


def cached_backbones() -> list[CachedWeights]:
    """Every registered backbone (each alpha and named size of the MobileNets) whose ImageNet
    weights file is in the Keras cache, smallest file first."""
    found: dict[Path, CachedWeights] = {}
    for spec in list_backbones():
        if not spec.has_imagenet or spec.source != "keras.applications":
            continue
        for alpha in ALPHAS.get(spec.name, (None,)):
            args = {} if alpha is None else {"alpha": alpha}
            for size in NAMED_SIZES.get(spec.name, (None,)):
                try:
                    path = imagenet_weights_path(_Probe(spec.name, size, args))
                except KeyError:  # a class tlsweep knows no weights file name for
                    break
                if path.is_file() and path not in found:
                    found[path] = CachedWeights(spec.name, args, size, path)
    return sorted(found.values(), key=lambda c: (c.path.stat().st_size, c.name, str(c.path)))
