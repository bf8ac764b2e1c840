"""MLflow: one experiment per study, one parent run per study, one nested child run per trial.

Everything goes through ``mlflow.MlflowClient`` with explicit run ids (no fluent global "active
run"), so several workers, retries and resumed processes log under the same parent safely.
A child run is created when its trial starts (parameters first), gets its per-epoch curves and
final metric when the trial ends, and is terminated FINISHED (COMPLETE or PRUNED, in the
``optuna.state`` tag) or FAILED. Runs left RUNNING by a killed process are closed by the next
process from the trial states Optuna recorded (:meth:`Tracker.close_stale_runs`).

What a user sees in the MLflow UI is decided here too: the experiment is tagged as model
training (so MLflow 3's UI opens its runs table, not its GenAI pages), the parent run is named
after the study, and a child run's name says what a user scans for:
``trial 12 · MobileNetV2-alpha0.35-160-avg · 0.9730`` (``pruned`` / ``failed`` instead of the
value). :func:`find_study_experiment` and :func:`runs_page_url` serve ``tlsweep ui``.

This module knows nothing about Optuna's internals: it is handed numbers, states and params.
"""

from __future__ import annotations

import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

from tlsweep.config import (
    CHECK_HTTP_MAX_RETRIES,
    CHECK_HTTP_TIMEOUT,
    DEFAULT_HTTP_MAX_RETRIES,
    DEFAULT_HTTP_TIMEOUT,
)
from tlsweep.errors import ServiceError, TlsweepError
from tlsweep.search import FINISHED
from tlsweep.stores import prepare_mlflow
from tlsweep.urls import redact_url

log = logging.getLogger(__name__)

ROLE_TAG = "tlsweep.role"
STUDY_TAG = "tlsweep.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
# The experiment tag MLflow 3's UI reads to choose between its GenAI pages and its training-runs
# table, and the value its own "Model training" choice writes (mlflow/server/js: ExperimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# What a run's name shows instead of a value, by state.
_STATE_WORDS = {"RUNNING": "running", "PRUNED": "pruned", "FAIL": "failed", "COMPLETE": "complete"}


def trial_run_name(number: int, backbone: str, state: str, value: float | None = None) -> str:
    """``trial 12 · MobileNetV2-alpha0.35-160-avg · 0.9730``; pruned and failed trials say so."""
    if state == "COMPLETE" and value is not None:
        outcome = f"{value:.4f}"
    else:
        outcome = _STATE_WORDS.get(state, state.lower())
    return f"trial {number} · {backbone} · {outcome}"


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
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
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


CHAMPION = "champion"  # the registry alias of the best registered version
SCORE_TAG = "tlsweep.validation_score"  # registered versions: the score that ranks them
METRIC_TAG = "tlsweep.validation_metric"
DIRECTION_TAG = "tlsweep.direction"


def _mlflow_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def bound_http_retries() -> None:
    """Bound MLflow's HTTP retries and timeouts unless the user set them."""
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(DEFAULT_HTTP_MAX_RETRIES))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(DEFAULT_HTTP_TIMEOUT))


def _first_line(e: BaseException) -> str:
    """The gist of an MLflow, SQLAlchemy or connection error, short and without a password."""

    e = getattr(e, "orig", None) or e  # SQLAlchemy wraps the driver's error
    msg = str(getattr(e, "message", None) or e)
    # urllib3 buries the reason ("[Errno 111] Connection refused") deep in a long sentence
    reason = re.search(
        r"(\[Errno -?\d+\][^'\")\]]*|Read timed out|timed out|\d{3} [A-Z][^,;]*)", msg
    )
    lines = [x.strip() for x in msg.strip().splitlines() if x.strip()]
    text = reason.group(1).strip() if reason else (lines[0] if lines else type(e).__name__)
    return redact_url(text[:200])


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
            f"({_first_line(e)}); start the server or fix --tracking-uri / tracking_uri (and "
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


class Tracker:
    """The MLflow side of one study."""

    errors = staticmethod(tracking_errors)  # for callers that must not import MLflow

    def __init__(self, tracking_uri: str | None, study: str, parent_run_id: str | None = None):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException
        from sqlalchemy.exc import SQLAlchemyError

        bound_http_retries()
        self.tracking_uri = resolve_uri(tracking_uri)
        prepare_mlflow(self.tracking_uri)  # a local SQLite store: built atomically, checked
        self.study = study
        try:
            self.client = MlflowClient(tracking_uri=self.tracking_uri)
            self.experiment_id = self._experiment(study)
        except (MlflowException, SQLAlchemyError, OSError) as e:  # e.g. no right to make tables
            raise ServiceError(
                f"tracking store {redact_url(self.tracking_uri)}: cannot open the experiment "
                f"'{study}' ({_first_line(e)}); check the tracking URI and the server, then run "
                "the command again"
            ) from None
        self.parent_run_id = parent_run_id
        self._trials: dict[str, tuple[int, str]] = {}  # run id -> (trial number, backbone)

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND, STUDY_TAG: name}
        for attempt in range(5):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if exp.lifecycle_stage == "deleted":
                    self.client.restore_experiment(exp.experiment_id)
                for k, v in tags.items():  # e.g. an experiment made before tlsweep tagged them
                    if exp.tags.get(k) != v:
                        self.client.set_experiment_tag(exp.experiment_id, k, v)
                return exp.experiment_id
            try:
                return self.client.create_experiment(name, tags=tags)
            except MlflowException:  # another worker created it first
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError(f"cannot create or find the MLflow experiment '{name}'")

    # --- the parent run ------------------------------------------------------------------------
    def attach_parent(
        self,
        known: str | None,
        params: Mapping[str, Any],
        sweep_text: str,
        sweep_name: str,
    ) -> str:
        """Resume the study's parent run (``known``, or found by its tags) or create it."""
        from mlflow.exceptions import MlflowException

        if known:
            try:
                run = self.client.get_run(known)
                if (
                    run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == self.experiment_id
                ):
                    self.parent_run_id = known
                    self.reopen_parent()
                    return known
            except MlflowException:  # a parent deleted, or in another tracking store
                pass
        rid = self.find_parent()
        if rid:
            self.parent_run_id = rid
            self.reopen_parent()
            return rid
        return self.create_parent(params, sweep_text, sweep_name)

    def find_parent(self) -> str | None:
        # The study name is compared here, not in the filter string: MLflow's filter strings have
        # no escape for a quote, and a study may be named "it's". The experiment is the study's.
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = 'study'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
        mine = [r for r in runs if r.data.tags.get(STUDY_TAG) == self.study]
        return mine[0].info.run_id if mine else None

    def create_parent(self, params: Mapping[str, Any], sweep_text: str, sweep_name: str) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.study,
            tags={ROLE_TAG: "study", STUDY_TAG: self.study},
        )
        rid = run.info.run_id
        self._log_params(rid, params)
        self.client.log_text(rid, sweep_text, f"sweep/{sweep_name}")
        self.parent_run_id = rid
        return rid

    def reopen_parent(self) -> None:
        """Mark the parent RUNNING again when a study is resumed."""
        if self.parent_run_id:
            self.client.update_run(self.parent_run_id, status="RUNNING")

    def close_parent(self, finished: bool) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, "FINISHED" if finished else "KILLED")

    def log_best(self, number: int, value: float, metric: str, params: Mapping[str, Any]) -> None:
        if not self.parent_run_id:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(f"best_{metric}", float(value), now, 0)],
            tags=[RunTag("best_trial", str(number))]
            + [RunTag(f"best.{k}", _mlflow_value(v)) for k, v in sorted(params.items())],
        )

    # --- child runs ----------------------------------------------------------------------------
    def start_trial(self, number: int, params: Mapping[str, Any], worker: str) -> str:
        backbone = str(params.get("backbone", "?"))
        run = self.client.create_run(
            self.experiment_id,
            run_name=trial_run_name(number, backbone, "RUNNING"),
            tags={
                "mlflow.parentRunId": self.parent_run_id or "",
                STUDY_TAG: self.study,
                ROLE_TAG: "trial",
                TRIAL_TAG: str(number),
                STATE_TAG: "RUNNING",
                "tlsweep.worker": worker,
            },
        )
        self._log_params(run.info.run_id, params)
        self._trials[run.info.run_id] = (number, backbone)
        return run.info.run_id

    def end_trial(
        self,
        run_id: str,
        state: str,
        history: list[Mapping[str, float]],
        final: Mapping[str, float],
        error: str | None = None,
        value: float | None = None,
    ) -> None:
        """Log the trial's curves and outcome; its name gets ``value`` (or pruned / failed)."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step) for step, h in enumerate(history) for k, v in h.items()
        ]
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        tags = [RunTag(STATE_TAG, state)]
        if error:
            tags.append(RunTag("error", error[:5000]))
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 entries
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])
        self.client.log_batch(run_id, tags=tags)
        number, backbone = self._trials.pop(run_id, None) or self._trial_of(run_id)
        self.client.update_run(run_id, name=trial_run_name(number, backbone, state, value))
        self.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")

    def _trial_of(self, run_id: str) -> tuple[int, str]:
        """(trial number, backbone) of a child run started by another process."""
        data = self.client.get_run(run_id).data
        try:
            number = int(data.tags.get(TRIAL_TAG, "-1"))
        except ValueError:
            number = -1
        return number, data.params.get("backbone", "?")

    def close_stale_runs(self, trial_states: Mapping[int, str], alive: set[int]) -> int:
        """Terminate child runs left RUNNING whose trial is no longer running in this study.

        ``trial_states`` maps trial number -> Optuna state name; ``alive`` holds the numbers of
        trials some live worker is still running. Returns how many runs were closed.
        """
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"attributes.status = 'RUNNING' and tags.`{ROLE_TAG}` = 'trial'",
            max_results=5000,
        )
        closed = 0
        for r in runs:
            if r.data.tags.get(STUDY_TAG) != self.study:  # see find_parent: no quoting in filters
                continue
            try:
                number = int(r.data.tags.get(TRIAL_TAG, "-1"))
            except ValueError:
                number = -1
            if number in alive:
                continue
            state = trial_states.get(number, "FAIL")
            if state == "RUNNING":
                continue
            self.client.set_tag(r.info.run_id, STATE_TAG, state)
            backbone = r.data.params.get("backbone", "?")
            self.client.update_run(r.info.run_id, name=trial_run_name(number, backbone, state))
            self.client.set_terminated(r.info.run_id, "FINISHED" if state in FINISHED else "FAILED")
            closed += 1
        if closed:
            log.info("closed %d MLflow run(s) left RUNNING by a process that died", closed)
        return closed

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _mlflow_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    # --- artifacts on the parent ---------------------------------------------------------------
    def log_resolved(self, text: str, changed: list[str]) -> None:
        """The resolved sweep as ``sweep/resolved.yaml`` (replaced by each run of the study);
        what a resumed run changed goes beside it, one file per run that changed something."""
        if not self.parent_run_id:
            return
        self.client.log_text(self.parent_run_id, text, "sweep/resolved.yaml")
        if changed:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.client.log_text(
                self.parent_run_id, "\n".join(changed) + "\n", f"sweep/changes-{stamp}.txt"
            )

    def log_parent_text(self, text: str, path: str) -> None:
        if self.parent_run_id:
            self.client.log_text(self.parent_run_id, text, path)

    def log_parent_dict(self, d: Any, path: str) -> None:
        if self.parent_run_id:
            self.client.log_dict(self.parent_run_id, d, path)

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        if not self.parent_run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()]
        )

    def set_parent_tag(self, key: str, value: str) -> None:
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, key, value)

    def log_parent_model(self, model: Any, meta: Mapping[str, Any], path: Any) -> str | None:
        """The exported Keras model as an MLflow model on the parent run, with its file.

        Returns the logged model's URI (``models:/m-...``), what :meth:`register` takes.
        """
        import mlflow

        if not self.parent_run_id:
            return None
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.parent_run_id):
            info = mlflow.keras.log_model(
                model,
                name="model",
                pip_requirements=["keras", "tensorflow"],
                metadata={"class_names": meta["class_names"]},
            )
            mlflow.log_dict(dict(meta), "model_metadata.json")
            mlflow.log_artifact(str(path), "export")
        return str(info.model_uri)

    # --- MLflow's own evaluation of the winner ------------------------------------------------
    def log_evaluation(self, proba: Any, labels: Any, class_names: list[str]) -> dict[str, float]:
        """MLflow's default classifier evaluator on the winner's test predictions.

        The parent run gets MLflow's standard metrics (prefixed ``test_eval_``) and artifacts:
        confusion matrix, ROC, precision-recall, calibration (and lift for two classes) plots,
        the per-class table for more classes. The evaluator draws its curves from a model's
        ``predict_proba``; a static dataset gives it only the predicted labels (no curves). So it
        is handed a lookup "model": row ``i`` of the dataset answers with the winner's stored
        probabilities of test image ``i``, computed once by the exported head; nothing is
        re-predicted. SHAP explanations are off (they would explain the lookup, not the head).
        """
        import mlflow
        import numpy as np
        import pandas as pd
        from mlflow.models import Model
        from mlflow.pyfunc import PyFuncModel

        if not self.parent_run_id:
            return {}
        proba = np.asarray(proba, dtype=np.float64)
        proba = proba / proba.sum(axis=1, keepdims=True)  # float32 rows sum to 1 +- 1e-7
        names = np.asarray(class_names, dtype=object)

        class _Predictions:  # what the evaluator reads from a scikit-learn classifier
            def predict(self, x: Any) -> Any:
                return names[proba[np.asarray(x["row"], np.int64)].argmax(axis=1)]

            def predict_proba(self, x: Any) -> Any:
                return proba[np.asarray(x["row"], np.int64)]

            def score(self, x: Any, y: Any, sample_weight: Any = None) -> float:
                return float(np.average(self.predict(x) == np.asarray(y), weights=sample_weight))

        lookup = PyFuncModel(
            model_meta=Model(flavors={"python_function": {"loader_module": "mlflow.sklearn"}}),
            model_impl=_Predictions(),
        )
        df = pd.DataFrame({"row": np.arange(len(proba)), "label": names[np.asarray(labels)]})
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self.parent_run_id), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # schema hints about the integer row column
            result = mlflow.models.evaluate(
                lookup,
                data=df,
                targets="label",
                model_type="classifier",
                evaluators="default",
                evaluator_config={
                    "log_explainer": False,
                    "log_model_explainability": False,
                    "label_list": list(class_names),
                    "metric_prefix": "test_eval_",
                },
            )
        return dict(result.metrics)

    # --- the model registry --------------------------------------------------------------------
    def register(
        self,
        model_uri: str,
        name: str,
        score: float,
        metric: str,
        direction: str,
        tags: Mapping[str, Any] | None = None,
    ) -> tuple[int, bool, float | None]:
        """Register ``model_uri`` as a new version of ``name``; move the ``champion`` alias to it
        when its validation ``score`` beats the score of the version the alias holds.

        The score and its metric are stored as version tags, so later exports compare against
        them; the test score never takes part. A champion scored on another metric is left in
        place (the two numbers are not comparable). Returns (version, promoted, champion's
        score before).
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.tracking_uri)
        version_tags = {
            SCORE_TAG: repr(float(score)),
            METRIC_TAG: metric,
            DIRECTION_TAG: direction,
            STUDY_TAG: self.study,
            **{k: _mlflow_value(v) for k, v in (tags or {}).items()},
        }
        mv = mlflow.register_model(model_uri, name, tags=version_tags)
        version = int(mv.version)
        before: float | None = None
        try:
            champ = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:  # no champion yet
            champ = None
        promote = champ is None
        if champ is not None:
            if champ.tags.get(METRIC_TAG) != metric or SCORE_TAG not in champ.tags:
                log.warning(
                    "%s@%s (version %s) was scored on %s, not %s: the alias stays where it is",
                    name,
                    CHAMPION,
                    champ.version,
                    champ.tags.get(METRIC_TAG, "no recorded metric"),
                    metric,
                )
            else:
                before = float(champ.tags[SCORE_TAG])
                better = score > before if direction == "maximize" else score < before
                promote = better
        if promote:
            self.client.set_registered_model_alias(name, CHAMPION, str(version))
        return version, promote, before

    def log_parent_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.parent_run_id:
            self.client.log_artifact(self.parent_run_id, local_path, artifact_path)

    # --- the fine-tuning stage: a child run of the parent --------------------------------------
    def start_stage(self, name: str, params: Mapping[str, Any], run_id: str | None = None) -> str:
        """A child run of the parent for a stage after the study (``run_id``: resume that one)."""
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # noqa: BLE001 - deleted: start a new one
                log.info("MLflow run %s of %s is gone; starting a new one", run_id, name)
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": self.parent_run_id or "",
                STUDY_TAG: self.study,
                ROLE_TAG: name,
            },
        )
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _mlflow_value(v)) for k, v in tags.items()])

    def end_stage(self, run_id: str, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED (interrupted; a rerun resumes it)."""
        self.client.set_terminated(run_id, status)
