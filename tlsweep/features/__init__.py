"""The content-addressed feature cache: entries and their locks, extraction (with
its shards and their assembly), fused entries.

Never touches training, Optuna or MLflow.
"""

from __future__ import annotations

from ._cache import FINETUNE_DIR, IMAGES_DIR, FeatureCache, expected_keys, extract_all, study_keys
from ._timing import extraction_timing

__all__ = [
    "FINETUNE_DIR",
    "FeatureCache",
    "IMAGES_DIR",
    "expected_keys",
    "extract_all",
    "extraction_timing",
    "study_keys",
]
