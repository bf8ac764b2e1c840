"""The content-addressed feature cache: entries and their locks, extraction (with
its shards and their assembly), fused entries.

Never touches training, Optuna or MLflow.
"""

from __future__ import annotations

from ._cache import (
    FINETUNE_DIR,
    IMAGES_DIR,
    Extraction,
    FeatureCache,
    expected_keys,
    extract_all,
    plan_extraction,
    study_keys,
)
from ._entries import Entry
from ._fusion import CachedEntry, FusedEntry
from ._timing import extraction_timing

__all__ = [
    "CachedEntry",
    "Entry",
    "Extraction",
    "FINETUNE_DIR",
    "FeatureCache",
    "FusedEntry",
    "IMAGES_DIR",
    "expected_keys",
    "extract_all",
    "extraction_timing",
    "plan_extraction",
    "study_keys",
]
