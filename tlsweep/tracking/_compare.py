"""Comparing many trials in the MLflow UI: the runs page sorted best first, and every trial in
one table on the study's parent run.

MLflow 3.17's runs page opens sorted by start time, 100 runs a page; its address takes the
sort (``orderByKey``, ``orderByAsc``), so :func:`best_first_url` puts the best 100 trials on the
first page whatever the study's size. :func:`log_trials_table` writes the study's trials as
one ``mlflow.log_table`` artifact of the parent run (``trials.json``), replaced at each refresh.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ._store import runs_page_url, tracking_errors

log = logging.getLogger(__name__)

TRIALS_TABLE = "trials.json"


def best_first_url(server_url: str, experiment_id: str, metric: str, direction: str) -> str:
    """The experiment's runs page sorted by ``metrics.`<metric>``` in the study's direction:
    the best trial first."""
    key = quote(f"metrics.`{metric}`", safe="")
    asc = "true" if direction == "minimize" else "false"
    return f"{runs_page_url(server_url, experiment_id)}&orderByKey={key}&orderByAsc={asc}"


def log_trials_table(tracker: Any, table: Mapping[str, Sequence[Any]]) -> None:
    """Put ``table`` (column -> values) on the study's parent run as :data:`TRIALS_TABLE`.

    ``MlflowClient.log_table`` appends to an existing table; a refresh replaces it instead,
    written as log_table writes it (pandas' "split" JSON). A failure to log it is a warning:
    the trials themselves are safe in the study.
    """
    if not tracker.parent_run_id or not table:
        return
    import pandas as pd

    client, run_id = tracker.client, tracker.parent_run_id
    frame = pd.DataFrame({k: list(v) for k, v in table.items()})
    try:
        have = {f.path for f in client.list_artifacts(run_id)}
        if TRIALS_TABLE in have:
            text = frame.to_json(orient="split", index=False, date_format="iso")
            client.log_text(run_id, text, TRIALS_TABLE)
        else:
            client.log_table(run_id, data=frame, artifact_file=TRIALS_TABLE)
    except tracking_errors() as e:
        log.warning("could not log the table of trials to the study's run: %s", e)
