"""One worker on one study: the loop that asks for trials until ``n_trials`` have finished.

:class:`StudyRunner` opens the storage and the study, recovers the trials of dead workers
(:mod:`tlsweep.study._recovery`), then asks for the next trial under the storage lock
(:func:`tlsweep.study._storage.storage_lock`) only while fewer than ``n_trials`` are finished or
running, so N workers end with exactly ``n_trials`` finished trials. Each trial runs in
:func:`tlsweep.study._objective.run_trial` with its heartbeat; ``search.max_failures`` trials failed
in a row stop the study. What a trial *is* lives in :mod:`tlsweep.study._search` and
:mod:`tlsweep.study._objective`; this module only decides who runs which trial.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tlsweep.config import FINISHED, SweepConfig
from tlsweep.errors import StudyFailing
from tlsweep.interrupts import deferred
from tlsweep.interrupts import requested as stop_requested

from ._objective import FeatureData, TrialResult, TrialTracker, run_trial
from ._recovery import WORKER_ATTR, Heartbeat, recover, run_may_still_be_closed, worker_id
from ._search import best_of, counts, open_study, study_storage, trial_id
from ._storage import open_storage, storage_lock

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)


@dataclass
class TrialOutcome:
    """What the CLI shows for one finished trial."""

    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    seconds: float
    finished: int
    n_trials: int
    best_value: float | None
    best_number: int | None
    error: str | None = None


class StudyRunner:
    """One worker on one study: starts trials until ``n_trials`` have finished."""

    def __init__(
        self,
        cfg: SweepConfig,
        features: dict[str, FeatureData],
        tracker: TrialTracker | None,
        on_trial: Callable[[TrialOutcome], None] | None = None,
        worker_index: int = 0,
    ):
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        self.cfg = cfg
        self.features = features
        self.tracker = tracker
        self.on_trial = on_trial
        self.storage = open_storage(cfg)
        data = {
            label: {"key": f.entry.key, "parts": f.entry.manifest["key_parts"]}
            for label, f in features.items()
        }
        self.study = open_study(cfg, self.storage, seed_offset=worker_index, data=data)
        self.worker = worker_id()
        self.retry = RetryHeartbeatStaleTrialCallback(max_retry=cfg.search.max_retry)

    def finished(self) -> int:
        c = counts(self.study)
        return sum(c[s] for s in FINISHED)

    def recover(self) -> None:
        recover(
            self.study,
            self.retry,
            self.cfg.search.grace_period,
            lock=lambda: storage_lock(self.cfg.storage, self.cfg.study),
        )
        if self.tracker is not None:
            trials = self.study.get_trials(deepcopy=False)
            states = {t.number: t.state.name for t in trials}
            grace = self.cfg.search.grace_period
            alive = {
                t.number
                for t in trials
                if t.state.name == "RUNNING" or run_may_still_be_closed(t, grace)
            }
            self.tracker.close_stale_runs(states, alive)

    def _next_trial(self) -> tuple[optuna.Trial | None, bool]:
        """(trial to run or None, study done?) decided under the storage lock."""
        with storage_lock(self.cfg.storage, self.cfg.study):
            c = counts(self.study)
            done = sum(c[s] for s in FINISHED)
            if done >= self.cfg.search.n_trials:
                return None, True
            if c["WAITING"] == 0 and done + c["RUNNING"] >= self.cfg.search.n_trials:
                return None, False
            trial = self.study.ask()
            trial.set_user_attr(WORKER_ATTR, self.worker)
            if hasattr(self.storage, "record_heartbeat"):
                self.storage.record_heartbeat(trial_id(trial))
            return trial, False

    def run(self, stop: threading.Event | None = None) -> int:
        """Run trials until the study is done, the timeout passes or ``stop`` is set."""
        self.recover()
        deadline = (
            time.monotonic() + self.cfg.search.timeout if self.cfg.search.timeout else math.inf
        )
        ran = 0
        failing: list[tuple[int, str]] = []  # the trials failed in a row: (number, error)
        last_recover = time.monotonic()
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if stop_requested():  # an interrupt that a library turned into an error of its own
                raise KeyboardInterrupt
            # An interrupt between asking for a trial and the objective's handler that fails
            # it would leave it RUNNING: held until the objective releases it (``started``).
            with deferred() as started:
                trial, done = self._next_trial()
                if done:
                    break
                if trial is None:  # others run the last trials: wait, and watch for deaths
                    started()
                    if time.monotonic() - last_recover > 1.0:
                        self.recover()
                        last_recover = time.monotonic()
                    time.sleep(0.5)
                    continue
                result = self._run_trial(trial, started)
            ran += 1
            if result.state != "FAIL":
                failing.clear()
                continue
            failing.append((trial.number, result.error or "no error message"))
            self._stop_if_failing(failing)
        self.recover()
        return ran

    def _stop_if_failing(self, failing: list[tuple[int, str]]) -> None:
        """Log a failed trial (a repeated error once), and stop the study when
        ``search.max_failures`` trials failed in a row: it cannot succeed as it is."""
        number, error = failing[-1]
        first_number, first = failing[0]
        if len(failing) == 1 or error != first:
            log.warning("trial %d failed: %s", number, error)
        else:
            log.debug("trial %d failed the same way", number)
        limit = self.cfg.search.max_failures
        if len(failing) >= limit:
            raise StudyFailing(
                f"study '{self.cfg.study}': {len(failing)} trials in a row failed "
                f"(search.max_failures: {limit}), so the run stops; the first, trial "
                f"{first_number}: {first}; fix the cause and run again (finished trials are kept)"
            )

    def _run_trial(self, trial: optuna.Trial, started: Callable[[], None]) -> TrialResult:
        study, tid = self.study, trial_id(trial)
        s = self.cfg.search
        heartbeat = Heartbeat(self.storage, tid, s.heartbeat_interval, s.grace_period)
        result = run_trial(
            study,
            trial,
            self.cfg,
            self.features,
            self.tracker,
            self.worker,
            keep_alive=heartbeat,
            alive=heartbeat.check,
            requeue=lambda: self.retry(study, study_storage(study).get_trial(tid)),
            started=started,
        )
        if self.on_trial:
            best_value, best_number = best_of(study)
            self.on_trial(
                TrialOutcome(
                    trial.number,
                    result.state,
                    result.value,
                    result.params,
                    result.seconds,
                    self.finished(),
                    self.cfg.search.n_trials,
                    best_value,
                    best_number,
                    result.error,
                )
            )
        return result
