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
``0.9730 · trial 12 · MobileNetV2-alpha0.35-160-avg`` (``pruned`` / ``failed`` instead of the
value), so a name cut short still shows the value. The store's URI, retries and tags are
:mod:`tlsweep.tracking._store`'s; the exported
model, its evaluation and the registry are :mod:`tlsweep.tracking._models`'s.

This module knows nothing about Optuna's internals: it is handed numbers, states and params.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from tlsweep.config import FINISHED, redact_url
from tlsweep.errors import ServiceError

from ._lineage import dataset_inputs, log_trial_inputs
from ._models import TrackerModels
from ._stages import TrackerStages, unlogged
from ._store import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    ROLE_TAG,
    STATE_TAG,
    STUDY_TAG,
    TRIAL_TAG,
    bound_http_retries,
    mlflow_value,
    prepare_mlflow,
    resolve_uri,
    store_gist,
    tracking_errors,
)

log = logging.getLogger(__name__)
# What a run's name shows instead of a value, by state.
_STATE_WORDS = {"RUNNING": "running", "PRUNED": "pruned", "FAIL": "failed", "COMPLETE": "complete"}


def trial_run_name(number: int, backbone: str, state: str, value: float | None = None) -> str:
    """``0.9730 · trial 12 · MobileNetV2-alpha0.35-160-avg``; pruned and failed trials say so.

    The outcome leads: the UI cuts a long name at about 25 characters, and the value is what a
    user scans the runs for."""
    if state == "COMPLETE" and value is not None:
        outcome = f"{value:.4f}"
    else:
        outcome = _STATE_WORDS.get(state, state.lower())
    return f"{outcome} · trial {number} · {backbone}"


class Tracker(TrackerStages, TrackerModels):
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
                f"'{study}' ({store_gist(e)}); check the tracking URI and the server, then run "
                "the command again"
            ) from None
        self.parent_run_id = parent_run_id
        self._created_parent = False  # this tracker created the parent run (see release_parent)
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
        reopen: bool = True,
    ) -> str:
        """Resume the study's parent run (``known``, or found by its tags) or create it.

        ``reopen=False`` (``best``, ``export``: they only add to the study's run) leaves a found
        parent's state as it is: RUNNING while a ``run`` goes on, FINISHED after it.
        """
        from mlflow.exceptions import MlflowException

        run = None
        if known:
            try:
                run = self.client.get_run(known)
                if not (
                    run.info.lifecycle_stage == "active"
                    and run.info.experiment_id == self.experiment_id
                ):
                    run = None
            except MlflowException:  # a parent deleted, or in another tracking store
                pass
        if run is None:
            rid = self.find_parent()
            run = self.client.get_run(rid) if rid else None
        if run is None:
            return self.create_parent(params, sweep_text, sweep_name)
        self.parent_run_id = run.info.run_id
        if reopen:
            self.reopen_parent()
        if not run.data.params:  # its creator died before it logged them
            self._describe_parent(params, sweep_text, sweep_name)
        return self.parent_run_id

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
        self.parent_run_id = run.info.run_id
        self._created_parent = True
        self._describe_parent(params, sweep_text, sweep_name)
        return self.parent_run_id

    def _describe_parent(self, params: Mapping[str, Any], sweep_text: str, sweep_name: str) -> None:
        """The study's settings as the parent's params, and the sweep file as an artifact."""
        self._log_params(self.parent_run_id, params)
        # the sweep file as written, but with no URL's password (storage, tracking_uri)
        self.client.log_text(self.parent_run_id, redact_url(sweep_text), f"sweep/{sweep_name}")

    def reopen_parent(self) -> None:
        """Mark the parent RUNNING again when a study is resumed."""
        if self.parent_run_id:
            self.client.update_run(self.parent_run_id, status="RUNNING")

    def close_parent(self, finished: bool) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, "FINISHED" if finished else "KILLED")

    def release_parent(self) -> None:
        """The end of a command that only adds to the study's run (``best``, ``export``): a
        parent it created is FINISHED; one it found keeps its state (a ``run`` may own it)."""
        if self._created_parent:
            self.close_parent(True)

    @contextlib.contextmanager
    def parent_state_kept(self) -> Iterator[None]:
        """Log through MLflow's fluent API on the parent run, whose ``start_run(run_id=...)``
        marks it RUNNING and whose end marks it FINISHED: its state (and end time) before is
        put back afterwards, so a command never finishes a parent a ``run`` still works in."""
        if not self.parent_run_id:
            yield
            return
        before = self.client.get_run(self.parent_run_id).info
        try:
            yield
        finally:
            now = self.client.get_run(self.parent_run_id).info
            if before.status == "RUNNING":
                if now.status != "RUNNING":
                    self.client.update_run(self.parent_run_id, status="RUNNING")
            elif (now.status, now.end_time) != (before.status, before.end_time):
                self.client.set_terminated(
                    self.parent_run_id, before.status, end_time=before.end_time
                )

    def log_best(self, number: int, value: float, metric: str, params: Mapping[str, Any]) -> None:
        if not self.parent_run_id:
            return
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        have = self.client.get_run(self.parent_run_id).data.metrics
        best = unlogged(have, {f"best_{metric}": value})  # as log_parent_metrics
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in best.items()],
            tags=[RunTag("best_trial", str(number))]
            + [RunTag(f"best.{k}", mlflow_value(v)) for k, v in sorted(params.items())],
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
        log_trial_inputs(self.client, run.info.run_id, params)
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
        """Log the trial's curves and outcome (if not logged yet: :meth:`log_trial_metrics`),
        then close its run; its name gets ``value`` (or pruned / failed)."""
        from mlflow.entities import RunTag

        self.log_trial_metrics(run_id, history, final)
        tags = [RunTag(STATE_TAG, state)]
        if error:
            tags.append(RunTag("error", redact_url(error)[:5000]))
        self.client.log_batch(run_id, tags=tags)
        number, backbone = self._trials.pop(run_id, None) or self._trial_of(run_id)
        self.client.update_run(run_id, name=trial_run_name(number, backbone, state, value))
        self.client.set_terminated(run_id, "FAILED" if state == "FAIL" else "FINISHED")

    def log_trial_metrics(
        self, run_id: str, history: list[Mapping[str, float]], final: Mapping[str, float]
    ) -> None:
        """A trial's per-epoch curves (step = epoch) and its final numbers (step 0).

        Logged before Optuna is told the outcome: a process killed between the two leaves a
        run that :meth:`close_stale_runs` closes with its curves on it, not an empty run.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, step) for step, h in enumerate(history) for k, v in h.items()
        ]
        metrics += [Metric(k, float(v), now, 0) for k, v in final.items()]
        for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 entries
            self.client.log_batch(run_id, metrics=metrics[i : i + 900])

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

        items = [Param(k, mlflow_value(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    # --- artifacts on the parent ---------------------------------------------------------------
    def log_resolved(self, text: str, changed: list[str]) -> None:
        """The resolved sweep as ``sweep/resolved.yaml`` (replaced by each run of the study);
        what a resumed run changed goes beside it, one file per run that changed something."""
        if not self.parent_run_id:
            return
        self.client.log_text(self.parent_run_id, redact_url(text), "sweep/resolved.yaml")
        if changed:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            self.client.log_text(
                self.parent_run_id,
                redact_url("\n".join(changed) + "\n"),
                f"sweep/changes-{stamp}.txt",
            )

    def log_parent_text(self, text: str, path: str) -> None:
        if self.parent_run_id:
            self.client.log_text(self.parent_run_id, redact_url(text), path)

    def log_parent_dict(self, d: Any, path: str) -> None:
        if self.parent_run_id:
            self.client.log_dict(self.parent_run_id, d, path)

    def log_parent_metrics(self, metrics: Mapping[str, float]) -> None:
        """The study's results on the parent (step 0). A rerun of a finished study scores the
        same winner again: a number equal to the run's latest is not added as a second point;
        a new winner's numbers are."""
        if not self.parent_run_id:
            return
        from mlflow.entities import Metric

        have = self.client.get_run(self.parent_run_id).data.metrics
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.parent_run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in unlogged(have, metrics).items()],
        )

    def set_parent_tag(self, key: str, value: str) -> None:
        if self.parent_run_id:
            self.client.set_tag(self.parent_run_id, key, value)

    def log_parent_table(self, table: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (column -> values) on the parent run, once: MLflow appends to a table logged
        again, and a resumed study (the same data) would list every row twice."""
        if not self.parent_run_id:
            return
        folder = artifact_file.rpartition("/")[0] or None
        if any(
            a.path == artifact_file for a in self.client.list_artifacts(self.parent_run_id, folder)
        ):
            return
        self.client.log_table(self.parent_run_id, dict(table), artifact_file)

    def log_parent_inputs(self, data_dir: str, cache_key: str, sizes: Mapping[str, int]) -> None:
        """The study's data on the parent run, as MLflow datasets (training, validation, and
        test: the winner is scored on it there)."""
        if self.parent_run_id:
            splits = ("train", "validation", "test")
            inputs = dataset_inputs(data_dir, cache_key, sizes, splits)
            if inputs:
                self.client.log_inputs(self.parent_run_id, datasets=inputs)

    def log_parent_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.parent_run_id:
            self.client.log_artifact(self.parent_run_id, local_path, artifact_path)
