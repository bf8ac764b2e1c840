"""The MLflow tracking store itself: its URI, how tlsweep talks to it, and how it marks runs.

What every MLflow call of tlsweep shares: the store's URI (:func:`resolve_uri`), MLflow's HTTP
retries bounded (:func:`bound_http_retries`), a quick reachability check of a tracking server
before any work starts (:func:`check_server`), what a failing store raises
(:func:`tracking_errors`) and the short, password-free gist of such an error; the tags that mark
tlsweep's experiments and runs. :func:`find_study_experiment` and :func:`runs_page_url` serve
``tlsweep ui``: they find a study in a store without creating anything. The runs themselves are
written by :class:`tlsweep.tracking.Tracker`.
"""

from __future__ import annotations

import os
import re
import sqlite3
from functools import cache
from typing import Any

from tlsweep.config import (
    CHECK_HTTP_MAX_RETRIES,
    CHECK_HTTP_TIMEOUT,
    DEFAULT_HTTP_MAX_RETRIES,
    DEFAULT_HTTP_TIMEOUT,
    redact_url,
)
from tlsweep.errors import ServiceError, TlsweepError, first_line
from tlsweep.stores import StoreKind, count_rows, prepare

# How tlsweep marks its experiments and runs (a study's parent run, its trials' child runs).
ROLE_TAG = "tlsweep.role"
STUDY_TAG = "tlsweep.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
STAGE_KEY_TAG = "tlsweep.stage_key"  # a stage's run (fine-tuning): what the stage's cache key is
# The experiment tag MLflow 3's UI reads to choose between its GenAI pages and its training-runs
# table, and the value its own "Model training" choice writes (mlflow/server/js: ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


def resolve_uri(tracking_uri: str | None) -> str:
    """The sweep's tracking URI, or MLflow's own default when it sets none."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    return mlflow.get_tracking_uri()


def _local_store_path(tracking_uri: str) -> str | None:
    """The file or folder a local tracking store lives in (SQLite file, file store), else None."""
    if tracking_uri.startswith("sqlite:///"):
        path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        return None if path in ("", ":memory:") else path
    if tracking_uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return url2pathname(urlparse(tracking_uri).path)
    if "://" not in tracking_uri:
        return tracking_uri
    return None


class TrackingStoreUnavailable(TlsweepError):
    """The tracking store cannot be read (a server that is down, a database that refuses)."""


def find_study_experiment(
    tracking_uri: str, study: str
) -> tuple[str | None, str | None, list[str]]:
    """The study's experiment and parent run, without creating anything, and the studies there.

    Returns ``(experiment_id or None, parent run id or None, names of the tlsweep studies in
    the store)``. A local
    store that does not exist yet is not opened (MLflow would create it): ``(None, [])``.
    A tracking server is asked once, without MLflow's minutes of retries.
    """
    local = _local_store_path(tracking_uri)
    if local is not None and not os.path.exists(local):
        return None, None, []
    if tracking_uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException

    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(study)
        experiments = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        found = exp.experiment_id if exp is not None and exp.lifecycle_stage == "active" else None
        parents = (
            client.search_runs(
                [found],
                filter_string=f"tags.`{ROLE_TAG}` = 'study'",
                order_by=["attributes.start_time ASC"],
            )
            if found
            else []
        )
    except MlflowException as e:
        first = first_line(e, None)
        raise TrackingStoreUnavailable(
            f"cannot read the tracking store {redact_url(tracking_uri)}: "
            f"{redact_url(first)[:300]}; check that it is up and reachable, then try again"
        ) from None
    parent = next((r.info.run_id for r in parents if r.data.tags.get(STUDY_TAG) == study), None)
    studies = sorted(e.name for e in experiments if STUDY_TAG in e.tags)
    return found, parent, studies


def runs_page_url(server_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow 3 UI's training-runs table of one experiment, or one run's page, in the
    model-training view (a fresh browser would otherwise show MLflow's GenAI pages)."""
    run = f"/{run_id}" if run_id else ""
    return (
        f"{server_url.rstrip('/')}/#/experiments/{experiment_id}/runs{run}"
        "?workflowType=machine_learning"
    )


def mlflow_value(v: Any) -> str:
    """A param's or tag's value as MLflow stores it: a string, URL passwords hidden, bounded."""
    s = redact_url(str(v))
    return s if len(s) <= 6000 else s[:5997] + "..."


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries and timeouts unless the user set them."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(DEFAULT_HTTP_MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(DEFAULT_HTTP_TIMEOUT))


def store_gist(e: BaseException) -> str:
    """The gist of an MLflow, SQLAlchemy or connection error, short and without a password."""

    e = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error
    msg = str(getattr(e, "message", None) or e)
    # urllib3 buries the reason ("[Errno 111] Connection refused") deep in a long sentence
    reason = re.search(
        r"(\[Errno -?\d+\][^'\")\]]*|Read timed out|timed out|\d{3} [A-Z][^,;]*)", msg
    )
    text = reason.group(1).strip() if reason else (first_line(msg, None) or type(e).__name__)
    return redact_url(text)[:200]  # redacted first: a cut URL loses the '@' that marks a password


def check_server(tracking_uri: str) -> None:
    """Reach an MLflow tracking server (http/https) once, quickly, before any work starts.

    A server that is down, unknown or refuses the login is a :class:`ServiceError` (exit 1)
    within about ``CHECK_HTTP_TIMEOUT * (CHECK_HTTP_MAX_RETRIES + 1)`` seconds, whatever the retry
    settings of the rest of the command.
    """
    from mlflow import MlflowClient
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )
    from mlflow.exceptions import MlflowException

    bound_http_retries()
    saved = {
        v.name: os.environ.get(v.name)
        for v in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)
    }
    os.environ[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name] = str(CHECK_HTTP_MAX_RETRIES)
    os.environ[MLFLOW_HTTP_REQUEST_TIMEOUT.name] = str(CHECK_HTTP_TIMEOUT)
    try:
        MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except (MlflowException, OSError) as e:
        raise ServiceError(
            f"tracking server {redact_url(tracking_uri)}: not reachable or refused the request "
            f"({store_gist(e)}); start the server or fix --tracking-uri / tracking_uri (and "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD), then run the command again"
        ) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What a failing tracking store or server raises: MLflow's own errors, and OSError (the
    HTTP client's errors are OSErrors)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)


# --- the local SQLite store, built and checked by tlsweep.stores -----------------------------
def _build_sqlite_store(url: str) -> None:
    from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # The artifact root MLflow's own store factory would use (it only names the default
    # experiment's artifact folder, ./mlruns/0); nothing is created there.
    root = os.environ.get("_MLFLOW_SERVER_ARTIFACT_ROOT", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH)
    store = SqlAlchemyStore(url, root)  # runs MLflow's migrations, creates experiment 0
    store.engine.dispose()
    SqlAlchemyStore._engine_map.pop(url, None)


@cache
def _schema_head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()  # what MLflow's own _verify_schema compares with


def _rows_with_data(con: sqlite3.Connection, tables: set[str]) -> int:
    """Rows a new store does not have: anything but experiment 0, the default workspace and
    alembic's bookkeeping (a table being rebuilt by a migration counts, as ``_alembic_tmp_X``)."""
    n = 0
    for t in sorted(tables):
        base = t.removeprefix("_alembic_tmp_")
        if base in ("alembic_version", "workspaces"):
            continue
        n += count_rows(con, t, "WHERE experiment_id != 0" if base == "experiments" else "")
    return n


MLFLOW_STORE = StoreKind(
    field="tracking_uri",
    what="MLflow tracking store",
    lib="MLflow",
    holds="runs",
    build=_build_sqlite_store,
    head=_schema_head,
    count_data=_rows_with_data,
    repair=lambda url: f"mlflow db upgrade {url}",
)


def prepare_mlflow(uri: str, create: bool = True) -> None:
    """Make the MLflow tracking store at ``uri`` safe to open, if it is a local SQLite file
    (:func:`tlsweep.stores.prepare`)."""
    prepare(uri, MLFLOW_STORE, create)
