"""The data audit: exact duplicates (from the content digests behind the cache key),
near-duplicates across splits (from the cached features) and likely label errors (from heads
trained out of fold on them).

``tlsweep audit`` is wired in :mod:`tlsweep.sweep` (it extracts as ``run`` does and scores labels
with the study's winner's head); MLflow only through :mod:`tlsweep.tracking`.
"""

from __future__ import annotations

from ._dupes import BLOCK_ROWS, NEAR_THRESHOLD, exact_duplicates, near_duplicates, similar_pairs
from ._eval import eval_copies, scored_entries, warn_copies, without
from ._grid import copies_grid, copies_table, log_audit_on_parent, log_on_parent, suspects_grid
from ._labels import FOLDS, default_params, label_issues, out_of_fold_proba
from ._report import AuditReport, audit_entry, copies_of_train, find_copies

__all__ = [
    "AuditReport",
    "BLOCK_ROWS",
    "FOLDS",
    "NEAR_THRESHOLD",
    "audit_entry",
    "copies_grid",
    "copies_of_train",
    "copies_table",
    "default_params",
    "eval_copies",
    "exact_duplicates",
    "find_copies",
    "label_issues",
    "log_audit_on_parent",
    "log_on_parent",
    "near_duplicates",
    "out_of_fold_proba",
    "scored_entries",
    "similar_pairs",
    "suspects_grid",
    "warn_copies",
    "without",
]
