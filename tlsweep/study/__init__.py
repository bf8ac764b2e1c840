"""Optuna: the space, sampler and pruner, the objective, the storage, the worker loop,
its launch and the recovery of trials whose process died.

Never touches MLflow.
"""

from __future__ import annotations

from ._launch import die_with_parent, extract_in_workers, run_workers, stop_held, wait_for_go
from ._objective import (
    TrialTracker,
    check_setup,
    describe,
    load_features,
    train_views,
    training_options,
)
from ._runner import StudyRunner
from ._search import (
    FINETUNE_ATTR,
    PARENT_ATTR,
    RESOLVED_ATTR,
    SEED_ATTR,
    StudySummary,
    check_data,
    existing_study,
    open_study,
    suggest,
    summarize,
)
from ._storage import check_database, open_storage, storage_errors
from ._table import trials_table

__all__ = [
    "FINETUNE_ATTR",
    "PARENT_ATTR",
    "RESOLVED_ATTR",
    "SEED_ATTR",
    "StudyRunner",
    "StudySummary",
    "TrialTracker",
    "check_data",
    "check_database",
    "check_setup",
    "describe",
    "die_with_parent",
    "existing_study",
    "extract_in_workers",
    "load_features",
    "open_storage",
    "open_study",
    "run_workers",
    "stop_held",
    "storage_errors",
    "suggest",
    "summarize",
    "train_views",
    "training_options",
    "trials_table",
    "wait_for_go",
]
