"""MLflow, all of it: the only package of tlsweep that imports ``mlflow``.

Its public API is this file (as Optuna's packages are laid out); the machinery lives in private
modules, each readable alone:

* :mod:`tlsweep.tracking._runs`: :class:`Tracker`, one experiment per study, one parent run per
  study, one nested child run per trial, their params, curves and outcomes;
* :mod:`tlsweep.tracking._stages`: the runs of the stages after the study (fine-tuning), found
  again after a kill, their curves and final numbers logged once (mixed into :class:`Tracker`);
* :mod:`tlsweep.tracking._models`: the exported model logged on the parent run, MLflow's
  evaluation of the winner, the model registry and its ``champion`` alias (mixed into
  :class:`Tracker`);
* :mod:`tlsweep.tracking._store`: the tracking store itself: its URI, bounded HTTP retries, the
  quick server check, its errors, the tags that mark tlsweep's runs, finding a study read-only
  (``tlsweep ui``), and the local SQLite store's schema (built and checked by
  :mod:`tlsweep.stores`);
* :mod:`tlsweep.tracking._ui`: ``tlsweep ui``, MLflow's own server started on the store.

Never touches the study's state.
"""

from __future__ import annotations

from ._compare import TRIALS_TABLE, best_first_url, log_trials_table
from ._runs import Tracker, trial_run_name
from ._store import (
    EXPERIMENT_KIND_TAG,
    MLFLOW_STORE,
    MODEL_TRAINING_KIND,
    TrackingStoreUnavailable,
    check_server,
    find_study_experiment,
    prepare_mlflow,
    resolve_uri,
    runs_page_url,
    tracking_errors,
)
from ._ui import ServerError, UiServer, check_port_free

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MLFLOW_STORE",
    "MODEL_TRAINING_KIND",
    "ServerError",
    "TRIALS_TABLE",
    "Tracker",
    "TrackingStoreUnavailable",
    "UiServer",
    "best_first_url",
    "check_port_free",
    "check_server",
    "find_study_experiment",
    "log_trials_table",
    "prepare_mlflow",
    "resolve_uri",
    "runs_page_url",
    "tracking_errors",
    "trial_run_name",
]
