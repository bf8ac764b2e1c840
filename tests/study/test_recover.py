"""recovery.recover: trials left RUNNING by dead workers are failed and their parameters retried."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import optuna
import pytest
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from tlsweep.study._recovery import WORKER_ATTR, recover

warnings.filterwarnings("ignore")


def _study(tmp_path):
    storage = RDBStorage(
        f"sqlite:///{tmp_path / 'o.db'}",
        heartbeat_interval=1,
        grace_period=60,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(3),
    )
    return optuna.create_study(study_name="s", storage=storage)


def test_untagged_trial_of_a_process_killed_right_after_ask_is_retried(tmp_path):
    # killed between study.ask() and tagging the trial: no worker, no heartbeat
    study = _study(tmp_path)
    t = study.ask()
    t.suggest_float("x", 0, 1)
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=60) == []
    time.sleep(1.2)
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=1) == [0]
    states = [tr.state.name for tr in study.trials]
    assert states == ["FAIL", "WAITING"]
    assert study.trials[1].params == study.trials[0].params


def test_trial_of_a_dead_local_worker_is_retried_at_once(tmp_path):
    import socket

    study = _study(tmp_path)
    t = study.ask()
    t.suggest_float("x", 0, 1)
    t.set_user_attr(WORKER_ATTR, f"{socket.gethostname()}:999999999:1")  # no such pid
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=60) == [0]
    assert [tr.state.name for tr in study.trials] == ["FAIL", "WAITING"]


def test_trial_of_a_live_worker_is_left_alone(tmp_path):
    from tlsweep.study._recovery import worker_id

    study = _study(tmp_path)
    t = study.ask()
    t.set_user_attr(WORKER_ATTR, worker_id())
    time.sleep(1.2)
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=1) == []
    assert [tr.state.name for tr in study.trials] == ["RUNNING"]


def test_untagged_trial_seen_under_the_storage_lock_is_failed_without_comparing_clocks(tmp_path):
    """A worker asks for a trial and tags it under the lock: an untagged trial seen under the
    lock is an orphan at once, however its start time compares with this machine's clock."""
    import threading

    study = _study(tmp_path)
    t = study.ask()
    t.suggest_float("x", 0, 1)
    held = []
    lock = threading.Lock()

    def storage_lock():
        class _Held:
            def __enter__(self):
                lock.acquire()
                held.append(True)

            def __exit__(self, *exc):
                lock.release()

        return _Held()

    assert recover(study, RetryHeartbeatStaleTrialCallback(3), 3600, lock=storage_lock) == [0]
    assert held == [True]
    assert [tr.state.name for tr in study.trials] == ["FAIL", "WAITING"]


def test_orphan_age_is_measured_in_utc_so_a_start_ahead_of_this_clock_is_left_alone(tmp_path):
    """Without the lock the age is UTC now minus the start; a trial started 'in the future' by
    a machine whose clock runs ahead is not failed (it is young), nor does the check crash."""
    import datetime

    from tlsweep.study._recovery import _age_seconds

    now_local = datetime.datetime.now()
    assert abs(_age_seconds(now_local)) < 5
    utc = datetime.datetime.now(datetime.timezone.utc)
    assert abs(_age_seconds(utc - datetime.timedelta(seconds=100)) - 100) < 5
    study = _study(tmp_path)
    study.ask()
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=60) == []


# --- the heartbeat thread ----------------------------------------------------------------------
class _FlakyStorage:
    """record_heartbeat fails ``failures`` times (None: always) with a database error."""

    def __init__(self, failures=None):
        self.failures = failures
        self.calls = 0
        self.recorded = 0

    def record_heartbeat(self, trial_id):
        import sqlalchemy.exc

        self.calls += 1
        if self.failures is None or self.calls <= self.failures:
            raise sqlalchemy.exc.OperationalError("UPDATE", {}, Exception("connection dropped"))
        self.recorded += 1


def test_heartbeat_failure_is_logged_once_retried_and_recovers(caplog):
    import logging

    from tlsweep.study._recovery import Heartbeat

    storage = _FlakyStorage(failures=3)
    with caplog.at_level(logging.INFO, logger="tlsweep.study._recovery"):
        with Heartbeat(storage, 7, interval=0.02, grace_period=5) as hb:
            deadline = time.monotonic() + 5
            while storage.recorded < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            hb.check()  # recovered within the grace period: the trial goes on
    assert storage.recorded >= 2
    warnings_ = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1, [r.getMessage() for r in caplog.records]
    assert "connection dropped" in warnings_[0].getMessage()
    assert any("recorded again" in r.getMessage() for r in caplog.records)


def test_heartbeat_lost_for_the_grace_period_stops_the_trial(caplog):
    import logging

    import pytest

    from tlsweep.study._recovery import Heartbeat, HeartbeatLost

    storage = _FlakyStorage(failures=None)
    with caplog.at_level(logging.INFO, logger="tlsweep.study._recovery"):
        with Heartbeat(storage, 7, interval=0.02, grace_period=0.3) as hb:
            hb.check()  # not yet
            deadline = time.monotonic() + 10
            while hb.lost is None and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(HeartbeatLost, match="grace_period.*connection dropped"):
                hb.check()
    assert storage.calls > 5  # it kept retrying
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1


class _BlankErrorStorage:
    """A storage whose failures carry no text: an OSError('  \n ') or an empty one."""

    def __init__(self, message: str):
        self.message = message
        self.calls = 0

    def record_heartbeat(self, trial_id):
        self.calls += 1
        raise OSError(self.message)


@pytest.mark.parametrize("message", ["", "  \n\t "])
def test_heartbeat_survives_an_error_whose_message_is_blank(caplog, message):
    """The thread logs the failure, keeps retrying and stops the trial after the grace period;
    a blank message once raised IndexError there, which killed the thread (no retry)."""
    import logging

    from tlsweep.study._recovery import Heartbeat, HeartbeatLost

    storage = _BlankErrorStorage(message)
    with caplog.at_level(logging.INFO, logger="tlsweep.study._recovery"):
        with Heartbeat(storage, 7, interval=0.02, grace_period=0.3) as hb:
            deadline = time.monotonic() + 10
            while (hb.lost is None or storage.calls < 5) and time.monotonic() < deadline:
                time.sleep(0.02)
            with pytest.raises(HeartbeatLost, match="grace_period.*first error: OSError$"):
                hb.check()
    assert storage.calls >= 5  # still retrying: the thread did not die on the first failure
    warnings_ = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings_) == 1 and "(OSError)" in warnings_[0], warnings_


def test_a_trial_whose_heartbeat_is_lost_fails_between_epochs(tmp_path):
    """run_trial calls the heartbeat's check after every epoch: the trial stops and is FAIL
    (with the reason), not COMPLETE, so its retried parameters do not run beside it."""
    from conftest import trial_inputs

    from tlsweep.study._objective import run_trial
    from tlsweep.study._recovery import HeartbeatLost

    cfg, features = trial_inputs(tmp_path)
    study = optuna.create_study(direction="maximize")
    epochs = []

    def alive():
        epochs.append(1)
        if len(epochs) == 2:
            raise HeartbeatLost("no heartbeat recorded for 31s")

    result = run_trial(study, study.ask(), cfg, features, None, "w", alive=alive)
    assert result.state == "FAIL" and len(result.history) == 2
    assert result.error == "HeartbeatLost: no heartbeat recorded for 31s"
    assert [t.state.name for t in study.trials] == ["FAIL"]


def test_a_finished_trials_run_is_left_to_its_worker_while_it_may_still_close_it():
    """A worker tells the study a trial's outcome, then closes its MLflow run: in between, the
    run is RUNNING but not stale, and another worker's recovery must not close it as if its
    owner had died (it did, with a "left RUNNING by a process that died" line)."""
    import datetime
    import socket

    from tlsweep.study._recovery import run_may_still_be_closed, worker_id

    def finished(worker: str | None, ended_s_ago: float) -> optuna.trial.FrozenTrial:
        end = datetime.datetime.now() - datetime.timedelta(seconds=ended_s_ago)
        return optuna.trial.FrozenTrial(
            number=0,
            state=optuna.trial.TrialState.COMPLETE,
            value=0.5,
            datetime_start=end - datetime.timedelta(seconds=1),
            datetime_complete=end,  # naive local time, as RDBStorage returns it
            params={},
            distributions={},
            user_attrs={WORKER_ATTR: worker} if worker else {},
            system_attrs={},
            intermediate_values={},
            trial_id=0,
        )

    here = socket.gethostname()
    assert run_may_still_be_closed(finished(worker_id(), 3600), 30)  # this live process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not run_may_still_be_closed(finished(f"{here}:{dead.pid}:0", 0), 30)
    assert run_may_still_be_closed(finished("elsewhere:12:34", 5), 30)  # another host, just now
    assert not run_may_still_be_closed(finished("elsewhere:12:34", 60), 30)  # long ago: stale
    assert not run_may_still_be_closed(finished(None, 0), 30)  # no owner recorded


_KILLED_AFTER_TELL = """
import os, sys
from pathlib import Path
import optuna
sys.path.insert(0, {tests!r})
from conftest import trial_inputs
from tlsweep.study._objective import run_trial
from tlsweep.tracking import Tracker

cfg, features = trial_inputs(Path({tmp!r}))
tracker = Tracker(cfg.tracking_uri, cfg.study)
tracker.create_parent({{"n": 1}}, "study: test\\n", "s.yaml")
tell = optuna.Study.tell

def tell_then_die(self, *a, **k):  # killed between telling Optuna and closing the run
    tell(self, *a, **k)
    os._exit(9)

optuna.Study.tell = tell_then_die
study = optuna.create_study(direction="maximize")
run_trial(study, study.ask(), cfg, features, tracker, "w")
"""


def test_a_trial_killed_after_optuna_heard_its_outcome_keeps_its_curves_on_its_run(tmp_path):
    """Optuna has the trial COMPLETE; the process dies before it closes the MLflow run. The run
    the next process closes carries the trial's curves (it used to be closed with no metrics)."""
    from pathlib import Path

    from tlsweep.tracking import Tracker

    script = _KILLED_AFTER_TELL.format(tests=str(Path(__file__).parents[1]), tmp=str(tmp_path))
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 9, p.stderr[-3000:]
    t = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "test")
    t.parent_run_id = t.find_parent()
    assert t.close_stale_runs({0: "COMPLETE"}, alive=set()) == 1
    (run,) = t.client.search_runs([t.experiment_id], filter_string="tags.`tlsweep.role` = 'trial'")
    assert run.info.status == "FINISHED"
    epochs = [m.step for m in t.client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert epochs == list(range(5)), epochs  # the sweep's 5 epochs, each once
    assert run.data.metrics["epochs_run"] == 5


def test_mlflow_refusing_a_trials_curves_does_not_fail_the_trained_trial(tmp_path):
    """MLflow errors while the curves are logged before Optuna hears the outcome: the trial is
    still COMPLETE (pruned: PRUNED), and the curves are tried again when its run is closed."""
    from conftest import trial_inputs

    from tlsweep.study._objective import run_trial
    from tlsweep.tracking import Tracker

    class Flaky(Tracker):
        refusals = 1

        def log_trial_metrics(self, run_id, history, final):
            if self.refusals:
                self.refusals -= 1
                raise OSError("connection reset by peer")
            super().log_trial_metrics(run_id, history, final)

    cfg, features = trial_inputs(tmp_path)
    tracker = Flaky(cfg.tracking_uri, cfg.study)
    tracker.create_parent({"n": 1}, "study: test\n", "s.yaml")
    study = optuna.create_study(direction="maximize")
    result = run_trial(study, study.ask(), cfg, features, tracker, "w")
    assert result.state == "COMPLETE" and study.trials[0].state.name == "COMPLETE"
    (run,) = tracker.client.search_runs([tracker.experiment_id], "tags.`tlsweep.role` = 'trial'")
    assert run.info.status == "FINISHED" and run.data.metrics["epochs_run"] == 5
    steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert steps == list(range(5))

    class Prunes(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    tracker.refusals = 1
    pruned = optuna.create_study(direction="maximize", pruner=Prunes())
    assert run_trial(pruned, pruned.ask(), cfg, features, tracker, "w").state == "PRUNED"
    assert pruned.trials[0].state.name == "PRUNED"
