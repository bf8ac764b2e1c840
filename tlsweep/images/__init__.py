"""The images: finding them, their labels and splits, content hashes (with the stat
index), decoding and resizing with ``tf.data``.

Never touches backbones, the feature cache or the search.
"""

from __future__ import annotations

from ._decode import (
    CHUNK_BYTES,
    ViewsVariant,
    decoded_chunks,
    image_batches,
    path_seeds,
    read_failure,
    variant_pixels,
    why_skipped,
)
from ._digests import content_digest, features_record, features_stat, file_digest, file_digests
from ._find import IMAGE_EXTENSIONS, SPLITS, ImageSet, find_images
from ._grid import image_grid
from ._survey import Survey, survey

__all__ = [
    "CHUNK_BYTES",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "SPLITS",
    "Survey",
    "ViewsVariant",
    "content_digest",
    "decoded_chunks",
    "features_record",
    "features_stat",
    "file_digest",
    "file_digests",
    "find_images",
    "image_batches",
    "image_grid",
    "path_seeds",
    "read_failure",
    "survey",
    "variant_pixels",
    "why_skipped",
]
