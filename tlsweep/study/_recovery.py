"""Liveness and recovery: which workers are alive, running trials' heartbeats, dead workers' trials.

Crash safety, using Optuna's own machinery:

* every running trial records a heartbeat (``RDBStorage(heartbeat_interval=...)``); a trial
  whose heartbeat went stale is failed by :func:`optuna.storages.fail_stale_trials` and its
  parameters are queued again by :class:`optuna.storages.RetryHeartbeatStaleTrialCallback`;
* a trial whose worker ran on this host and is gone (``kill -9``) is failed and retried at once,
  without waiting for the grace period;
* Ctrl-C and SIGTERM fail the running trial and queue its parameters again
  (:func:`tlsweep.study._objective.run_trial`).

A worker is ``host:pid:start-time`` (:func:`worker_id`), recorded on every trial it asks for, so
a trial whose worker ran on this host and is gone is told from one that still runs.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tlsweep.errors import error_gist

if TYPE_CHECKING:
    import optuna

from ._search import study_storage, trial_id
from ._storage import storage_errors

log = logging.getLogger(__name__)

WORKER_ATTR = "tlsweep.worker"


# --- liveness ----------------------------------------------------------------------------------
def worker_id() -> str:
    """host:pid:start-time: enough to tell whether a worker on this host is still alive."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid())}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def worker_is_dead(worker: str) -> bool:
    """True only when ``worker`` ran on this host and that process is gone."""
    try:
        host, pid_s, start = worker.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _start_time(pid) != start


class HeartbeatLost(Exception):
    """A running trial's heartbeat could not be recorded for longer than the grace period:
    other workers count the trial as dead and retry its parameters, so this run stops."""


class Heartbeat:
    """Records a running trial's heartbeat every ``interval`` seconds in a thread.

    A failure to record it (a dropped database connection, a full disk) is logged once and
    retried every interval; if no heartbeat was recorded for longer than ``grace_period``
    seconds, other workers take the trial as dead and run its parameters again, so
    :meth:`check` (called by the trial after every epoch) raises :class:`HeartbeatLost` and the
    trial fails here instead of running twice.
    """

    def __init__(self, storage: Any, trial_id: int, interval: float, grace_period: float):
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._grace = grace_period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tlsweep-heartbeat")
        self._last_ok = time.monotonic()  # the worker recorded one when it asked for the trial
        self._first_error: str | None = None
        self.lost: str | None = None  # why the trial must stop, once it must

    def _beat(self) -> None:
        try:
            self._storage.record_heartbeat(self._trial_id)
        except storage_errors() as e:
            error = error_gist(e)
            silent = time.monotonic() - self._last_ok
            if self._first_error is None:
                self._first_error = error
                log.warning(
                    "trial heartbeat (storage id %d) could not be recorded (%s); retrying every "
                    "%gs for up to %gs",
                    self._trial_id,
                    error,
                    self._interval,
                    self._grace,
                )
            if silent > self._grace and self.lost is None:
                self.lost = (
                    f"no heartbeat recorded for {silent:.0f}s (search.grace_period: "
                    f"{self._grace:g}), so other workers take this trial as dead; first error: "
                    f"{self._first_error}"
                )
                log.error("stopping the trial: %s", self.lost)
            return
        except BaseException as e:  # not a storage error: a bug; stop the trial and show it
            self.lost = f"the heartbeat thread failed: {type(e).__name__}: {e}"
            raise
        if self._first_error is not None and self.lost is None:
            log.info("trial heartbeat recorded again after %s", self._first_error)
            self._first_error = None
        self._last_ok = time.monotonic()

    def _run(self) -> None:
        while True:
            self._beat()
            if self._stop.wait(self._interval):
                return

    def check(self) -> None:
        """Raise :class:`HeartbeatLost` if the trial must stop (called between epochs)."""
        if self.lost is not None:
            raise HeartbeatLost(self.lost)

    def __enter__(self) -> Heartbeat:
        if hasattr(self._storage, "record_heartbeat"):
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def _age_seconds(start: datetime.datetime) -> float:
    """Seconds since ``start``: aware (JournalStorage) or naive local time (RDBStorage's
    getter turns the stored naive UTC into this machine's local time), compared in UTC."""
    if start.tzinfo is None:
        start = start.astimezone()  # naive means this machine's local time
    return (datetime.datetime.now(datetime.timezone.utc) - start).total_seconds()


def run_may_still_be_closed(trial: optuna.trial.FrozenTrial, grace_period: float) -> bool:
    """Whether the worker of a finished trial may still be closing its MLflow run (it tells
    the study first): yes while that worker lives on this host; for a worker on another host,
    for ``grace_period`` seconds after the trial ended. Such a run is not stale."""
    w = trial.user_attrs.get(WORKER_ATTR) or trial.system_attrs.get(WORKER_ATTR)
    if not w or worker_is_dead(w):
        return False
    if w.rsplit(":", 2)[0] == socket.gethostname():
        return True
    done = trial.datetime_complete
    return done is not None and _age_seconds(done) < grace_period


def recover(
    study: optuna.Study,
    retry: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None,
    grace_period: float = 30.0,
    lock: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> list[int]:
    """Fail the trials of dead workers and queue their parameters again; returns their numbers.

    A worker asks for a trial and tags it with its id under the storage lock, so a RUNNING
    trial without a tag seen while holding that ``lock`` belongs to a process killed in
    between (it has no heartbeat either, so Optuna's stale-trial check would never see it):
    no clock is compared, so clock skew between machines cannot fail a live trial. Without
    ``lock``, an untagged trial counts as orphaned once older than ``grace_period`` (in UTC).
    """
    import optuna
    from optuna.trial import TrialState

    failed = []
    with lock() if lock is not None else contextlib.nullcontext():
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        w = t.user_attrs.get(WORKER_ATTR) or t.system_attrs.get(WORKER_ATTR)
        orphan = not w and (
            lock is not None
            or (t.datetime_start is not None and _age_seconds(t.datetime_start) > grace_period)
        )
        if orphan or (w and worker_is_dead(w)):
            try:
                ok = study_storage(study).set_trial_state_values(trial_id(t), state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                ok = False
            if ok:
                failed.append(t.number)
                if retry is not None:
                    retry(study, study_storage(study).get_trial(trial_id(t)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
    failed += sorted(after - before - set(failed))
    if failed:
        log.info("trial(s) %s were left running by a dead worker: failed and queued again", failed)
    return failed
