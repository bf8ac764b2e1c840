"""The registry of ``keras.applications`` backbones: sizes, preprocessing, building
and the identity of their weights.

Sits below the config: it reads a backbone's settings through the :class:`BackboneSettings`
Protocol. Never touches the images' locations or the cache.
"""

from __future__ import annotations

from ._build import (
    RANDOM_WEIGHTS_SEED,
    build_base,
    build_extractor,
    fetch_imagenet_weights,
    imagenet_weights_path,
    pooling_layer,
    preprocess_layer,
    preprocessing_name,
)
from ._cached import CachedWeights, cached_backbones
from ._registry import get_spec, list_backbones

__all__ = [
    "CachedWeights",
    "RANDOM_WEIGHTS_SEED",
    "build_base",
    "build_extractor",
    "cached_backbones",
    "fetch_imagenet_weights",
    "get_spec",
    "imagenet_weights_path",
    "list_backbones",
    "pooling_layer",
    "preprocess_layer",
    "preprocessing_name",
]
