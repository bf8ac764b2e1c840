"""Stage runs: a child run of the parent for each stage after the study (fine-tuning).

:class:`TrackerStages` is mixed into :class:`tlsweep.tracking.Tracker`. A stage resumes after a
kill, so everything here is safe to repeat: the stage's run is found again by its key even when
its creator died before saying which run it made, :meth:`~TrackerStages.metric_steps` tells which
epochs the run has already, and ``log_metrics(..., once=True)`` leaves out numbers it already has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from ._store import ROLE_TAG, STAGE_KEY_TAG, STUDY_TAG, mlflow_value

log = logging.getLogger(__name__)


class TrackerStages:
    """The stage side of a :class:`~tlsweep.tracking.Tracker`: it uses the tracker's client,
    experiment, study and parent run."""

    client: Any  # mlflow.MlflowClient
    experiment_id: str
    study: str
    parent_run_id: str | None
    _log_params: Any  # the Tracker's: params in batches MLflow accepts

    def start_stage(
        self, name: str, params: Mapping[str, Any], run_id: str | None = None, key: str = ""
    ) -> str:
        """A child run of the parent for a stage after the study: ``run_id`` if it still exists,
        else this parent's run of the stage with this ``key`` (its creator died before saying
        which run it made), else a new one."""
        from mlflow.exceptions import MlflowException

        for rid in (run_id, self._find_stage(name, key)):
            if not rid:
                continue
            try:
                self.client.update_run(rid, status="RUNNING")
                return rid
            except MlflowException:  # deleted: look further, or start a new one
                log.info("MLflow run %s of %s is gone; starting a new one", rid, name)
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={
                "mlflow.parentRunId": self.parent_run_id or "",
                STUDY_TAG: self.study,
                ROLE_TAG: name,
                STAGE_KEY_TAG: key,
            },
        )
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _find_stage(self, name: str, key: str) -> str | None:
        if not key or not self.parent_run_id:
            return None
        runs = self.client.search_runs(  # ``name`` and ``key`` are tlsweep's own [a-z0-9]
            [self.experiment_id],
            filter_string=f"tags.`{ROLE_TAG}` = '{name}' and tags.`{STAGE_KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time ASC"],
        )
        mine = [  # a FINISHED run is a stage done before: its state was lost; start anew
            r
            for r in runs
            if r.data.tags.get("mlflow.parentRunId") == self.parent_run_id
            and r.info.status != "FINISHED"
        ]
        return mine[0].info.run_id if mine else None

    def log_metrics(
        self, run_id: str, metrics: Mapping[str, float], step: int = 0, *, once: bool = False
    ) -> None:
        """``once``: leave out the keys the run has already (a stage's final numbers, logged
        again by a rerun after a kill that came before the stage recorded itself finished)."""
        from mlflow.entities import Metric

        if once:
            metrics = unlogged(self.client.get_run(run_id).data.metrics, metrics, changed=False)
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
        )

    def metric_steps(self, run_id: str, key: str) -> set[int]:
        """The steps at which ``key`` is on the run already (a resumed stage skips them)."""
        return {m.step for m in self.client.get_metric_history(run_id, key)}

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, mlflow_value(v)) for k, v in tags.items()])

    def end_stage(self, run_id: str, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED (interrupted; a rerun resumes it)."""
        self.client.set_terminated(run_id, status)


def unlogged(
    have: Mapping[str, float], metrics: Mapping[str, float], changed: bool = True
) -> dict[str, float]:
    """The ``metrics`` a run does not have yet: keys it lacks, and (``changed``) keys whose latest
    value on the run differs."""
    return {k: v for k, v in metrics.items() if k not in have or (changed and have[k] != float(v))}
