"""The sweep file: its schema with every default written once, the head's parameters,
validation of user input, storage and tracking URLs, and the resolved record saved with a study.

Owns: :mod:`._schema` (dataclasses and defaults), :mod:`._params` (the head's parameters,
declared once), :mod:`._sweepfile` (reading and validating the YAML), :mod:`._backbones` (the
``backbones:`` section, checked against the registry), :mod:`._checks` (field checks and their
errors), :mod:`._urls` (storage and tracking URLs), :mod:`._resolved` (the resolved record).

Never touches TensorFlow, Optuna or MLflow; below it are only :mod:`tlsweep.errors` and the
backbone registry's metadata.
"""

from __future__ import annotations

from ._checks import check_can_write
from ._params import HEAD_PARAMETERS, HeadParam, Param, grid_values, largest
from ._resolved import changes, resolved_record, resolved_yaml
from ._schema import (
    BOOTSTRAP_SAMPLES,
    CHECK_HTTP_MAX_RETRIES,
    CHECK_HTTP_TIMEOUT,
    DEFAULT_CACHE_DIR,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HTTP_MAX_RETRIES,
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_LOCK_TIMEOUT,
    DEFAULT_PREDICT_BATCH,
    DEFAULT_SEED,
    DEFAULT_UI_HOST,
    DEFAULT_UI_PORT,
    DEFAULT_UI_START_TIMEOUT,
    DROPOUT_SEED_STRIDE,
    FINETUNE_SHUFFLE_STRIDE,
    FINISHED,
    HYPERBAND_MIN_RESOURCE,
    INIT_SEED_OFFSET,
    MAX_WORKERS,
    MEDIAN_STARTUP_TRIALS,
    MEDIAN_WARMUP_STEPS,
    METRIC_DIRECTIONS,
    MIN_VALIDATION_PER_CLASS,
    REPEAT_SEED_STRIDE,
    VIEW_SEED_OFFSET,
    WORKER_SEED_STRIDE,
    BackboneConfig,
    DataConfig,
    FinetuneConfig,
    SweepConfig,
)
from ._starter import (
    Plan,
    Timing,
    check_output,
    duration,
    plan,
    render,
    trial_budget,
    write_new,
)
from ._sweepfile import load_sweep, model_name
from ._urls import TRACKING_DATABASES, parse_complaint, redact_url

__all__ = [
    "BOOTSTRAP_SAMPLES",
    "BackboneConfig",
    "CHECK_HTTP_MAX_RETRIES",
    "CHECK_HTTP_TIMEOUT",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HTTP_MAX_RETRIES",
    "DEFAULT_HTTP_TIMEOUT",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_PREDICT_BATCH",
    "DEFAULT_SEED",
    "DEFAULT_UI_HOST",
    "DEFAULT_UI_PORT",
    "DEFAULT_UI_START_TIMEOUT",
    "DROPOUT_SEED_STRIDE",
    "DataConfig",
    "FINETUNE_SHUFFLE_STRIDE",
    "FINISHED",
    "FinetuneConfig",
    "HEAD_PARAMETERS",
    "HYPERBAND_MIN_RESOURCE",
    "HeadParam",
    "INIT_SEED_OFFSET",
    "MAX_WORKERS",
    "MEDIAN_STARTUP_TRIALS",
    "MEDIAN_WARMUP_STEPS",
    "METRIC_DIRECTIONS",
    "MIN_VALIDATION_PER_CLASS",
    "Param",
    "Plan",
    "REPEAT_SEED_STRIDE",
    "SweepConfig",
    "TRACKING_DATABASES",
    "Timing",
    "VIEW_SEED_OFFSET",
    "WORKER_SEED_STRIDE",
    "changes",
    "check_can_write",
    "check_output",
    "duration",
    "grid_values",
    "largest",
    "load_sweep",
    "model_name",
    "parse_complaint",
    "plan",
    "redact_url",
    "render",
    "resolved_record",
    "resolved_yaml",
    "trial_budget",
    "write_new",
]
