"""workers.recover: trials left RUNNING by dead workers are failed and their parameters retried."""

from __future__ import annotations

import time
import warnings

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from tlsweep.workers import WORKER_ATTR, recover

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
    from tlsweep.workers import worker_id

    study = _study(tmp_path)
    t = study.ask()
    t.set_user_attr(WORKER_ATTR, worker_id())
    time.sleep(1.2)
    assert recover(study, RetryHeartbeatStaleTrialCallback(3), grace_period=1) == []
    assert [tr.state.name for tr in study.trials] == ["RUNNING"]
