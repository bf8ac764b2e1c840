"""The dense head: its compiled training graph, the trainer and the metrics (each metric
once).

Never touches Optuna or MLflow.
"""

from __future__ import annotations

from ._graph import as_tensor, proba_loss_acc
from ._metrics import SCORES, better, bootstrap_intervals, evaluation, objective_value, scores
from ._timing import trial_seconds
from ._train import HeadParams, class_weight_vector, evaluate_head, train_head, train_heads

__all__ = [
    "HeadParams",
    "SCORES",
    "as_tensor",
    "better",
    "bootstrap_intervals",
    "class_weight_vector",
    "evaluate_head",
    "evaluation",
    "objective_value",
    "proba_loss_acc",
    "scores",
    "train_head",
    "train_heads",
    "trial_seconds",
]
